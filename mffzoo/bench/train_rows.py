"""The typed rows of ``mffzoo bench train``: one (model, implementation) measurement, merged over repeated runs
(:func:`merge_runs`), with its ratios to the other rows of the same model (:func:`add_ratios`).

A row is :class:`TrainBenchRow` with three sub-records (:class:`Speed`, :class:`Memory`, :class:`Ratios`);
:meth:`TrainBenchRow.to_dict` is the flat JSON row ``--json`` writes (and the worker processes send), and
:meth:`TrainBenchRow.from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .train_impls import EAGER_TWIN, IMPLS, PEER_OF, PEERS

__all__ = ["Speed", "Memory", "Ratios", "TrainBenchRow", "merge_runs", "add_ratios"]


@dataclass
class Speed:
    """The timed steps of a row: img/s is the batch over the median step time after warm-up; the ``*_runs`` lists
    keep every run's value once repeated runs are merged (the spread, and the paired ratios)."""

    img_s: float
    img_s_runs: list[float] = field(default_factory=list)
    img_s_best: float | None = None  # from the fastest timed step
    img_s_best_runs: list[float] = field(default_factory=list)
    step_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    warmup_times_s: list[float] = field(default_factory=list)
    compile_s: float | None = None  # a compiled row's warm-up time beyond its eager twin's step
    compile_s_runs: list[float] = field(default_factory=list)
    flops_per_step: int | None = None  # CUDA only
    tflops: float | None = None
    peak_tflops: float | None = None  # the GPU's dense peak for the row's precision
    mfu: float | None = None
    load_before: float | None = None  # the machine's 1-minute load average around the timed steps
    load_after: float | None = None


@dataclass
class Memory:
    """Peak memory of a row's steps, taken in a process of its own, and what that number is."""

    peak_mem_mib: float | None = None
    mem_kind: str = "not measured"


@dataclass
class Ratios:
    """A row's img/s over other rows' of the same model, the median of the per-run ratios (paired, so a run slowed
    by load cancels out); None where the other row was not measured."""

    ratio: float | None = None  # vs the peer under the row's own precision
    ratio_runs: list[float] = field(default_factory=list)
    ratio_best: float | None = None  # the same from each side's fastest step
    ratio_best_runs: list[float] = field(default_factory=list)
    fastest_peer: str | None = None  # the fastest peer row of the run
    ratio_fastest: float | None = None
    ratio_fastest_runs: list[float] = field(default_factory=list)
    ratio_eager: float | None = None  # a compiled row vs its eager twin (what compilation gains)


_PARTS = {"speed": Speed, "memory": Memory, "ratios": Ratios}


@dataclass
class TrainBenchRow:
    """One (model, implementation) of a benchmark run: what was stepped, how, and what it measured."""

    model: str  # what was timed, from the model's own args (e.g. "ViT-S/16", "ViT-S/16 (vits recipe)")
    impl: str  # a key of IMPLS
    precision: str  # what the step's matmuls run in: fp32, tf32, bf16 or fp16
    speed: Speed
    size: str | None = None  # --models size, or None for --recipe
    recipe: str | None = None  # the recipe file (absolute), or None
    device: str = ""  # the machine, in words
    overrides: list[str] = field(default_factory=list)
    batch: int = 0
    steps: int = 0
    warmup: int = 0
    params: int = 0
    trainable_params: int = 0
    attention: str = ""
    optimizer: str = ""
    compiled: bool = False
    memory: Memory = field(default_factory=Memory)
    ratios: Ratios = field(default_factory=Ratios)

    @property
    def label(self) -> str:
        return IMPLS.get(self.impl, "")

    @property
    def peer(self) -> str:
        """The peer row this row is compared with: itself for a peer, else the peer under its precision."""
        return self.impl if self.impl in PEERS else PEER_OF[self.precision]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON row: every field, the sub-records' fields inline, plus ``label`` and ``peer``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _PARTS:
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = list(value) if isinstance(value, list) else value
            if f.name == "impl":
                out.update(label=self.label, peer=self.peer)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainBenchRow:
        """The row of a flat JSON row (:meth:`to_dict`); ``label`` and ``peer`` follow from ``impl``."""
        parts = {name: part(**{f.name: d[f.name] for f in dataclasses.fields(part) if f.name in d})
                 for name, part in _PARTS.items()}
        own = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in _PARTS and f.name in d}
        return cls(**own, **parts)


