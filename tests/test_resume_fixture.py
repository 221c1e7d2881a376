"""A checkpoint written before the engine became components (tests/data/resume_v1, made by
tests/data/make_resume_fixture.py at the commit its meta.json names) still resumes, and the run ends where the
uninterrupted run of that commit ended."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_train_data
from safetensors.torch import load_file

from mffzoo.cpu import cpu_features
from mffzoo.train import train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import load_checkpoint_file

FIXTURE = Path(__file__).resolve().parent / "data" / "resume_v1"
sys.path.insert(0, str(FIXTURE.parent))
from make_resume_fixture import fixture_recipe  # noqa: E402


def test_checkpoint_of_the_pre_component_engine_resumes_to_the_same_weights(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = json.loads((FIXTURE / "meta.json").read_text())
    data = write_train_data(tmp_path / "data")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE / meta["checkpoint"], run / "checkpoints" / meta["checkpoint"])

    with caplog.at_level("INFO", logger="mffzoo.train"):
        res = train(fixture_recipe(data), output_dir=run)

    assert f"resuming from {run / 'checkpoints' / meta['checkpoint']}" in caplog.text
    assert res.completed and not res.already_finished
    assert res.global_step == meta["final_step"]
    newest = CheckpointManager(run / "checkpoints").list()[0]
    got = load_checkpoint_file(newest)["model"]
    want = load_file(str(FIXTURE / "final_model.safetensors"))
    start = load_checkpoint_file(FIXTURE / meta["checkpoint"])["model"]
    assert got.keys() == want.keys()
    same_machine = meta["cpu"] == cpu_features().describe() and meta["torch"] == torch.__version__
    # On the CPU kind and torch that made the fixture the steps are bit-identical; elsewhere fp32 kernels sum in
    # another order, so allow that noise, far below what steps 9-12 move the weights (checked: not vacuous).
    atol = 0.0 if same_machine else 1e-5
    moved = max((want[k].float() - start[k].float()).abs().max().item() for k in want)
    assert moved > 100 * max(atol, 1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
