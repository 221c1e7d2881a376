"""Training throughput: one MFF pretraining step against Hugging Face ``ViTMAEForPreTraining``.

The peer is what a user would pick instead of mffzoo: ``transformers.ViTMAEForPreTraining`` built with the same
dimensions (encoder, decoder, mask ratio, norm_pix) and stepped with ``torch.optim.AdamW``. By default each mffzoo
row is compared with the peer **under the same precision** (``--peers auto``): ``hf-bf16`` where the row's recipe
resolves to bf16 autocast (:func:`~mffzoo.train.numerics.resolve_precision`), ``hf`` (its fp32 default) where it
falls back to fp32; ``--peers auto,hf`` adds the peer's fp32 default as a reference row. mffzoo rows are built,
configured and stepped by the training engine's own functions and task, with the recipe defaults of a size
(``--models``) or exactly what one recipe's run does (``--recipe``: model, ``batch_per_device``, precision,
attention, optimizer, ``cpu_threads`` and ``train.compile`` with its compilation, whose time is reported apart
from the step time). A step is forward + backward + optimizer step on the same random batch; img/s is the batch
over the median step time after warm-up. Speed claims are the ratio columns (same run, same machine), never
absolute numbers from another day.

This module is the API, :func:`bench_train`, returning a :class:`TrainBenchResult` of typed rows; the work is in
its neighbours: :mod:`.train_impls` builds the implementations, :mod:`.train_measure` times them (speed: one
fresh process per model with the implementations' steps interleaved; memory: one fresh process per
implementation), :mod:`.train_rows` holds the rows and their ratios, :mod:`.train_report` their text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..train.numerics import precision_name, resolve_precision
from ..train.recipe import find_recipe, load_recipe
from .train_impls import (
    DEFAULT_BATCH,
    DEFAULT_BATCH_GPU,
    DEFAULT_IMPLS,
    EAGER_TWIN,
    IMPLS,
    PEER_OF,
    PEERS,
    SIZES,
    build_model,
    count_params,
    default_batch,
    hf_config,
    impl_recipe,
    recipe_compiles,
    resolve_recipe,
)
from .train_measure import BenchError, gpu_peak_tflops, measure, measure_isolated, memory_isolated
from .train_report import TrainBenchResult, format_results, memory_log_line, run_log_line, summary_lines
from .train_rows import Memory, Ratios, Speed, TrainBenchRow, add_ratios, merge_runs

__all__ = [
    "SIZES", "DEFAULT_BATCH", "DEFAULT_BATCH_GPU", "IMPLS", "PEERS", "BenchError", "TrainBenchResult",
    "TrainBenchRow", "Speed", "Memory", "Ratios", "bench_train", "resolve_recipe", "hf_config", "build_model",
    "count_params", "default_batch", "gpu_peak_tflops", "measure", "add_ratios", "format_results",
    "summary_lines",
]


@dataclass
class _Plan:
    """What one ``bench_train`` call measures, checked before any work: (size, recipe) targets and the settings
    every run shares."""

    targets: list[tuple[str | None, Any]]
    recipe: str | None  # the recipe file, absolute (a worker process finds it from any directory)
    impls: list[str]
    peers: list[str]
    device: str
    batch_size: int | None
    steps: int
    warmup: int
    overrides: list[str]
    seed: int


def _names(values: Iterable[str], allowed: Iterable[str], what: str, hint: str) -> list[str]:
    out = list(dict.fromkeys(v.strip().lower() for v in values if v.strip()))
    allowed = list(allowed)
    for v in out:
        if v not in allowed:
            raise ConfigError(f"unknown {what} '{v}'; allowed: {', '.join(allowed)}{hint}")
    return out


def _device(device: str | None) -> str:
    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no GPU; use --device cpu")
    return device


def _plan(models: Iterable[str] | None, recipe: str | os.PathLike[str] | None, impls: Iterable[str] | None,
          peers: Iterable[str], device: str | None, overrides: Sequence[str], *, batch_size: int | None, steps: int,
          warmup: int, repeats: int, seed: int) -> _Plan:
    """The checked plan: the names, the numbers, and the targets (their recipes validate the overrides)."""
    ours_allowed = [i for i in IMPLS if i not in PEERS]
    impl_list = None if impls is None else _names(impls, ours_allowed, "implementation",
                                                  " (peers go in --peers: auto, " + ", ".join(PEERS) + ")")
    peer_list = _names(peers, ["auto", *PEERS], "peer", "")
    for name, value, low in (("batch size", batch_size, 1), ("steps", steps, 1), ("warm-up steps", warmup, 0),
                             ("repeats", repeats, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    path = None
    if recipe is not None:
        if models:
            raise ConfigError("--models and --recipe exclude each other: the recipe names its model; drop --models")
        loaded = load_recipe(recipe, list(overrides))
        targets: list[tuple[str | None, Any]] = [(None, loaded)]
        device = device or loaded.train.device
        path = str(find_recipe(recipe).resolve())
        if impl_list is None:
            impl_list = ["mffzoo-compile", "mffzoo"] if recipe_compiles(loaded) else ["mffzoo"]
    else:
        sizes = _names(models if models is not None else ("s", "b"), SIZES, "model size", " (e.g. --models s,b)")
        targets = [(m, resolve_recipe(m, overrides)) for m in sizes]  # validates the overrides before any work
        if impl_list is None:
            impl_list = list(DEFAULT_IMPLS)
    if not targets:
        raise ConfigError("nothing to measure: give at least one model size (--models s,b)")
    device = _device(device)
    if any(i in EAGER_TWIN for i in impl_list) and warmup < 1:
        raise ConfigError("a compiled row needs warm-up steps (its compilation runs in them); use --warmup 2")
    return _Plan(targets=targets, recipe=path, impls=impl_list, peers=peer_list, device=device,
                 batch_size=batch_size, steps=steps, warmup=warmup, overrides=list(overrides), seed=seed)


def _quiet_precision(name: str, device: torch.device) -> str:
    """The precision name ``resolve_precision`` picks, without its fallback warning (the table says it)."""
    log = logging.getLogger("mffzoo.train")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return precision_name(resolve_precision(name, device)[0])
    finally:
        log.setLevel(level)


def _row_names(plan: _Plan, rec: Any) -> list[str]:
    """The rows of one target: the peers asked for (``auto``: the one under each mffzoo row's precision), then
    mffzoo's; checks that the peer's library is installed when a peer row is wanted."""
    same = {PEER_OF[_quiet_precision(impl_recipe(rec, i).train.precision, torch.device(plan.device))]
            for i in plan.impls}
    wanted = [p for p in PEERS if p in plan.peers or ("auto" in plan.peers and p in same)]
    names = wanted + plan.impls
    if not names:
        raise ConfigError("nothing to measure: give at least one implementation (--impls) or peer (--peers)")
    if any(n in PEERS for n in names):
        try:
            import transformers  # noqa: F401  (optional dependency, mffzoo[bench])
        except ImportError:
            raise ConfigError(
                "the peer (Hugging Face transformers) is not installed; pip install 'mffzoo[bench]'"
            ) from None
    return names


def _speed_runs(plan: _Plan, repeats: int, isolate: bool,
                log: Callable[[str], None] | None) -> list[TrainBenchRow]:
    """Every target ``repeats`` times (each in a fresh process with ``isolate``), merged per (model, impl)."""
    runs: dict[tuple[str, str], list[TrainBenchRow]] = {}
    for rep in range(repeats):
        for size, rec in plan.targets:
            batch = plan.batch_size or (rec.train.batch_per_device if plan.recipe
                                        else default_batch(size, plan.device))
            spec = dict(mode="speed", impls=_row_names(plan, rec), size=size, recipe=plan.recipe,
                        device=plan.device, batch=batch, steps=plan.steps, warmup=plan.warmup,
                        overrides=plan.overrides, seed=plan.seed)
            for r in measure_isolated(spec) if isolate else measure(spec):
                runs.setdefault((r.model, r.impl), []).append(r)
                if log:
                    log(run_log_line(r, rep, repeats))
    return add_ratios([merge_runs(rs) for rs in runs.values()])


def _memory(plan: _Plan, rows: list[TrainBenchRow], log: Callable[[str], None] | None) -> None:
    """Each row's peak memory, in a process of its own."""
    for r in rows:
        spec = dict(impls=[r.impl], size=r.size, recipe=r.recipe, device=plan.device, batch=r.batch,
                    overrides=plan.overrides, seed=plan.seed)
        r.memory = memory_isolated(spec)
        if log:
            log(memory_log_line(r))


def bench_train(
    models: Iterable[str] | None = None,
    *,
    recipe: str | os.PathLike[str] | None = None,
    impls: Iterable[str] | None = None,
    peers: Iterable[str] = ("auto",),
    batch_size: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 1,
    device: str | None = None,
    overrides: Sequence[str] = (),
    isolate: bool = True,
    memory: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> TrainBenchResult:
    """Measure every (model, implementation); one :class:`TrainBenchRow` per pair, with the ratios of
    :func:`add_ratios`.

    ``models`` are sizes (default s, b) run with the recipe defaults; ``overrides`` then are ``model.*`` keys
    (``depth=4``: tiny models for tests). Or ``recipe`` (a file or bare name): what that recipe's run does here,
    with ``overrides`` as any recipe key (``train.batch_per_device=16``); its default rows are ``mffzoo`` and,
    when the recipe compiles, ``mffzoo-compile``. ``peers``: ``auto`` = the peer under the precision each mffzoo
    row resolves to, plus any named peer rows. Per model, one process times all implementations with interleaved
    steps (:func:`measure`); ``repeats`` runs that again in a fresh process and keeps every run's img/s for the
    spread and the paired ratios. Then, with ``memory``, each implementation's peak memory is taken in a process
    of its own. ``batch_size`` None uses the recipe's ``train.batch_per_device``, or per size
    :data:`DEFAULT_BATCH` (CPU) / :data:`DEFAULT_BATCH_GPU`. ``isolate=False`` measures in this process (quick;
    no memory is reported then, it would not be per implementation). ``log`` gets a line per measured row.
    """
    plan = _plan(models, recipe, impls, peers, device, overrides, batch_size=batch_size, steps=steps,
                 warmup=warmup, repeats=repeats, seed=seed)
    rows = _speed_runs(plan, repeats, isolate, log)
    if isolate and memory:
        _memory(plan, rows, log)
    return TrainBenchResult(rows)
