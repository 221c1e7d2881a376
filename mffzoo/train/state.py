"""A run's state, as components that each save and load their own part of a checkpoint.

:class:`RunState` is what the engine's phases share; it is composed of the components below, and its
:meth:`~RunState.state_dict` / :meth:`~RunState.load_state_dict` are the one place the checkpoint layout is
written down (format ``mffzoo-train/1``, :data:`~mffzoo.train.checkpoint.CHECKPOINT_FORMAT`)::

    key                    component                          what
    format                 -                                  CHECKPOINT_FORMAT
    model                  Trainee (full state dict)          clean keys, the unwrapped module's
    ...                    task.checkpoint_meta()             e.g. arch, model_args (what ``mffzoo convert`` reads)
    optimizer              Trainee (full state dict)
    scheduler, scaler      Trainee (timm / torch state dicts)
    epoch, step_in_epoch,  Position                           where to continue (at an epoch's last step: the
    global_step, ...                                          next epoch's start); + steps_per_epoch,
                                                              total_steps, world_size, sampler (checks, readers)
    rng                    RngStreams                         every rank's RNG states, in rank order
    data_stats             DataStats                          the unreadable files met so far
    compile, attention     Choices                            train.compile / train.attention as decided
    metrics                Losses                             last window's loss, epoch-loss bookkeeping
    recipe                 -                                  the resolved recipe (resume checks it)

Saving is collective (FSDP2 gathers the shards, each rank gives its RNG states); only rank 0 gets the dict.
Components that a checkpoint does not hold (the log window, the clock, the loop's parts) live here too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import to_dict
from ..errors import DataError
from .attention import AttentionChoice, legacy_attention
from .checkpoint import CHECKPOINT_FORMAT, CheckpointManager, capture_rng, restore_rng
from .compile import CompileDecision, CompileRecorder
from .data import GlobalBatchSampler, SampleDataset, UnreadableFiles
from .distributed import DistEnv, all_gather_object
from .metrics import MetricsWriter, Progress, epoch_losses_from_metrics
from .recipe import EngineRecipe
from .signals import StopRequest
from .task import RunContext, Task

_logger = logging.getLogger("mffzoo.train")

__all__ = ["RunState", "Trainee", "Position", "Losses", "DataStats", "RngStreams", "Choices", "LogWindow", "Clock",
           "LoopParts"]

_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # what checkpoints hold: whole tensors, on the CPU
_LOAD = StateDictOptions(full_state_dict=True)


# --------------------------------------------------------------------------------------------- saved components
@dataclass
class Trainee:
    """The model and what trains it, built by :func:`mffzoo.train.setup.build_run`; saves ``model``,
    ``optimizer``, ``scheduler`` and ``scaler``."""

    model: nn.Module  # what a step calls: DDP-wrapped under torchrun, else ``core``
    core: nn.Module  # the module whose state dict is saved (FSDP2 shards it in place); hooks see it
    ddp: nn.parallel.DistributedDataParallel | None
    sharded: bool  # FSDP2 over several ranks
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler  # per iteration (step_update)
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    lr: float
    warmup_steps: int

    @property
    def current_lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def gradient_sync(self, last_micro: bool) -> Any:
        """Gradients sync across ranks only on an optimizer step's last micro-batch (DDP ``no_sync`` / FSDP2
        ``set_requires_gradient_sync``): the context a micro-step's backward runs in."""
        if self.ddp is not None and not last_micro:
            return self.ddp.no_sync()
        if self.sharded:
            self.core.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def step(self, clip_grad: float | None) -> None:
        """One optimizer step on the accumulated gradients (unscaled and clipped first where asked)."""
        if clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.core.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state on the CPU (collective: FSDP2 gathers the shards)."""
        return get_model_state_dict(self.core, options=_SAVE)

    def state_dict(self) -> dict[str, Any]:
        """Collective (FSDP2 gathers the shards); every rank gets the whole state."""
        return {"model": self.model_state_dict(),
                "optimizer": get_optimizer_state_dict(self.core, self.optimizer, options=_SAVE),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.core, state["model"], options=_LOAD)
        set_optimizer_state_dict(self.core, self.optimizer, state["optimizer"], options=_LOAD)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Position:
    """Where the run is, in optimizer steps: epochs completed, steps into the current epoch, steps in all."""

    sampler: GlobalBatchSampler
    epochs: int  # train.epochs
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.sampler.steps_per_epoch

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step."""
        return self.sampler.accum

    @property
    def mid_epoch(self) -> bool:
        return self.step_in_epoch < self.steps_per_epoch

    def advance(self) -> None:
        self.global_step += 1
        self.step_in_epoch += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """The position to continue from: at an epoch's last step, the next epoch's start."""
        end = self.step_in_epoch >= self.steps_per_epoch
        e, step = (self.epoch + 1, 0) if end else (self.epoch, self.step_in_epoch)
        return {"epoch": e, "step_in_epoch": step, "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "world_size": self.sampler.world_size,
                "sampler": {**self.sampler.state_dict(), "epoch": e, "start_step": step}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])


