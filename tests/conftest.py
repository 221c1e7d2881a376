"""Shared test configuration: the ``openvino`` marker on every test that loads OpenVINO in-process.

Select them with ``-m openvino`` or leave them out with ``-m 'not openvino'``. They once had to run in their own
process: OpenVINO left the main thread's alternate signal stack pointing at unmapped memory, and the next signal
(torch's SIGCHLD handler) crashed the suite or corrupted its heap. :func:`mffzoo.export.openvino.keep_signal_stack`
fixes that; ``test_signals_survive_compiled_models_destroyed_out_of_order`` guards it.
"""

from __future__ import annotations

import pytest

_OPENVINO_FILES = {"test_bench_infer.py", "test_export_openvino.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in _OPENVINO_FILES or "openvino" in item.name:
            item.add_marker(pytest.mark.openvino)
