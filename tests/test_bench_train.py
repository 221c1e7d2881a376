"""``mffzoo bench train``: well-formed rows for both implementations, ratios from the measured numbers, a
like-for-like peer (same parameter count) under the same precision, and ``--recipe`` (compile time apart from the
step time). Tiny models only; nothing here asserts on speed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, TINY_DECODER, cli_error

from mffzoo.bench import train as bt
from mffzoo.cli.main import main
from mffzoo.errors import ConfigError

pytest.importorskip("transformers")

# The shared tiny model as recipe overrides (fusion of blocks 0 and 3 so the MFF path has a projection).
SETS = [f"{k}={v}" for k, v in {**TINY, **TINY_DECODER}.items()] + ["fusion_layers=[0,3]"]
FAST = dict(batch_size=2, steps=2, warmup=1, overrides=SETS)
DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


@pytest.fixture
def tiny_recipe(tmp_path):
    """recipes/demo.yaml with the shared tiny model and a 2-image micro-batch; compiles (train.compile=true)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "_base_": str(DEMO), "name": "tinybench",
        "model": {**TINY, **TINY_DECODER, "fusion_layers": [0, 3]},
        "train": {"batch_size": 64, "batch_per_device": 2, "compile": True},
    }))
    return path


def _peer_for_recipe_precision(precision: str) -> str:
    amp = bt.resolve_precision(precision, torch.device("cpu"))[0]
    return {None: "hf", torch.bfloat16: "hf-bf16", torch.float16: "hf-fp16"}[amp]


def test_config_mapping_gives_the_same_parameter_count():
    hf, _, recipe = bt.build_model("hf", "s", SETS)
    mae, _, _ = bt.build_model("mffzoo-mae", "s", SETS)
    mff, _, mff_recipe = bt.build_model("mffzoo", "s", SETS)
    cfg, m = hf.config, recipe.model
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size, cfg.patch_size) == (
        m.embed_dim, m.depth, m.num_heads, m.img_size, m.patch_size)
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads) == (
        m.decoder_dim, m.decoder_depth, m.decoder_heads)
    assert cfg.norm_pix_loss and cfg.mask_ratio == 0.75 and mff_recipe.model.fusion_layers == [0, 3]
    hf_all, hf_train = bt.count_params(hf)
    mae_all, mae_train = bt.count_params(mae)
    mff_all, mff_train = bt.count_params(mff)
    assert mae_train == hf_train  # same network, parameter for parameter
    assert mae_all == hf_all + 1  # + MAE mode's frozen single fusion weight
    c = TINY["embed_dim"]
    assert mff_train == hf_train + (c * c + c) + 2  # MFF adds one Linear(C, C) and two fusion weights


def _check_row(r: bt.TrainBenchRow, impl: str, steps: int, repeats: int = 1) -> None:
    assert r.impl == impl and r.label == bt.IMPLS[impl] and r.batch == 2
    assert len(r.speed.step_times_s) == steps * repeats and all(t > 0 for t in r.speed.step_times_s)
    if repeats == 1:
        assert r.speed.step_s == pytest.approx(statistics.median(r.speed.step_times_s))
    assert r.speed.img_s == pytest.approx(2 / r.speed.step_s)
    assert r.params > 0 and r.trainable_params > 0


@pytest.mark.slow  # four fresh processes (speed, then memory per implementation)
def test_isolated_rows_for_both_implementations_and_ratio_from_measurements():
    rows = bt.bench_train(["s"], impls=["mffzoo"], peers=["hf"], device="cpu", **FAST).rows
    assert [r.impl for r in rows] == ["hf", "mffzoo"]
    hf, ours = rows
    for r in rows:
        _check_row(r, r.impl, steps=2)
        assert r.model == "ViT (dim 64, depth 4, 4 heads, patch 8, 32 px; shrunk from ViT-S/16)"
        assert r.overrides == SETS
        assert r.memory.peak_mem_mib > 0 and "fresh process" in r.memory.mem_kind  # VmHWM delta, one process each
        assert r.speed.flops_per_step is None and r.speed.mfu is None  # CPU: no FLOP count, no MFU
    assert hf.precision == "fp32" and hf.attention.startswith("transformers")
    assert ours.precision in ("bf16", "fp32")  # the engine's resolution of the recipe's bf16
    assert hf.ratios.ratio == 1.0 and hf.ratios.ratio_best == 1.0 and hf.ratios.ratio_fastest == 1.0
    assert ours.ratios.ratio_fastest == pytest.approx(ours.speed.img_s / hf.speed.img_s)
    if ours.precision == "fp32":  # hf is the peer of the same precision
        assert ours.ratios.ratio == pytest.approx(ours.speed.img_s / hf.speed.img_s)
        assert ours.ratios.ratio_best == pytest.approx(ours.speed.img_s_best / hf.speed.img_s_best)
    assert ours.speed.img_s_best == pytest.approx(2 / min(ours.speed.step_times_s))


