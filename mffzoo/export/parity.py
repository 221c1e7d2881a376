"""THE parity routine: every backend (ONNX Runtime, TensorRT, the benchmark's backends) is judged by this code.

An artefact is run next to PyTorch on the same inputs (random tensors and real images) at the minimum, an odd
middle and the maximum batch. Low-precision artefacts are compared twice: against fp32 PyTorch (the model the
user has; the gates apply here) and against PyTorch computing in the same precision (which separates the
exporter's error from the precision's own error). An artefact with several outputs (``features: levels``) is
compared output by output, and the gates apply to each output; one with a dynamic input size is also run at
other sizes (:class:`InputSet` with its ``size``), non-square included.
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

__all__ = ["Metrics", "compare", "compare_outputs", "worst", "as_outputs", "InputSet", "ParityRow", "ParityReport",
           "ParityFailed", "run_parity", "gate_failures"]

# numpy NCHW batch -> the output array, or a list of arrays (one per output, graph order)
Runner = Callable[[np.ndarray], "np.ndarray | Sequence[np.ndarray]"]


def as_outputs(y: Any) -> list[Any]:
    """A runner's or a module's result as a list of outputs (one element for a single-output artefact)."""
    return list(y) if isinstance(y, (list, tuple)) else [y]


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


def compare_outputs(out: Any, ref: Any, *, classifier: bool = False) -> list[Metrics]:
    """:func:`compare` per output (``out`` and ``ref``: an array or a list of arrays each)."""
    outs, refs = as_outputs(out), as_outputs(ref)
    if len(outs) != len(refs):
        raise CheckFailed(f"the artefact has {len(outs)} outputs, PyTorch {len(refs)}")
    return [compare(o, r, classifier=classifier) for o, r in zip(outs, refs)]


def worst(ms: Sequence[Metrics]) -> Metrics:
    """The worst of each metric over several outputs (a one-line summary of a multi-output artefact)."""
    top = [m.top1 for m in ms if m.top1 is not None]
    return Metrics(max_abs=max(m.max_abs for m in ms), mean_abs=max(m.mean_abs for m in ms),
                   cosine=min(m.cosine for m in ms), top1=min(top) if top else None, n=ms[0].n)


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
class InputSet:
    """One pool of check inputs: ``data`` holds ``sum(batches)`` samples (each batch size sees different ones)."""

    name: str  # "random" or "images"
    data: np.ndarray
    batches: Sequence[int]
    size: str | None = None  # "HxW" where the artefact takes several sizes; None: its one size


@dataclass
class ParityRow:
    reference: str  # "torch fp32" or "torch fp16"/"torch bf16"
    inputs: str  # "random", "images" or "all"
    batch: int | None  # None for the "all" summary row
    metrics: Metrics
    gated: bool = False
    failures: list[str] = field(default_factory=list)
    output: str | None = None  # the output compared (None: the artefact's only one)
    size: str | None = None  # the input's "HxW" (None: the artefact's one size, or every size in an "all" row)


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
    outputs: list[str] = field(default_factory=list)  # the outputs compared, each gated on its own
    sizes: list[str] = field(default_factory=list)  # the input sizes ("HxW") checked, where there are several

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> tuple[list[list[str]], list[str]]:
        """Rows and header for :func:`mffzoo.table.print_table`. With several outputs, the batches of one input
        pool and size are shown merged (the report's JSON keeps every batch)."""
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows = []
        for r in self._shown_rows():
            m = r.metrics
            verdict = ("FAIL: " + "; ".join(r.failures)) if r.failures else ("pass" if r.gated else "")
            what = f"{self.backend} vs {r.reference}" + (f" [{r.output}]" if len(self.outputs) > 1 else "")
            inputs = r.inputs + (f" {r.size}" if r.size else "")
            rows.append([what, inputs, "all" if r.batch is None else str(r.batch),
                         f(m.max_abs, ".2e"), f(m.mean_abs, ".2e"), f(m.cosine, ".7f"), f(m.top1, ".3f"), verdict])
        return rows, ["comparison", "inputs", "batch", "max abs", "mean abs", "cosine (min)", "top-1 agree", "gate"]

    def _shown_rows(self) -> list[ParityRow]:
        if len(self.outputs) <= 1:
            return self.rows
        shown: list[ParityRow] = []
        groups: dict[tuple[Any, ...], list[ParityRow]] = {}
        for r in self.rows:
            if r.batch is None:
                shown += [ParityRow(g[0].reference, g[0].inputs, None if len(g) > 1 else g[0].batch,
                                    _merge([x.metrics for x in g]), output=g[0].output, size=g[0].size)
                          for g in groups.values()]
                groups.clear()
                shown.append(r)
            else:
                groups.setdefault((r.inputs, r.size), []).append(r)
        return shown


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
def _torch_run(module: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    dev = next(module.parameters()).device
    return [y.float().cpu().numpy() for y in as_outputs(module(torch.from_numpy(x).to(dev)))]


def _input_sets(inputs: dict[str, np.ndarray] | Sequence[InputSet], batches: Sequence[int]) -> list[InputSet]:
    if isinstance(inputs, dict):
        return [InputSet(name, pool, batches) for name, pool in inputs.items()]
    return list(inputs)


def _split(sets: list[InputSet]) -> list[tuple[InputSet, int, np.ndarray]]:
    """(set, batch size, batch) for every batch of every set, each batch its own samples."""
    out = []
    for s in sets:
        start = 0
        for b in s.batches:
            out.append((s, b, s.data[start:start + b]))
            start += b
    return out


def run_parity(
    runner: Runner,
    references: dict[str, torch.nn.Module],
    inputs: dict[str, np.ndarray] | Sequence[InputSet],
    *,
    batches: Sequence[int],
    gates: Gates,
    gated_reference: str = "torch fp32",
    classifier: bool = False,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    inputs_info: dict[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
) -> ParityReport:
    """Run ``runner`` and each reference module on every input pool split into ``batches``. The runner's
    ``providers`` and ``notes`` (what executed it; see :class:`~mffzoo.export.onnx.OrtRunner`) go into the report.

    ``inputs`` maps a name ("random", "images") to an array of ``sum(batches)`` samples, so every batch size sees
    different samples; or it is a list of :class:`InputSet` (each with its own batches and size). Gates apply, per
    output (``outputs`` names them; several for ``levels``), to the merged ("all") row against
    ``gated_reference``.
    """
    sets = _input_sets(inputs, batches)
    split = _split(sets)
    got = [as_outputs(runner(x)) for _, _, x in split]  # the artefact once per batch, against every reference
    names = list(outputs) if outputs else [f"output{i}" for i in range(len(got[0]))] if len(got[0]) > 1 else []
    multi = bool(names)
    rows: list[ParityRow] = []
    failures: list[str] = []
    for ref_name, module in references.items():
        per = [compare_outputs(out, _torch_run(module, x), classifier=classifier) for (_, _, x), out in zip(split, got)]
        gated = ref_name == gated_reference
        for i in range(len(per[0])):  # output by output: its batches, then its gated "all" row
            name = names[i] if multi else None
            rows += [ParityRow(ref_name, s.name, b, ms[i], output=name, size=s.size)
                     for (s, b, _), ms in zip(split, per)]
            total = _merge([ms[i] for ms in per])
            fails = gate_failures(total, gates) if gated else []
            rows.append(ParityRow(ref_name, "all", None, total, gated=gated, failures=fails, output=name))
            failures += [f"vs {ref_name}{f' [{name}]' if multi else ''}: {f}" for f in fails]
    return ParityReport(
        backend=backend, precision=precision, gates=dataclasses.asdict(gates), batches=list(batches), rows=rows,
        inputs=dict(inputs_info or {}), passed=not failures, failures=failures,
        providers=list(getattr(runner, "providers", None) or []), notes=list(getattr(runner, "notes", None) or []),
        outputs=names, sizes=list(dict.fromkeys(s.size for s in sets if s.size)),
    )
