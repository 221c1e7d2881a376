"""The training loop, shared by every objective: pretraining here, fine-tuning in the evaluation tools.

:func:`run` reads like facebookresearch/mae's ``main_pretrain`` + ``engine_pretrain``: join the process group,
build data, model, optimizer and schedule, resume, then loop epochs -> micro-batches with gradient accumulation,
logging every ``log.every_steps`` and checkpointing every ``checkpoint.every_steps`` and at epoch ends. The loop
is a sequence of phases over one :class:`_RunState`, each a function of its own::

    _run
      _setup            data (fails fast), run directory, model + DDP/FSDP2, optimizer, schedule, scaler
      _resume           newest valid checkpoint -> weights, optimizer, schedule, position, RNG, data stats
      _already_finished a finished run with its outputs in place (task.finished_outputs): return, change nothing
      _start            loader, metrics writer, progress, stop vote; the header line
        _decide_compile   train.compile (auto on a CPU: _probe_eager_step first) -> the compile wrapper
      _train_epoch      per epoch:
        _micro_step       forward + backward of one micro-batch (gradient sync on the last one only)
        _optimizer_step   step, counters, stop vote; when due: _flush, _save_checkpoint or _stop_now
      _end_epoch        flush, synced stop vote, epoch record, checkpoint or stop, task.on_epoch_end
      _finish           task.on_train_end with the full state, summary.json

``_flush`` reduces a log window across ranks (the only host syncs) and ``_check_window`` stops on a non-finite
loss or too many unreadable files.

An objective plugs in as a :class:`Task` (see :class:`mffzoo.train.pretrain.PretrainTask`)::

    class MyTask(Task):
        def build_model(self) -> nn.Module: ...              # fp32 on CPU; the engine moves and wraps it
        def build_transform(self) -> Callable: ...           # PIL image -> normalised tensor (training aug.)
        def step(self, model, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
            ...                                              # runs under autocast; loss = mean over the
                                                             # micro-batch; metrics = detached tensors,
                                                             # averaged over each log window and all ranks.
                                                             # train.compile=auto may first time it on a
                                                             # synthetic batch (a shallow copy of the task)
        # optional hooks
        def on_dataset(self, dataset) -> None: ...           # check the data before a model is built
        def optimizer_kwargs(self, model) -> dict: ...       # extra timm create_optimizer_v2 kwargs
                                                             # (e.g. layer_decay=0.65 for fine-tuning)
        def checkpoint_meta(self) -> dict: ...               # plain data stored in every checkpoint
        def on_epoch_end(self, ctx: RunContext) -> None: ... # evaluation, figures (called on every rank)
        def on_train_end(self, ctx: RunContext) -> dict: ... # export/publish; returned into TrainResult.extra
        def finished_outputs(self, ctx, summary) -> dict | None: ...  # a finished run's outputs, if all there

    result = run(recipe, MyTask(recipe))     # recipe: any EngineRecipe subclass

``batch.seeds`` holds one seed per sample, derived from (recipe seed, epoch, dataset index): draw any per-sample
randomness from it (as the pretraining mask does) and the run is identical on 1 or N processes and after a
resume. Mixup-style randomness that needs the whole batch can seed a generator from ``batch.seeds``.

The engine owns: torchrun/DDP (``find_unused_parameters=False``) or FSDP2, the effective batch through gradient
accumulation, AMP (bf16 autocast; fp16 + GradScaler; fp32), ``torch.compile``, the optimizer (timm, no-decay
groups from ``model.no_weight_decay()``, fused AdamW), the attention kernel (``train.attention``) and
per-iteration warmup + cosine (timm),
checkpoints (atomic, last-k, exact resume), preemption (SIGTERM/SIGINT: every rank stops at the same optimizer
step, one step after the signal, saves and exits with 128 + the signal number), ``train.deterministic``, the NaN
stop, progress bar, ``metrics.jsonl`` and TensorBoard. Losses stay on the device and reach the host once per log
window.

Test hook (not a user setting): ``MFFZOO_TEST_SIGNAL_AT_STEP=STEP[:SIGNAL[:TARGET]]`` makes rank 0 send SIGNAL
(default TERM) right after optimizer step STEP to its own process group (TARGET ``group``, the default) or to its
parent's (``parent``: torchrun), so tests interrupt a run at a known step instead of racing it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
from torch.distributed.fsdp import fully_shard

from ..config import dump_yaml, to_dict
from ..cpu import cpu_features
from ..errors import CheckpointError, ConfigError, DataError, MffzooError, WriteFailed
from ..io import atomic_write, check_output_folder, exclusive, read_json_object, write_failed
from .attention import AttentionChoice, choose_attention, set_attention
from .checkpoint import CHECKPOINT_FORMAT, CheckpointManager, capture_rng, restore_rng
from .compile import (
    CompileCache,
    CompileDecision,
    CompileEstimate,
    CompileRecorder,
    compile_for_training,
    decide_compile,
    time_eager_step,
)
from .data import Batch, GlobalBatchSampler, SampleDataset, UnreadableFiles, build_dataset, build_loader, derive_seed
from .distributed import DistEnv, StopVote, all_gather_object, all_reduce, barrier, destroy, init_distributed
from .metrics import (
    MetricsWriter,
    Progress,
    epoch_losses_from_metrics,
    format_duration,
    peak_memory_mb,
    reset_peak_memory,
)
from .numerics import numerics, precision_name, resolve_precision
from .optim import accumulation_steps, build_optimizer, fit_batch_per_device
from .recipe import EngineRecipe

_logger = logging.getLogger("mffzoo.train")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # what checkpoints hold: whole tensors, on the CPU
SUMMARY_NAME = "summary.json"  # RUN/summary.json: how the run ended, and what on_train_end returned
# What a run's "final loss" is (TrainResult.final_loss, summary.json, the published provenance): the mean over all
# optimizer steps of the last completed epoch, not the last log window's few steps; and how it is labelled.
FINAL_LOSS_KIND = "last-epoch mean"
FINAL_LOSS_LABEL = f"final loss ({FINAL_LOSS_KIND})"

__all__ = ["Task", "RunContext", "TrainResult", "TrainingDiverged", "accumulation_steps", "build_optimizer",
           "fit_batch_per_device", "run", "FINAL_LOSS_KIND", "FINAL_LOSS_LABEL"]


class TrainingDiverged(MffzooError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""

    exit_code = 1


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


# --------------------------------------------------------------------------------------------- helpers
def _one_line(exc: MffzooError) -> MffzooError:
    """Errors raised in a loader worker arrive wrapped in a multi-line traceback; keep the message."""
    text = str(exc)
    if "\n" not in text:
        return exc
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return type(exc)(last.split(": ", 1)[1] if ": " in last else last)


class _StopSignal:
    """SIGTERM (what schedulers send) / SIGINT set a flag; the ranks agree on it at the next step, save, exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0  # the strongest request so far (SIGTERM 15 over SIGINT 2): what the ranks vote with
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = max(self.signum, int(signum))

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _TestSignal:
    """``MFFZOO_TEST_SIGNAL_AT_STEP`` (see the module docstring): a deterministic interruption for tests."""

    VAR = "MFFZOO_TEST_SIGNAL_AT_STEP"

    def __init__(self, step: int, sig: signal.Signals, target: str) -> None:
        self.step, self.sig, self.target = step, sig, target

    @classmethod
    def from_env(cls, env: DistEnv) -> _TestSignal | None:
        spec = os.environ.get(cls.VAR, "").strip()
        if not spec or not env.is_main:
            return None
        parts = spec.split(":")
        try:
            step = int(parts[0])
            sig = signal.Signals[f"SIG{parts[1].upper().removeprefix('SIG')}"] if len(parts) > 1 else signal.SIGTERM
        except (ValueError, KeyError):
            raise ConfigError(f"{cls.VAR}='{spec}' is not STEP[:SIGNAL[:TARGET]], e.g. 5:TERM (a test hook)") from None
        target = parts[2] if len(parts) > 2 else "group"
        if target not in ("group", "parent"):
            raise ConfigError(f"{cls.VAR}: target '{target}' must be group or parent (a test hook)")
        return cls(step, sig, target)

    def maybe_fire(self, global_step: int) -> None:
        """Signal our own group now (so this rank's request is in this step's vote whatever the parent does),
        then, for ``parent``, the parent's: torchrun forwards it to every rank's process group.

        The signal comes from a forked child, as from ``kill`` in a shell or a scheduler: torch's loader workers
        treat a SIGTERM from their own parent (the main process) differently from anyone else's."""
        if global_step != self.step:
            return
        pids = [os.getpid()] + ([os.getppid()] if self.target == "parent" else [])
        for pid in pids:
            # a whole group only where that process leads it (a test starts it with start_new_session=True)
            leads = os.getpgid(pid) == pid
            _logger.warning("test hook %s: sending %s to %s %d at step %d", self.VAR, self.sig.name,
                            "process group" if leads else "process", pid, global_step)
            child = os.fork()
            if child == 0:  # pragma: no cover - the child only sends the signal
                try:
                    (os.killpg if leads else os.kill)(pid, self.sig)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)  # sent (and delivered to us, if we are in that group) when this returns


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


