"""Linear semantic-segmentation probe of a frozen backbone, in the style of DINOv2's linear head.

The encoder's patch tokens after a few blocks (``levels``; timm ``forward_intermediates(..., norm=False,
output_fmt="NCHW")``) are bilinearly resized to the first level's grid and concatenated; the head is
``BatchNorm2d`` + a 1x1 ``Conv2d`` to the classes (weights N(0, 0.01)); its logits are bilinearly upsampled to
the label size and trained with cross-entropy that skips label 0 (ignore). Reported: mIoU (mean over the classes
present in the labels or predictions) and pixel accuracy, both from torchmetrics
(``MulticlassJaccardIndex(average="macro")``, ``MulticlassAccuracy(average="micro")``, with the ignore index), plus
each class's IoU (None for a class neither in the labels nor predicted).

Default levels (:func:`mffzoo.archs.default_dense_levels`, shared with ``mffzoo export --features levels``): blocks
3, 5, 7, 11 of a 12-block encoder (ViT-S/B), 7, 11, 15, 23 of a 24-block one (ViT-L), otherwise the blocks ending
at 1/3, 1/2, 2/3 and all of the encoder (1, 2, 3, 5 of the 6-block demo model).

Our choices (DINOv2 trains its head with augmentation for 40k iterations): no augmentation, so the encoder runs
once per image and the head trains on cached features (float16, in memory and in the feature cache) whenever they
fit in ``max_cache_gb``; otherwise the encoder runs on every batch of every epoch. AdamW (lr 1e-3, weight decay
1e-4), batch 16, one warm-up epoch then a per-iteration cosine to 0, 40 epochs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..archs import check_level_order, default_dense_levels, resolve_dense_levels
from ..config import require
from ..data.seg_demo import default_seg_demo_root, read_seg_demo_meta, write_seg_demo_dataset
from ..errors import CheckpointError, ConfigError, DataError
from ..progress import Progress
from ..zoo import atomic_torch_save, load_checkpoint_file
from .data import make_loader, model_input_size
from .features import dataset_fingerprint, feature_cache_dir, load_eval_model, model_fingerprint, resolve_device
from .linear import num_threads, tensor_batches
from .seg_data import IGNORE_INDEX, SegDataset, check_labels, check_seg_folder, describe_pairs, to_targets

_logger = logging.getLogger("mffzoo")

__all__ = ["ADE_NUM_CLASSES", "SegProbeConfig", "SegLinearHead", "SegProbeResult", "default_levels", "check_levels",
           "demo_seg_data", "train_seg_head", "evaluate_seg_head", "seg_probe", "seg_rows"]

ADE_NUM_CLASSES = 150
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def default_levels(depth: int, arch: str | None = None) -> list[int]:
    """The blocks the probe reads by default: :func:`mffzoo.archs.default_dense_levels` (the table
    ``mffzoo export --features levels`` uses too)."""
    return default_dense_levels(arch, depth)


def check_levels(levels: list[int] | None, depth: int, arch: str | None = None) -> list[int]:
    """``levels`` (or the default) if they are increasing block indices of a ``depth``-block encoder, else a
    one-line :class:`ConfigError`: the same two checks as ``mffzoo export --features levels``."""
    return resolve_dense_levels(None if levels is None else check_level_order(levels), depth, arch)


@dataclass
class SegProbeConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    levels: list[int] | None = None  # None: default_levels(depth)
    eval_every: int = 10
    max_cache_gb: float = 4.0  # features larger than this are not cached: the encoder runs every epoch
    seed: int = 0

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (BatchNorm needs a batch), got {self.batch_size}")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                f"must be in [0, epochs), got {self.warmup_epochs} with epochs={self.epochs}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        require(self.max_cache_gb >= 0, "max_cache_gb", f"must be >= 0, got {self.max_cache_gb}")


class SegLinearHead(nn.Module):
    """``BatchNorm2d`` + 1x1 ``Conv2d`` on concatenated feature maps; logits bilinearly resized to ``size``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(self.conv(self.bn(feats)), size=tuple(size), mode="bilinear", align_corners=False)


@dataclass
class SegProbeResult:
    """What ``seg_probe`` measured (``to_dict()``: the results JSON, what ``--update-zoo`` records)."""

    model: str
    random_init: bool
    data: str
    device: str
    num_classes: int
    num_train: int
    num_val: int
    img_size: int
    feature_dim: int
    levels: list[int]
    classes: list[str] | None
    features_cached: bool
    config: dict[str, Any]
    results: dict[str, dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    task: str = "seg"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"task": d.pop("task"), **d}


