"""A run to and from its checkpoints: :func:`save_checkpoint` writes :meth:`RunState.state_dict
<mffzoo.train.state.RunState.state_dict>` (every rank gathers, rank 0 writes), :func:`resume` continues from the
newest valid one once :func:`check_fits` says it was written by this recipe, dataset and model, so the run
continues exactly as if it had never stopped. The layout itself is :mod:`mffzoo.train.state`'s."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..errors import CheckpointError, WriteFailed
from .distributed import all_gather_object
from .recipe import EngineRecipe
from .state import RunState

_logger = logging.getLogger("mffzoo.train")

__all__ = ["resume", "save_checkpoint", "check_fits"]


def resume(s: RunState) -> None:
    """Continue from the newest valid checkpoint: weights, optimizer, schedule, scaler, position, each rank's
    RNG and the unreadable-file count, so the run continues exactly as if it had never stopped."""
    found = s.ckpts.load_latest() if s.recipe.checkpoint.resume and not s.recipe.checkpoint.restart else None
    if found is None:
        return
    state, path = found
    check_fits(state, path, s.recipe, s.position.steps_per_epoch, s.trainee.core)
    s.load_state_dict(state)
    s.resumed_from = s.ckpt_path = path
    p = s.position
    if p.global_step < p.total_steps:  # epochs 1-based, as every line the run prints
        where = (f"in epoch {p.epoch + 1}/{s.tc.epochs} after step {p.step_in_epoch}/{p.steps_per_epoch} of it"
                 if p.step_in_epoch else f"at the start of epoch {p.epoch + 1}/{s.tc.epochs}")
        _logger.info("resuming from %s %s (global step %d/%d)", path, where, p.global_step, p.total_steps)


def save_checkpoint(s: RunState) -> Path | None:
    """All ranks gather (FSDP needs it); rank 0 writes. Always after a flush, so the state is finite. At an
    epoch's last step the position saved is the next epoch's start."""
    state = s.state_dict()
    failed: str | None = None
    if state is not None:
        try:
            s.ckpt_path = s.ckpts.save(state, s.position.global_step)
        except WriteFailed as exc:  # disk full, file-size limit, read-only: the previous checkpoint is whole
            failed = _write_failed(s, exc)
    failed = all_gather_object(failed)[0]  # (also the barrier: rank 0 has written) every rank stops alike
    if failed is not None:
        raise WriteFailed(failed)
    return s.ckpt_path


def _write_failed(s: RunState, exc: WriteFailed) -> str:
    """The one line for a checkpoint the file system refused: what is kept, and that a rerun resumes from it."""
    if exc.cause is None or exc.remedy is None:
        return str(exc)
    kept = [p for p in s.ckpts.list() if p not in s.ckpts.unusable]
    then = (f"the last good checkpoint '{kept[0]}' is kept: {exc.remedy}, then rerun the same command to resume "
            "from it" if kept else f"no earlier checkpoint: {exc.remedy}, then rerun the same command")
    return f"could not write '{exc.path}': {exc.cause}; {then} (or pass another --output to start a new run)"


# --------------------------------------------------------------------------------------------- fit checks
def check_fits(state: dict[str, Any], path: Path, recipe: EngineRecipe, steps_per_epoch: int,
               model: nn.Module) -> None:
    """Refuse, in one line, a checkpoint of another recipe, dataset size or model layout."""
    _check_resumable(state, recipe, path)
    if state.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise CheckpointError(f"checkpoint '{path}' was written with {state['steps_per_epoch']} steps per "
                              f"epoch, now {steps_per_epoch} (the dataset changed); use another --output")
    _check_shapes(state["model"], model, path)


def _check_shapes(saved: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """One line instead of torch's size-mismatch report, e.g. for a checkpoint of an older mffzoo whose
    parameter layout changed (fusion logits (K,) -> (K, 1, 1, 1)): its optimizer moments would not fit either."""
    now = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} there, {tuple(now[k].shape)} now" for k, v in saved.items()
           if k in now and tuple(v.shape) != tuple(now[k].shape)]
    if bad:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model ({'; '.join(bad[:2])}): it was written by another model "
            "or an older mffzoo; use another --output (convert it with `mffzoo convert` to keep its weights)"
        )


def _check_resumable(saved: dict[str, Any], recipe: EngineRecipe, path: Path) -> None:
    """Refuse to continue a run whose checkpoints came from a different model or schedule."""
    now, old = to_dict(recipe), saved.get("recipe")
    if not isinstance(old, dict):
        return
    keys = [("model", None), ("optim", None), ("train", "epochs"), ("train", "batch_size"), ("train", "seed"),
            ("data", "augment")]
    for section, key in keys:
        a = now.get(section) if key is None else (now.get(section) or {}).get(key)
        b = old.get(section) if key is None else (old.get(section) or {}).get(key)
        if a == b or b is None:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diff = next(k for k in {**a, **b} if a.get(k) != b.get(k))
            name, a, b = f"{section}.{diff}", a.get(diff), b.get(diff)
        else:
            name = f"{section}.{key}"
        raise CheckpointError(
            f"run directory '{path.parent.parent}' holds checkpoints of a different recipe ({name}: {b!r} there, "
            f"{a!r} now); use another --output, or --set {name}={b!r} to continue that run"
        )
