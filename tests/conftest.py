"""Suite-wide test ordering.

Tests that load OpenVINO's runtime into the pytest process run last. With its runtime loaded, the fork-based
DataLoader workers that later tests start in the same process left the interpreter's heap corrupted: a
reproducible segfault in a later, unrelated test (2026-12-02, AMD EPYC; gdb: pymalloc free of a corrupted list).
Each half of the suite passed alone; only the order OpenVINO-then-fork crashed. Serving code never forks after
loading OpenVINO, so this is a property of one long test process, not of mffzoo.
"""

from __future__ import annotations

import pytest

_OPENVINO_FILES = {"test_bench_infer.py", "test_export_openvino.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # stable sort: the order inside each group is unchanged
    items.sort(key=lambda item: item.path.name in _OPENVINO_FILES or "openvino" in item.name)
