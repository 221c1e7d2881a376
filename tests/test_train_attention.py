"""``train.attention: auto|sdpa|math``: a kernel switch only; ``auto`` measures on a CPU under bf16 (no rule holds
across AMX, AVX512-BF16 and AVX2 CPUs), says why, and a resumed run keeps its checkpoint's kernel."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_steps, run_interrupted, subprocess_recipe, train_cmd, train_env

from mffzoo.cpu import cpu_features
from mffzoo.models import create_pretrain_model
from mffzoo.train.attention import AttentionChoice, choose_attention, time_attention_kernels
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import load_checkpoint_file

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_pretrain_model("mff_vit_small", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                 fusion_layers=[0, 1], decoder_dim=32, decoder_depth=1, decoder_heads=4)


def _forward(model: torch.nn.Module, dtype: torch.dtype | None = torch.bfloat16):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def forward() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)

    return forward


def _fused(model: torch.nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def test_rules_and_explicit_modes_switch_every_attention_module() -> None:
    model = _model()
    assert len(_fused(model)) == 3  # two encoder blocks + one decoder block
    assert choose_attention(model, "math", CPU, torch.bfloat16) == AttentionChoice("math", "train.attention=math")
    assert _fused(model) == [False] * 3
    assert choose_attention(model, "auto", CPU, None) == AttentionChoice("sdpa", "auto: fused SDPA in fp32 on cpu")
    assert _fused(model) == [True] * 3
    assert choose_attention(model, "auto", CUDA, torch.bfloat16).kernel == "sdpa"
    assert choose_attention(model, "math", CUDA, None).kernel == "math"
    # no way to measure: the rule measured so far (math where bf16 is native), and it says it did not measure
    rule = choose_attention(model, "auto", CPU, torch.bfloat16)
    assert rule.kernel == ("math" if cpu_features().native_bf16 else "sdpa") and "not measured" in rule.reason
    assert choose_attention(torch.nn.Linear(2, 2), "auto", CPU, torch.bfloat16).kernel == "n/a"


def test_auto_under_bf16_on_a_cpu_measures_and_takes_the_faster_kernel_leaving_the_run_untouched() -> None:
    model = _model()
    rng = torch.get_rng_state()
    timings = time_attention_kernels(model, _forward(model), CPU, torch.bfloat16)
    assert set(timings) == {"sdpa", "math"} and all(0 < t < 10 for t in timings.values())
    choice = choose_attention(model, "auto", CPU, torch.bfloat16, _forward(model))
    found = re.search(r"measured on this cpu under bf16, fwd\+bwd of the run's attention calls: "
                      r"(math|sdpa) ([\d.e+-]+) ms vs (math|sdpa) ([\d.e+-]+) ms", choice.reason)
    assert found, choice.reason
    assert found[1] == choice.kernel != found[3] and float(found[2]) <= float(found[4])  # the faster one
    assert _fused(model) == [choice.kernel == "sdpa"] * 3
    assert all(p.grad is None for p in model.parameters())  # the probe took input gradients only
    assert torch.equal(torch.get_rng_state(), rng)
    assert AttentionChoice.from_state(choice.state()) == choice


def test_both_kernels_compute_the_same_loss() -> None:
    model = _model()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    losses = {}
    for mode in ("sdpa", "math"):
        choose_attention(model, mode, CPU, None)
        losses[mode] = model(x, noise=noise).loss
    torch.testing.assert_close(losses["sdpa"], losses["math"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_resumed_auto_run_keeps_the_checkpoints_kernel(data_root: Path, tmp_path: Path) -> None:
    """Killed after step 5 with train.attention=math, resumed under auto: it keeps math (a re-measurement could
    pick the other kernel and the resumed run would no longer compute what the interrupted one would have)."""
    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", train={"attention": "math"},
                                checkpoint={"every_steps": 2, "keep_last": 2})
    run = tmp_path / "run"
    killed = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo", "5:KILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = load_checkpoint_file(CheckpointManager(run / "checkpoints").list()[0])
    assert state["attention"] == {"kernel": "math", "reason": "train.attention=math"}
    assert checkpoint_steps(run) == [4, 2]
    resumed = run_interrupted(train_cmd(recipe, run) + ["--set", "train.attention=auto"], train_env(tmp_path / "zoo"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "math attention (kept from the checkpoint: train.attention=math)" in resumed.stderr
