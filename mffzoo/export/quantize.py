"""int8 for CPU serving with ONNX Runtime's own quantisation tools (dynamic, or static with calibration images).

Dynamic quantisation stores int8 weights and quantises activations per batch at run time (no data needed);
static quantisation fixes activation scales from calibration images (QDQ format), which needs representative
images: the same preprocessed images the parity check uses, from ``--check-images`` or the demo dataset.

x86 CPUs without VNNI run ORT's u8 x s8 kernels with pairwise int16 sums that saturate when weights use the
full int8 range; per-channel scales put every column at the full range, so there the error jumps (measured on
an AVX2 EPYC: tiny ViT cosine 0.989 full range vs 0.9997 with 7-bit weights). ``reduce_range`` (7-bit weights,
ORT's documented remedy) is therefore on by default where VNNI/AMX-INT8 is absent, off where it is present.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..cpu import cpu_features
from ..errors import ExportError

__all__ = ["quantize_onnx", "ArrayCalibrationReader", "resolve_reduce_range", "cpu_has_vnni"]

def cpu_has_vnni() -> bool | None:
    """Whether this CPU has int8 dot-product instructions (VNNI / AMX-INT8); None when it cannot be told."""
    cpu = cpu_features()
    return cpu.vnni if cpu.flags_known else None


def resolve_reduce_range(value: bool | None) -> tuple[bool, str]:
    """``quantize.reduce_range`` -> (the setting, why): null means auto (7-bit weights unless VNNI is present)."""
    if value is not None:
        return value, "set in the profile"
    vnni = cpu_has_vnni()
    if vnni is None:
        return True, "auto: CPU int8 features unknown, 7-bit weights are safe everywhere"
    return (False, "auto: this CPU has VNNI/AMX-INT8") if vnni else (True, "auto: this CPU has no VNNI (u8s8 "
                                                                        "saturation with full-range weights)")


class ArrayCalibrationReader:
    """ORT ``CalibrationDataReader`` over preprocessed images, fed one small batch at a time."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 8) -> None:
        self._batches = [images[i:i + batch] for i in range(0, len(images), batch)]
        self.input_name = input_name
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: str = "dynamic",
    calibration: np.ndarray | None = None,
    input_name: str = "pixel_values",
    per_channel: bool = True,
    reduce_range: bool = False,
) -> Path:
    """fp32 ONNX ``src`` -> int8 ONNX ``dst`` (int8 weights, 7-bit if ``reduce_range``; uint8 activations)."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"int8 needs onnxruntime's quantisation tools ({exc}); pip install 'mffzoo[onnx]'") from None
    dst = Path(dst)
    root = logging.getLogger()
    level = root.level
    if not logging.getLogger("mffzoo").isEnabledFor(logging.DEBUG):
        root.setLevel(logging.WARNING)  # ORT's quantiser logs every skipped tensor on the root logger
    try:
        _quantize(src, dst, mode, calibration, input_name, per_channel, reduce_range)
    finally:
        root.setLevel(level)
    return dst


def _quantize(src: str | os.PathLike[str], dst: Path, mode: str, calibration: np.ndarray | None, input_name: str,
              per_channel: bool, reduce_range: bool) -> None:
    # optional: mffzoo[onnx]
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional: mffzoo[onnx]

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + ORT-level optimisation first, as ORT's quantisation guide recommends.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Gemm"])
        elif mode == "static":
            if calibration is None or not len(calibration):
                raise ExportError("static int8 needs calibration images; pass --check-images DIR or use "
                                  "quantize.mode=dynamic")
            quantize_static(
                str(pre), str(dst), ArrayCalibrationReader(calibration, input_name),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel, reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Gemm"],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        else:  # a profile's quantize.mode is checked at load; this is quantize_onnx's own, public API (a str)
            raise ExportError(f"quantize.mode must be dynamic or static, got {mode!r}")