@dataclass
class Losses:
    """The last log window's mean loss, and the current epoch's flushed step losses (rank means) with the mean
    of the last completed epoch: in every checkpoint (``metrics``), so a run resumed mid-epoch still averages
    the whole epoch."""

    last_loss: float | None = None
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    epoch_loss: float | None = None  # the run's "final loss" (FINAL_LOSS_KIND) at its end

    def add_window(self, losses: torch.Tensor) -> None:
        """A flushed window's step losses (on the host)."""
        self.last_loss = float(losses.mean())
        self.epoch_loss_sum += float(losses.double().sum())
        self.epoch_loss_steps += len(losses)

    def end_epoch(self) -> None:
        self.epoch_loss = self.epoch_loss_sum / self.epoch_loss_steps if self.epoch_loss_steps else None
        self.epoch_loss_sum, self.epoch_loss_steps = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.last_loss, "epoch_loss": self.epoch_loss, "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_steps": self.epoch_loss_steps}

    def load_state_dict(self, state: dict[str, Any],
                        legacy: Callable[[], tuple[float | None, float, int]]) -> None:
        """``legacy``: (epoch loss, sum, steps) for a checkpoint of an older mffzoo, which lacks them."""
        self.last_loss = state.get("loss")
        if "epoch_loss_steps" in state:
            self.epoch_loss = state.get("epoch_loss")
            self.epoch_loss_sum, self.epoch_loss_steps = float(state["epoch_loss_sum"]), int(state["epoch_loss_steps"])
        else:
            self.epoch_loss, self.epoch_loss_sum, self.epoch_loss_steps = legacy()


@dataclass
class DataStats:
    """The unreadable files of the run: ``total`` the same on every rank after a flush, ``new`` this rank's
    since the last flush."""

    unreadable: UnreadableFiles = field(default_factory=UnreadableFiles)
    total: int = 0
    new: int = 0

    def add(self, bad: list[tuple[str, str]]) -> None:
        self.new += self.unreadable.add(bad)

    def check(self, any_new: bool, is_main: bool, dataset_size: int, max_fraction: float) -> None:
        """At a flush: merge the ranks' new files when any rank met one (every rank sees the same sum: all
        gather), and stop on more than ``max_fraction`` of the dataset."""
        if any_new and self.unreadable.sync(all_gather_object):
            self.total = self.unreadable.count
            if is_main:
                _logger.warning("skipped %d unreadable image(s) so far, e.g. %s", self.total,
                                self.unreadable.examples(3))
        if self.total > max_fraction * dataset_size:
            raise DataError(
                f"{self.total} of {dataset_size} images unreadable (more than data.max_bad_fraction="
                f"{max_fraction}), e.g. {self.unreadable.examples(1)}; fix or remove them"
            )
        self.new = 0

    def state_dict(self) -> dict[str, Any]:
        return self.unreadable.state()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.unreadable = UnreadableFiles.from_state(state)
        self.total = self.unreadable.count


@dataclass
class RngStreams:
    """Every global RNG (torch, CUDA, numpy, python) of every rank: saved in rank order, each rank restores its
    own (where the world size is the same)."""

    env: DistEnv

    def state_dict(self) -> list[dict[str, Any]]:
        return all_gather_object(capture_rng())  # collective

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.env.world_size:
            restore_rng(states[self.env.rank])


@dataclass
class Choices:
    """``train.compile`` / ``train.attention`` as decided (:mod:`mffzoo.train.choices`); a resumed run keeps its
    checkpoint's."""

    compile: CompileDecision | None = None
    attention: AttentionChoice | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"compile": self.compile.state() if self.compile else None,
                "attention": self.attention.state() if self.attention else None}

    def load_state_dict(self, state: dict[str, Any], legacy_attention: Callable[[], AttentionChoice | None]) -> None:
        self.compile = CompileDecision.from_state(state.get("compile"))
        self.attention = AttentionChoice.from_state(state.get("attention")) or legacy_attention()


