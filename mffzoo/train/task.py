"""The interface between an objective and the engine: what an objective implements (:class:`Task`), what its
hooks see (:class:`RunContext`) and what a run returns (:class:`TrainResult`). The protocol, hook by hook, is in
:mod:`mffzoo.train.engine`'s docstring."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Batch, SampleDataset
from .distributed import DistEnv
from .recipe import EngineRecipe

__all__ = ["Task", "RunContext", "TrainResult", "FINAL_LOSS_KIND", "FINAL_LOSS_LABEL"]

# What a run's "final loss" is (TrainResult.final_loss, summary.json, the published provenance): the mean over all
# optimizer steps of the last completed epoch, not the last log window's few steps; and how it is labelled.
FINAL_LOSS_KIND = "last-epoch mean"
FINAL_LOSS_LABEL = f"final loss ({FINAL_LOSS_KIND})"


class Task:
    """An objective the engine trains; override ``build_model``, ``build_transform`` and ``step``."""

    def __init__(self, recipe: EngineRecipe) -> None:
        self.recipe = recipe

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_transform(self) -> Callable[[Any], torch.Tensor]:
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_dataset(self, dataset: SampleDataset) -> None:
        """Check the opened training data before any model is built (e.g. its class map)."""

    def optimizer_kwargs(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def on_epoch_end(self, ctx: RunContext) -> None:
        pass

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        return {}

    def finished_outputs(self, ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any] | None:
        """What ``on_train_end`` returned for this already finished run (``summary``: its summary.json), if all
        of it is still in place: rerunning the run then changes nothing and returns it. None (the default, and
        when an output is missing) runs ``on_train_end`` again, which writes the outputs anew."""
        return None


@dataclass
class RunContext:
    """What hooks see. ``model`` is the unwrapped module (no DDP/compile wrapper)."""

    recipe: EngineRecipe
    env: DistEnv
    run_dir: Path
    model: nn.Module
    dataset: SampleDataset
    epoch: int  # epochs completed
    global_step: int
    total_steps: int
    steps_per_epoch: int
    last_loss: float | None
    wall_s: float
    state_dict: dict[str, torch.Tensor] | None = None  # full model state (rank 0) in on_train_end
    images_seen: int = 0
    bad_images: int = 0
    checkpoint: Path | None = None  # the run's newest checkpoint (at the end: the final one)
    # mean loss over all optimizer steps of the last completed epoch (the run's "final loss" at the end);
    # ``last_loss`` is the last log window's only
    epoch_loss: float | None = None


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    stop_reason: str  # "finished", or the signal that stopped the run: "sigterm", "sigint"
    epoch: int
    global_step: int
    total_steps: int
    final_loss: float | None  # FINAL_LOSS_KIND: the last completed epoch's mean (None before one completed)
    checkpoint: Path | None
    wall_s: float
    images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    already_finished: bool = False  # the run had finished before this call, which trained and wrote nothing

    @property
    def exit_code(self) -> int:
        """0 when finished; 128 + the signal number when stopped by one (143 SIGTERM, 130 SIGINT), as a shell
        reports a process ended by that signal, so schedulers and scripts see that the run is not complete."""
        if self.stop_reason.startswith("sig"):
            return 128 + int(getattr(signal.Signals, self.stop_reason.upper()))
        return 0

    @property
    def stop_message(self) -> str:
        """What the CLI prints when a signal stopped the run (SIGTERM: the scheduler preempted it)."""
        what = "preempted" if self.stop_reason == "sigterm" else "stopped"
        return (f"{what} by {self.stop_reason.upper()} at step {self.global_step}/{self.total_steps}; checkpoint "
                f"{self.checkpoint}; rerun the same command to resume")

