"""TensorRT: build an engine from the exported ONNX, and run it on torch CUDA tensors (no pycuda).

Kept small on purpose: the ONNX export, parity check, sidecar and CLI are the shared, tested code; this module
only turns a checked ONNX file into an engine and executes it. Written against TensorRT 10.12+ and 11: the
network is strongly typed (fp16/bf16 come from the ONNX dtypes; TRT 11 has no FP16/BF16 builder flags), and
every flag is looked up by name because enum values moved between the two.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..io import cache_root

__all__ = ["require_trt", "build_engine", "TrtRunner", "default_timing_cache", "timing_cache_file"]

_logger = logging.getLogger("mffzoo")
INSTALL_HINT = "pip install 'mffzoo[gpu]' on a machine with an NVIDIA GPU"


def require_trt() -> None:
    """One-line error naming what is missing (the package, the GPU, or both) before anything is written."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the 'tensorrt' Python package is not installed")
    except Exception as exc:  # the PyPI stub raises at import when NVIDIA's wheels could not be fetched
        missing.append(f"the 'tensorrt' package does not import ({str(exc).splitlines()[0][:80]})")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to torch")
    if missing:
        raise ExportError(f"--format trt needs TensorRT and a CUDA GPU: {' and '.join(missing)}; {INSTALL_HINT} "
                          "(or use --format onnx)")


def default_timing_cache() -> Path:
    """The folder of the keyed timing caches (:func:`timing_cache_file`)."""
    return cache_root() / "trt-timing"


def timing_cache_file(base: str | os.PathLike[str] | None, tensorrt: str, gpu: str, compute_capability: str) -> Path:
    """One timing-cache file per (TensorRT version, GPU name, compute capability).

    A timing cache holds kernel timings of one GPU under one TensorRT; loading another's gives wrong tactics or
    worse (TensorRT's ``ignore_mismatch`` documents wrong results). Keying the file name keeps the caches of every
    GPU and version apart in one shared folder. ``base``: a folder (the keyed file goes in it), or a file name
    whose stem gets the key (``timing.cache`` -> ``timing-<key>.cache``); None for :func:`default_timing_cache`."""
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"trt{tensorrt}-{gpu}-sm{compute_capability}").strip("-")
    path = Path(base) if base else default_timing_cache()
    if base is None or path.is_dir() or not path.suffix:
        return path / f"{key}.cache"
    return path.with_name(f"{path.stem}-{key}{path.suffix}")


def _unique_tmp(path: Path) -> Path:
    """A temp name no other writer can pick, on a file system shared between machines (pids are not unique)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{uuid.uuid4().hex}.tmp")


def _trt_call(what: str, fn: Callable[[], Any]) -> Any:
    """TensorRT calls that fail with a pybind ``TypeError``/``RuntimeError`` when it cannot initialise CUDA (a
    TensorRT built for another CUDA major than the driver/torch): one line instead of a traceback."""
    try:
        out = fn()
    except (TypeError, RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ExportError(f"TensorRT cannot {what} ({first}); its CUDA major must match torch's (torch.version.cuda): "
                          "pip install 'mffzoo[gpu]' for CUDA 13, 'mffzoo[gpu-cu12]' for CUDA 12") from None
    if out is None:
        raise ExportError(f"TensorRT cannot {what} (it returned nothing; is the GPU visible and free?); run "
                          "mffzoo -v export ... for TensorRT's log")
    return out


def _logger_cls() -> Any:
    import tensorrt as trt  # optional: mffzoo[gpu]

    class Collect(trt.ILogger):
        """Keeps errors so a failed build says why in one line."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                _logger.debug("tensorrt: %s", msg)

    return Collect()