# --------------------------------------------------------------------------------------------- loop components
@dataclass
class LogWindow:
    """The current log window and optimizer step, on this rank's device, until the engine's flush reduces them
    (the only host syncs: log windows, checkpoints, stop requests)."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per-step mean loss
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_count: int = 0
    t_start: float = 0.0
    images: int = 0
    micro: int = 0  # micro-batches of the current optimizer step so far
    step_loss: torch.Tensor | None = None

    def restart(self, now: float) -> None:
        self.t_start, self.images = now, 0

    def add_micro(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], accum: int) -> None:
        loss_d = loss.detach().float() / accum
        self.step_loss = loss_d if self.step_loss is None else self.step_loss + loss_d
        for k, v in metrics.items():
            v = v.detach().float()
            self.metric_sums[k] = self.metric_sums[k] + v if k in self.metric_sums else v.clone()
        self.metric_count += 1
        self.micro = 0 if self.micro == accum - 1 else self.micro + 1

    def end_step(self, images: int) -> None:
        self.losses.append(self.step_loss)
        self.step_loss = None
        self.images += images

    def packed(self, device: torch.device, bad_new: int) -> torch.Tensor:
        """Step losses, metric means (sorted by name, flattened) and ``bad_new``, as one tensor to reduce."""
        parts = [torch.stack(self.losses).float() if self.losses else torch.zeros(0, device=device)]
        count = max(self.metric_count, 1)
        parts += [(self.metric_sums[k].float() / count).reshape(-1) for k in sorted(self.metric_sums)]
        parts.append(torch.tensor([float(bad_new)], device=device))
        return torch.cat(parts).to(device)

    def metrics_record(self, vals: torch.Tensor) -> dict[str, Any]:
        """The metric means out of ``vals`` (what :meth:`packed` put there after the losses), rounded."""
        rec: dict[str, Any] = {}
        off = len(self.losses)
        for k in sorted(self.metric_sums):
            size = self.metric_sums[k].numel()
            v = vals[off:off + size]
            rec[k] = [round(float(x), 6) for x in v] if self.metric_sums[k].dim() else round(float(v[0]), 6)
            off += size
        return rec

    def clear(self) -> None:
        self.losses, self.metric_sums, self.metric_count = [], {}, 0


@dataclass
class Clock:
    """The run's start (``t_start``: wall time), the loop's start in this process and the images it trained."""

    t_start: float
    t_loop: float = 0.0
    images_this_run: int = 0

    def img_s(self) -> float:
        return self.images_this_run / max(time.time() - self.t_loop, 1e-9)


@dataclass
class LoopParts:
    """What the loop needs beyond the model, built by the engine's start phase."""

    train_model: nn.Module  # ``Trainee.model``, or its torch.compile wrapper
    amp: Any  # autocast context (re-entered every micro-batch), or a null context
    loader: Any
    writer: MetricsWriter
    progress: Progress
    recorder: CompileRecorder  # times a compiled run's first steps into the compile cache
    stop: StopRequest


# --------------------------------------------------------------------------------------------- the run
@dataclass
class RunState:
    """What the phases of one run share: built by :func:`mffzoo.train.setup.build_run`, moved on by
    :func:`mffzoo.train.resume.resume` and the loop. A checkpoint is its :meth:`state_dict`."""

    recipe: EngineRecipe
    task: Task
    env: DistEnv
    run_dir: Path
    dataset: SampleDataset
    ckpts: CheckpointManager
    trainee: Trainee
    position: Position
    clock: Clock
    rng: RngStreams
    losses: Losses = field(default_factory=Losses)
    data: DataStats = field(default_factory=DataStats)
    choices: Choices = field(default_factory=Choices)
    window: LogWindow = field(default_factory=LogWindow)
    resumed_from: Path | None = None
    ckpt_path: Path | None = None  # the newest checkpoint of this run
    loop: LoopParts = field(init=False)  # set by the engine's start phase

    @property
    def tc(self) -> Any:
        return self.recipe.train

    @property
    def device(self) -> torch.device:
        return self.env.device

    def context(self, state_dict: dict[str, torch.Tensor] | None = None) -> RunContext:
        p = self.position
        return RunContext(self.recipe, self.env, self.run_dir, self.trainee.core, self.dataset, p.epoch,
                          p.global_step, p.total_steps, p.steps_per_epoch, self.losses.last_loss,
                          time.time() - self.clock.t_start, state_dict, p.global_step * self.tc.batch_size,
                          self.data.total, self.ckpt_path, epoch_loss=self.losses.epoch_loss)

    # ---- the checkpoint layout (see the module docstring): written here, read below
    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint of this state, on rank 0 (None elsewhere). Collective: call it on every rank."""
        trainee = self.trainee.state_dict()
        rng = self.rng.state_dict()
        if not self.env.is_main:
            return None
        return {"format": CHECKPOINT_FORMAT, "model": trainee.pop("model"), **self.task.checkpoint_meta(),
                **trainee, **self.position.state_dict(), "rng": rng, "data_stats": self.data.state_dict(),
                **self.choices.state_dict(), "metrics": self.losses.state_dict(), "recipe": to_dict(self.recipe)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint that fits this run (:func:`mffzoo.train.resume.check_fits`); older ones
        without the epoch-loss bookkeeping or the attention choice get what their mffzoo did."""
        self.trainee.load_state_dict(state)
        p = self.position
        p.load_state_dict(state)
        self.rng.load_state_dict(state.get("rng") or [])
        self.data.load_state_dict(state.get("data_stats"))
        self.losses.load_state_dict(state.get("metrics") or {}, legacy=lambda: epoch_losses_from_metrics(
            self.run_dir, p.epoch, p.step_in_epoch, p.steps_per_epoch))
        self.choices.load_state_dict(state, legacy_attention=lambda: legacy_attention(
            self.tc.attention, self.device, self.trainee.amp_dtype))
