"""Real multi-process training: ``torchrun --nproc_per_node=2`` with gloo on the CPU ends **bit-identical** to one
process with the same per-device batch, with DDP and with FSDP2 (the ViT-L switch), under AdamW and under SGD
(whose update is proportional to the gradient, so a sum instead of a mean across ranks or micro-batches cannot
pass); and SIGTERM to torchrun (loader workers included) checkpoints every rank at the same step, from which the
run resumes to the same final weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_state, checkpoint_steps, run_interrupted, tiny_recipe, write_yaml

from mffzoo.train import train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.train.recipe import load_recipe
from mffzoo.zoo import load_checkpoint_file

pytestmark = pytest.mark.slow

OPTIM = {"adamw": {"opt": "adamw"}, "sgd": {"opt": "sgd", "lr": 0.05}}  # timm sgd: nesterov, momentum 0.9


def _recipe(root: Path, opt: str, **sections: dict[str, Any]) -> dict[str, Any]:
    # batch 8 = 4 per device: one process accumulates 2 micro-batches, two processes take one each. Pinned to
    # the CPU (train.device=cpu in tiny_recipe): on a GPU machine rank 1 would otherwise ask for a second GPU.
    base = {"train": {"epochs": 2}, "optim": OPTIM[opt], "publish": {"tag": None}, "log": {"vis_images": 0}}
    return tiny_recipe(root, base, **sections)


@pytest.fixture(scope="module")
def root(data_root: Path) -> Path:
    return data_root


@pytest.fixture(scope="module")
def one_process(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The final weights of one process, per optimizer, computed on first use."""
    cache: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def get(opt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if opt not in cache:
            out = tmp_path_factory.mktemp(f"ref-{opt}") / "run"
            assert train(_recipe(root, opt), output_dir=out).completed
            ckpts = CheckpointManager(out / "checkpoints").list()  # steps 8, 6, 4, 2
            cache[opt] = (load_checkpoint_file(ckpts[0])["model"], load_checkpoint_file(ckpts[-1])["model"])
        return cache[opt]

    return get


def _env(out: Path, signal_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MFFZOO_HOME": str(out.parent / "zoo"), "PYTHONUNBUFFERED": "1"}
    env.pop("MFFZOO_TEST_SIGNAL_AT_STEP", None)
    if signal_at:
        env["MFFZOO_TEST_SIGNAL_AT_STEP"] = signal_at
    return env


def _torchrun(recipe: Path, out: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mffzoo", "train", str(recipe), "--output", str(out)]


def _final(out: Path) -> dict[str, Any]:
    state = load_checkpoint_file(CheckpointManager(out / "checkpoints").list()[0])
    assert state["world_size"] == 2 and state["global_step"] == 8 and len(state["rng"]) == 2
    assert (out / "model" / "model.safetensors").is_file()
    return state["model"]


@pytest.mark.parametrize("fsdp, opt", [(False, "adamw"), (True, "adamw"), (False, "sgd"), (True, "sgd")],
                         ids=["ddp-adamw", "fsdp-adamw", "ddp-sgd", "fsdp-sgd"])
def test_two_processes_match_one_bit_for_bit(root: Path, one_process: Any, tmp_path: Path, fsdp: bool,
                                             opt: str) -> None:
    ref, early = one_process(opt)
    out = tmp_path / "run"
    recipe = write_yaml(_recipe(root, opt, train={"fsdp": fsdp}), tmp_path / "tiny.yaml")
    res = run_interrupted(_torchrun(recipe, out), _env(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 8 = 4 per device x 2 processes x 1 accumulation" in res.stderr
    assert res.stdout.count("done:") == 1  # only rank 0 reports
    got = _final(out)
    assert_same_state(got, ref)  # max abs 0.0
    # and training moved the weights (steps 2 -> 8), so equality is not the trivial kind
    moved = [k for k in ref if not torch.equal(ref[k], early[k])]
    assert len(moved) > 0.8 * len(ref), sorted(set(ref) - set(moved))


def test_sigterm_to_torchrun_with_loader_workers_checkpoints_and_resumes_exactly(root: Path, one_process: Any,
                                                                                 tmp_path: Path) -> None:
    """SIGTERM to torchrun, which forwards it to each rank's process group (loader workers included): the
    workers ignore it, the ranks agree on the stop one step later (rank 0 asked after step 5: all save at 6),
    exit within torchrun's grace period (no SIGKILL), and rerunning the command ends bit-identical."""
    ref, _ = one_process("adamw")
    out = tmp_path / "run"
    recipe = write_yaml(_recipe(root, "adamw", data={"num_workers": 1}, checkpoint={"every_steps": 100}),
                        tmp_path / "tiny.yaml")
    res = run_interrupted(_torchrun(recipe, out), _env(out, "5:TERM:parent"))
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]  # torchrun reports the signal it received
    assert "SIGTERM received: checkpoint" in log and "saved at step 6" in log, log[-3000:]
    assert "DataLoader worker" not in log and "forcefully exiting via SIGKILL" not in log, log[-3000:]
    assert "preempted by SIGTERM at step 6/8" in log
    assert checkpoint_steps(out) == [6, 4]
    state = load_checkpoint_file(CheckpointManager(out / "checkpoints").list()[0])
    assert state["global_step"] == 6 and state["world_size"] == 2

    res = run_interrupted(_torchrun(recipe, out), _env(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint-00000006.pth" in res.stderr
    assert_same_state(_final(out), ref)



@pytest.mark.parametrize("nproc", [2, 4])
def test_a_one_process_recipe_runs_unchanged_under_torchrun(root: Path, tmp_path: Path, nproc: int) -> None:
    """As the README documents for the demo (batch 64 = 64 per device): each process takes its share."""
    out = tmp_path / "run"
    recipe = write_yaml(_recipe(root, "adamw", train={"epochs": 1, "batch_per_device": 8}), tmp_path / "one.yaml")
    res = run_interrupted(_torchrun(recipe, out, nproc), _env(out))
    assert res.returncode == 0, res.stderr[-3000:]
    share = 8 // nproc
    assert f"batch 8 = {share} per device x {nproc} processes x 1 accumulation" in res.stderr, res.stderr[-3000:]
    assert load_recipe(out / "recipe.yaml").train.batch_per_device == share  # the resolved recipe says so
    assert load_checkpoint_file(CheckpointManager(out / "checkpoints").list()[0])["world_size"] == nproc


def test_a_bad_recipe_under_torchrun_is_one_line_once_before_torchruns_report(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = write_yaml(_recipe(root, "adamw", train={"batch_per_device": 8}), tmp_path / "three.yaml")
    res = run_interrupted(_torchrun(recipe, out, 3), _env(out))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if "error: " in line]
    assert errors == ["error: train.batch_size=8 is not divisible by train.batch_per_device=8 x 3 processes = 24; "
                      "use a number of processes that divides 8 (the effective batch stays 8)"], res.stderr[-3000:]
    report = res.stderr.find("Traceback")
    assert report == -1 or res.stderr.index(errors[0]) < report  # ours first, then torchrun's own report
    assert not (out / "checkpoints").exists()
