"""``--format trt``: a TensorRT engine built from the ONNX (strongly typed), run on the GPU; its ONNX ships with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import ExportError
from ..trt import TrtRunner, build_engine, require_trt
from .base import INPUT_NAME, BenchVariant, Built, ExportFormat, TritonFacts, fresh_path, logger

if TYPE_CHECKING:
    from ..parity import Runner
    from ..profile import ExportProfile


class TensorRtFormat(ExportFormat):
    name = "trt"
    backend = "tensorrt"
    suffix = ".engine"
    precisions = ("fp32", "fp16", "bf16")
    companions = (".onnx",)  # the ONNX the engine was built from: engines are GPU/version specific
    strict_suffix = False
    triton = TritonFacts("model.plan", "platform", "tensorrt_plan", "KIND_GPU", gpu_only=True,
                         signature_from_onnx=True)
    bench_prefix = "trt"
    bench = (
        BenchVariant("fp16", "cuda", "TensorRT engine from the fp16 ONNX"),
        BenchVariant("fp32", "cuda", "TensorRT engine from the fp32 ONNX, TF32 off"),
    )

    def precision_error(self, precision: str) -> str:
        return ("int8 is for ONNX Runtime CPU serving (--format onnx); TensorRT int8 needs calibration this "
                "tool does not do: use --precision fp16 or bf16 with --format trt")

    def check_machine(self, precision: str, *, checking: bool) -> None:
        require_trt()  # building an engine needs the GPU, checked or not

    def check_output(self, out: Path) -> None:
        if out.suffix == ".onnx":
            raise ExportError(f"--output '{out}' is the engine path for --format trt: use .engine (the ONNX it is "
                              "built from is written next to it)")

    def build(self, built: Built, prof: ExportProfile, workdir: Path, *, calibration: np.ndarray | None,
              img_size: tuple[int, int]) -> Built:
        b, t, sizes = prof.batch, prof.trt, built.dynamic_size
        logger.info("building the TensorRT engine (strongly typed, batch %d:%d:%d%s)", b.min, b.opt, b.max,
                    f", height and width {sizes[0]}:{sizes[1]}:{sizes[2]}" if sizes else "")
        built.artefact = fresh_path(workdir, built.onnx.stem, ".engine")
        built.extra["tensorrt"] = build_engine(
            built.onnx, built.artefact, input_name=INPUT_NAME, img_size=img_size, batch=(b.min, b.opt, b.max),
            workspace_gb=t.workspace_gb, timing_cache=t.timing_cache, tf32=t.tf32,
            optimization_level=t.optimization_level, sizes=sizes)
        return built

    def companion_sources(self, built: Built) -> dict[str, Path]:
        return {".onnx": built.onnx}

    def sidecar_onnx(self, out: Path) -> str | None:
        return out.with_suffix(".onnx").name

    def runner(self, path: Path, precision: str, *, device: str | None = None, threads: int | None = None) -> TrtRunner:
        return TrtRunner(path)  # the GPU torch sees

    def bench_call(self, runner: Runner) -> tuple[Callable[[Any], Any], Callable[[np.ndarray], Any]]:
        assert isinstance(runner, TrtRunner)
        return runner.run_torch, lambda a: torch.from_numpy(a).cuda()

    def unavailable(self, precision: str, device: str) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        try:
            import tensorrt  # noqa: F401  (optional: mffzoo[gpu])
        except Exception:  # ImportError, or the PyPI stub failing at import
            return "tensorrt is not installed (pip install 'mffzoo[gpu]' on an NVIDIA GPU machine)"
        return None