# ------------------------------------------------------------------------------------------------ features
def encode(net: nn.Module, images: torch.Tensor, levels: list[int], bf16: bool = False) -> torch.Tensor:
    """(B, len(levels) x C, h, w) float32: the levels' patch tokens, resized to the first level's grid."""
    dev = next(net.parameters()).device
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        maps = net.forward_intermediates(images.to(dev, non_blocking=True), indices=levels, norm=False,
                                         stop_early=True, output_fmt="NCHW", intermediates_only=True)
    size = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == size else F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
            for m in maps]
    return torch.cat([m.float() for m in maps], dim=1)


def _extract(net: nn.Module, ds: SegDataset, levels: list[int], split: str, *, batch_size: int, workers: int,
             bf16: bool) -> dict[str, torch.Tensor]:
    feats, masks = [], []
    with Progress(total=len(ds), desc=f"seg features: {split} split, {len(ds)} images", unit="img") as progress:
        for x, y, _ in make_loader(ds, batch_size, workers=workers):
            feats.append(encode(net, x, levels, bf16).half().cpu())
            masks.append(y.to(torch.int16))
            progress.update(len(y))
    return {"feats": torch.cat(feats), "masks": torch.cat(masks)}


def _cached(net: nn.Module, ds: SegDataset, levels: list[int], split: str, cache: bool | str | os.PathLike[str],
            model_key: str, **kw: Any) -> tuple[dict[str, torch.Tensor], Path | None]:
    """A split's float16 features and raw masks, from the feature cache when model, files and preprocessing
    match, and where to write them (None: read from the cache, or caching is off)."""
    if cache is False:
        return _extract(net, ds, levels, split, **kw), None
    root = feature_cache_dir() if cache is True else Path(cache)
    dev = next(net.parameters()).device.type
    key = dataset_fingerprint(describe_pairs(ds.pairs, f"{ds.describe()}-levels{levels}"))
    path = root / f"seg-{model_key}-{key}-{'bf16' if kw['bf16'] else 'fp32'}{'' if dev == 'cpu' else '-' + dev}.pt"
    if path.is_file():
        try:
            d = load_checkpoint_file(path)
            return {"feats": d["feats"], "masks": d["masks"]}, None
        except (CheckpointError, KeyError) as exc:  # a damaged cache entry is recomputed, never fatal
            _logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    return _extract(net, ds, levels, split, **kw), path


def _streamed(net: nn.Module, ds: SegDataset, levels: list[int], num_classes: int, *, batch_size: int,
              workers: int, bf16: bool, shuffle: bool, seed: int) -> Batches:
    """Batches that run the encoder every time (features too large to cache)."""
    loader = make_loader(ds, batch_size, shuffle=shuffle, workers=workers, drop_last=shuffle and len(ds) > batch_size,
                         seed=seed)

    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, idx in loader:
            yield encode(net, x, levels, bf16), to_targets(y, idx, ds, num_classes)

    return epoch


def _in_order(x: torch.Tensor, t: torch.Tensor, batch_size: int) -> Batches:
    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(t), batch_size):
            yield x[i: i + batch_size], t[i: i + batch_size]

    return epoch


