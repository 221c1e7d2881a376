"""``--format openvino``: an IR (``.xml`` + ``.bin``) converted from the fp32 ONNX, int8 through NNCF, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ExportError
from ..openvino import PRECISIONS, OvRunner, compile_config, convert_ir, cpu_has_bf16, ov_supports
from ..quantize import resolve_reduce_range
from ..sidecar import file_sha256
from .base import BenchVariant, Built, ExportFormat, TritonFacts, fresh_path, logger

if TYPE_CHECKING:
    from ..profile import ExportProfile


class OpenVinoFormat(ExportFormat):
    name = "openvino"
    backend = "openvino"
    suffix = ".xml"
    precisions = PRECISIONS
    companions = (".bin",)  # the IR's weights; read_model finds them by the .xml's name
    triton = TritonFacts("model.xml", "backend", "openvino", "KIND_CPU", companions=(".bin",),
                         companion_sha256=("openvino", "weights_sha256"))
    bench_prefix = "ov"
    bench = (
        BenchVariant("fp32", "cpu", "OpenVINO CPU, IR from the fp32 ONNX, f32 inference hint"),
        BenchVariant("bf16", "cpu", "OpenVINO CPU, same IR, bf16 inference hint (AMX/AVX512-BF16)"),
        BenchVariant("int8", "cpu", "OpenVINO CPU, NNCF int8 IR (calibrated on demo images)"),
    )
    bench_tools = ("openvino", "nncf")

    def precision_error(self, precision: str) -> str:
        return (f"'{precision}' is not a precision of --format openvino; use fp32, bf16 (CPUs with AMX or "
                "AVX512-BF16) or int8")

    def check_machine(self, precision: str, *, checking: bool) -> None:
        """Refused even unchecked: bf16 without bf16 hardware would run as fp32."""
        ok, why = ov_supports(precision)
        if not ok:
            raise ExportError(why)

    def check_output(self, out: Path) -> None:
        if out.suffix != self.suffix:
            raise ExportError(f"--output '{out}' must end in {self.suffix} for --format {self.name} (the weights go "
                              "to the .bin next to it)")

    def needs_calibration(self, prof: ExportProfile) -> bool:
        return prof.precision == "int8"  # NNCF always calibrates

    def onnx_precision(self, precision: str) -> str:
        return "fp32"  # bf16 is a compile-time hint here, int8 NNCF's quantisation of the fp32 IR

    def build(self, built: Built, prof: ExportProfile, workdir: Path, *, calibration: np.ndarray | None,
              img_size: tuple[int, int]) -> Built:
        built.artefact = fresh_path(workdir, f"model-ov-{prof.precision}", ".xml")
        int8 = prof.precision == "int8"
        reduce_range, why = resolve_reduce_range(prof.quantize.reduce_range)
        logger.info("converting to OpenVINO IR (%s%s)", prof.precision,
                     f", NNCF int8 on {len(calibration) if calibration is not None else 0} calibration images, "
                     f"{7 if reduce_range else 8}-bit weights; {why}" if int8 else "")
        built.extra["openvino"] = convert_ir(built.onnx, built.artefact, calibration=calibration, int8=int8,
                                             reduce_range=reduce_range, subset_size=prof.quantize.num_calibration)
        built.extra["openvino"]["compile_config"] = compile_config(prof.precision)
        if int8:
            built.extra["quantization"] = {
                "tool": "nncf", "model_type": "transformer", "overflow_fix": "enable" if reduce_range else "disable",
                "reduce_range": reduce_range, "reduce_range_why": why,
                "weights": "int8 (7-bit)" if reduce_range else "int8", "activations": "int8 (calibrated)",
                "calibration_images": None if calibration is None else len(calibration)}
        return built

    def companion_sources(self, built: Built) -> dict[str, Path]:
        return {".bin": built.artefact.with_suffix(".bin")}

    def record_companions(self, built: Built, out: Path) -> None:
        built.extra["openvino"].update(weights_file=out.with_suffix(".bin").name,
                                       weights_sha256=file_sha256(built.artefact.with_suffix(".bin")))

    def sidecar_onnx(self, out: Path) -> str | None:
        return None  # the IR ships without its ONNX

    def compute_dtype(self, precision: str, built: Built) -> str:
        hint = built.extra["openvino"]["compile_config"]["INFERENCE_PRECISION_HINT"]
        if precision == "int8":
            return f"int8 weights and activations (NNCF FakeQuantize), {hint} elsewhere (INFERENCE_PRECISION_HINT)"
        return f"{precision} (OpenVINO INFERENCE_PRECISION_HINT {hint}; the IR holds fp32 weights)"

    def runner(self, path: Path, precision: str, *, device: str | None = None, threads: int | None = None) -> OvRunner:
        return OvRunner(path, precision, threads=threads)  # CPU only

    def unavailable(self, precision: str, device: str) -> str | None:
        ok32, why32 = ov_supports("fp32")
        if not ok32:
            return why32
        if precision == "bf16":
            return None if cpu_has_bf16() else "no bf16 hardware on this CPU (needs AMX or AVX512-BF16)"
        ok, why = ov_supports(precision)
        return None if ok else why
