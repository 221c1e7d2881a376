"""``mffzoo bench train``: well-formed rows for both implementations, ratios from the measured numbers, and a
like-for-like peer (same parameter count). Tiny models only; nothing here asserts on speed."""

from __future__ import annotations

import statistics

import pytest
import torch
from helpers import TINY, TINY_DECODER

from mffzoo.cli.main import main
from mffzoo.errors import ConfigError
from mffzoo.throughput import train as bt

pytest.importorskip("transformers")

# The shared tiny model as recipe overrides (fusion of blocks 0 and 3 so the MFF path has a projection).
SETS = [f"{k}={v}" for k, v in {**TINY, **TINY_DECODER}.items()] + ["fusion_layers=[0,3]"]
FAST = dict(batch_size=2, steps=2, warmup=1, overrides=SETS)


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


def _check_row(r: dict, impl: str, steps: int, repeats: int = 1) -> None:
    assert r["impl"] == impl and r["label"] == bt.IMPLS[impl] and r["batch"] == 2
    assert len(r["step_times_s"]) == steps * repeats and all(t > 0 for t in r["step_times_s"])
    if repeats == 1:
        assert r["step_s"] == pytest.approx(statistics.median(r["step_times_s"]))
    assert r["img_s"] == pytest.approx(2 / r["step_s"])
    assert r["params"] > 0 and r["trainable_params"] > 0


@pytest.mark.slow  # four fresh processes (speed, then memory per implementation)
def test_isolated_rows_for_both_implementations_and_ratio_from_measurements():
    rows = bt.bench_train(["s"], impls=["hf", "mffzoo"], device="cpu", **FAST)
    assert [r["impl"] for r in rows] == ["hf", "mffzoo"]
    hf, ours = rows
    for r in rows:
        _check_row(r, r["impl"], steps=2)
        assert r["model"] == "ViT-S/16 (custom)" and r["overrides"] == SETS
        assert r["peak_mem_mib"] > 0 and "fresh process" in r["mem_kind"]  # VmHWM delta, one process each
        assert r["flops_per_step"] is None and r["mfu"] is None  # CPU: no FLOP count, no MFU
    assert hf["precision"] == "fp32" and hf["attention"].startswith("transformers")
    assert ours["precision"] in ("bf16", "fp32")  # the engine's resolution of the recipe's bf16
    assert hf["ratio"] == 1.0 and hf["ratio_best"] == 1.0
    assert ours["ratio"] == pytest.approx(ours["img_s"] / hf["img_s"])
    assert ours["ratio_best"] == pytest.approx(ours["img_s_best"] / hf["img_s_best"])
    assert ours["img_s_best"] == pytest.approx(2 / min(ours["step_times_s"]))


def test_in_process_repeats_keep_every_run():
    rows = bt.bench_train(["s"], impls=["mffzoo-mae", "hf-bf16", "mffzoo-sdpa"], repeats=2, isolate=False,
                          device="cpu", **FAST)
    for r in rows:
        _check_row(r, r["impl"], steps=2, repeats=2)
        assert len(r["img_s_runs"]) == 2 and r["img_s"] == pytest.approx(statistics.median(r["img_s_runs"]))
        assert r["peak_mem_mib"] is None  # not isolated: a peak would mix implementations, so none is claimed
        assert r["ratio"] is None and r["ratio_runs"] == [None, None]  # the peer's default row was not measured
    ours, peer, sdpa = rows
    assert peer["precision"] == "bf16" and peer["optimizer"] == "torch AdamW"
    # mffzoo rows are configured by the engine's own functions: fused AdamW, and train.attention's choice
    assert ours["optimizer"] == sdpa["optimizer"] == "timm adamw fused"
    from mffzoo.train.engine import cpu_has_amx

    assert ours["attention"] == ("timm math" if ours["precision"] == "bf16" and cpu_has_amx() else "timm sdpa")
    assert sdpa["attention"] == "timm sdpa"


def test_repeated_ratio_is_the_median_of_paired_per_run_ratios():
    rows = bt.bench_train(["s"], impls=["hf", "mffzoo-mae"], repeats=3, isolate=False, device="cpu", **FAST)
    hf, ours = rows
    assert len(ours["ratio_runs"]) == 3 and hf["ratio_runs"] == [1.0, 1.0, 1.0]
    assert ours["ratio_runs"] == pytest.approx([a / b for a, b in zip(ours["img_s_runs"], hf["img_s_runs"])])
    assert ours["ratio"] == pytest.approx(statistics.median(ours["ratio_runs"]))
    assert ours["img_s_best"] == pytest.approx(2 / min(ours["step_times_s"]))
    assert ours["ratio_best"] == pytest.approx(statistics.median(ours["ratio_best_runs"]))


def test_add_ratios_divides_by_the_peer_of_the_same_size():
    rows = [dict(model="A", impl="hf", img_s=2.0), dict(model="A", impl="mffzoo", img_s=5.0),
            dict(model="B", impl="mffzoo", img_s=1.0), dict(model="B", impl="hf", img_s=4.0),
            dict(model="C", impl="mffzoo", img_s=1.0)]
    assert [r["ratio"] for r in bt.add_ratios(rows)] == [1.0, 2.5, 0.25, 1.0, None]


def test_table_and_markdown(capsys):
    rows = bt.add_ratios([
        dict(model="ViT-S/16", impl=i, precision=p, batch=32, params=47.6e6, trainable_params=47.4e6, img_s=v,
             img_s_runs=[v, v], img_s_best=v + 1, peak_mem_mib=1000.0, attention="sdpa", optimizer="adamw",
             load_before=0.1, load_after=0.2, overrides=[], device="cpu", steps=5, warmup=2, mem_kind="rss")
        for i, p, v in (("hf", "fp32", 2.0), ("mffzoo", "bf16", 3.0))
    ])
    bt.print_results(rows, markdown=True)
    out = capsys.readouterr().out
    assert "| ViT-S/16 | mffzoo | bf16 | 32 | 47.60 | 3.00 | 4.00 | 1000 | 1.50x | 1.50 | 1.33x |" in out
    assert "ratio vs hf" in out and "MFU" not in out


def test_gpu_peaks_per_product_and_precision():
    """H100 NVL and PCIe are not the SXM part; a fp32 row is divided by the fp32 peak, not the bf16 one."""
    assert bt._gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert bt._gpu_peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert bt._gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert bt._gpu_peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert bt._gpu_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert bt._gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert bt._gpu_peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert bt._gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert bt._gpu_peak_tflops("Some Future GPU", "bf16") is None


def test_gpu_batches_are_gpu_sized():
    assert [bt.default_batch(s, "cpu") for s in "sbl"] == [16, 8, 4]
    assert [bt.default_batch(s, "cuda") for s in "sbl"] == [256, 128, 64]


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=["x"]), "unknown model size 'x'"),
    (dict(impls=["tf"]), "unknown implementation 'tf'"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(batch_size=0), "batch size must be >= 1"),
    (dict(overrides=["dept=4"]), "depth"),  # did-you-mean from the recipe schema
])
def test_bad_input_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bt.bench_train(**{"models": ["s"], **kwargs})


def test_cli_bad_input_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--models", "s,q"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model size 'q'") and "\n" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flops_and_mfu():
    rows = bt.bench_train(["s"], impls=["hf", "mffzoo"], device="cuda", **FAST)
    for r in rows:
        assert r["flops_per_step"] > 0 and r["tflops"] > 0 and r["peak_mem_mib"] > 0
        if r["peak_tflops"]:
            assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