# --------------------------------------------------------------------------------------------- the loop
def run(recipe: EngineRecipe, task: Task, output_dir: str | Path | None = None) -> TrainResult:
    """Train ``task`` under ``recipe`` (single process, or one rank of a torchrun launch)."""
    t_start = time.time()
    env = init_distributed(recipe.train.device)
    if not env.is_main:
        _logger.setLevel(logging.WARNING)
    try:
        with numerics(recipe.train, env.device):
            return _run(recipe, task, env, Path(recipe.run_dir(output_dir)), t_start)
    except MffzooError as exc:
        raise _one_line(exc) from None
    finally:
        destroy(env)
        if not env.is_main:
            _logger.setLevel(logging.NOTSET)


def _run(recipe: EngineRecipe, task: Task, env: DistEnv, run_dir: Path, t_start: float) -> TrainResult:
    """The whole run, phase by phase; each phase is a function below over one :class:`_RunState`. The run
    directory is locked for all of it (a second process is refused at once, before any work)."""
    with _run_lock(run_dir, env):
        return _run_locked(recipe, task, env, run_dir, t_start)


@contextlib.contextmanager
def _run_lock(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """Rank 0 checks the run directory (a folder, not a file) and holds its lock for the whole run; every rank
    gets rank 0's answer, so a refused run stops on all ranks at once with the same line."""
    with contextlib.ExitStack() as held:
        refused: tuple[type[MffzooError], str] | None = None
        if env.is_main:
            try:
                check_output_folder(run_dir, "run directory", fix="pass another --output")
                held.enter_context(exclusive(run_dir, fix="wait for it to finish or pass another --output"))
            except MffzooError as exc:
                refused = (type(exc), str(exc))
        refused = all_gather_object(refused)[0]
        if refused is not None:
            raise refused[0](refused[1])
        yield


def _run_locked(recipe: EngineRecipe, task: Task, env: DistEnv, run_dir: Path, t_start: float) -> TrainResult:
    s = _setup(recipe, task, env, run_dir, t_start)
    _resume(s)
    if (done := _already_finished(s)) is not None:
        return done
    if env.is_main:  # only now: a run refused above (another recipe's checkpoints) keeps its own recipe.yaml
        dump_yaml(recipe, run_dir / "recipe.yaml")
    _start(s)
    try:
        with s.stopper:
            while s.epoch < s.tc.epochs and s.stop_reason == "finished":
                _train_epoch(s)
                if s.stop_reason != "finished":
                    break
                _end_epoch(s)
    finally:
        s.vote.close()
        s.progress.close()
        s.writer.close()
        # Shut the loader workers down now. They ignore SIGTERM (a scheduler's signal is the main process's to
        # handle), so a loader still referenced at interpreter exit, e.g. from a frame kept alive by a reference
        # cycle in a hook, hangs multiprocessing's exit handler on their join.
        s.loader = None
    return _finish(s)


@dataclass
class _RunState:
    """What the phases of one run share: built by :func:`_setup`, moved on by :func:`_resume` and the loop.

    Counters count optimizer steps; the window fields hold the current log window on the device until
    :func:`_flush` reduces them (the only host syncs: log windows, checkpoints, stop requests)."""

    recipe: EngineRecipe
    task: Task
    env: DistEnv
    run_dir: Path
    t_start: float
    dataset: SampleDataset
    sampler: GlobalBatchSampler
    ckpts: CheckpointManager
    total_steps: int
    warmup_steps: int
    model: nn.Module  # what a step calls: DDP-wrapped under torchrun, else ``core``
    core: nn.Module  # the module whose state dict is saved (FSDP2 shards it in place); hooks see it
    ddp: nn.parallel.DistributedDataParallel | None
    amp_dtype: torch.dtype | None
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler  # per iteration (step_update)
    scaler: torch.amp.GradScaler
    # position (restored by _resume)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0
    resumed_from: Path | None = None
    ckpt_path: Path | None = None  # the newest checkpoint of this run
    unreadable: UnreadableFiles = field(default_factory=UnreadableFiles)
    bad_total: int = 0  # unreadable files of the whole run, the same on every rank after a flush
    last_loss: float | None = None  # the last log window's mean loss
    # the current epoch's flushed step losses (rank means), and the mean of the last completed epoch; in every
    # checkpoint, so a run resumed mid-epoch still averages the whole epoch
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    epoch_loss: float | None = None
    # the current log window (this rank, on the device)
    window: list[torch.Tensor] = field(default_factory=list)  # per-step mean loss
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_count: int = 0
    bad_new: int = 0  # unreadable files new to this rank since the last flush
    t_window: float = 0.0
    imgs_window: int = 0
    # the current optimizer step (micro-batches accumulated so far) and the stop request
    micro: int = 0
    step_loss: torch.Tensor | None = None
    stop_sig: int = 0  # the signal the ranks agreed to stop on at the latest vote (0: none)
    stop_reason: str = "finished"
    images_this_run: int = 0
    t_loop: float = 0.0
    # set by _start
    train_model: nn.Module = field(init=False)  # ``model``, or its torch.compile wrapper
    amp: Any = field(init=False)  # autocast context (re-entered every micro-batch), or a null context
    loader: Any = field(init=False)
    writer: MetricsWriter = field(init=False)
    progress: Progress = field(init=False)
    stopper: _StopSignal = field(default_factory=_StopSignal)
    vote: StopVote = field(init=False)
    test_signal: _TestSignal | None = None
    compile: CompileDecision | None = None  # train.compile's outcome; a resumed run keeps its checkpoint's
    attention: AttentionChoice | None = None  # train.attention's outcome; likewise kept on resume
    recorder: CompileRecorder = field(init=False)  # times a compiled run's first steps into the compile cache

    @property
    def tc(self) -> Any:
        return self.recipe.train

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def accum(self) -> int:
        return self.sampler.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def context(self, state_dict: dict[str, torch.Tensor] | None = None) -> RunContext:
        return RunContext(self.recipe, self.env, self.run_dir, self.core, self.dataset, self.epoch, self.global_step,
                          self.total_steps, self.steps_per_epoch, self.last_loss, time.time() - self.t_start,
                          state_dict, self.global_step * self.tc.batch_size, self.bad_total, self.ckpt_path,
                          epoch_loss=self.epoch_loss)


# --------------------------------------------------------------------------------------------- setup
def _setup(recipe: EngineRecipe, task: Task, env: DistEnv, run_dir: Path, t_start: float) -> _RunState:
    """Data first (a wrong path fails in a second, before any model is built), then the run directory, then
    model, optimizer and schedule."""
    tc, oc = recipe.train, recipe.optim
    fitted = fit_batch_per_device(tc.batch_size, tc.batch_per_device, env.world_size)
    if fitted != tc.batch_per_device and env.is_main:
        _logger.info("train.batch_per_device=%d is more than each process's share of train.batch_size=%d on %d "
                     "processes: %d per device", tc.batch_per_device, tc.batch_size, env.world_size, fitted)
    tc.batch_per_device = fitted  # the resolved recipe (recipe.yaml) says what the run did
    accumulation_steps(tc.batch_size, tc.batch_per_device, env.world_size)
    dataset = build_dataset(recipe.data, task.build_transform())
    task.on_dataset(dataset)
    sampler = GlobalBatchSampler(len(dataset), tc.batch_size, tc.batch_per_device, env.world_size, env.rank,
                                 seed=tc.seed)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"the dataset has {len(dataset)} images, fewer than one batch (train.batch_size="
                        f"{tc.batch_size}); lower train.batch_size or add data")
    total_steps = tc.epochs * sampler.steps_per_epoch
    warmup_steps = int(round(oc.warmup_epochs * sampler.steps_per_epoch))
    ckpts = _prepare_run_dir(recipe, env, run_dir)

    if env.device.type == "cpu" and tc.cpu_threads:
        torch.set_num_threads(tc.cpu_threads)
    amp_dtype, use_scaler = resolve_precision(tc.precision, env.device)
    model, core, ddp = _build_model(recipe, task, env)
    lr = oc.resolved_lr(tc.batch_size)
    optimizer = build_optimizer(core, oc, tc.batch_size, **task.optimizer_kwargs(core))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=oc.min_lr,
                                  warmup_t=warmup_steps, warmup_lr_init=lr * oc.warmup_start_factor,
                                  warmup_prefix=True, t_in_epochs=False, cycle_limit=1)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
    return _RunState(recipe, task, env, run_dir, t_start, dataset, sampler, ckpts, total_steps, warmup_steps,
                     model, core, ddp, amp_dtype, lr, optimizer, scheduler, scaler)


