"""TensorRT builder and runner: run only where TensorRT and a CUDA GPU exist (bench/gpu_check.sh runs them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mffzoo.errors import ExportError
from mffzoo.export import export_model

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
_why = None
if importlib.util.find_spec("tensorrt") is None:
    _why = "TensorRT is not installed (pip install 'mffzoo[gpu]' on an NVIDIA GPU machine)"
elif not torch.cuda.is_available():
    _why = "no CUDA GPU"
pytestmark = pytest.mark.skipif(_why is not None, reason=f"TensorRT tests need TensorRT and CUDA: {_why}")


@pytest.mark.parametrize("precision", ["fp16", "fp32", "bf16"])
def test_trt_engine_build_run_parity(tmp_path: Path, precision: str) -> None:
    res = export_model("mff_vit_small", random_init=True, model_args=TINY, format="trt", precision=precision,
                       output=tmp_path / f"tiny-{precision}.engine", batch={"min": 1, "opt": 4, "max": 8},
                       trt={"timing_cache": str(tmp_path / "timing.cache")})
    assert res.report.passed, res.report.failures
    side = json.loads(res.sidecar.read_text())
    assert side["format"] == "trt" and side["tensorrt"]["tensorrt"] and side["tensorrt"]["gpu"]
    assert (tmp_path / f"tiny-{precision}.onnx").is_file() and (tmp_path / "timing.cache").is_file()


def test_trt_runner_dynamic_batch_on_torch_tensors(tmp_path: Path) -> None:
    from mffzoo.export.trt import TrtRunner

    res = export_model("mff_vit_small", random_init=True, model_args=TINY, format="trt", precision="fp32",
                       output=tmp_path / "t.engine", batch={"min": 1, "opt": 4, "max": 8}, check={"enabled": False})
    runner = TrtRunner(res.artefact)
    for b in (1, 3, 8):
        x = torch.randn(b, 3, 32, 32, device="cuda")
        y = runner.run_torch(x)
        assert y.shape == (b, 64) and y.is_cuda
        assert np.isfinite(runner(x.cpu().numpy())).all()
    assert runner.batch_range == (1, 8)
    with pytest.raises(ExportError, match="built for batch 1..8"):  # set_input_shape returned False
        runner.run_torch(torch.randn(9, 3, 32, 32, device="cuda"))