def test_in_process_repeats_keep_every_run():
    rows = bt.bench_train(["s"], impls=["mffzoo-mae", "mffzoo-sdpa"], peers=["hf-bf16"], repeats=2,
                          isolate=False, device="cpu", **FAST).rows
    assert [r.impl for r in rows] == ["hf-bf16", "mffzoo-mae", "mffzoo-sdpa"]
    for r in rows:
        _check_row(r, r.impl, steps=2, repeats=2)
        s = r.speed
        assert len(s.img_s_runs) == 2 and s.img_s == pytest.approx(statistics.median(s.img_s_runs))
        assert r.memory.peak_mem_mib is None  # not isolated: a peak would mix implementations, so none is claimed
        assert r.ratios.fastest_peer == "hf-bf16" and len(r.ratios.ratio_fastest_runs) == 2
    peer, ours, sdpa = rows
    assert peer.precision == "bf16" and peer.optimizer == "torch AdamW"
    # the ratio is against the peer of the row's own precision: None when that one was not measured
    assert ours.peer == _peer_for_recipe_precision("bf16")
    assert (ours.ratios.ratio is None) == (ours.peer != "hf-bf16")
    # mffzoo rows are configured by the engine's own functions: fused AdamW, and train.attention's choice
    assert ours.optimizer == sdpa.optimizer == "timm adamw fused"
    # bf16 on a CPU: measured, either kernel; fp32: the rule
    assert ours.attention in (("timm math", "timm sdpa") if ours.precision == "bf16" else ("timm sdpa",))
    assert sdpa.attention == "timm sdpa"


def test_default_peer_runs_under_the_precision_of_the_mffzoo_rows():
    """No --peers: exactly the peer row of the precision the engine resolves (hf where bf16 falls back to fp32)."""
    rows = bt.bench_train(["s"], impls=["mffzoo"], isolate=False, device="cpu", **FAST).rows
    peer, ours = rows
    assert peer.impl == _peer_for_recipe_precision("bf16") == ours.peer
    assert peer.precision == ours.precision
    assert ours.ratios.ratio == pytest.approx(ours.speed.img_s / peer.speed.img_s) == ours.ratios.ratio_fastest


def test_repeated_ratio_is_the_median_of_paired_per_run_ratios():
    rows = bt.bench_train(["s"], impls=["mffzoo-mae"], peers=["hf"], repeats=3, isolate=False, device="cpu",
                          **FAST).rows
    hf, ours = rows
    assert len(ours.speed.img_s_runs) == 3 and hf.ratios.ratio_fastest_runs == [1.0, 1.0, 1.0]
    assert ours.ratios.ratio_fastest_runs == pytest.approx(
        [a / b for a, b in zip(ours.speed.img_s_runs, hf.speed.img_s_runs)])
    assert ours.ratios.ratio_fastest == pytest.approx(statistics.median(ours.ratios.ratio_fastest_runs))
    assert ours.speed.img_s_best == pytest.approx(2 / min(ours.speed.step_times_s))


def test_ratios_same_precision_peer_fastest_peer_and_eager_twin():
    def row(model, impl, precision, runs):
        return bt.TrainBenchRow(model=model, impl=impl, precision=precision,
                                speed=bt.Speed(img_s=statistics.median(runs), img_s_runs=runs))

    rows = bt.add_ratios([
        row("A", "hf", "fp32", [2.0, 1.0, 2.0]), row("A", "hf-bf16", "bf16", [4.0, 2.0, 3.0]),
        row("A", "mffzoo", "bf16", [6.0, 4.0, 3.0]), row("A", "mffzoo-compile", "bf16", [12.0, 4.0, 6.0]),
        row("B", "mffzoo", "fp32", [1.0]), row("B", "hf", "fp32", [4.0]),
        row("C", "mffzoo", "fp32", [1.0]),
    ])
    a_hf, a_bf16, a_ours, a_comp, b_ours, b_hf, c_ours = rows
    # same precision: paired per run, then the median
    assert a_ours.ratios.ratio_runs == [1.5, 2.0, 1.0] and a_ours.ratios.ratio == 1.5
    assert a_hf.ratios.ratio == 1.0 and a_bf16.ratios.ratio == 1.0
    # the fastest peer row of A is hf-bf16 (median 3.0 img/s vs 2.0)
    assert {r.ratios.fastest_peer for r in rows[:4]} == {"hf-bf16"}
    assert a_hf.ratios.ratio_fastest == 0.5 and a_comp.ratios.ratio_fastest == 2.0
    assert a_comp.ratios.ratio_eager == 2.0 and a_ours.ratios.ratio_eager is None
    assert b_ours.ratios.ratio == b_ours.ratios.ratio_fastest == 0.25 and b_ours.ratios.fastest_peer == "hf"
    assert c_ours.ratios.ratio is None and c_ours.ratios.fastest_peer is None  # no peer measured for C
    lines = bt.summary_lines(rows)
    assert lines[0] == "A: fastest peer hf-bf16 (bf16, 3.00 img/s); vs it: mffzoo 1.50x, mffzoo-compile 2.00x"
    assert lines[1].startswith("B: fastest peer hf (fp32") and len(lines) == 2


