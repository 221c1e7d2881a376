"""Linear probing as in MAE/MFF: a frozen encoder, BatchNorm without affine + a linear layer on the cls token.

Recipe (MAE ``main_linprobe.py``; mmpretrain's MFF linear configs match): LARS, momentum 0.9, no weight decay,
lr = blr x batch / 256 with blr 0.1, 10 warm-up epochs then a half-cycle cosine to 0 (per iteration), 90 epochs,
head weights ~ N(0, 0.01). The BatchNorm is what makes one learning rate work for features of any scale.

With augmentation off (the default here) every epoch sees the same images, so the encoder runs once and the
head trains on cached features in seconds; ``augment=True`` runs the encoder on RandomResizedCrop + flip views
every step, as the paper does at ImageNet scale (then only the validation features are extracted and cached).
Encoder and head run on ``device`` (``auto``: a CUDA GPU when one is visible).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..config import require
from ..errors import ConfigError
from .data import check_image_folder, eval_transform, make_loader, open_splits, train_transform
from .features import (
    READOUTS,
    compute_features,
    features_info,
    frozen_features,
    load_eval_model,
    pool_tokens,
    resolve_device,
)
from .knn import topk_accuracy

__all__ = ["LinearProbeConfig", "LinearHead", "build_head_optimizer", "train_linear_head", "linear_probe",
           "tensor_batches", "evaluate_head"]


@dataclass
class LinearProbeConfig:
    epochs: int = 90
    batch_size: int = 256
    blr: float = 0.1  # base lr per 256 images (MAE); lr = blr * batch_size / 256 unless ``lr`` is set
    lr: float | None = None
    optimizer: Literal["lars", "sgd"] = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    min_lr: float = 0.0
    pool: Literal["cls", "avg"] = "cls"
    augment: bool = False
    eval_every: int = 1
    seed: int = 0

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (BatchNorm needs a batch), got {self.batch_size}")
        require(self.blr > 0 and (self.lr is None or self.lr > 0), "lr", "learning rates must be > 0")
        require(math.isfinite(self.effective_lr), "blr", f"{self.blr} x batch_size / 256 is beyond a float")
        require(0 <= self.min_lr <= self.effective_lr, "min_lr",
                f"must be in [0, lr {self.effective_lr:g}], got {self.min_lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                f"must be in [0, epochs), got {self.warmup_epochs} with epochs={self.epochs}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


class LinearHead(nn.Sequential):
    """``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear``: MAE's linear-probe head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def build_head_optimizer(head: nn.Module, cfg: LinearProbeConfig) -> torch.optim.Optimizer:
    """LARS as in MAE's ``util/lars.py`` (timm's ``Lars``: layer-wise trust ratio on weight matrices only,
    biases and norms get the plain momentum update), or SGD."""
    lr = cfg.effective_lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [{"params": matrices, "always_adapt": True, "weight_decay": cfg.weight_decay},
              {"params": vectors, "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum)


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], Iterator]:
    """Per-epoch shuffled mini-batches of cached features (last partial batch dropped, as in MAE)."""

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + e)
        perm = torch.randperm(len(y), generator=g)
        n = len(y) // batch_size * batch_size or len(y)
        for i in range(0, n, batch_size):
            idx = perm[i: i + batch_size]
            yield x[idx], y[idx]

    return epoch