def merge_runs(runs: list[TrainBenchRow]) -> TrainBenchRow:
    """One row from repeated runs: the median of the per-run img/s (every run's value is kept for the spread and
    for the paired ratios of :func:`add_ratios`)."""
    first, speeds = runs[0], [r.speed for r in runs]
    img_s_runs = [s.img_s for s in speeds]
    img_s = statistics.median(img_s_runs)
    step_s = first.batch / img_s
    compiles = [s.compile_s for s in speeds if s.compile_s is not None]
    tflops = mfu = None
    if first.speed.flops_per_step:
        tflops = first.speed.flops_per_step / step_s / 1e12
        mfu = tflops / first.speed.peak_tflops if first.speed.peak_tflops else None
    speed = dataclasses.replace(
        first.speed, img_s=img_s, img_s_runs=img_s_runs, img_s_best_runs=[s.img_s_best for s in speeds],
        img_s_best=max(s.img_s_best for s in speeds), step_s=step_s,
        step_times_s=[t for s in speeds for t in s.step_times_s],
        warmup_times_s=[t for s in speeds for t in s.warmup_times_s],
        compile_s=statistics.median(compiles) if compiles else None, compile_s_runs=compiles,
        tflops=tflops, mfu=mfu,
        load_before=max((s.load_before for s in speeds if s.load_before is not None), default=None),
        load_after=max((s.load_after for s in speeds if s.load_after is not None), default=None),
    )
    return dataclasses.replace(first, speed=speed, overrides=list(first.overrides))


def _paired(a: TrainBenchRow, b: TrainBenchRow | None, key: str = "img_s") -> tuple[float | None, list[float]]:
    """(median, per-run list) of a's / b's ``key`` run by run: paired, so a run slowed by load cancels out."""
    if b is None:
        return None, []
    xs = getattr(a.speed, f"{key}_runs") or [getattr(a.speed, key)]
    ys = getattr(b.speed, f"{key}_runs") or [getattr(b.speed, key)]
    per_run = [x / y for x, y in zip(xs, ys)]
    return statistics.median(per_run), per_run


def _ratios(r: TrainBenchRow, by_impl: Mapping[str, TrainBenchRow], fastest: TrainBenchRow | None) -> Ratios:
    peer = by_impl.get(r.peer)
    ratio, ratio_runs = _paired(r, peer)
    best, best_runs = _paired(r, peer, "img_s_best") if r.speed.img_s_best is not None else (None, [])
    ratio_fastest, fastest_runs = _paired(r, fastest)
    return Ratios(ratio=ratio, ratio_runs=ratio_runs, ratio_best=best, ratio_best_runs=best_runs,
                  fastest_peer=fastest.impl if fastest else None, ratio_fastest=ratio_fastest,
                  ratio_fastest_runs=fastest_runs,
                  ratio_eager=_paired(r, by_impl.get(EAGER_TWIN.get(r.impl, "")))[0])


def add_ratios(rows: list[TrainBenchRow]) -> list[TrainBenchRow]:
    """Per model (label), set every row's :class:`Ratios`:

    - ``ratio`` (and ``ratio_runs``, ``ratio_best``): img/s / img/s of the peer under the row's own precision
      (``peer``; None when that peer row was not measured); the median of the per-run ratios;
    - ``ratio_fastest``: img/s / img/s of the fastest peer row of the run (``fastest_peer``);
    - ``ratio_eager``: a compiled row's img/s / its eager twin's (what compilation gains).
    ``best`` uses each side's fastest step, the steadier number when other jobs share the machine."""
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        by_impl = {r.impl: r for r in group}
        peers = [r for r in group if r.impl in PEERS]
        fastest = max(peers, key=lambda r: r.speed.img_s) if peers else None
        for r in group:
            r.ratios = _ratios(r, by_impl, fastest)
    return rows
