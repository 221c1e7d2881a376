"""`mffzoo bench infer` on a tiny model: real backends, a real table and JSON (behaviour, never timings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mffzoo.bench.infer import (
    BackendResult,
    InferBenchResult,
    _bench_profile,
    available_backends,
    backends,
    best_exported,
    round_ratios,
)
from mffzoo.cli.main import main
from mffzoo.cpu import cpu_features
from mffzoo.export import ExportProfile
from mffzoo.zoo import load_model, write_model_folder

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = load_model("mff_vit_small", random_init=True, **TINY)
    return write_model_folder(tmp_path_factory.mktemp("zoo") / "tiny", "mff_vit_small_patch16_224", model,
                              model_args=TINY)


def test_bench_infer_table_and_json(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    main(["bench", "infer", str(tiny), "--batch", "4", "--backends", "ort-fp32,ort-int8,eager-bf16",
          "--rounds", "2", "--iters", "2", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    for name in ("eager", "eager-bf16", "ort-fp32", "ort-int8"):
        assert f"\n{name} " in text
    assert "img/s b4" in text and "best exported cpu backend" in text
    data = json.loads(out.read_text())
    res = {r["name"]: r for r in data["results"]}
    assert list(res) == ["eager", "ort-fp32", "ort-int8", "eager-bf16"]  # the peer runs (first) even unasked
    assert res["eager"]["ratio_vs_peer"] == 1.0 and res["eager"]["parity"] == {"peer": True}
    for r in res.values():
        assert r["throughput"] > 0 and len(r["throughput_rounds"]) == 2
        assert r["latency_ms_p90"] >= r["latency_ms_p50"] > 0
    assert res["ort-fp32"]["parity"]["max_abs"] < 1e-4 and not res["ort-fp32"]["parity"]["failures"]
    assert res["ort-int8"]["parity"]["cosine"] >= 0.99
    assert data["meta"]["batch"] == 4 and data["meta"]["threads"] == 1 and data["meta"]["tools"]["onnxruntime"]


def test_bench_infer_list_and_errors(tiny: Path, capsys) -> None:
    main(["bench", "infer", "--list"])  # listing needs no MODEL
    *table, blank, cpu_line = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in table[2:]}
    # the CPU is named for what it has (issue: "AMX on this CPU" was printed on CPUs without AMX)
    assert blank == "" and cpu_line == f"this CPU: {cpu_features().model} ({cpu_features().describe()})"
    assert "AMX on this CPU" not in rows["eager-bf16"]
    assert set(rows) == set(backends())
    assert all("  yes  " in rows[n] for n in ("eager", "ort-fp32", "ort-int8"))
    if not torch.cuda.is_available():  # the GPU backends say no, and why
        for n in ("cuda-eager", "cuda-fp16", "trt-fp16", "trt-fp32"):
            assert "  no: no CUDA GPU  " in rows[n], rows[n]
    for n, why in available_backends().items():
        assert ("  yes  " in rows[n]) == (why is None) and (why is None or f"no: {why}" in rows[n])
    with pytest.raises(SystemExit) as exc:
        main(["bench", "infer", str(tiny), "--backends", "ort-fp64"])
    assert exc.value.code == 2 and "unknown backend 'ort-fp64'" in capsys.readouterr().err
    if available_backends()["cuda-fp16"]:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "infer", str(tiny), "--backends", "cuda-fp16"])
        assert exc.value.code == 2 and "cannot run here: no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("batch,want", [(1, (1, 1, 64)), (8, (1, 8, 64)), (96, (1, 96, 96))])
def test_exported_backends_are_tuned_for_the_bench_batch(batch: int, want: tuple) -> None:
    """TensorRT's profile (opt) follows --batch; every exported backend uses the export pipeline's settings."""
    prof = _bench_profile(backends()["trt-fp16"], batch)
    assert (prof.format, prof.precision) == ("trt", "fp16") and (prof.batch.min, prof.batch.opt, prof.batch.max) == want
    assert _bench_profile(backends()["ort-int8-static"], batch).quantize.mode == "static"
    assert _bench_profile(backends()["ort-int8"], batch).quantize == ExportProfile().quantize  # export's defaults


def test_bench_group_lists_infer(capsys) -> None:
    main(["bench", "--help"])
    assert "infer" in capsys.readouterr().out


def test_bench_infer_without_model_is_one_line_exit_2(capsys) -> None:
    from tests.helpers import cli_error

    assert "missing argument MODEL" in cli_error(["bench", "infer"], capsys)


def test_headline_ratio_lies_inside_its_per_round_range() -> None:
    """Call times of two interleaved rounds where the peer was slowed in round 2: the old headline (ratio of the
    medians over all calls) was 3.0x against per-round ratios of 2.0x; the headline is now their median."""
    peer = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]  # seconds per call, per round
    backend = [[0.5, 0.5, 0.5], [0.5, 1.0, 1.0]]
    per_round = [[8 / float(np.median(r)) for r in calls] for calls in (backend, peer)]
    old = float(np.median(sum(peer, []))) / float(np.median(sum(backend, [])))
    med, rounds = round_ratios(*per_round)
    assert rounds == [2.0, 2.0] and med == 2.0
    assert old == 3.0 and not min(rounds) <= old <= max(rounds)  # the defect this replaces
    med, rounds = round_ratios([10.0, 12.0, 30.0], [4.0, 8.0, 10.0])
    assert rounds == [2.5, 1.5, 3.0] and med == 2.5  # odd rounds: one of them


def _result(name: str, device: str, ratio: float, failures: list[str] | None = None, thr: float = 1.0):
    return BackendResult(name=name, device=device, precision=backends()[name].precision, description="",
                         latency_ms_p50=1.0, latency_ms_p90=1.0, throughput=thr, throughput_rounds=[thr],
                         ratio_vs_peer=ratio, ratio_rounds=[ratio], parity={"failures": failures or []})


def test_best_exported_backend_is_chosen_per_device_by_ratio_among_passing() -> None:
    results = [_result("eager", "cpu", 1.0, thr=10), _result("ort-fp32", "cpu", 1.3, thr=13),
               _result("ort-int8", "cpu", 2.5, ["cosine 0.9 < 0.99"], thr=25),  # fastest but fails its gate
               _result("ov-int8", "cpu", 1.9, thr=19), _result("compile", "cpu", 3.0, thr=30),  # not exported
               _result("cuda-eager", "cuda", 1.0, thr=500), _result("trt-fp16", "cuda", 1.5, thr=750)]
    best = {r.device: r.name for r in best_exported(results)}
    assert best == {"cpu": "ov-int8", "cuda": "trt-fp16"}  # a GPU's img/s never competes with a CPU's
    meta = {"batch": 8, "random_init": True, "model": "m", "img_size": [32, 32], "threads": 1, "rounds": 1,
            "iters": 1, "machine": {"cpu": "x"}, "parity_reference": "eager"}
    notes = "\n".join(InferBenchResult(meta, results, {}).notes())
    assert "best exported cpu backend passing its gate: ov-int8 at 1.90x eager" in notes
    assert "best exported cuda backend passing its gate: trt-fp16 at 1.50x cuda-eager" in notes
    assert "ov-int8 vs ort-fp32 throughput: 1.46x" in notes


@pytest.mark.skipif(available_backends()["ov-int8"] is not None, reason="OpenVINO/NNCF not installed")
def test_bench_openvino_rows_built_by_the_export_pipeline(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    main(["bench", "infer", str(tiny), "--batch", "3", "--backends", "ort-fp32,ov-fp32,ov-int8", "--rounds", "2",
          "--iters", "2", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "ov-fp32 vs ort-fp32 throughput" in text and "ov-int8 vs ort-fp32 throughput" in text
    res = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(res) == ["eager", "ort-fp32", "ov-fp32", "ov-int8"]  # interleaved with the others, peer first
    assert res["ov-fp32"]["parity"]["max_abs"] < 1e-4 and not res["ov-fp32"]["parity"]["failures"]
    assert res["ov-int8"]["parity"]["cosine"] >= 0.99 and res["ov-int8"]["parity"]["max_abs"] > 0
    for r in res.values():
        assert min(r["throughput_rounds"]) <= r["throughput"] <= max(r["throughput_rounds"])
        if r["ratio_rounds"]:
            assert min(r["ratio_rounds"]) <= r["ratio_vs_peer"] <= max(r["ratio_rounds"])
    prof = _bench_profile(backends()["ov-int8"], 8)
    assert (prof.format, prof.precision) == ("openvino", "int8")
