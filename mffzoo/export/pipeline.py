"""One artefact pipeline for ``mffzoo export`` and ``mffzoo bench infer``: ONNX -> (int8 | engine | OpenVINO IR).

Both build through :func:`build_artefact`, so what the benchmark measures is built exactly like what the export
writes (same wrapper, I/O names, dtypes, quantiser settings, checker, engine profile): the two cannot drift.
:class:`SigtermGuard` turns SIGTERM into ``SystemExit`` so the callers' ``finally`` removes their temp folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from .inputs import model_img_size
from .onnx import check_onnx, export_onnx
from .openvino import compile_config, convert_ir
from .profile import ExportProfile
from .quantize import quantize_onnx, resolve_reduce_range
from .trt import build_engine
from .wrappers import OUTPUT_NAMES, TORCH_DTYPES, ExportModule

__all__ = ["INPUT_NAME", "Built", "build_artefact", "onnx_precision", "SigtermGuard"]

_logger = logging.getLogger("mffzoo")
INPUT_NAME = "pixel_values"


@dataclass
class Built:
    artefact: Path  # the file to serve (inside the work folder; an IR's .bin lies next to its .xml)
    onnx: Path  # the ONNX it was made from (the artefact itself for fp32/fp16/bf16 ONNX)
    extra: dict[str, Any] = field(default_factory=dict)  # sidecar sections: "quantization" / "tensorrt" / "openvino"


def onnx_precision(precision: str, fmt: str = "onnx") -> str:
    """int8 is quantised from the fp32 ONNX, OpenVINO converts the fp32 ONNX (bf16 is a compile-time hint there);
    every other precision is exported as such."""
    return "fp32" if precision == "int8" or fmt == "openvino" else precision


def _fresh(workdir: Path, stem: str, suffix: str) -> Path:
    path, i = workdir / f"{stem}{suffix}", 1
    while path.exists():
        path, i = workdir / f"{stem}-{i}{suffix}", i + 1
    return path


def build_artefact(
    fp32: torch.nn.Module,
    features: str,
    prof: ExportProfile,
    workdir: Path,
    *,
    calibration: np.ndarray | None = None,
    onnx_cache: dict[tuple[Any, ...], Path] | None = None,
) -> Built:
    """Build ``prof``'s artefact from the fp32 model into ``workdir``; ``onnx_cache`` reuses identical ONNX exports."""
    img = model_img_size(fp32)
    b = prof.batch
    src = onnx_precision(prof.precision, prof.format)
    key = (features, src, b.min, b.max, prof.opset, prof.slim, img)
    onnx_path = (onnx_cache or {}).get(key)
    if onnx_path is None:
        onnx_path = _fresh(workdir, f"model-{src}", ".onnx")
        _logger.info("exporting %s (%s, %s) to ONNX opset %d, batch %d..%d", prof.model, features, src, prof.opset,
                     b.min, b.max)
        export_onnx(ExportModule(fp32, features, TORCH_DTYPES[src]), onnx_path, img_size=img, input_name=INPUT_NAME,
                    output_name=OUTPUT_NAMES[features][0], batch_min=b.min, batch_max=b.max, opset=prof.opset,
                    slim=prof.slim)
        if onnx_cache is not None:
            onnx_cache[key] = onnx_path
    built = Built(onnx_path, onnx_path)
    if prof.precision == "int8" and prof.format == "onnx":
        q = prof.quantize
        reduce_range, why = resolve_reduce_range(q.reduce_range)
        _logger.info("quantising to int8 (%s, %s %s-bit weights; %s)", q.mode,
                     "per-channel" if q.per_channel else "per-tensor", 7 if reduce_range else 8, why)
        built.artefact = quantize_onnx(onnx_path, _fresh(workdir, f"model-int8-{q.mode}", ".onnx"), mode=q.mode,
                                       calibration=calibration, input_name=INPUT_NAME, per_channel=q.per_channel,
                                       reduce_range=reduce_range)
        check_onnx(built.artefact, dynamic_batch=b.min != b.max)  # the served file is checked, not just its source
        built.extra["quantization"] = {"mode": q.mode, "per_channel": q.per_channel, "reduce_range": reduce_range,
                                       "reduce_range_why": why, "weights": "int8 (7-bit)" if reduce_range else "int8",
                                       "activations": "uint8",
                                       "calibration_images": None if calibration is None else len(calibration)}
    if prof.format == "openvino":
        built.artefact = _fresh(workdir, f"model-ov-{prof.precision}", ".xml")
        int8 = prof.precision == "int8"
        reduce_range, why = resolve_reduce_range(prof.quantize.reduce_range)
        _logger.info("converting to OpenVINO IR (%s%s)", prof.precision,
                     f", NNCF int8 on {len(calibration) if calibration is not None else 0} calibration images, "
                     f"{7 if reduce_range else 8}-bit weights; {why}" if int8 else "")
        built.extra["openvino"] = convert_ir(onnx_path, built.artefact, calibration=calibration, int8=int8,
                                             reduce_range=reduce_range, subset_size=prof.quantize.num_calibration)
        built.extra["openvino"]["compile_config"] = compile_config(prof.precision)
        if int8:
            built.extra["quantization"] = {
                "tool": "nncf", "model_type": "transformer", "overflow_fix": "enable" if reduce_range else "disable",
                "reduce_range": reduce_range, "reduce_range_why": why,
                "weights": "int8 (7-bit)" if reduce_range else "int8", "activations": "int8 (calibrated)",
                "calibration_images": None if calibration is None else len(calibration)}
    if prof.format == "trt":
        _logger.info("building the TensorRT engine (strongly typed, batch %d:%d:%d)", b.min, b.opt, b.max)
        built.artefact = _fresh(workdir, onnx_path.stem, ".engine")
        t = prof.trt
        built.extra["tensorrt"] = build_engine(
            onnx_path, built.artefact, input_name=INPUT_NAME, img_size=img, batch=(b.min, b.opt, b.max),
            workspace_gb=t.workspace_gb, timing_cache=t.timing_cache, tf32=t.tf32,
            optimization_level=t.optimization_level)
    return built


class SigtermGuard:
    """While active, SIGTERM removes the registered temp folders and raises ``SystemExit(143)``.

    Python's default SIGTERM action ends the process without unwinding, which left ``.X.onnx.tmp-*`` folders
    behind. The handler removes the folders itself (a ``SystemExit`` raised inside some C callbacks exits at once,
    skipping ``finally``); inside :meth:`hold` (creating the folder, moving finished files in place) it waits until
    the block is done. A no-op outside the main thread or when a non-Python handler is installed; the previous
    handler is restored on exit.
    """

    def __init__(self) -> None:
        self._prev: Any = None
        self._held = False
        self._pending = False
        self._remove: list[Path] = []
        self._calls: list[Callable[[], None]] = []

    def remove_on_term(self, path: str | Path) -> None:
        self._remove.append(Path(path))

    def call_on_term(self, fn: Callable[[], None]) -> None:
        """Also run ``fn`` on SIGTERM (after the folders are removed), e.g. to release a lock and its file."""
        self._calls.append(fn)

    def _terminate(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        _logger.warning("terminated (SIGTERM): removing temporary files")
        for path in self._remove:
            shutil.rmtree(path, ignore_errors=True)
        for fn in self._calls:
            with contextlib.suppress(OSError):
                fn()
        raise SystemExit(128 + signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._held:
            self._pending = True
        else:
            self._terminate()

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not None:  # None: installed outside Python, cannot be restored
                self._prev = prev
                signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self._pending:
            self._terminate()