def _prepare_run_dir(recipe: EngineRecipe, env: DistEnv, run_dir: Path) -> CheckpointManager:
    """Refuse to mix runs: an existing run directory is resumed, restarted (its checkpoints set aside) or an
    error. The resolved recipe is written once the checkpoints are known to fit it (``_run_locked``)."""
    ckpts = CheckpointManager(run_dir / "checkpoints", recipe.checkpoint.keep_last)
    if recipe.checkpoint.restart:
        if env.is_main and (aside := ckpts.set_aside()) is not None:
            _logger.warning("checkpoint.restart: starting from step 0; the previous checkpoints are in %s", aside)
    elif not recipe.checkpoint.resume and ckpts.list():
        raise ConfigError(f"'{run_dir}' already holds checkpoints and checkpoint.resume is false; pass another "
                          "--output, or --set checkpoint.restart=true to start over (they are moved aside)")
    if env.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(run_dir, exc, where="pass another --output") from None
    return ckpts


def _build_model(recipe: EngineRecipe, task: Task, env: DistEnv,
                 ) -> tuple[nn.Module, nn.Module, nn.parallel.DistributedDataParallel | None]:
    """(model to call, core to save, DDP wrapper or None): the same init on every rank, then per-rank RNG
    streams; FSDP2 shards the timm blocks and the root in place, DDP wraps."""
    tc, device = recipe.train, env.device
    torch.manual_seed(derive_seed(tc.seed, 0x1))  # the same init on every rank (FSDP shards each rank's own copy)
    model = task.build_model().to(device)
    torch.manual_seed(derive_seed(tc.seed, env.rank, 0x7))  # then per-rank streams (e.g. drop path)
    core, ddp = model, None
    if tc.fsdp and env.distributed:
        # Our forward returns slices (pred) that nobody modifies in place; the warning does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for m in list(model.modules()):
            if m is not model and type(m).__name__ == "Block":  # timm ViT blocks (encoder and decoder)
                fully_shard(m)
        fully_shard(model)
    elif env.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
        model = ddp
    elif tc.fsdp:
        _logger.info("train.fsdp is on but this is a single process; training unsharded")
    return model, core, ddp


