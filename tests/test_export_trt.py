"""The GPU export paths. The TensorRT builder and runner run only where TensorRT imports and a CUDA GPU exists
(bench/gpu_check.sh runs them); the parts of the GPU code that do not need a GPU (timing-cache keys, dtype
mapping, one-line builder errors, ONNX Runtime's CUDA provider options and its silent CPU fallback, the version of
onnxruntime-gpu) are tested here on the CPU."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mffzoo.errors import ExportError
from mffzoo.export import export_model

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _trt_missing() -> str | None:
    """Why the TensorRT tests cannot run, or None. Imported, not found by find_spec: the PyPI stub of tensorrt is
    found but raises at import when NVIDIA's wheels could not be fetched (what gpu_check.sh checks too)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the stub's own error
        return f"TensorRT does not import ({type(exc).__name__}); pip install 'mffzoo[gpu]' on an NVIDIA GPU machine"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


needs_trt = pytest.mark.skipif(_trt_missing() is not None, reason=f"needs TensorRT and CUDA: {_trt_missing()}")


# --------------------------------------------------------------------------------------------- on the GPU
@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32", "bf16"])
def test_trt_engine_build_run_parity(tmp_path: Path, precision: str) -> None:
    res = export_model("mff_vit_small", random_init=True, model_args=TINY, format="trt", precision=precision,
                       output=tmp_path / f"tiny-{precision}.engine", batch={"min": 1, "opt": 4, "max": 8},
                       trt={"timing_cache": str(tmp_path)})
    assert res.report.passed, res.report.failures
    assert res.report.providers and res.report.providers[0].startswith("TensorRT")
    side = json.loads(res.sidecar.read_text())
    assert side["format"] == "trt" and side["tensorrt"]["tensorrt"] and side["tensorrt"]["gpu"]
    assert side["tools"]["tensorrt"] == side["tensorrt"]["tensorrt"]  # the version of tensorrt-cu1x is found
    assert (tmp_path / f"tiny-{precision}.onnx").is_file()
    caches = list(tmp_path.glob("trt*.cache"))
    assert [Path(side["tensorrt"]["timing_cache"])] == caches and "-sm" in caches[0].name


@needs_trt
def test_trt_runner_dynamic_batch_on_torch_tensors(tmp_path: Path) -> None:
    from mffzoo.export.trt import TrtRunner

    res = export_model("mff_vit_small", random_init=True, model_args=TINY, format="trt", precision="fp32",
                       output=tmp_path / "t.engine", batch={"min": 1, "opt": 4, "max": 8}, check={"enabled": False})
    runner = TrtRunner(res.artefact)
    assert runner.in_dtype == torch.float32
    for b in (1, 3, 8):
        x = torch.randn(b, 3, 32, 32, device="cuda")
        y = runner.run_torch(x)
        assert y.shape == (b, 64) and y.is_cuda
        assert np.isfinite(runner(x.cpu().numpy())).all()
    assert runner.batch_range == (1, 8)
    with pytest.raises(ExportError, match="built for batch 1..8"):  # set_input_shape returned False
        runner.run_torch(torch.randn(9, 3, 32, 32, device="cuda"))


@needs_trt
def test_trt_runner_feeds_the_engine_its_own_input_dtype(tmp_path: Path) -> None:
    from mffzoo.export.trt import TrtRunner

    res = export_model("mff_vit_small", random_init=True, model_args=TINY, format="trt", precision="fp16",
                       output=tmp_path / "h.engine", batch={"min": 1, "opt": 2, "max": 4}, check={"enabled": False})
    runner = TrtRunner(res.artefact)
    import tensorrt as trt

    assert runner.in_dtype == {"FLOAT": torch.float32, "HALF": torch.float16}[
        runner.engine.get_tensor_dtype(runner.input_name).name]
    assert trt.__version__ in runner.providers[0]
    assert np.isfinite(runner(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))).all()


