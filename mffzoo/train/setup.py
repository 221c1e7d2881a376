"""A run's setup, before any step: the data (fails fast), the run directory, the model on its device wrapped
for torchrun (DDP) or sharded (FSDP2), the optimizer, the per-iteration warm-up + cosine schedule (timm) and the
GradScaler: a :class:`~mffzoo.train.state.RunState` at step 0, which the resume may then move on."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.distributed.fsdp import fully_shard

from ..errors import ConfigError, DataError
from ..io import write_failed
from .checkpoint import CheckpointManager
from .data import GlobalBatchSampler, build_dataset, derive_seed
from .distributed import DistEnv
from .numerics import resolve_precision
from .optim import accumulation_steps, build_optimizer, fit_batch_per_device
from .recipe import EngineRecipe
from .state import Clock, Position, RngStreams, RunState, Trainee
from .task import Task

_logger = logging.getLogger("mffzoo.train")

__all__ = ["build_run"]


def build_run(recipe: EngineRecipe, task: Task, env: DistEnv, run_dir: Path, t_start: float) -> RunState:
    """Data first (a wrong path fails in a second, before any model is built), then the run directory, then
    model, optimizer and schedule."""
    tc = recipe.train
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
    position = Position(sampler, tc.epochs)
    ckpts = _prepare_run_dir(recipe, env, run_dir)

    if env.device.type == "cpu" and tc.cpu_threads:
        torch.set_num_threads(tc.cpu_threads)
    trainee = _build_trainee(recipe, task, env, position.total_steps,
                             int(round(recipe.optim.warmup_epochs * sampler.steps_per_epoch)))
    return RunState(recipe, task, env, run_dir, dataset, ckpts, trainee, position, Clock(t_start), RngStreams(env))


def _prepare_run_dir(recipe: EngineRecipe, env: DistEnv, run_dir: Path) -> CheckpointManager:
    """Refuse to mix runs: an existing run directory is resumed, restarted (its checkpoints set aside) or an
    error. The resolved recipe is written once the checkpoints are known to fit it (the engine, after resuming)."""
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


def _build_trainee(recipe: EngineRecipe, task: Task, env: DistEnv, total_steps: int, warmup_steps: int) -> Trainee:
    """The model (see :func:`_build_model`), the optimizer with the task's extra arguments, the schedule and the
    scaler the precision asks for."""
    tc, oc = recipe.train, recipe.optim
    amp_dtype, use_scaler = resolve_precision(tc.precision, env.device)
    model, core, ddp = _build_model(recipe, task, env)
    lr = oc.resolved_lr(tc.batch_size)
    optimizer = build_optimizer(core, oc, tc.batch_size, **task.optimizer_kwargs(core))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=oc.min_lr,
                                  warmup_t=warmup_steps, warmup_lr_init=lr * oc.warmup_start_factor,
                                  warmup_prefix=True, t_in_epochs=False, cycle_limit=1)
    scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)
    return Trainee(model, core, ddp, bool(tc.fsdp and env.distributed), optimizer, scheduler, scaler, amp_dtype, lr,
                   warmup_steps)


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