# ------------------------------------------------------------------------------------------------ the head
def _head_optimizer(head: nn.Module, cfg: SegProbeConfig) -> torch.optim.Optimizer:
    decay = [p for p in head.parameters() if p.ndim > 1]  # the conv weight; BatchNorm and bias: no decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _seg_step(head: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(head(x, t.shape[-2:]), t, ignore_index=IGNORE_INDEX)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_seg_head(dim: int, num_classes: int, epoch_batches: Batches, steps_per_epoch: int, cfg: SegProbeConfig,
                   evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                   log: Callable[[dict[str, Any]], None] | None = None,
                   device: torch.device | str = "cpu") -> tuple[SegLinearHead, list[dict[str, Any]]]:
    """Train a :class:`SegLinearHead` from ``(features, targets)`` batches (targets: class index or
    ``IGNORE_INDEX``), warm-up + per-iteration cosine lr; ``evaluate`` every ``cfg.eval_every`` epochs and last."""
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    head = SegLinearHead(dim, num_classes).to(dev)
    opt = _head_optimizer(head, cfg)
    warm = cfg.warmup_epochs * steps_per_epoch
    sched = CosineLRScheduler(opt, t_initial=max(1, cfg.epochs * steps_per_epoch - warm), lr_min=0.0,
                              warmup_t=warm, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        losses = []
        for x, t in epoch_batches(epoch - 1):
            sched.step_update(step)
            step += 1
            losses.append(_seg_step(head, opt, x.to(dev, non_blocking=True).float(), t.to(dev).long()))
        rec = _epoch_record(epoch, losses, opt.param_groups[0]["lr"])
        if evaluate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            scores = evaluate(head.eval())
            rec.update(miou=scores["miou"], pixel_acc=scores["pixel_acc"])
        history.append(rec)
        if log is not None:
            log(rec)
    return head.eval(), history


def _epoch_record(epoch: int, losses: list[torch.Tensor], lr: float) -> dict[str, Any]:
    mean = float(torch.stack(losses).mean()) if losses else float("nan")
    if not math.isfinite(mean):
        raise ConfigError(f"segmentation probe loss became {mean} in epoch {epoch}; lower --lr")
    return {"epoch": epoch, "loss": round(mean, 6), "lr": lr}


@torch.no_grad()
def evaluate_seg_head(head: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      num_classes: int) -> dict[str, Any]:
    """mIoU and pixel accuracy in percent (torchmetrics, label 0 ignored) and each class's IoU (None: a class
    neither in the labels nor predicted, which the mean leaves out)."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    head.eval()
    dev = next(head.parameters()).device
    kw = dict(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    miou = MulticlassJaccardIndex(average="macro", **kw).to(dev)
    per_class = MulticlassJaccardIndex(average="none", **kw).to(dev)
    acc = MulticlassAccuracy(average="micro", **kw).to(dev)
    for x, t in batches:
        t = t.to(dev).long()
        pred = head(x.to(dev).float(), t.shape[-2:]).argmax(dim=1)
        for m in (miou, per_class, acc):
            m.update(pred, t)
    present = (per_class.confmat.sum(0) + per_class.confmat.sum(1)) > 0
    ious = per_class.compute().tolist()
    return {"miou": round(100.0 * float(miou.compute()), 4), "pixel_acc": round(100.0 * float(acc.compute()), 4),
            "per_class_iou": [round(100.0 * v, 4) if p else None for v, p in zip(ious, present.tolist())]}


# ------------------------------------------------------------------------------------------------ the probe
def demo_seg_data() -> Path:
    """The built-in segmentation demo (``--data demo``), written on first use under the cache root."""
    try:
        return write_seg_demo_dataset(default_seg_demo_root())
    except ValueError as exc:
        raise DataError(f"segmentation demo dataset: {exc}") from None


def _label_space(root: Path, num_classes: int | None) -> tuple[int, list[str] | None]:
    """(K, class names by label 1..K or None): the demo's own, else ``num_classes`` (default 150, ADE20K's)."""
    meta = read_seg_demo_meta(root)
    k = num_classes or (int(meta["num_classes"]) if meta else ADE_NUM_CLASSES)
    if k < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {k}")
    names = list(meta["classes"]) if meta and len(meta.get("classes", [])) == k else None
    return k, names


def _splits(net: nn.Module, pairs: dict[str, list[Any]], levels: list[int], num_classes: int,
            cfg: SegProbeConfig, img_size: int, enc: dict[str, Any], cache: bool | str | os.PathLike[str],
            ) -> tuple[Batches, int, Batches, int, bool]:
    """(train batches, steps per epoch, validation batches, feature dim, cached?) for the head."""
    dc = resolve_data_config(model=net)
    train_ds, val_ds = (SegDataset(pairs[s], img_size, dc["mean"], dc["std"], dc.get("interpolation", "bicubic"))
                        for s in ("training", "validation"))
    probe = encode(net, train_ds[0][0][None], levels, enc["bf16"])
    per_image = probe[0].numel() * 2 + img_size * img_size * 2  # float16 features + int16 mask
    fits = (len(train_ds) + len(val_ds)) * per_image <= cfg.max_cache_gb * 2**30
    bs = min(cfg.batch_size, len(train_ds))
    if not fits:
        _logger.info("seg features would take %.1f GB (> %.1f GB): the encoder runs on every batch",
                     (len(train_ds) + len(val_ds)) * per_image / 2**30, cfg.max_cache_gb)
        train = _streamed(net, train_ds, levels, num_classes, shuffle=True, seed=cfg.seed, **{**enc,
                          "batch_size": bs})
        val = _streamed(net, val_ds, levels, num_classes, shuffle=False, seed=0, **enc)
        return train, max(1, len(train_ds) // bs), val, probe.shape[1], False
    key = model_fingerprint(net) if cache is not False else ""
    split = {name: (ds, *_cached(net, ds, levels, name, cache, key, **enc))
             for name, ds in (("training", train_ds), ("validation", val_ds))}
    targets = {name: to_targets(d["masks"].long(), torch.arange(len(ds)), ds, num_classes).to(torch.int16)
               for name, (ds, d, _) in split.items()}  # every label checked before anything is written
    for _, d, path in split.values():
        if path is not None:
            atomic_torch_save(d, path)
    x_tr, x_va = split["training"][1]["feats"], split["validation"][1]["feats"]
    return (tensor_batches(x_tr, targets["training"], bs, cfg.seed), max(1, len(x_tr) // bs),
            _in_order(x_va, targets["validation"], enc["batch_size"]), probe.shape[1], True)


def seg_probe(model: str | os.PathLike[str], data: str | os.PathLike[str], cfg: SegProbeConfig | None = None, *,
              img_size: int | None = None, random_init: bool = False, num_classes: int | None = None,
              batch_size: int = 32, workers: int = 0, bf16: bool = False, cache: bool | str = True,
              device: str | torch.device = "auto", log: Callable[[dict[str, Any]], None] | None = None,
              ) -> SegProbeResult:
    """mIoU / pixel accuracy of a linear segmentation probe on a MODEL spec's frozen features, on an
    ADE20K-layout folder (``batch_size``: images per encoder forward)."""
    cfg = cfg or SegProbeConfig()
    cfg.validate()
    dev = resolve_device(device)
    root = Path(data)
    pairs = check_seg_folder(root)  # bad data fails before any model is built
    k, names = _label_space(root, num_classes)
    check_labels(pairs, k)
    net = load_eval_model(model, img_size=img_size, random_init=random_init, seed=cfg.seed, device=dev)
    depth = len(getattr(net, "blocks", []))
    if not depth or not hasattr(net, "forward_intermediates"):
        raise ConfigError(f"'{model}' is not a ViT with blocks and forward_intermediates; the probe reads its blocks")
    levels = check_levels(cfg.levels, depth, (getattr(net, "pretrained_cfg", None) or {}).get("architecture"))
    size = model_input_size(net, img_size)
    enc = dict(batch_size=batch_size, workers=workers, bf16=bf16)
    train, steps, val, dim, cached = _splits(net, pairs, levels, k, cfg, size, enc, cache)
    # As the linear probe: a small head on a busy CPU runs several times faster on one thread than on two
    # (measured 32 vs 135 ms a step on the 2-core CPU for the demo model's head); the encoder keeps them all.
    small = dev.type == "cpu" and cfg.batch_size * k * size * size < 2**25 and cached
    final: dict[str, Any] = {}  # the last evaluation (train_seg_head always evaluates after the last epoch)
    with num_threads(1 if small else torch.get_num_threads()):
        _, history = train_seg_head(dim, k, train, steps, cfg, log=log, device=dev,
                                    evaluate=lambda h: final.update(evaluate_seg_head(h, val(0), k)) or final)
    best = max((h["miou"] for h in history if "miou" in h), default=final["miou"])
    readout = f"blocks {','.join(map(str, levels))} (BN + 1x1 conv)"
    return SegProbeResult(
        model=str(model), random_init=random_init, data=str(data), device=dev.type, num_classes=k,
        num_train=len(pairs["training"]), num_val=len(pairs["validation"]), img_size=size, feature_dim=dim,
        levels=levels, classes=names, features_cached=cached, config={**asdict(cfg), "levels": levels},
        results={"linear": {**final, "best_miou": best, "readout": readout}}, history=history)


def seg_rows(result: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """Table rows (model, task, read-out, mIoU, pixel accuracy) for :func:`mffzoo.table.print_table`."""
    rows = [[result["model"] + (" (random init)" if result.get("random_init") else ""), result["task"],
             m.get("readout", key), f"{m['miou']:.2f}", f"{m['pixel_acc']:.2f}"]
            for key, m in result["results"].items()]
    return rows, ["model", "task", "features", "mIoU %", "pixel acc %"]
