"""THE parity routine: every backend (ONNX Runtime, TensorRT, the benchmark's backends) is judged by this code.

An artefact is run next to PyTorch on the same inputs (random tensors and real images) at the minimum, an odd
middle and the maximum batch. Low-precision artefacts are compared twice: against fp32 PyTorch (the model the
user has; the gates apply here) and against PyTorch computing in the same precision (which separates the
exporter's error from the precision's own error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CheckFailed
from .profile import Gates

__all__ = ["Metrics", "compare", "ParityRow", "ParityReport", "ParityFailed", "run_parity", "gate_failures"]

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Metrics:
    max_abs: float
    mean_abs: float
    cosine: float  # worst sample
    top1: float | None  # agreement of argmax (classifiers only)
    n: int


def compare(out: np.ndarray, ref: np.ndarray, *, classifier: bool = False) -> Metrics:
    """Error of ``out`` against ``ref``, per sample flattened (so pooled, tokens and logits are treated alike)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise CheckFailed(f"output shape {out.shape} differs from PyTorch's {ref.shape}")
    diff = np.abs(out - ref)
    a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = (a * b).sum(1) / denom
    finite = bool(np.isfinite(out).all())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).mean()) if classifier else None
    return Metrics(
        max_abs=float(diff.max()) if finite else float("inf"),
        mean_abs=float(diff.mean()) if finite else float("inf"),
        cosine=float(cos.min()) if finite else float("-inf"),
        top1=top1,
        n=len(out),
    )


def gate_failures(m: Metrics, gates: Gates) -> list[str]:
    """Which gates ``m`` misses, as short readable strings."""
    fails = []
    if gates.max_abs is not None and not m.max_abs <= gates.max_abs:
        fails.append(f"max abs {m.max_abs:.3g} > {gates.max_abs:g}")
    if gates.mean_abs is not None and not m.mean_abs <= gates.mean_abs:
        fails.append(f"mean abs {m.mean_abs:.3g} > {gates.mean_abs:g}")
    if gates.cosine is not None and not m.cosine >= gates.cosine:
        fails.append(f"cosine {m.cosine:.6f} < {gates.cosine:g}")
    if gates.top1 is not None and m.top1 is not None and not m.top1 >= gates.top1:
        fails.append(f"top-1 agreement {m.top1:.3f} < {gates.top1:g}")
    return fails


@dataclass
class ParityRow:
    reference: str  # "torch fp32" or "torch fp16"/"torch bf16"
    inputs: str  # "random", "images" or "all"
    batch: int | None  # None for the "all" summary row
    metrics: Metrics
    gated: bool = False
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    backend: str
    precision: str
    gates: dict[str, Any]
    batches: list[int]
    rows: list[ParityRow]
    inputs: dict[str, Any]
    passed: bool
    failures: list[str]
    providers: list[str] = field(default_factory=list)  # what really ran the artefact (session.get_providers())
    notes: list[str] = field(default_factory=list)  # e.g. a silent CPU fallback of the CUDA provider

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> tuple[list[list[str]], list[str]]:
        """Rows and header for :func:`mffzoo.table.print_table`."""
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows = []
        for r in self.rows:
            m = r.metrics
            verdict = ("FAIL: " + "; ".join(r.failures)) if r.failures else ("pass" if r.gated else "")
            rows.append([f"{self.backend} vs {r.reference}", r.inputs, "all" if r.batch is None else str(r.batch),
                         f(m.max_abs, ".2e"), f(m.mean_abs, ".2e"), f(m.cosine, ".7f"), f(m.top1, ".3f"), verdict])
        return rows, ["comparison", "inputs", "batch", "max abs", "mean abs", "cosine (min)", "top-1 agree", "gate"]


class ParityFailed(CheckFailed):
    """A parity gate was missed; carries the report so the CLI can print it."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


def _merge(ms: Sequence[Metrics]) -> Metrics:
    n = sum(m.n for m in ms)
    top = [m for m in ms if m.top1 is not None]
    return Metrics(
        max_abs=max(m.max_abs for m in ms),
        mean_abs=sum(m.mean_abs * m.n for m in ms) / n,
        cosine=min(m.cosine for m in ms),
        top1=(sum(m.top1 * m.n for m in top) / sum(m.n for m in top)) if top else None,
        n=n,
    )


@torch.no_grad()
def _torch_run(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    dev = next(module.parameters()).device
    return module(torch.from_numpy(x).to(dev)).float().cpu().numpy()


def run_parity(
    runner: Runner,
    references: dict[str, torch.nn.Module],
    inputs: dict[str, np.ndarray],
    *,
    batches: Sequence[int],
    gates: Gates,
    gated_reference: str = "torch fp32",
    classifier: bool = False,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    inputs_info: dict[str, Any] | None = None,
) -> ParityReport:
    """Run ``runner`` and each reference module on every input pool split into ``batches``. The runner's
    ``providers`` and ``notes`` (what executed it; see :class:`~mffzoo.export.onnx.OrtRunner`) go into the report.

    ``inputs`` maps a name ("random", "images") to an array of ``sum(batches)`` samples, so every batch size sees
    different samples. Gates apply to the merged ("all") row against ``gated_reference``.
    """
    rows: list[ParityRow] = []
    failures: list[str] = []
    outs: dict[str, list[np.ndarray]] = {}
    for name, pool in inputs.items():  # run the artefact once per batch, compare it with every reference
        start = 0
        for b in batches:
            outs.setdefault(name, []).append(runner(pool[start:start + b]))
            start += b
    for ref_name, module in references.items():
        per: list[Metrics] = []
        for name, pool in inputs.items():
            start = 0
            for i, b in enumerate(batches):
                m = compare(outs[name][i], _torch_run(module, pool[start:start + b]), classifier=classifier)
                start += b
                rows.append(ParityRow(ref_name, name, b, m))
                per.append(m)
        total = _merge(per)
        gated = ref_name == gated_reference
        fails = gate_failures(total, gates) if gated else []
        rows.append(ParityRow(ref_name, "all", None, total, gated=gated, failures=fails))
        failures += [f"vs {ref_name}: {f}" for f in fails]
    return ParityReport(
        backend=backend, precision=precision, gates=dataclasses.asdict(gates), batches=list(batches), rows=rows,
        inputs=dict(inputs_info or {}), passed=not failures, failures=failures,
        providers=list(getattr(runner, "providers", None) or []), notes=list(getattr(runner, "notes", None) or []),
    )