# --------------------------------------------------------------------------------------------- resume
def _resume(s: _RunState) -> None:
    """Continue from the newest valid checkpoint: weights, optimizer, schedule, scaler, position, each rank's
    RNG and the unreadable-file count, so the run continues exactly as if it had never stopped."""
    found = s.ckpts.load_latest() if s.recipe.checkpoint.resume and not s.recipe.checkpoint.restart else None
    if found is None:
        return
    state, path = found
    _check_resumable(state, s.recipe, path)
    if state.get("steps_per_epoch") not in (None, s.steps_per_epoch):
        raise CheckpointError(f"checkpoint '{path}' was written with {state['steps_per_epoch']} steps per "
                              f"epoch, now {s.steps_per_epoch} (the dataset changed); use another --output")
    _check_shapes(state["model"], s.core, path)
    set_model_state_dict(s.core, state["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(s.core, s.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    s.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    s.epoch, s.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
    s.global_step = int(state["global_step"])
    rngs = state.get("rng") or []
    if len(rngs) == s.env.world_size:
        restore_rng(rngs[s.env.rank])
    s.unreadable = UnreadableFiles.from_state(state.get("data_stats"))
    s.bad_total = s.unreadable.count
    metrics = state.get("metrics") or {}
    s.last_loss = metrics.get("loss")
    if "epoch_loss_steps" in metrics:
        s.epoch_loss = metrics.get("epoch_loss")
        s.epoch_loss_sum, s.epoch_loss_steps = float(metrics["epoch_loss_sum"]), int(metrics["epoch_loss_steps"])
    else:  # a checkpoint of an older mffzoo, without them: metrics.jsonl's window means, weighted by their steps
        s.epoch_loss, s.epoch_loss_sum, s.epoch_loss_steps = epoch_losses_from_metrics(
            s.run_dir, s.epoch, s.step_in_epoch, s.steps_per_epoch)
    s.compile = CompileDecision.from_state(state.get("compile"))
    s.attention = AttentionChoice.from_state(state.get("attention")) or _legacy_attention(s)
    s.resumed_from = s.ckpt_path = path
    if s.global_step < s.total_steps:  # epochs 1-based, as every line the run prints
        where = (f"in epoch {s.epoch + 1}/{s.tc.epochs} after step {s.step_in_epoch}/{s.steps_per_epoch} of it"
                 if s.step_in_epoch else f"at the start of epoch {s.epoch + 1}/{s.tc.epochs}")
        _logger.info("resuming from %s %s (global step %d/%d)", path, where, s.global_step, s.total_steps)


def _already_finished(s: _RunState) -> TrainResult | None:
    """A rerun of a finished run whose outputs are all in place: the result, having changed nothing. A finished
    run with an output missing (or no summary of its end) goes on to ``_finish``, which writes them again."""
    if s.global_step < s.total_steps:
        return None
    outputs = None
    if s.env.is_main:
        summary = read_json_object(s.run_dir / SUMMARY_NAME)
        if summary.get("completed") and summary.get("global_step") == s.global_step:
            outputs = s.task.finished_outputs(s.context(), summary)
    outputs = all_gather_object(outputs)[0]  # rank 0 decides for every rank
    done = (f"{s.epoch} epoch{'s' * (s.epoch != 1)}, {s.global_step} step{'s' * (s.global_step != 1)}, "
            f"{FINAL_LOSS_LABEL} " + (f"{s.epoch_loss:.4f}" if s.epoch_loss is not None else "n/a"))
    if outputs is None:
        if s.env.is_main:
            _logger.info("%s is already finished (%s) but its outputs are not all in place; writing them again from "
                         "its final checkpoint %s", s.run_dir, done, s.ckpt_path)
        return None
    if s.env.is_main:
        _logger.info("%s is already finished (%s); nothing to do: to train again, pass another --output, or --set "
                     "checkpoint.restart=true (its checkpoints are moved aside)", s.run_dir, done)
    return TrainResult(s.run_dir, True, "finished", s.epoch, s.global_step, s.total_steps, s.epoch_loss, s.ckpt_path,
                       time.time() - s.t_start, 0.0, outputs if s.env.is_main else {}, already_finished=True)


# --------------------------------------------------------------------------------------------- start
def _start(s: _RunState) -> None:
    """What the loop needs beyond the model: the compile wrapper, loader, metrics writer, progress, the stop
    machinery; and the header line that says what this run does."""
    tc, env, device = s.tc, s.env, s.device
    s.amp = torch.autocast(device.type, dtype=s.amp_dtype) if s.amp_dtype is not None else contextlib.nullcontext()
    _decide_attention(s)
    _decide_compile(s)
    s.train_model = compile_for_training(s.model, s.compile.enabled)
    s.loader = build_loader(s.dataset, s.sampler, s.recipe.data, pin_memory=device.type == "cuda", seed=tc.seed,
                            rank=env.rank)
    s.writer = MetricsWriter(s.run_dir, env.is_main, s.recipe.log.tensorboard,
                             resume_step=s.global_step if s.resumed_from is not None else None)
    s.progress = Progress(s.recipe.log.progress, env.is_main, s.total_steps, s.global_step)
    if env.is_main:
        _logger.info(
            "training %s: %d images, %d epochs x %d steps, batch %d = %d per device x %d process%s x %d "
            "accumulation, lr %.3g, %s on %s, %s, compile: %s -> %s", s.recipe.name, len(s.dataset), tc.epochs,
            s.steps_per_epoch, tc.batch_size, tc.batch_per_device, env.world_size,
            "es" if env.world_size != 1 else "", s.accum, s.lr,
            precision_name(s.amp_dtype), device, s.attention, s.compile,
            s.run_dir)
        if s.warmup_steps >= s.total_steps:
            _logger.warning("the warm-up (optim.warmup_epochs=%g) covers the whole run (train.epochs=%d): the lr only "
                            "rises and never decays; lower optim.warmup_epochs or raise train.epochs",
                            s.recipe.optim.warmup_epochs, tc.epochs)
    s.test_signal = _TestSignal.from_env(env)
    s.vote = StopVote(env)
    s.t_window = s.t_loop = time.time()
    reset_peak_memory(device)


_KEPT = "kept from the checkpoint: "


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Every global RNG (torch, CUDA, numpy, python) as it was afterwards: transforms and tasks draw from any."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _decide_attention(s: _RunState) -> None:
    """``train.attention`` -> ``s.attention``, applied to the model. Under ``auto`` a resumed run keeps its
    checkpoint's kernel; a CPU run under bf16 measures both kernels on the run's attention calls first
    (:mod:`mffzoo.train.attention`). Every rank takes rank 0's choice; the run's RNG streams are left as they were."""
    kept = s.attention
    if s.tc.attention == "auto" and kept is not None:
        s.attention = AttentionChoice(kept.kernel, _KEPT + kept.reason.removeprefix(_KEPT))
        set_attention(s.core, kept.kernel)
        return
    forward = None
    if not (s.tc.fsdp and s.env.distributed):  # FSDP2-sharded attention modules cannot be called on their own
        task = copy.copy(s.task)  # a task that counts its steps (attributes it rebinds) does not count the probe

        def forward() -> None:  # called only where a measurement is needed: no sample read otherwise
            batch = _synthetic_batch(s, s.dataset[(0, 0)][0])
            with s.amp:
                task.step(s.core, batch)
    with _rng_kept():
        choice = choose_attention(s.core, s.tc.attention, s.device, s.amp_dtype, forward)
    s.attention = all_gather_object(choice)[0]
    set_attention(s.core, s.attention.kernel)


def _legacy_attention(s: _RunState) -> AttentionChoice | None:
    """A checkpoint written before choices were stored: what ``auto`` chose then (math only on AMX under bf16)."""
    if s.tc.attention != "auto":
        return None
    amx = s.device.type == "cpu" and s.amp_dtype == torch.bfloat16 and cpu_features().amx
    return AttentionChoice("math" if amx else "sdpa", "auto: the rule of the mffzoo version that wrote the checkpoint")


def _synthetic_batch(s: _RunState, sample: torch.Tensor) -> Batch:
    """A micro-batch of ``sample``'s shape (seeded noise, label 0): what the probes time."""
    n, device = s.tc.batch_per_device, s.device
    images = torch.randn((n, *sample.shape), generator=torch.Generator().manual_seed(0)).to(device)
    return Batch(images, torch.zeros(n, dtype=torch.long, device=device), torch.arange(n))


def _decide_compile(s: _RunState) -> None:
    """``train.compile`` -> ``s.compile`` and the timing recorder. Under ``auto`` a resumed run keeps the
    decision in its checkpoint (it computes what the interrupted run would have); on a CPU a fresh one measures an
    eager step first (:mod:`mffzoo.train.compile`). Every rank takes rank 0's decision. The run's RNG streams
    and gradients are left as they were: a run with the probe is bit-identical to one without."""
    mode, device = s.tc.compile, s.device
    remaining = s.total_steps - s.global_step
    if mode is False:  # nothing to measure or record: no sample to read
        s.compile = decide_compile(False, device.type, remaining_steps=remaining, eager_step_s=None,
                                   estimate=CompileEstimate.default("fp32"))
        s.recorder = CompileRecorder(None, None, device)
        return
    with _rng_kept():
        sample = s.dataset[(0, 0)][0]  # one sample: the shape of a synthetic batch and of the cache key
        key = CompileCache.key_for(s.core, tuple(sample.shape), s.tc.batch_per_device, s.amp_dtype, device)
        eager_micro = None
        if mode == "auto" and s.compile is not None:
            reason = s.compile.reason.removeprefix(_KEPT)  # the original reason, however often resumed
            s.compile = CompileDecision(s.compile.enabled, _KEPT + reason)
        else:
            if mode == "auto" and device.type == "cpu" and remaining > 0:
                eager_micro = _probe_eager_step(s, sample)
            decision = decide_compile(mode, device.type, remaining_steps=remaining,
                                      eager_step_s=None if eager_micro is None else eager_micro * s.accum,
                                      estimate=CompileCache(key).estimate())
            s.compile = all_gather_object(decision)[0]
        # Timings are recorded from single-process runs only: under torchrun a step's time includes gradient
        # communication, which the probe (on the unwrapped module) leaves out.
        record = s.compile.enabled and remaining > 0 and not s.env.distributed
        if record and eager_micro is None:
            eager_micro = _probe_eager_step(s, sample)  # what the compile time is measured against
    s.recorder = CompileRecorder(CompileCache(key) if record else None, eager_micro, device)


def _probe_eager_step(s: _RunState, sample: torch.Tensor) -> float:
    """Seconds of one eager micro-step (forward + backward) on a synthetic batch of ``sample``'s shape, the
    slowest rank's; the run's RNG and gradients are left as they were."""
    device = s.device
    batch = _synthetic_batch(s, sample)
    task = copy.copy(s.task)  # a task that counts its steps (attributes it rebinds) does not count the probe

    def step() -> torch.Tensor:
        with s.amp:
            return task.step(s.core, batch)[0]

    elapsed = time_eager_step(s.core, step, device)
    return float(all_reduce(torch.tensor([elapsed], device=device), op="max")[0])


# --------------------------------------------------------------------------------------------- one epoch
def _train_epoch(s: _RunState) -> None:
    """The micro-batches of one epoch (from the sampler's position): an optimizer step every ``accum`` of
    them; stops early when the ranks agreed to stop mid-epoch (``s.stop_reason`` then says why)."""
    s.sampler.set_epoch(s.epoch, s.step_in_epoch)
    s.train_model.train()
    s.t_window, s.imgs_window = time.time(), 0
    s.micro, s.step_loss, s.stop_sig = 0, None, 0
    for batch in _batches(s.loader):
        _micro_step(s, batch)
        if s.micro == 0 and _optimizer_step(s):
            break


def _micro_step(s: _RunState, batch: Batch) -> None:
    """Forward and backward of one micro-batch; gradients sync across ranks only on an optimizer step's last
    micro-batch (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync``). Loss and metrics stay on the device."""
    if s.micro == 0:
        s.scheduler.step_update(num_updates=s.global_step)
    last_micro = s.micro == s.accum - 1
    batch = batch.to(s.device)
    if batch.bad:
        s.bad_new += s.unreadable.add(batch.bad)
    if s.ddp is not None and not last_micro:
        sync: Any = s.ddp.no_sync()
    else:
        sync = contextlib.nullcontext()
        if s.tc.fsdp and s.env.distributed:
            s.core.set_requires_gradient_sync(last_micro)
    with sync, s.recorder.step():
        with s.amp:
            loss, metrics = s.task.step(s.train_model, batch)
        s.scaler.scale(loss / s.accum).backward()
    loss_d = loss.detach().float() / s.accum
    s.step_loss = loss_d if s.step_loss is None else s.step_loss + loss_d
    for k, v in metrics.items():
        v = v.detach().float()
        s.metric_sums[k] = s.metric_sums[k] + v if k in s.metric_sums else v.clone()
    s.metric_count += 1
    s.micro = 0 if last_micro else s.micro + 1


def _optimizer_step(s: _RunState) -> bool:
    """Step, count, vote on a stop (every step, no host sync), then flush / checkpoint / stop when due.
    True when the epoch must end here (a stop mid-epoch was saved)."""
    oc = s.recipe.optim
    if oc.clip_grad is not None:
        s.scaler.unscale_(s.optimizer)
        nn.utils.clip_grad_norm_(s.core.parameters(), oc.clip_grad)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    s.window.append(s.step_loss)
    s.step_loss = None
    s.global_step += 1
    s.step_in_epoch += 1
    s.imgs_window += s.tc.batch_size
    s.images_this_run += s.tc.batch_size
    s.progress.update()
    if s.test_signal is not None:
        s.test_signal.maybe_fire(s.global_step)
    s.stop_sig = s.vote.poll(s.stopper.signum)  # one step late under torchrun

    # host syncs only here: every log window, before a checkpoint, on a stop request
    every = s.recipe.checkpoint.every_steps
    ckpt_due = bool(every) and s.global_step % every == 0
    if s.global_step % s.recipe.log.every_steps == 0 or ckpt_due or s.stop_sig:
        _flush(s)
        mid_epoch = s.step_in_epoch < s.steps_per_epoch
        if mid_epoch and s.stop_sig:
            _stop_now(s, s.stop_sig, f"at step {s.global_step} (in epoch {s.epoch + 1}/{s.tc.epochs})")
            return True
        if ckpt_due and mid_epoch:
            _save_checkpoint(s)
    return False


def _end_epoch(s: _RunState) -> None:
    """Close the epoch: flush, a synced stop vote, the epoch record and line, then a stop checkpoint or the
    epoch's checkpoint, then the task's epoch hook (a stop at an epoch's last step is saved here)."""
    tc = s.tc
    _flush(s)
    s.stop_sig = max(s.stop_sig, s.vote.poll(s.stopper.signum, sync=True))  # ranks sync here anyway
    s.epoch_loss = s.epoch_loss_sum / s.epoch_loss_steps if s.epoch_loss_steps else None
    s.epoch_loss_sum, s.epoch_loss_steps = 0.0, 0
    s.epoch += 1
    s.step_in_epoch = 0
    s.writer.write({"type": "epoch", "step": s.global_step, "epoch": s.epoch, "loss": s.epoch_loss,
                    "bad_images": s.bad_total, "time": round(time.time() - s.t_start, 2)})
    mean = f"{s.epoch_loss:.4f}" if s.epoch_loss is not None else "n/a"
    s.progress.epoch_line(_status_line(s, s.epoch, f"loss {mean} (epoch mean)",
                                       s.images_this_run / max(time.time() - s.t_loop, 1e-9)))
    if s.stop_sig and s.epoch < tc.epochs:
        _stop_now(s, s.stop_sig, f"at the end of epoch {s.epoch}")
    elif s.epoch % s.recipe.checkpoint.every_epochs == 0 or s.epoch == tc.epochs:
        _save_checkpoint(s)
    s.task.on_epoch_end(s.context())


def _status_line(s: _RunState, epoch: int, loss: str, img_s: float) -> str:
    """A progress line: ``epoch`` (1-based: the epoch running, or just done), step, ``loss``, lr, speed, time."""
    elapsed = time.time() - s.t_loop
    eta = elapsed / max(s.images_this_run, 1) * (s.total_steps - s.global_step) * s.tc.batch_size
    return (f"epoch {epoch}/{s.tc.epochs}  step {s.global_step}/{s.total_steps}  {loss}  "
            f"lr {max(g['lr'] for g in s.optimizer.param_groups):.2e}  {img_s:.0f} img/s  "
            f"elapsed {format_duration(time.time() - s.t_start)}  eta {format_duration(eta)}")


# --------------------------------------------------------------------------------------------- log window
def _flush(s: _RunState) -> dict[str, Any] | None:
    """Reduce the log window across ranks (two collectives, one host sync), check it, log it; returns the record
    (None for an empty window)."""
    device, keys = s.device, sorted(s.metric_sums)
    parts = [torch.stack(s.window).float() if s.window else torch.zeros(0, device=device)]
    parts += [(s.metric_sums[k].float() / max(s.metric_count, 1)).reshape(-1) for k in keys]
    parts.append(torch.tensor([float(s.bad_new)], device=device))
    packed = all_reduce(torch.cat(parts).to(device)) / s.env.world_size
    mem = all_reduce(torch.tensor([peak_memory_mb(device)], device=device), op="max")  # the fullest rank
    vals = torch.cat([packed, mem]).cpu()
    vals, mem_mb = vals[:-1], float(vals[-1])
    reset_peak_memory(device)  # each window reports its own peak
    n = len(s.window)
    _check_window(s, vals[:n], new_bad=bool(vals[-1] > 0))
    rec = None
    if n:
        now = time.time()
        s.last_loss = float(vals[:n].mean())
        s.epoch_loss_sum += float(vals[:n].double().sum())
        s.epoch_loss_steps += n
        rec = {"type": "train", "step": s.global_step,
               "epoch": round(s.epoch + s.step_in_epoch / s.steps_per_epoch, 4), "loss": s.last_loss,
               "lr": max(g["lr"] for g in s.optimizer.param_groups),
               "img_s": round(s.imgs_window / max(now - s.t_window, 1e-9), 2), "mem_mb": round(mem_mb, 1),
               "time": round(now - s.t_start, 2)}
        off = n
        for k in keys:
            size = s.metric_sums[k].numel()
            v = vals[off:off + size]
            rec[k] = [round(float(x), 6) for x in v] if s.metric_sums[k].dim() else round(float(v[0]), 6)
            off += size
        s.writer.write(rec)
        s.progress.show(rec)
        if s.progress.windows and s.step_in_epoch < s.steps_per_epoch:  # (at an epoch's end: the epoch line)
            # off a terminal: a plain line per log window, where a bar would have moved
            s.progress.window_line(_status_line(s, s.epoch + 1, f"loss {s.last_loss:.4f}", rec["img_s"]))
        s.t_window, s.imgs_window = now, 0
    s.window, s.metric_sums, s.metric_count = [], {}, 0
    return rec


def _check_window(s: _RunState, losses: torch.Tensor, new_bad: bool) -> None:
    """Stop on too many unreadable files (counted the same on every rank) or a non-finite loss (before anything
    of this window is saved)."""
    if new_bad and s.unreadable.sync(all_gather_object):  # every rank sees the same sum: all gather
        s.bad_total = s.unreadable.count
        if s.env.is_main:
            _logger.warning("skipped %d unreadable image(s) so far, e.g. %s", s.bad_total, s.unreadable.examples(3))
    if s.bad_total > s.recipe.data.max_bad_fraction * len(s.dataset):
        raise DataError(
            f"{s.bad_total} of {len(s.dataset)} images unreadable (more than data.max_bad_fraction="
            f"{s.recipe.data.max_bad_fraction}), e.g. {s.unreadable.examples(1)}; fix or remove them"
        )
    s.bad_new = 0
    if len(losses) and not torch.isfinite(losses).all():
        bad_step = s.global_step - len(losses) + int((~torch.isfinite(losses)).nonzero()[0, 0]) + 1
        last = s.ckpts.list()
        raise TrainingDiverged(
            f"loss is {float(losses[~torch.isfinite(losses)][0])} at step {bad_step} (epoch {s.epoch + 1}); stopped "
            f"without saving. Last good checkpoint: {last[0] if last else 'none'}. Lower optim.blr, set "
            "optim.clip_grad or use train.precision=fp32, then rerun to resume from it"
        )


# --------------------------------------------------------------------------------------------- checkpoint, stop
def _save_checkpoint(s: _RunState) -> Path | None:
    """All ranks gather (FSDP needs it); rank 0 writes. Always after a flush, so the state is finite. At an
    epoch's last step the position saved is the next epoch's start."""
    end = s.step_in_epoch >= s.steps_per_epoch
    e, step = (s.epoch + 1, 0) if end else (s.epoch, s.step_in_epoch)
    model_sd = get_model_state_dict(s.core, options=_FULL)
    optim_sd = get_optimizer_state_dict(s.core, s.optimizer, options=_FULL)
    rngs = all_gather_object(capture_rng())
    failed: str | None = None
    if s.env.is_main:
        sampler_state = {**s.sampler.state_dict(), "epoch": e, "start_step": step}
        state = {
            "format": CHECKPOINT_FORMAT, "model": model_sd, **s.task.checkpoint_meta(),
            "optimizer": optim_sd, "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
            "epoch": e, "step_in_epoch": step, "global_step": s.global_step, "steps_per_epoch": s.steps_per_epoch,
            "total_steps": s.total_steps, "world_size": s.env.world_size, "sampler": sampler_state, "rng": rngs,
            "data_stats": s.unreadable.state(), "compile": s.compile.state() if s.compile else None,
            "attention": s.attention.state() if s.attention else None,
            "metrics": {"loss": s.last_loss, "epoch_loss": s.epoch_loss, "epoch_loss_sum": s.epoch_loss_sum,
                        "epoch_loss_steps": s.epoch_loss_steps}, "recipe": to_dict(s.recipe),
        }
        try:
            s.ckpt_path = s.ckpts.save(state, s.global_step)
        except WriteFailed as exc:  # disk full, file-size limit, read-only: the previous checkpoint is whole
            failed = _checkpoint_write_failed(s, exc)
    failed = all_gather_object(failed)[0]  # (also the barrier: rank 0 has written) every rank stops alike
    if failed is not None:
        raise WriteFailed(failed)
    return s.ckpt_path


def _checkpoint_write_failed(s: _RunState, exc: WriteFailed) -> str:
    """The one line for a checkpoint the file system refused: what is kept, and that a rerun resumes from it."""
    if exc.cause is None or exc.remedy is None:
        return str(exc)
    kept = [p for p in s.ckpts.list() if p not in s.ckpts.unusable]
    then = (f"the last good checkpoint '{kept[0]}' is kept: {exc.remedy}, then rerun the same command to resume "
            "from it" if kept else f"no earlier checkpoint: {exc.remedy}, then rerun the same command")
    return f"could not write '{exc.path}': {exc.cause}; {then} (or pass another --output to start a new run)"


def _stop_now(s: _RunState, signum: int, where: str) -> None:
    """The ranks agreed to stop on ``signum``: save where they are and end the loop (exit 128 + signum)."""
    s.stop_reason = signal.Signals(signum).name.lower()
    t0 = time.time()
    path = _save_checkpoint(s)
    _logger.info("%s received: checkpoint %s saved %s in %.1f s", signal.Signals(signum).name, path, where,
                 time.time() - t0)


# --------------------------------------------------------------------------------------------- finish
def _finish(s: _RunState) -> TrainResult:
    """A finished run hands the full state to the task's end hook (export, publish); every run writes its
    summary, finished or stopped."""
    completed = s.stop_reason == "finished" and s.epoch >= s.tc.epochs
    extra: dict[str, Any] = {}
    if completed:
        model_sd = get_model_state_dict(s.core, options=_FULL)
        extra = s.task.on_train_end(s.context(model_sd if s.env.is_main else None)) or {}
        barrier()
    wall = time.time() - s.t_start
    result = TrainResult(s.run_dir, completed, s.stop_reason, s.epoch, s.global_step, s.total_steps, s.epoch_loss,
                         s.ckpt_path, wall, s.images_this_run / max(time.time() - s.t_loop, 1e-9), extra)
    if s.env.is_main:
        _write_summary(result, s.recipe, s.env, s.bad_total)
    return result


def _batches(loader: Any) -> Iterator[Batch]:
    try:
        yield from loader
    except MffzooError as exc:
        raise _one_line(exc) from None


def _write_summary(result: TrainResult, recipe: EngineRecipe, env: DistEnv, bad_total: int) -> None:
    summary = {
        "name": recipe.name, "completed": result.completed, "stop_reason": result.stop_reason,
        "epochs": result.epoch, "global_step": result.global_step, "total_steps": result.total_steps,
        "final_loss": result.final_loss if result.final_loss is None or math.isfinite(result.final_loss) else None,
        "final_loss_kind": FINAL_LOSS_KIND,
        "images_seen": result.global_step * recipe.train.batch_size, "wall_s": round(result.wall_s, 1),
        "images_per_s_this_run": round(result.images_per_s, 1), "world_size": env.world_size,
        "device": str(env.device), "bad_images": bad_total,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in result.extra.items()},
    }
    atomic_write(result.run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
