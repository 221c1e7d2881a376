"""The optimizer and the batch arithmetic every training loop shares: the engine and ``mffzoo bench train``.

The optimizer is timm's factory with the recipe's hyper-parameters; the batch helpers turn a recipe's effective
batch into what each process runs on ``world_size`` processes.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from ..errors import ConfigError


def build_optimizer(model: nn.Module, oc: Any, batch_size: int, **extra: Any) -> torch.optim.Optimizer:
    """timm's optimizer factory with the recipe's hyper-parameters: no weight decay for 1-D params (norms,
    biases) and ``model.no_weight_decay()``; AdamW/Adam use torch's fused kernel, which exists for CUDA and CPU
    (3x faster optimizer step than the for-each path on the dev CPU)."""
    kwargs: dict[str, Any] = {}
    if "adam" in oc.opt or "lamb" in oc.opt:
        kwargs.update(betas=tuple(oc.betas), eps=oc.eps)
    if oc.opt in ("adamw", "adam"):
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt=oc.opt, lr=oc.resolved_lr(batch_size), weight_decay=oc.weight_decay,
                               **{**kwargs, **extra})


def fit_batch_per_device(batch_size: int, batch_per_device: int, world_size: int) -> int:
    """The micro-batch a process runs: ``batch_per_device``, or its share of the batch where that is smaller
    (a recipe written for one process, e.g. the demo's 64 of 64, then runs unchanged on 2 or 4)."""
    share, rest = divmod(batch_size, world_size)
    return share if rest == 0 and 0 < share < batch_per_device else batch_per_device


def accumulation_steps(batch_size: int, batch_per_device: int, world_size: int) -> int:
    """Micro-batches per optimizer step that keep the effective batch at ``batch_size`` on ``world_size``."""
    per_step = batch_per_device * world_size
    if batch_size % per_step:
        fits = [d for d in range(1, batch_size // world_size + 1) if batch_size % (d * world_size) == 0]
        fix = (f"set --set train.batch_per_device={max(d for d in fits if d <= batch_per_device)}" if fits
               else f"use a number of processes that divides {batch_size}")
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by train.batch_per_device={batch_per_device} x "
            f"{world_size} processes = {per_step}; {fix} (the effective batch stays {batch_size})"
        )
    return batch_size // per_step
