"""The MAE-vs-MFF reproduction: a fair recipe pair and the seed aggregation, checked without any training."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from mffzoo.analysis.reproduce import QUICK_NOTE, TINY_MODEL, aggregate, markdown_table, pretrain_recipe, summary_rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@pytest.mark.parametrize("model", [None, {**TINY_MODEL, "img_size": 32, "depth": 4, "embed_dim": 64}],
                         ids=["budget", "quick"])
def test_mae_and_mff_recipes_differ_only_in_fusion_layers(model: dict[str, Any] | None, tmp_path: Path) -> None:
    from mffzoo.train.recipe import load_recipe

    depth = (model or TINY_MODEL)["depth"]
    for seed in (0, 2):
        mae, mff = (_flatten(pretrain_recipe(m, seed, 3, tmp_path, model)) for m in ("mae", "mff"))
        assert mae.keys() == mff.keys()
        assert {k for k in mae if mae[k] != mff[k]} == {"name", "description", "model.fusion_layers"}
        assert mae["model.fusion_layers"] == [depth - 1] and mff["model.fusion_layers"] == list(range(depth))
        assert mae["train.seed"] == seed and mae["train.epochs"] == 3
    for method in ("mae", "mff"):  # both are valid engine recipes
        recipe = load_recipe(pretrain_recipe(method, 1, 3, tmp_path, model))
        assert recipe.model.fusion_layers == ([depth - 1] if method == "mae" else list(range(depth)))


def _run(method: str, seed: int, knn: float, loss: float | None, last: list[float], fw: list[float] | None) -> dict:
    blocks = [[0.0, v] for v in last]
    return {"method": method, "seed": seed, "knn_cls_top1": knn, "knn_avg_top1": knn + 1.0, "linear_top1": 2 * knn,
            "val_recon_loss": 0.5 + seed / 100, "train_loss_final": loss, "fusion_layers": [0, 1] if fw else [1],
            "fusion_weights": fw,
            "freq": {"frequencies": [0.0, 0.5], "grid": [4, 4], "blocks": blocks, "high_freq": last,
                     "mean_high_freq": sum(last) / len(last)}}


def test_aggregation_mean_std_rows_and_markdown() -> None:
    runs = []
    for seed, (a, b) in enumerate(((30.0, 40.0), (33.0, 44.0), (36.0, 42.0))):
        runs.append(_run("mae", seed, a, None, [-1.0, -2.0 - seed], None))
        runs.append(_run("mff", seed, b, 0.6 + seed / 10, [-1.5, -3.0], [0.25 + seed / 10, 0.75 - seed / 10]))
    agg = aggregate(runs)
    k = agg["mae"]["knn_cls_top1"]
    assert (k["mean"], k["std"], k["n"], k["values"]) == (33.0, 3.0, 3, [30.0, 33.0, 36.0])
    assert agg["mff"]["knn_cls_top1"]["std"] == pytest.approx(statistics.stdev([40.0, 44.0, 42.0]))
    assert "train_loss_final" not in agg["mae"] and agg["mff"]["train_loss_final"]["mean"] == pytest.approx(0.7)
    # per-run frequency summaries, then their seed mean; curves averaged point by point
    assert agg["mae"]["high_freq_last"]["values"] == [-2.0, -3.0, -4.0]
    assert agg["mae"]["high_freq_mean"]["mean"] == pytest.approx(-2.0)
    assert agg["mae"]["freq"]["blocks"] == [[0.0, -1.0], [0.0, -3.0]] and agg["mae"]["freq"]["high_freq"] == [-1, -3]
    assert agg["mff"]["fusion_weights_mean"] == pytest.approx([0.35, 0.65]) and agg["mff"]["fusion_layers"] == [0, 1]
    assert "fusion_weights_mean" not in agg["mae"]

    res = {"aggregate": agg}
    rows, header = summary_rows(res)
    assert header == ["metric (mean ± std over seeds)", "MAE", "MFF"]
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["k-NN top-1 (cls token)"] == ["33.00 ± 3.00", "42.00 ± 2.00"]
    assert by_name["k-NN top-1 (avg-pooled patch tokens)"] == ["34.00 ± 3.00", "43.00 ± 2.00"]
    assert by_name["final train loss (last-epoch mean)"] == ["n/a", "0.7000 ± 0.1000"]
    assert by_name["Δ log-amp @ high freq, last block"][0] == "-3.000 ± 1.000"
    md = markdown_table(res).splitlines()
    assert md[0] == "| metric (mean ± std over seeds) | MAE | MFF |" and md[1] == "|---|---|---|"
    assert "| k-NN top-1 (cls token) | 33.00 ± 3.00 | 42.00 ± 2.00 |" in md
    assert md[-1] == "MFF softmax fusion weights (mean over seeds): block 0: 0.350, block 1: 0.650"
    assert not any("smoke run" in line.lower() for line in md)

    quick = markdown_table({**res, "quick": True}).splitlines()  # a --quick table says what it is, first
    assert quick[0] == ("**Smoke run (--quick: tiny data, 1 epoch), not a result: it checks that the pipeline runs; "
                        "its numbers say nothing about MAE vs MFF.**")
    assert quick[2:] == md and QUICK_NOTE.startswith("smoke run")
