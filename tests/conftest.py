"""Fixtures several test modules share (module-scoped: each module gets its own copy to change), and the
OpenVINO split.

Tests that load OpenVINO run in their own pytest process (`python -m pytest -q -m openvino`, see .ci/run).

With OpenVINO's runtime loaded into the long-lived pytest process, the rest of the suite (fork-based DataLoader
workers, ONNX Runtime, training) left the interpreter's heap corrupted: a reproducible segfault in a later,
unrelated test (2026-12-02, AMD EPYC; gdb: pymalloc freeing a corrupted list). Each half of the suite passed on
its own. The root cause is not found yet; until it is, the default run deselects these tests (pyproject addopts)
and CI runs them in a second process.
"""

from __future__ import annotations

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