def gpu_info() -> dict[str, Any]:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    input_name: str,
    img_size: tuple[int, int],
    batch: tuple[int, int, int],
    workspace_gb: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
    tf32: bool = False,
    optimization_level: int = 3,
    sizes: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Parse ``onnx_path`` into a strongly typed network and write a serialized engine; returns build facts.

    One optimisation profile on the input: batch ``(min, opt, max)`` at ``img_size``, or, with ``sizes`` (pixels
    ``min, opt, max``; an ONNX with dynamic height and width), over batch x height x width, each dimension in its
    own range (TensorRT's min/opt/max shapes are per dimension), tuned for ``opt`` x ``opt``."""
    require_trt()
    import tensorrt as trt  # optional: mffzoo[gpu]

    log = _logger_cls()
    builder = _trt_call("create a builder", lambda: trt.Builder(log))
    network = _trt_call("create a network", lambda: builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)] or log.errors
        raise ExportError(f"TensorRT cannot parse '{onnx_path}': {'; '.join(errs)[:300]}")
    config = _trt_call("create a builder config", builder.create_builder_config)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = optimization_level
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; fp32 parity needs it off
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch
    hw = [img_size] * 3 if sizes is None else [(s, s) for s in sizes]  # min, opt, max (height, width)
    profile.set_shape(input_name, (lo, 3, *hw[0]), (opt, 3, *hw[1]), (hi, 3, *hw[2]))
    config.add_optimization_profile(profile)
    gpu = gpu_info()
    cache_path = timing_cache_file(timing_cache, trt.__version__, gpu["gpu"], gpu["compute_capability"])
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob) if blob else None
    # ignore_mismatch=False: TensorRT refuses a cache of another device rather than loading it (True loads it,
    # with wrong results possible). The key in the file name should make that rare (a driver or MIG change).
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            _logger.warning("warning: TensorRT refused the timing cache %s (made on another device or setup, or "
                            "damaged); building without it and replacing it", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from '{onnx_path}': "
                          f"{'; '.join(log.errors)[:300] or 'see mffzoo -v export ... for the builder log'}")
    Path(engine_path).write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_tmp(cache_path)
    try:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)  # reused by the next build: engine builds drop from minutes to seconds
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensorrt": trt.__version__, **gpu, "timing_cache": str(cache_path),
            "workspace_gb": workspace_gb, "tf32": tf32, "optimization_level": optimization_level,
            "profile": {"min": lo, "opt": opt, "max": hi,
                        "shapes": {k: [b, 3, *s] for k, b, s in zip(("min", "opt", "max"), batch, hw)}}}


_TORCH_DTYPE = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (by name: enum values moved between TensorRT 10 and 11)."""
    try:
        return _TORCH_DTYPE[trt_dtype_name]
    except KeyError:
        raise ExportError(f"TensorRT engine uses tensor type {trt_dtype_name}, which mffzoo cannot feed; export "
                          "with --precision fp32, fp16 or bf16") from None


class TrtRunner:
    """Executes an engine with torch CUDA tensors as the buffers; callable on numpy like :class:`OrtRunner`."""

    def __init__(self, engine_path: str | os.PathLike[str]) -> None:
        require_trt()
        import tensorrt as trt  # optional: mffzoo[gpu]

        self._log = _logger_cls()
        self.runtime = _trt_call("create a runtime", lambda: trt.Runtime(self._log))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load engine '{engine_path}' (built with another TensorRT version or "
                              f"GPU?): {'; '.join(self._log.errors)[:200]}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_names = inputs[0], outputs  # every output (levels: one per block)
        self.output_name = outputs[0]
        # the engine's own I/O types: a strongly typed fp16/bf16 engine takes fp16/bf16 input
        self.in_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name).name)
        self.out_dtypes = [torch_dtype(self.engine.get_tensor_dtype(n).name) for n in outputs]
        self.providers = [f"TensorRT {trt.__version__} on {gpu_info()['gpu']}"]  # for the parity report
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)  # min, opt, max shapes of profile 0
        self.shape_range = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
        self.batch_range = (self.shape_range[0][0], self.shape_range[1][0])
        self.stream = torch.cuda.Stream()  # execute_async_v3 must not run on the legacy default stream

    def run_torch(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The output tensor on the GPU; a list of them, in engine order, for an engine with several outputs."""
        x = x.to(device="cuda", dtype=self.in_dtype).contiguous()
        ctx = self.context
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):  # False: outside the optimisation profile
            (b0, _, h0, w0), (b1, _, h1, w1) = self.shape_range
            raise ExportError(f"TensorRT engine rejects input shape {tuple(x.shape)}: it was built for batch {b0}..{b1}"
                              f" at height x width {h0}x{w0}..{h1}x{w1}; rebuild it with --batch (and --dynamic-size) "
                              "covering it, or feed a shape in that range")
        outs = [torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dt, device="cuda")
                for n, dt in zip(self.output_names, self.out_dtypes)]
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        for n, out in zip(self.output_names, outs):
            ctx.set_tensor_address(n, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # x may still be being written on the current stream
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT execution failed: {'; '.join(self._log.errors)[:200]}")
        torch.cuda.current_stream().wait_stream(self.stream)
        for t in (x, *outs):
            t.record_stream(self.stream)
        return outs[0] if len(outs) == 1 else outs

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | list[np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        out = self.run_torch(t)
        torch.cuda.current_stream().synchronize()
        if isinstance(out, list):
            return [o.float().cpu().numpy() for o in out]
        return out.float().cpu().numpy()
