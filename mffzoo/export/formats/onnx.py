"""``--format onnx``: the ONNX file itself (int8: quantised by ONNX Runtime's quantiser), run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ExportError
from ..onnx import CUDA_EP, OrtRunner, check_onnx, ort_supports
from ..quantize import quantize_onnx, resolve_reduce_range
from .base import INPUT_NAME, BenchVariant, Built, ExportFormat, TritonFacts, fresh_path, logger

if TYPE_CHECKING:
    from ..profile import ExportProfile


class OnnxFormat(ExportFormat):
    name = "onnx"
    backend = "onnxruntime"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "bf16", "int8")
    triton = TritonFacts("model.onnx", "backend", "onnxruntime", "KIND_CPU")
    bench_prefix = "ort"
    bench = (
        BenchVariant("fp32", "cpu", "ONNX Runtime CPU, fp32 ONNX"),
        BenchVariant("fp16", "cpu", "ONNX Runtime CPU, fp16-compute ONNX"),
        BenchVariant("int8", "cpu", "ONNX Runtime CPU, int8 dynamic (per-channel)"),
        BenchVariant("int8", "cpu", "ONNX Runtime CPU, int8 static QDQ (calibrated on demo images)", "-static",
                     "static"),
    )

    def check_machine(self, precision: str, *, checking: bool) -> None:
        """Only the parity check needs ONNX Runtime (an unchecked export needs the exporter only)."""
        if checking:
            ok, why = ort_supports(precision)
            if not ok:
                raise ExportError(why)

    def needs_calibration(self, prof: ExportProfile) -> bool:
        return prof.precision == "int8" and prof.quantize.mode == "static"

    def calibration_fallback(self, prof: ExportProfile) -> Path | None:
        return prof.check.images  # the parity images, else the demo data

    def onnx_precision(self, precision: str) -> str:
        return "fp32" if precision == "int8" else precision  # int8 is quantised from the fp32 ONNX

    def build(self, built: Built, prof: ExportProfile, workdir: Path, *, calibration: np.ndarray | None,
              img_size: tuple[int, int]) -> Built:
        if prof.precision != "int8":
            return built
        q = prof.quantize
        reduce_range, why = resolve_reduce_range(q.reduce_range)
        logger.info("quantising to int8 (%s, %s %s-bit weights; %s)", q.mode,
                     "per-channel" if q.per_channel else "per-tensor", 7 if reduce_range else 8, why)
        built.artefact = quantize_onnx(built.onnx, fresh_path(workdir, f"model-int8-{q.mode}", ".onnx"), mode=q.mode,
                                       calibration=calibration, input_name=INPUT_NAME, per_channel=q.per_channel,
                                       reduce_range=reduce_range)
        check_onnx(built.artefact, dynamic_batch=prof.batch.min != prof.batch.max,  # the served file is checked
                   dynamic_size=built.dynamic_size is not None)
        built.extra["quantization"] = {"mode": q.mode, "per_channel": q.per_channel, "reduce_range": reduce_range,
                                       "reduce_range_why": why, "weights": "int8 (7-bit)" if reduce_range else "int8",
                                       "activations": "uint8",
                                       "calibration_images": None if calibration is None else len(calibration)}
        return built

    def compute_dtype(self, precision: str, built: Built) -> str:
        return "int8 weights / uint8 activations (MatMul), fp32 elsewhere" if precision == "int8" else precision

    def runner(self, path: Path, precision: str, *, device: str | None = None, threads: int | None = None) -> OrtRunner:
        providers = None if device is None else [CUDA_EP if device == "cuda" else "CPUExecutionProvider"]
        return OrtRunner(path, threads=threads, providers=providers)

    def unavailable(self, precision: str, device: str) -> str | None:
        try:
            import onnxruntime  # noqa: F401  (optional: mffzoo[onnx])
        except ImportError:
            return "onnxruntime is not installed (pip install 'mffzoo[onnx]')"
        return None
