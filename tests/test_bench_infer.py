"""`mffzoo bench infer` on a tiny model: real backends, a real table and JSON (behaviour, never timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mffzoo.bench.infer import BACKENDS, available_backends
from mffzoo.cli.main import main
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
    text = capsys.readouterr().out
    assert all(name in text for name in BACKENDS)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "infer", str(tiny), "--backends", "ort-fp64"])
    assert exc.value.code == 2 and "unknown backend 'ort-fp64'" in capsys.readouterr().err
    if available_backends()["cuda-fp16"]:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "infer", str(tiny), "--backends", "cuda-fp16"])
        assert exc.value.code == 2 and "cannot run here: no CUDA GPU" in capsys.readouterr().err


def test_bench_group_lists_infer(capsys) -> None:
    main(["bench", "--help"])
    assert "infer" in capsys.readouterr().out
