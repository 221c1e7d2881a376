"""What ``mffzoo bench train`` reports, as strings (the CLI prints them): :class:`TrainBenchResult`, its table
(:func:`format_results`), the fastest-peer summary (:func:`summary_lines`) and the notes under the table (the
like-for-like parameter check, the recipe and the machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .train_impls import PEERS
from .train_rows import TrainBenchRow

__all__ = ["TrainBenchResult", "format_results", "summary_lines", "note_lines", "run_log_line", "memory_log_line"]


@dataclass
class TrainBenchResult:
    """The rows of one ``bench_train`` call, in measurement order (per model: peers first, then mffzoo's)."""

    rows: list[TrainBenchRow] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of strings: what the table printers show."""
        return format_results(self.rows)

    def summary(self) -> list[str]:
        """One line per model: the fastest peer row and every mffzoo row's ratio to it."""
        return summary_lines(self.rows)

    def notes(self) -> list[str]:
        """The summary, then per row its parameters, attention, optimizer and load, then the recipe and machine."""
        return self.summary() + note_lines(self.rows)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The flat JSON rows ``--json`` writes."""
        return [r.to_dict() for r in self.rows]


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_results(rows: list[TrainBenchRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: what the table printers show."""
    cuda = any(r.speed.flops_per_step for r in rows)
    compiled = any(r.compiled for r in rows)
    header = ["model", "implementation", "precision", "batch", "params (M)", "img/s", "img/s best",
              "peak mem (MiB)", "peer (same precision)", "ratio vs peer", "ratio per run", "ratio best",
              "ratio vs fastest peer"]
    if compiled:
        header += ["ratio vs eager", "compile (s)"]
    if cuda:
        header += ["TFLOP/s", "MFU (peak of its precision)"]
    out = []
    for r in rows:
        s, q = r.speed, r.ratios
        line = [r.model, r.impl, r.precision, str(r.batch), f"{r.params / 1e6:.2f}", _fmt(s.img_s),
                _fmt(s.img_s_best), _fmt(r.memory.peak_mem_mib, ".0f"), r.peer or "-", _x(q.ratio),
                " / ".join(_fmt(v) for v in q.ratio_runs or [None]), _x(q.ratio_best), _x(q.ratio_fastest)]
        if compiled:
            line += [_x(q.ratio_eager), _fmt(s.compile_s, ".1f")]
        if cuda:
            line += [_fmt(s.tflops, ".1f"), _fmt(s.mfu * 100, ".1f") + "%" if s.mfu else "-"]
        out.append(line)
    return header, out


def summary_lines(rows: list[TrainBenchRow]) -> list[str]:
    """One line per model: the fastest peer row of the run and every mffzoo row's ratio to it."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        fastest = group[0].ratios.fastest_peer
        if fastest is None:
            continue
        peer = next(r for r in group if r.impl == fastest)
        ours = ", ".join(f"{r.impl} {_x(r.ratios.ratio_fastest)}" for r in group if r.impl not in PEERS)
        out.append(f"{model}: fastest peer {fastest} ({peer.precision}, {peer.speed.img_s:.2f} img/s); "
                   f"vs it: {ours or 'no mffzoo row'}")
    return out


def note_lines(rows: list[TrainBenchRow]) -> list[str]:
    """Per row the like-for-like parameter check, attention, optimizer and load; then the recipe (or the custom
    model) and what the numbers are on which machine."""
    out = []
    for r in rows:
        s = r.speed
        out.append(f"{r.model} {r.impl}: {r.params:,} params ({r.trainable_params:,} trainable), "
                   f"attention {r.attention}, optimizer {r.optimizer}, load {_fmt(s.load_before)}"
                   f"->{_fmt(s.load_after)}"
                   + (f", compile s per run {' / '.join(_fmt(c, '.1f') for c in s.compile_s_runs)}"
                      if s.compile_s_runs else ""))
    if rows:
        r = rows[0]
        if r.recipe:
            out.append(f"recipe: {r.recipe}" + (f" with {', '.join(r.overrides)}" if r.overrides else ""))
        elif r.overrides:
            out.append(f"custom model: {', '.join(r.overrides)}")
        out.append(f"device: {r.device}; img/s = batch / median of {r.steps} timed steps after {r.warmup} "
                   "warm-up, implementations' steps interleaved in one process per run; ratios = median over runs "
                   "of the run's img/s / the other row's img/s (peer: the HF peer under the row's precision); best = "
                   "fastest timed step (steadier when other jobs share the machine); compile = a compiled row's "
                   f"warm-up time beyond its eager twin's step; memory: {r.memory.mem_kind}")
    return out


def run_log_line(r: TrainBenchRow, rep: int, repeats: int) -> str:
    """The progress line of one row of run ``rep`` (0-based) of ``repeats``."""
    s = r.speed
    extra = f", compile {s.compile_s:.1f} s" if s.compile_s is not None else ""
    return (f"[run {rep + 1}/{repeats}] {r.model} {r.impl} ({r.precision}): {s.img_s:.2f} img/s{extra}, "
            f"load {_fmt(s.load_before)}->{_fmt(s.load_after)}")


def memory_log_line(r: TrainBenchRow) -> str:
    """The progress line of one row's memory run."""
    return f"[memory] {r.model} {r.impl}: {_fmt(r.memory.peak_mem_mib, '.0f')} MiB"