# --------------------------------------------------------------------------------------------- on the CPU
def test_timing_cache_file_is_keyed_by_tensorrt_gpu_and_compute_capability(tmp_path: Path) -> None:
    from mffzoo.export.trt import default_timing_cache, timing_cache_file

    a = timing_cache_file(tmp_path, "10.13.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert a == tmp_path / "trt10.13.0-NVIDIA-H100-80GB-HBM3-sm9.0.cache"
    others = {timing_cache_file(tmp_path, "11.4.0", "NVIDIA H100 80GB HBM3", "9.0"),  # another TensorRT
              timing_cache_file(tmp_path, "10.13.0", "NVIDIA H100 NVL", "9.0"),  # another GPU
              timing_cache_file(tmp_path, "10.13.0", "NVIDIA H100 80GB HBM3", "8.0")}  # another capability
    assert len(others | {a}) == 4 and all(p.parent == tmp_path for p in others)
    named = timing_cache_file(tmp_path / "timing.cache", "10.13.0", "NVIDIA A100-SXM4-80GB", "8.0")
    assert named == tmp_path / "timing-trt10.13.0-NVIDIA-A100-SXM4-80GB-sm8.0.cache"
    assert timing_cache_file(None, "11.4.0", "NVIDIA L4", "8.9").parent == default_timing_cache()


def test_timing_cache_temp_names_are_unique_across_hosts(tmp_path: Path) -> None:
    from mffzoo.export.trt import _unique_tmp

    names = {_unique_tmp(tmp_path / "x.cache").name for _ in range(50)}
    assert len(names) == 50 and all(socket.gethostname() in n and n.startswith(".x.cache.") for n in names)


def test_tensorrt_failures_are_one_line_errors() -> None:
    from mffzoo.export.trt import _trt_call, torch_dtype

    def broken_builder() -> None:  # what a TensorRT that cannot initialise CUDA raises at trt.Builder(logger)
        raise TypeError("pybind11::init(): factory function returned nullptr\nmore lines")

    with pytest.raises(ExportError) as info:
        _trt_call("create a builder", broken_builder)
    msg = str(info.value)
    assert "\n" not in msg and "factory function returned nullptr" in msg and "CUDA major" in msg
    with pytest.raises(ExportError, match="returned nothing"):
        _trt_call("create a runtime", lambda: None)
    assert _trt_call("add", lambda: 3) == 3
    assert torch_dtype("HALF") is torch.float16 and torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(ExportError, match="FP8"):
        torch_dtype("FP8")


def test_ort_cuda_provider_gets_no_tf32_and_a_silent_cpu_fallback_is_reported(tmp_path: Path) -> None:
    """ONNX Runtime's CUDA provider is asked for with use_tf32=0 (its default TF32 would fail the fp32 gate); when it
    cannot run (here: the CPU build of onnxruntime, as with a CUDA-12 onnxruntime-gpu beside CUDA-13 libraries),
    ONNX Runtime falls back to the CPU without an error: the runner notices and the parity report says so."""
    pytest.importorskip("onnxruntime")
    from mffzoo.export.onnx import OrtRunner, ort_providers
    from mffzoo.export.parity import run_parity
    from mffzoo.export.profile import Gates

    assert ort_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert ort_providers(None, ["CPUExecutionProvider", "AzureExecutionProvider"]) == ["CPUExecutionProvider"]

    res = export_model("mff_vit_small", random_init=True, model_args=TINY, output=tmp_path / "m.onnx",
                       batch={"min": 1, "opt": 2, "max": 4}, check={"enabled": False})
    cpu = OrtRunner(res.artefact, providers=["CPUExecutionProvider"])
    assert cpu.providers == ["CPUExecutionProvider"] and cpu.notes == []
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with a working CUDA provider: no fallback to provoke")
    gpu = OrtRunner(res.artefact, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers == ["CPUExecutionProvider"]
    assert len(gpu.notes) == 1 and "fell back" in gpu.notes[0] and ort.__version__ in gpu.notes[0]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    report = run_parity(gpu, {"torch fp32": _Wrap(gpu)}, {"random": x}, batches=[1, 2], gates=Gates())
    assert report.providers == ["CPUExecutionProvider"] and report.notes == gpu.notes
    assert report.to_dict()["notes"] == gpu.notes


class _Wrap(torch.nn.Module):
    """A torch module that returns what the ONNX runner returns (the comparison is not the point here)."""

    def __init__(self, runner: object) -> None:
        super().__init__()
        self.runner = runner
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner(x.numpy()))


def test_tool_versions_find_gpu_distributions_by_import_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu installs the module `onnxruntime` under another distribution name (as tensorrt-cu12 does
    for `tensorrt`): the version comes from the distribution that provides the import name."""
    from mffzoo.export.sidecar import dist_version, tool_versions

    info = tmp_path / "mffzoo_fake_rt_gpu-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mffzoo-fake-rt-gpu\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("mffzoo_fake_rt\n")
    (tmp_path / "mffzoo_fake_rt").mkdir()
    (tmp_path / "mffzoo_fake_rt" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert dist_version("mffzoo_fake_rt") == "1.2.3"
    assert dist_version("mffzoo_no_such_module") is None
    ort = pytest.importorskip("onnxruntime")
    assert tool_versions()["onnxruntime"] == ort.__version__
