"""What one ``--format`` is: the :class:`ExportFormat` every backend module subclasses once.

Everything the export, its parity check, ``mffzoo bench infer`` and the Triton writer need to know of a format
lives on its class (name, precisions, file suffix and companions, how to build, how to run, whether it runs here,
its Triton backend), so no caller keeps a table of formats of its own. Every format starts from the fp32/fp16/bf16
ONNX that :func:`mffzoo.export.pipeline.build_artefact` exports; :meth:`ExportFormat.build` turns it into the
artefact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ...errors import ExportError

if TYPE_CHECKING:
    from ..parity import Runner
    from ..profile import ExportProfile

__all__ = ["INPUT_NAME", "Built", "BenchVariant", "ExportFormat", "TritonFacts", "fresh_path", "logger"]

logger = logging.getLogger("mffzoo")  # the formats' progress lines, under the CLI's logger

INPUT_NAME = "pixel_values"  # the artefacts' input tensor, in every format


@dataclass
class Built:
    artefact: Path  # the file to serve (inside the work folder; companions such as an IR's .bin lie next to it)
    onnx: Path  # the ONNX it was made from (the artefact itself for fp32/fp16/bf16 ONNX)
    extra: dict[str, Any] = field(default_factory=dict)  # sidecar sections: "quantization" / "tensorrt" / "openvino"
    outputs: list[str] = field(default_factory=list)  # output tensor names in order (levels: level0..levelN-1)
    dynamic_size: tuple[int, int, int] | None = None  # (min, opt, max) px of height and width; None: fixed size


@dataclass(frozen=True)
class TritonFacts:
    """How Triton serves a format (``None`` on a format: Triton cannot serve it from this tool)."""

    file: str  # the model file's name in the version folder
    key: str  # config field naming the runtime: "backend" or "platform"
    value: str
    kind: str  # default instance kind
    companions: tuple[str, ...] = ()  # suffixes of files copied next to the model file (OpenVINO's .bin)
    companion_sha256: tuple[str, ...] = ()  # where the sidecar keeps the first companion's sha256
    gpu_only: bool = False
    signature_from_onnx: bool = False  # I/O read from the ONNX the artefact was built from (a TensorRT plan)


@dataclass(frozen=True)
class BenchVariant:
    """One ``mffzoo bench infer`` row of a format: named ``<bench_prefix>-<precision><suffix>``."""

    precision: str
    device: str  # "cpu" | "cuda"
    description: str
    suffix: str = ""  # e.g. "-static"
    quantize: str = "dynamic"  # quantize.mode of its export profile


def fresh_path(workdir: Path, stem: str, suffix: str) -> Path:
    """A name not yet taken in ``workdir`` (the bench builds many artefacts into one folder)."""
    path, i = workdir / f"{stem}{suffix}", 1
    while path.exists():
        path, i = workdir / f"{stem}-{i}{suffix}", i + 1
    return path


class ExportFormat:
    """One export format; subclass it once per backend and :func:`~mffzoo.export.formats.register` an instance."""

    name: ClassVar[str]  # the --format value (and the sidecar's "format")
    backend: ClassVar[str]  # the runtime's name in parity reports and logs, e.g. "onnxruntime"
    suffix: ClassVar[str]  # of the artefact
    precisions: ClassVar[tuple[str, ...]]
    companions: ClassVar[tuple[str, ...]] = ()  # suffixes of files that travel with the artefact (.bin, .onnx)
    strict_suffix: ClassVar[bool] = True  # --output must end in ``suffix``
    triton: ClassVar[TritonFacts | None] = None
    bench_prefix: ClassVar[str | None] = None  # bench rows are named <bench_prefix>-<precision>
    bench: ClassVar[tuple[BenchVariant, ...]] = ()
    bench_tools: ClassVar[tuple[str, ...]] = ()  # extra packages whose versions a bench run records

    # --- plan: refused before any file is written ---------------------------------------------------------------
    def precision_error(self, precision: str) -> str:
        """The profile error for a precision this format does not have."""
        return f"'{precision}' is not a precision of --format {self.name}; use {', '.join(self.precisions)}"

    def check_machine(self, precision: str, *, checking: bool) -> None:
        """Raise :class:`ExportError` when this machine cannot build (or, ``checking``, run) the artefact."""

    def check_output(self, out: Path) -> None:
        """Refuse an ``--output`` whose suffix does not fit this format."""
        if self.strict_suffix and out.suffix != self.suffix:
            raise ExportError(f"--output '{out}' must end in {self.suffix} for --format {self.name}")

    def needs_calibration(self, prof: ExportProfile) -> bool:
        """Whether the build needs int8 calibration images (loaded and checked before anything is written)."""
        return False

    def calibration_fallback(self, prof: ExportProfile) -> Path | None:
        """Calibration images when ``--calib-images`` is not given (None: the built-in demo data)."""
        return None

    # --- build ---------------------------------------------------------------------------------------------------
    def onnx_precision(self, precision: str) -> str:
        """The precision of the ONNX the artefact is made from."""
        return precision

    def build(self, built: Built, prof: ExportProfile, workdir: Path, *, calibration: np.ndarray | None,
              img_size: tuple[int, int]) -> Built:
        """Turn ``built.onnx`` into the artefact inside ``workdir`` (default: the ONNX is the artefact)."""
        return built

    def companion_sources(self, built: Built) -> dict[str, Path]:
        """Companion suffix -> the built file that goes there (next to the artefact)."""
        return {}

    def record_companions(self, built: Built, out: Path) -> None:
        """Note the companions' final names and hashes in ``built.extra`` (the sidecar) before it is written."""

    def sidecar_onnx(self, out: Path) -> str | None:
        """The sidecar's "onnx": the name of the ONNX file that ships with the artefact, if any."""
        return out.name

    def compute_dtype(self, precision: str, built: Built) -> str:
        """What the artefact computes in, for the sidecar."""
        return precision

    # --- check and bench -----------------------------------------------------------------------------------------
    def runner(self, path: Path, precision: str, *, device: str | None = None, threads: int | None = None) -> Runner:
        """A callable on fp32 numpy NCHW batches: the parity routine's and the bench's way to run the artefact.
        It returns the output array, or a list of them (graph order) for an artefact with several outputs.

        ``device`` None: the export's parity default (e.g. CUDA first where present); else that device only.
        """
        raise NotImplementedError

    def bench_call(self, runner: Runner) -> tuple[Callable[[Any], Any], Callable[[np.ndarray], Any]]:
        """(run, prepare) for the bench: prepare moves a numpy batch to where ``run`` wants it, outside timing."""
        return runner, np.ascontiguousarray

    def unavailable(self, precision: str, device: str) -> str | None:
        """Why a bench row of this format cannot run here (None: it can)."""
        return None

    def bench_names(self) -> list[str]:
        return [f"{self.bench_prefix}-{v.precision}{v.suffix}" for v in self.bench]
