"""A toy fourth export format: the ONNX file under another suffix, run by ONNX Runtime on the CPU.

It exists to show that a backend is one module plus one ``register(...)`` line: export, parity, the bench and the
Triton writer pick it up from :data:`mffzoo.export.formats.FORMATS` with no other change.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mffzoo.export.formats import BenchVariant, Built, ExportFormat
from mffzoo.export.onnx import OrtRunner
from mffzoo.export.profile import ExportProfile


class OnnxCopyFormat(ExportFormat):
    name = "onnx-copy"
    backend = "onnxruntime"
    suffix = ".onnxc"
    precisions = ("fp32", "fp16")
    bench_prefix = "copy"
    bench = (BenchVariant("fp32", "cpu", "toy: a copy of the fp32 ONNX on ONNX Runtime CPU"),)
    # triton = None: Triton cannot serve it, and --triton-repo is refused before anything is written

    def build(self, built: Built, prof: ExportProfile, workdir: Path, *, calibration: np.ndarray | None,
              img_size: tuple[int, int]) -> Built:
        built.artefact = shutil.copyfile(built.onnx, workdir / f"model-{prof.precision}{self.suffix}")
        return built

    def runner(self, path: Path, precision: str, *, device: str | None = None,
               threads: int | None = None) -> OrtRunner:
        return OrtRunner(path, threads=threads, providers=["CPUExecutionProvider"])
