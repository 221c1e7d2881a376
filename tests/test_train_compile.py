"""``train.compile: auto|true|false``: the decision policy, the recipe field, a probe that leaves the run
unchanged, and a compiled CPU run whose checkpoints have clean keys and whose SIGKILL resume is bit-identical."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_same_state,
    checkpoint_steps,
    cli_error,
    final_model_state,
    run_interrupted,
    subprocess_recipe,
    tiny_recipe,
    train_cmd,
    train_env,
    write_yaml,
)

from mffzoo.data import write_demo_dataset
from mffzoo.errors import ConfigError
from mffzoo.train import train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.train.compile import (
    DEFAULT_CPU_COMPILE_S,
    DEFAULT_CPU_GAIN,
    CompileCache,
    CompileDecision,
    CompileEstimate,
    decide_compile,
)
from mffzoo.train.recipe import load_recipe
from mffzoo.zoo import load_checkpoint_file

DEFAULT = CompileEstimate.default("bf16")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "tiny", num_classes=4, train_per_class=8,
                              val_per_class=2, image_size=32)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never the user's measurements


# --------------------------------------------------------------------------------------------- the policy
def test_explicit_modes_and_cuda_need_no_measurement() -> None:
    assert decide_compile(True, "cpu", remaining_steps=1, eager_step_s=None, estimate=DEFAULT) == \
        CompileDecision(True, "train.compile=true")
    assert decide_compile(False, "cuda", remaining_steps=10**6, eager_step_s=9.0, estimate=DEFAULT) == \
        CompileDecision(False, "train.compile=false")
    assert decide_compile("auto", "cuda", remaining_steps=1, eager_step_s=None, estimate=DEFAULT) == \
        CompileDecision(True, "auto: on cuda")
    assert not decide_compile("auto", "cpu", remaining_steps=100, eager_step_s=None, estimate=DEFAULT).enabled


def test_auto_on_cpu_compiles_when_the_saving_beats_the_compile_time() -> None:
    assert (DEFAULT_CPU_COMPILE_S, DEFAULT_CPU_GAIN["bf16"]) == (90.0, 0.10)
    # fp32 on a CPU: compiling measured no gain (0.99x), so without a measurement auto never compiles it
    assert not decide_compile("auto", "cpu", remaining_steps=10**6, eager_step_s=1.0,
                              estimate=CompileEstimate.default("fp32")).enabled
    short = decide_compile("auto", "cpu", remaining_steps=40, eager_step_s=0.8, estimate=DEFAULT)
    assert not short.enabled
    assert str(short) == ("off (auto: 40 steps x 0.8 s x 10% = 3.2 s < ~90 s compile on cpu, default estimate)")
    long = decide_compile("auto", "cpu", remaining_steps=2000, eager_step_s=0.8, estimate=DEFAULT)
    assert long.enabled and "= 160 s > ~90 s compile" in long.reason
    # a measured estimate replaces the defaults: cheap compilation, large gain
    measured = CompileEstimate(compile_s=20.0, gain=0.5, measured=True)
    on = decide_compile("auto", "cpu", remaining_steps=100, eager_step_s=0.8, estimate=measured)
    assert on.enabled and on.reason.endswith("= 40 s > ~20 s compile on cpu, measured")
    # a measurement that says compiling is slower never compiles
    slower = CompileEstimate(compile_s=1.0, gain=-0.05, measured=True)
    assert not decide_compile("auto", "cpu", remaining_steps=10**7, eager_step_s=1.0, estimate=slower).enabled


def test_decision_survives_a_checkpoint_and_the_cache_reads_back_measurements(tmp_path: Path) -> None:
    d = CompileDecision(False, "auto: 1 steps x 0.1 s x 10% = 0.01 s < ~90 s compile on cpu, default estimate")
    assert CompileDecision.from_state(d.state()) == d
    assert CompileDecision.from_state(None) is None and CompileDecision.from_state({"enabled": "yes"}) is None
    key = CompileCache.key_for(torch.nn.Linear(4, 2), (3, 32, 32), 4, None, torch.device("cpu"))
    assert key["precision"] == "fp32" and key["device"] == "cpu" and key["torch"] == torch.__version__
    cache = CompileCache(key, root=tmp_path)
    assert cache.estimate() == CompileEstimate.default("fp32")  # nothing measured yet
    cache.record(compile_s=30.0, eager_step_s=0.2, compiled_step_s=0.16)
    est = cache.estimate()
    assert est.measured and est.compile_s == 30.0 and est.gain == pytest.approx(0.2)  # 20% of a step saved
    other = CompileCache.key_for(torch.nn.Linear(4, 3), (3, 32, 32), 4, None, torch.device("cpu"))  # another model
    assert CompileCache(other, root=tmp_path).estimate() == CompileEstimate.default("fp32")


def test_a_bf16_run_is_keyed_bf16_and_gets_the_bf16_default(tmp_path: Path) -> None:
    """Defect: the cache key spelled the precision ``bfloat16`` and the defaults ``bf16``, so an unmeasured bf16
    CPU run expected a 0% gain and ``auto`` never compiled it. One spelling, as recipes write it."""
    key = CompileCache.key_for(torch.nn.Linear(4, 2), (3, 32, 32), 4, torch.bfloat16, torch.device("cpu"))
    assert key["precision"] == "bf16"
    est = CompileCache(key, root=tmp_path).estimate()
    assert est == CompileEstimate.default("bf16") and est.gain == DEFAULT_CPU_GAIN["bf16"] > 0
    on = decide_compile("auto", "cpu", remaining_steps=100_000, eager_step_s=0.5, estimate=est)
    assert on.enabled, on.reason


# --------------------------------------------------------------------------------------------- the recipe field
def test_recipe_field_takes_auto_true_false_and_nothing_else(data_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert load_recipe(tiny_recipe(data_root)).train.compile == "auto"  # the default
    for value in ("auto", True, False):
        assert load_recipe(tiny_recipe(data_root, train={"compile": value})).train.compile == value
    assert load_recipe(tiny_recipe(data_root), ["train.compile=true"]).train.compile is True
    for bad in ("sometimes", 1):
        with pytest.raises(ConfigError, match="train.compile"):
            load_recipe(tiny_recipe(data_root, train={"compile": bad}))
    recipe = write_yaml(tiny_recipe(data_root), tmp_path / "tiny.yaml")
    err = cli_error(["train", str(recipe), "--set", "train.compile=sometimes", "--output", str(tmp_path / "r")],
                    capsys)
    assert "train.compile" in err and "sometimes" in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------- runs
def test_auto_on_a_tiny_cpu_run_stays_eager_says_why_and_the_probe_changes_nothing(
        data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # drop path draws from the global RNG in every forward, so a probe outside a forked RNG would show
    small = {"log": {"vis_images": 0}, "publish": {"tag": None}, "train": {"epochs": 1},
             "model": {"drop_path_rate": 0.1}}
    with caplog.at_level("INFO", logger="mffzoo.train"):
        auto = train(tiny_recipe(data_root, **small), output_dir=tmp_path / "auto")
    header = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training tiny"))
    assert "compile: off (auto: 4 steps x " in header and "< ~90 s compile on cpu, default estimate)" in header
    # the probe ran two eager steps before training; a run without it (compile=false) ends bit-identical
    eager = train(tiny_recipe(data_root, **{**small, "train": {"epochs": 1, "compile": False}}),
                  output_dir=tmp_path / "eager")
    assert auto.completed and eager.completed
    assert_same_state(final_model_state(auto.run_dir), final_model_state(eager.run_dir))
    state = load_checkpoint_file(CheckpointManager(auto.run_dir / "checkpoints").list()[0])
    assert state["compile"]["enabled"] is False and state["compile"]["reason"].startswith("auto: 4 steps")


@pytest.mark.slow
def test_compiled_cpu_run_has_clean_keys_records_its_timings_and_resumes_bit_identically(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One uninterrupted compiled run (in process), then the same run SIGKILLed after step 7 and resumed with
    ``train.compile=auto``: the resumed run keeps the checkpoint's decision (compiled) and ends bit-identical."""
    sections: dict[str, Any] = {"train": {"compile": True}, "checkpoint": {"every_steps": 3, "keep_last": 3}}
    xdg = tmp_path / "xdg"
    with caplog.at_level("INFO", logger="mffzoo.train"):
        ref = train(tiny_recipe(data_root, log={"vis_images": 0}, publish={"tag": None}, **sections),
                    output_dir=tmp_path / "ref")
    assert ref.completed
    header = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training tiny"))
    assert "compile: on (train.compile=true)" in header
    ref_state = load_checkpoint_file(CheckpointManager(ref.run_dir / "checkpoints").list()[0])
    assert ref_state["compile"] == {"enabled": True, "reason": "train.compile=true"}
    assert not [k for k in ref_state["model"] if "_orig_mod" in k or k.startswith("module.")]
    from safetensors.torch import load_file

    encoder = load_file(ref.run_dir / "model" / "model.safetensors")
    assert encoder and not [k for k in encoder if "_orig_mod" in k]
    recorded = [json.loads(p.read_text()) for p in (xdg / "mffzoo" / "compile").glob("*.json")]
    assert len(recorded) == 1 and recorded[0]["compile_s"] >= 0 and recorded[0]["compiled_micro_step_s"] > 0

    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", **sections)
    run = tmp_path / "killed"
    env = {**train_env(tmp_path / "zoo", "7:KILL"), "XDG_CACHE_HOME": str(xdg)}
    killed = run_interrupted(train_cmd(recipe, run), env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint_steps(run) == [6, 4, 3]
    resumed = run_interrupted(train_cmd(recipe, run) + ["--set", "train.compile=auto"],
                              {**train_env(tmp_path / "zoo"), "XDG_CACHE_HOME": str(xdg)}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "compile: on (kept from the checkpoint: train.compile=true)" in resumed.stderr
    assert_same_state(final_model_state(run), ref_state["model"])


@pytest.mark.slow
def test_compiled_ddp_matches_one_compiled_process_and_fsdp_stays_close(data_root: Path, tmp_path: Path) -> None:
    """torchrun, 2 processes, ``train.compile=true``: DDP (the wrapper compiled) ends bit-identical to one compiled
    process with the same per-device batch; FSDP2 (compiled after sharding) partitions the graph differently, so
    it is close, not bitwise. Neither writes compile prefixes into its checkpoint."""
    from test_train_ddp import _env as ddp_env
    from test_train_ddp import _final, _recipe, _torchrun

    ref = train(_recipe(data_root, "adamw", train={"compile": True}, log={"vis_images": 0}),
                output_dir=tmp_path / "one")
    want = final_model_state(ref.run_dir)
    for fsdp in (False, True):
        out = tmp_path / f"fsdp{int(fsdp)}"
        recipe = write_yaml(_recipe(data_root, "adamw", train={"compile": True, "fsdp": fsdp}, log={"vis_images": 0}),
                            tmp_path / f"fsdp{int(fsdp)}.yaml")
        res = run_interrupted(_torchrun(recipe, out), {**ddp_env(out), "XDG_CACHE_HOME": str(tmp_path / "xdg")},
                              timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "compile: on (train.compile=true)" in res.stderr
        got = _final(out)
        assert not [k for k in got if "_orig_mod" in k or k.startswith("module.")]
        assert_same_state(got, want, atol=1e-3 if fsdp else 0.0)
