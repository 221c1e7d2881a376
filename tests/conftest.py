"""Fixtures several test modules share (module-scoped: each module gets its own copy to change), and the
``openvino`` marker on every test that loads OpenVINO in-process.

Select them with ``-m openvino`` or leave them out with ``-m 'not openvino'``. They once had to run in their own
process: OpenVINO left the main thread's alternate signal stack pointing at unmapped memory, and the next signal
(torch's SIGCHLD handler) crashed the suite or corrupted its heap. :func:`mffzoo.export.openvino.keep_signal_stack`
fixes that; ``test_signals_survive_compiled_models_destroyed_out_of_order`` guards it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY, write_train_data

from mffzoo.data import write_demo_dataset
from mffzoo.zoo import write_model_folder

_OPENVINO_FILES = {"test_bench_infer.py", "test_export_openvino.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in _OPENVINO_FILES or "openvino" in item.name:
            item.add_marker(pytest.mark.openvino)


@pytest.fixture
def drop_stale_cli_handler() -> None:
    """An in-process `main()` leaves a root handler on the stderr that capsys has since closed; drop it (modules
    that call `main()` use it with ``pytestmark = pytest.mark.usefixtures("drop_stale_cli_handler")``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and getattr(h.stream, "closed", False):
            root.removeHandler(h)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training data for the engine tests (4 classes x 8 images: 4 steps of 8 per epoch)."""
    return write_train_data(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Evaluation and analysis data: 4 classes, 10 train / 5 val images each, 32 px."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", num_classes=4, train_per_class=10,
                              val_per_class=5, image_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model folder (config.json + model.safetensors + mffzoo.json) of a tiny random ViT (seed 0); modules
    that need another one define their own ``tiny``."""
    torch.manual_seed(0)
    m = timm.create_model("mff_vit_small", pretrained=False, num_classes=0, **TINY)
    return write_model_folder(tmp_path_factory.mktemp("zoo") / "mff_vit_small_patch16_224.tiny",
                              "mff_vit_small_patch16_224", m, model_args=TINY, meta={"note": "test"})
