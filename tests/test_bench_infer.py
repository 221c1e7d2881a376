"""`mffzoo bench infer` on a tiny model: real backends, a real table and JSON (behaviour, never timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mffzoo.bench.infer import BACKENDS, _bench_profile, available_backends
from mffzoo.cli.main import main
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
    assert "img/s b4" in text and "best exported backend" in text
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
    main(["bench", "infer", "x", "--list"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(BACKENDS)
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
    prof = _bench_profile(BACKENDS["trt-fp16"], batch)
    assert (prof.format, prof.precision) == ("trt", "fp16") and (prof.batch.min, prof.batch.opt, prof.batch.max) == want
    assert _bench_profile(BACKENDS["ort-int8-static"], batch).quantize.mode == "static"
    assert _bench_profile(BACKENDS["ort-int8"], batch).quantize == ExportProfile().quantize  # export's defaults


def test_bench_group_lists_infer(capsys) -> None:
    main(["bench", "--help"])
    assert "infer" in capsys.readouterr().out
