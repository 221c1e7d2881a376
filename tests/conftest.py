"""Tests that load OpenVINO run in their own pytest process (`python -m pytest -q -m openvino`, see .ci/run).

With OpenVINO's runtime loaded into the long-lived pytest process, the rest of the suite (fork-based DataLoader
workers, ONNX Runtime, training) left the interpreter's heap corrupted: a reproducible segfault in a later,
unrelated test (2026-12-02, AMD EPYC; gdb: pymalloc freeing a corrupted list). Each half of the suite passed on
its own. The root cause is not found yet; until it is, the default run deselects these tests (pyproject addopts)
and CI runs them in a second process.
"""

from __future__ import annotations

import pytest

_OPENVINO_FILES = {"test_bench_infer.py", "test_export_openvino.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in _OPENVINO_FILES or "openvino" in item.name:
            item.add_marker(pytest.mark.openvino)