def train_linear_head(
    dim: int,
    num_classes: int,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    cfg: LinearProbeConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[LinearHead, list[dict[str, Any]]]:
    """Train a :class:`LinearHead` on ``device`` from ``(features, labels)`` batches (moved there per step) with
    a per-iteration warm-up + cosine lr."""
    dev = torch.device(device)
    # A small head step is microseconds of math: OpenMP threads only add spin-waiting (measured 25x slower with
    # 2 threads than 1 on a busy 2-core CPU), so tiny probes run single-threaded.
    small = dev.type == "cpu" and cfg.batch_size * dim * num_classes < 2**26
    with num_threads(1 if small else torch.get_num_threads()):
        return _train_linear_head(dim, num_classes, epoch_batches, steps_per_epoch, cfg, evaluate, log, dev)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (one thread is faster for a small head on a CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_linear_head(
    dim: int,
    num_classes: int,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    cfg: LinearProbeConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    log: Callable[[dict[str, Any]], None] | None,
    device: torch.device,
) -> tuple[LinearHead, list[dict[str, Any]]]:
    torch.manual_seed(cfg.seed)
    head = LinearHead(dim, num_classes).to(device)
    opt = build_head_optimizer(head, cfg)
    warm = cfg.warmup_epochs * steps_per_epoch
    sched = CosineLRScheduler(opt, t_initial=max(1, cfg.epochs * steps_per_epoch - warm), lr_min=cfg.min_lr,
                              warmup_t=warm, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(cfg.epochs):
        head.train()
        total, count = torch.zeros((), device=device), 0  # summed on the device: one host sync per epoch
        for x, y in epoch_batches(epoch):
            sched.step_update(step)
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            loss = loss_fn(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            count += len(y)
            step += 1
        mean_loss = float(total) / max(count, 1)
        if not math.isfinite(mean_loss):
            raise ConfigError(f"linear probe loss became {mean_loss} in epoch {epoch + 1}; lower --blr (or --lr)")
        rec: dict[str, Any] = {"epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": opt.param_groups[0]["lr"]}
        if evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            head.eval()
            rec.update(evaluate(head))
        history.append(rec)
        if log is not None:
            log(rec)
    head.eval()
    return head, history


@torch.no_grad()
def evaluate_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Top-1/top-5 of ``head`` on features ``x`` (run on the head's device in chunks)."""
    head.eval()
    dev = next(head.parameters()).device
    logits = torch.cat([head(c.to(dev).float()).float().cpu() for c in x.split(chunk)])
    return topk_accuracy(logits, y.cpu())


def linear_probe(model: str | os.PathLike[str], data: str | os.PathLike[str], cfg: LinearProbeConfig | None = None,
                 *, img_size: int | None = None, random_init: bool = False, batch_size: int = 128, workers: int = 0,
                 bf16: bool = False, cache: bool | str = True, device: str | torch.device = "auto",
                 log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Linear-probe top-1/top-5 of a MODEL spec on an ImageNet-style folder (``batch_size`` is for the encoder)."""
    cfg = cfg or LinearProbeConfig()
    cfg.validate()
    dev = resolve_device(device)
    check_image_folder(data)  # bad data fails before any model is built
    net = load_eval_model(model, img_size=img_size, random_init=random_init, seed=cfg.seed, device=dev)

    if not cfg.augment:
        train, val, classes, info = frozen_features(net, data, img_size=img_size, batch_size=batch_size,
                                                    workers=workers, bf16=bf16, cache=cache)
        x_tr, y_tr = train[cfg.pool].to(dev), train.labels.to(dev)  # on the device once, not per step
        batches = tensor_batches(x_tr, y_tr, min(cfg.batch_size, len(y_tr)), cfg.seed)
        steps = max(1, len(y_tr) // min(cfg.batch_size, len(y_tr)))
    else:
        # MAE linprobe augmentation: RandomResizedCrop(bicubic) + flip, no colour jitter; the encoder runs per step,
        # so only the validation features are extracted (and cached) up front.
        aug_ds, val_ds = open_splits(data, train_transform(net, img_size, interpolation="bicubic", color_jitter=None),
                                     eval_transform(net, img_size))
        val = compute_features(net, val_ds, batch_size=batch_size, workers=workers, bf16=bf16, cache=cache)
        classes = list(aug_ds.classes)
        info = features_info(net, classes, len(aug_ds), val, img_size)
        loader = make_loader(aug_ds, cfg.batch_size, shuffle=True, workers=workers,
                             drop_last=len(aug_ds) > cfg.batch_size, seed=cfg.seed)
        steps = len(loader)

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for imgs, y in loader:
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    c, a = pool_tokens(net, net.forward_features(imgs.to(dev, non_blocking=True)))
                yield (c if cfg.pool == "cls" else a).float(), y

    x_val, y_val = val[cfg.pool].to(dev), val.labels
    head, history = train_linear_head(x_val.shape[1], len(classes), batches, steps, cfg,
                                      evaluate=lambda h: evaluate_head(h, x_val, y_val), log=log, device=dev)
    final = evaluate_head(head, x_val, y_val)
    best = max((h["top1"] for h in history if "top1" in h), default=final["top1"])
    return {"task": "linear", "model": str(model), "random_init": random_init, "data": str(data),
            "device": dev.type, **info, "classes": classes, "config": asdict(cfg),
            "results": {cfg.pool: {**final, "best_top1": best, "readout": READOUTS[cfg.pool]}}, "history": history}