def test_gpu_peaks_per_product_and_precision():
    """H100 NVL and PCIe are not the SXM part; a fp32 row is divided by the fp32 peak, not the bf16 one."""
    assert bt.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert bt.gpu_peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert bt.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert bt.gpu_peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert bt.gpu_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert bt.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert bt.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert bt.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert bt.gpu_peak_tflops("Some Future GPU", "bf16") is None


def test_gpu_batches_are_gpu_sized():
    assert [bt.default_batch(s, "cpu") for s in "sbl"] == [16, 8, 4]
    assert [bt.default_batch(s, "cuda") for s in "sbl"] == [256, 128, 64]


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=["x"]), "unknown model size 'x'"),
    (dict(impls=["tf"]), "unknown implementation 'tf'"),
    (dict(impls=["hf"]), "peers go in --peers"),
    (dict(peers=["tf"]), "unknown peer 'tf'"),
    (dict(recipe="no/such.yaml"), "recipe 'no/such.yaml' does not exist"),
    (dict(recipe=str(DEMO), models=["s"]), "exclude each other"),
    (dict(recipe=str(DEMO), overrides=["train.compil=true"]), "compile"),  # did-you-mean from the recipe schema
    (dict(impls=["mffzoo-compile"], warmup=0), "needs warm-up steps"),
    (dict(impls=[], peers=["auto"]), "nothing to measure"),
    (dict(models=[]), "nothing to measure"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(batch_size=0), "batch size must be >= 1"),
    (dict(overrides=["dept=4"]), "depth"),  # did-you-mean from the recipe schema
])
def test_bad_input_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bt.bench_train(**{"models": None if "recipe" in kwargs else ["s"], **kwargs})


@pytest.mark.parametrize("args, match", [
    (["--models", "s,q"], "unknown model size 'q'"),
    (["--recipe", "no/such.yaml"], "recipe 'no/such.yaml' does not exist"),
    (["--recipe", str(DEMO), "--set", "train.bogus=1"], "train.bogus"),
    (["--recipe", str(DEMO), "--impls", "mffzoo,fast"], "unknown implementation 'fast'"),
    (["--peers", "auto,torch"], "unknown peer 'torch'"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, args, match):
    assert match in cli_error(["bench", "train", *args], capsys)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_recipe_benches_its_own_settings_against_the_peer_of_its_precision(tiny_recipe, precision):
    """--recipe: the recipe's model and micro-batch; its precision picks the peer (fp16 runs on any CPU, so both
    branches are exercised here); train.compile=false: one eager mffzoo row and no compile field."""
    rows = bt.bench_train(recipe=tiny_recipe, overrides=[f"train.precision={precision}", "train.compile=false"],
                          steps=1, warmup=1, isolate=False).rows
    peer, ours = rows
    assert peer.impl == {"fp32": "hf", "fp16": "hf-fp16"}[precision] == ours.peer
    assert peer.precision == ours.precision == precision and ours.impl == "mffzoo"
    # the model's own numbers, not "ViT-S/16": the recipe shrinks the registered ViT-S
    assert ours.batch == 2
    assert ours.model == "ViT (dim 64, depth 4, 4 heads, patch 8, 32 px; shrunk from ViT-S/16) (tinybench recipe)"
    assert ours.recipe == str(tiny_recipe.resolve()) and ours.speed.compile_s is None and not ours.compiled
    hf, _, recipe = bt.build_model("hf", recipe=bt.load_recipe(tiny_recipe))
    assert recipe.model.fusion_layers == [0, 3] and ours.trainable_params == bt.count_params(hf)[1] + 64 * 65 + 2


@pytest.mark.slow  # the one test that really compiles (tens of seconds on 2 shared cores)
def test_recipe_that_compiles_reports_compile_time_apart_with_its_eager_twin(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "rows.json"
    main(["bench", "train", "--recipe", str(tiny_recipe), "--steps", "1", "--warmup", "1", "--no-memory",
          "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [_peer_for_recipe_precision("bf16"), "mffzoo-compile", "mffzoo"]
    comp, eager = rows["mffzoo-compile"], rows["mffzoo"]
    assert comp["compiled"] and not eager["compiled"]
    # compile time = the warm-up step beyond the eager twin's step, apart from the timed (steady) steps
    (first,) = comp["warmup_times_s"]
    assert comp["compile_s"] == pytest.approx(max(0.0, first - eager["step_s"])) and comp["compile_s"] > 0
    assert len(comp["step_times_s"]) == 1 and eager["compile_s"] is None
    assert comp["ratio_eager"] == pytest.approx(comp["img_s"] / eager["img_s"])
    printed = capsys.readouterr().out
    assert "ratio vs eager" in printed and "compile (s)" in printed and "fastest peer" in printed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flops_and_mfu():
    rows = bt.bench_train(["s"], impls=["mffzoo", "mffzoo-compile"], peers=["auto", "hf"], device="cuda",
                          **FAST).rows
    for r in rows:
        assert r.speed.flops_per_step > 0 and r.speed.tflops > 0 and r.memory.peak_mem_mib > 0
        if r.speed.peak_tflops:
            assert r.speed.mfu == pytest.approx(r.speed.tflops / r.speed.peak_tflops)
