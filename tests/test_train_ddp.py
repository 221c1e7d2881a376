"""Real multi-process training: ``torchrun --nproc_per_node=2`` with gloo on CPU matches one process with the
same global batch, with DDP and with FSDP2 (the ViT-L switch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny_recipe, write_yaml

from mffzoo.data import write_demo_dataset
from mffzoo.train import train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import load_checkpoint_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    tmp = tmp_path_factory.mktemp("ddp")
    root = write_demo_dataset(tmp / "data", num_classes=4, train_per_class=8, val_per_class=2, image_size=32)
    # One process, no accumulation: the reference for 2 processes x 2 micro-batches of 2 (same global batch 8).
    ref = train(tiny_recipe(root, train={"epochs": 2, "batch_per_device": 8}, publish={"tag": None},
                            log={"vis_images": 0}), output_dir=tmp / "ref")
    assert ref.completed
    ckpts = CheckpointManager(tmp / "ref" / "checkpoints").list()  # steps 8, 6, 4, 2
    return root, [load_checkpoint_file(p)["model"] for p in (ckpts[0], ckpts[-1])]


def _torchrun(root: Path, out: Path, fsdp: bool) -> dict[str, torch.Tensor]:
    recipe = write_yaml(tiny_recipe(root, train={"epochs": 2, "batch_per_device": 2, "fsdp": fsdp},
                                    publish={"tag": None}, log={"vis_images": 0}), out.parent / f"{out.name}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MFFZOO_HOME": str(out.parent / "zoo")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mffzoo", "train", str(recipe), "--output", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 8 = 2 per device x 2 processes x 2 accumulation" in res.stderr
    assert res.stdout.count("done:") == 1  # only rank 0 reports
    state = load_checkpoint_file(CheckpointManager(out / "checkpoints").list()[0])
    assert state["world_size"] == 2 and state["global_step"] == 8 and len(state["rng"]) == 2
    assert (out / "model" / "model.safetensors").is_file()
    return state["model"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(setup: tuple[Path, list[dict[str, torch.Tensor]]], tmp_path: Path,
                                 fsdp: bool) -> None:
    root, (ref, early) = setup
    got = _torchrun(root, tmp_path / "run", fsdp)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=5e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # relative to how far training moved the weights (steps 2 -> 8), the difference is rounding noise
    moved = torch.cat([(ref[k] - early[k]).flatten() for k in ref]).norm()
    diff = torch.cat([(got[k] - ref[k]).flatten() for k in ref]).norm()
    assert diff < 0.01 * moved, (float(diff), float(moved))
