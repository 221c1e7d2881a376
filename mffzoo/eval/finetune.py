"""End-to-end fine-tuning of a pretrained backbone, run by the shared training engine (:mod:`mffzoo.train`).

Recipe (MAE ``main_finetune.py``; mmpretrain's MFF fine-tune configs use the same values): global average pooling
of the patch tokens + a fresh ``fc_norm`` (the pretrained final norm is dropped), head ~ N(0, 2e-5), AdamW
(0.9, 0.999), blr 5e-4 (lr = blr x batch / 256), weight decay 0.05, layer-wise lr decay 0.65 (ViT-S/B) / 0.75
(ViT-L) through timm's layer-decay parameter groups, 5 warm-up epochs + cosine to 1e-6, drop path 0.1 (B/S) /
0.2 (L), RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing
0.1 (SoftTargetCrossEntropy), 100 epochs (ViT-S/B) / 50 (ViT-L), batch 1024.

This module only says *what* is trained (a :class:`~mffzoo.train.engine.Task`): the engine owns the loop,
checkpoints and exact resume, DDP/FSDP, precision, progress and ``metrics.jsonl``. Validation top-1/top-5 is
measured at the end of every ``evaluation.every_epochs`` epochs (sharded over ranks) and appended to
``RUN/eval.jsonl``; the final classifier is written as a timm model folder to ``RUN/model``.

The validation split is read with timm's ``create_dataset`` and the training reader's own ``class_to_idx``, so
validation label ``i`` is the class the engine trained as ``i`` (timm sorts class folders naturally and
case-insensitively; a plain sort would permute them).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_model_args
from torch import nn

from ..config import MAX_IMG_SIZE, load_config, read_yaml, require, to_dict
from ..errors import ConfigError, DataError
from ..train.data import Batch, derive_seed, open_image_dataset, resolve_root
from ..train.distributed import all_reduce
from ..train.engine import RunContext, Task, TrainResult, run
from ..train.recipe import DEMO_ROOT, EngineRecipe, OptimConfig, TrainConfig, find_recipe, load_recipe
from ..zoo.home import WEIGHTS_NAME, git_commit, write_model_folder
from .data import check_image_folder, class_to_idx, make_loader, model_input_size
from .features import load_eval_model

_logger = logging.getLogger("mffzoo.eval")

__all__ = ["FinetuneModelConfig", "AugConfig", "MixupConfig", "EvalConfig", "FinetuneRecipe", "FinetuneTask",
           "build_finetune_model", "load_finetune_recipe", "finetune", "recipe_epochs", "EVAL_LOG"]

EVAL_LOG = "eval.jsonl"


@dataclass
class FinetuneModelConfig:
    pretrained: str = "mff_vit_base_patch16_224.mff_in1k_800e"  # any MODEL spec mffzoo.zoo.load_model accepts
    random_init: bool = False  # build the architecture without weights (smoke tests, from-scratch baselines)
    img_size: int | None = None  # null: the backbone's own input size
    num_classes: int | None = None  # null: the number of class folders in data.root/train
    drop_path_rate: float = 0.1  # 0.1 ViT-S/B, 0.2 ViT-L (MAE)
    layer_decay: float = 0.65  # 0.65 ViT-S/B (MAE, MFF), 0.75 ViT-L (MAE)
    head_init_std: float = 2.0e-5  # MAE: trunc_normal_(head.weight, std=2e-5)

    def validate(self) -> None:
        require(bool(self.pretrained), "model.pretrained", "is empty; name a MODEL (e.g. mff_vit_small.demo)")
        require(self.img_size is None or 8 <= self.img_size <= MAX_IMG_SIZE, "model.img_size",
                f"must be in 8..{MAX_IMG_SIZE} (or null: the backbone's own), got {self.img_size}")
        require(self.num_classes is None or self.num_classes >= 2, "model.num_classes", "must be >= 2 (or null)")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate",
                f"must be in [0, 1), got {self.drop_path_rate}")
        require(0.0 < self.layer_decay <= 1.0, "model.layer_decay",
                f"must be in (0, 1] (1 = no layer decay), got {self.layer_decay}")
        require(self.head_init_std > 0, "model.head_init_std", "must be > 0")


@dataclass
class AugConfig:
    """timm ``create_transform`` training options (RandAugment, random erasing); mean/std/flip come from data."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # null = no RandAugment
    color_jitter: float | None = None  # MAE fine-tuning: none (RandAugment covers colour)
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"

    def validate(self) -> None:
        require(0.0 <= self.re_prob <= 1.0, "aug.re_prob", f"must be in [0, 1], got {self.re_prob}")
        require(self.color_jitter is None or self.color_jitter >= 0, "aug.color_jitter",
                f"must be >= 0 (or null: none), got {self.color_jitter}")
        require(self.re_mode in ("const", "rand", "pixel"), "aug.re_mode", "must be one of const, rand, pixel")
        require(self.re_count >= 1, "aug.re_count", "must be >= 1")
        lo, hi = self.crop_scale
        require(0.0 < lo <= hi <= 1.0, "aug.crop_scale", f"must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
        require(self.interpolation in ("bilinear", "bicubic", "random"), "aug.interpolation",
                "must be bilinear, bicubic or random")
        if self.auto_augment:
            require(self.auto_augment.split("-")[0] in ("rand", "augmix", "original", "originalr", "v0", "v0r",
                                                        "3a", "trivialaugment"),
                    "aug.auto_augment",
                    f"'{self.auto_augment}' is not a timm auto-augment spec (e.g. rand-m9-mstd0.5-inc1)")


@dataclass
class MixupConfig:
    """timm ``Mixup``; with mixup or cutmix on the loss is SoftTargetCrossEntropy on mixed, smoothed targets."""

    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    label_smoothing: float = 0.1

    def validate(self) -> None:
        require(self.mixup >= 0 and self.cutmix >= 0, "mixup.mixup", "alphas must be >= 0 (0 = off)")
        require(0.0 <= self.prob <= 1.0, "mixup.prob", "must be in [0, 1]")
        require(0.0 <= self.switch_prob <= 1.0, "mixup.switch_prob", "must be in [0, 1]")
        require(self.mode in ("batch", "pair", "elem"), "mixup.mode", "must be batch, pair or elem")
        require(0.0 <= self.label_smoothing < 1.0, "mixup.label_smoothing", "must be in [0, 1)")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass
class EvalConfig:
    split: str = "val"
    every_epochs: int = 1
    batch_size: int = 256
    crop_pct: float = 0.875

    def validate(self) -> None:
        require(bool(self.split), "evaluation.split", "is empty; name the validation folder (e.g. val)")
        require(self.every_epochs >= 1, "evaluation.every_epochs", "must be >= 1")
        require(self.batch_size >= 1, "evaluation.batch_size", "must be >= 1")
        require(0.0 < self.crop_pct <= 1.0, "evaluation.crop_pct", "must be in (0, 1]")


def _finetune_train() -> TrainConfig:
    return TrainConfig(epochs=100, batch_size=1024, batch_per_device=128)


def _finetune_optim() -> OptimConfig:
    return OptimConfig(opt="adamw", blr=5.0e-4, min_lr=1.0e-6, weight_decay=0.05, betas=(0.9, 0.999),
                       warmup_epochs=5.0, warmup_start_factor=1.0e-6)


@dataclass
class FinetuneRecipe(EngineRecipe):
    """Full fine-tuning: ``mffzoo eval finetune RECIPE`` (engine sections + model, aug, mixup, evaluation)."""

    train: TrainConfig = field(default_factory=_finetune_train)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        super().validate()
        if self.mixup.active and self.mixup.mode in ("batch", "pair"):
            require(self.train.batch_per_device % 2 == 0, "train.batch_per_device",
                    f"must be even for mixup.mode={self.mixup.mode} (timm Mixup pairs images), got "
                    f"{self.train.batch_per_device}")


def load_finetune_recipe(source: str | os.PathLike[str] | dict[str, Any],
                         overrides: Sequence[str] = ()) -> FinetuneRecipe:
    return load_recipe(source, list(overrides), cls=FinetuneRecipe)


# --------------------------------------------------------------------------------------------- model
def build_finetune_model(spec: str | os.PathLike[str], num_classes: int, *, img_size: int | None = None,
                         drop_path_rate: float = 0.1, random_init: bool = False, head_init_std: float = 2.0e-5,
                         seed: int = 0) -> nn.Module:
    """Pretrained ViT -> classifier as MAE fine-tunes it: avg pool, fresh fc_norm (final norm dropped), new head."""
    model = load_eval_model(spec, img_size=img_size, random_init=random_init, seed=seed,
                            drop_path_rate=drop_path_rate)
    fc_norm = getattr(model, "fc_norm", None)
    if not hasattr(model, "blocks") or getattr(model, "patch_embed", None) is None or fc_norm is None:
        raise ConfigError(f"model.pretrained '{spec}' is not a timm VisionTransformer; fine-tuning recipes here "
                          "build the MAE/MFF ViT classifier (avg pool + fc_norm)")
    dim = model.embed_dim
    norm = model.norm
    eps = getattr(norm, "eps", 1e-6)
    model.norm = nn.Identity()
    model.fc_norm = nn.LayerNorm(dim, eps=eps)
    model.reset_classifier(num_classes, global_pool="avg")
    nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    return model.train()


def _classifier_model_args(model: nn.Module) -> dict[str, Any]:
    args = get_model_args(model)
    args.pop("num_classes", None)
    if isinstance(args.get("img_size"), (tuple, list)):
        args["img_size"] = int(args["img_size"][0])
    return {**args, "global_pool": "avg", "fc_norm": True}


# --------------------------------------------------------------------------------------------- task
class _SeededPythonRandom:
    """timm's RandAugment and random erasing draw from python ``random``; seed it from torch's RNG (which the
    engine seeds per sample) so augmentation stays a function of the sample, as the engine's resume requires."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        state = random.getstate()
        random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, with Pillow < 11's result for 0 bits (a black image) instead of Pillow >= 11's error.

    RandAugment ``inc1`` maps magnitude 10 (reached by the ``mstd0.5`` noise ~2% of the time) to 0 bits; MAE ran
    on a Pillow that returned black there, current Pillow raises and kills the loader."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


def _pillow_safe(tf: Any) -> Any:
    for t in getattr(tf, "transforms", []):
        ops = list(getattr(t, "ops", []) or []) + [op for sub in getattr(t, "policy", []) or [] for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = _posterize
    return tf


class FinetuneTask(Task):
    recipe: FinetuneRecipe

    def __init__(self, recipe: FinetuneRecipe, schedule_epochs: int | None = None) -> None:
        """``schedule_epochs``: the epochs of the recipe as written (before ``--set``), which a result of fewer
        epochs is marked as shortened against; None: the recipe's own ``train.epochs``."""
        super().__init__(recipe)
        self.schedule_epochs = schedule_epochs or recipe.train.epochs
        self.root = resolve_root(recipe.data)
        self.classes = self._classes()
        self.num_classes = recipe.model.num_classes or len(self.classes)
        self.mixup_fn = None
        m = recipe.mixup
        if m.active:
            self.mixup_fn = Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.prob, switch_prob=m.switch_prob,
                                  mode=m.mode, label_smoothing=m.label_smoothing, num_classes=self.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif m.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=m.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.input_size: int | None = None
        self._built: nn.Module | None = None
        self.model_args: dict[str, Any] = {}
        self.arch = ""
        self.history: list[dict[str, Any]] = []

    def _classes(self) -> list[str]:
        """Class names in training-label order (timm's folder reader: natural, case-insensitive sort)."""
        r = self.recipe
        if r.data.dataset or not self.root.is_dir():
            return []  # tar / hfds: the recipe's model.num_classes says how many

        return check_image_folder(self.root, (r.data.split, r.evaluation.split))

    def train_class_map(self, dataset: Any) -> dict[str, int] | None:
        """The training reader's ``class_to_idx`` (the labels the model learns), checked against the folders."""
        mapping = getattr(getattr(dataset, "reader", None), "class_to_idx", None)
        if not mapping:
            return None
        mapping = {str(k): int(v) for k, v in mapping.items()}

        if self.classes and mapping != class_to_idx(self.classes):
            only_reader = sorted(set(mapping) - set(self.classes))[:5]
            only_dirs = sorted(set(self.classes) - set(mapping))[:5]
            raise DataError(f"the training reader's classes differ from the class folders of '{self.root}' (only in "
                            f"the reader: {only_reader or '-'}; folders it skipped: {only_dirs or '-'}); remove hidden "
                            "or stray image folders and use .png/.jpg/.jpeg images so train and val labels agree")
        return mapping

    def eval_dataset(self, ctx: RunContext, transform: Callable[[Any], torch.Tensor]) -> Any:
        """The validation split through timm's ``create_dataset`` with the training reader's class map."""
        r = self.recipe
        mapping = self.train_class_map(ctx.dataset)
        try:
            ds = open_image_dataset(r.data.dataset, Path(self.root), r.evaluation.split,  # safe folder scan
                                    class_map=mapping or None, is_training=False, transform=transform)
        except (RuntimeError, FileNotFoundError, OSError, ValueError, AssertionError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read the validation split '{r.evaluation.split}' of '{self.root}' "
                            f"({msg[:160]}); set --set evaluation.split=NAME to the folder holding it") from None
        if len(ds) == 0:
            raise DataError(f"the validation split '{r.evaluation.split}' of '{self.root}' has no images")
        return ds

    def _class_names(self, ctx: RunContext) -> list[str]:
        """Name of each output index, from the training reader's map (the folder scan when it has none)."""
        mapping = self.train_class_map(ctx.dataset)
        if mapping:
            return [str(c) for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        return list(self.classes)

    # ---- engine interface
    def on_dataset(self, dataset: Any) -> None:
        self.train_class_map(dataset)  # a reader/folder class mismatch fails now, not after the first epoch
        # Labels are checked here, where the data is read, once: a check of the device batch in every step
        # would cost a GPU->CPU sync per step. A reader gives all of its items labels or none.
        _, target, _ = dataset.load(0)
        if target is None or int(target) < 0:
            raise DataError("the training data has no labels; fine-tuning needs class folders (train/<class>/*)")

    def _model(self) -> nn.Module:
        """The classifier, built once: the engine asks for the transform (which needs its input size) first."""
        if self._built is None:
            m = self.recipe.model
            if not self.num_classes:
                raise ConfigError("model.num_classes is null and data.root has no class folders to count; set "
                                  "--set model.num_classes=N")
            model = build_finetune_model(m.pretrained, self.num_classes, img_size=m.img_size,
                                         drop_path_rate=m.drop_path_rate, random_init=m.random_init,
                                         head_init_std=m.head_init_std, seed=self.recipe.train.seed)

            self.input_size = model_input_size(model, m.img_size)
            self.arch = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture")
                            or type(model).__name__)
            self.model_args = _classifier_model_args(model)
            self._built = model
        return self._built

    def build_model(self) -> nn.Module:
        model, self._built = self._model(), None  # hand it over; the engine owns it from here
        return model

    def _size(self) -> int:
        if self.input_size is None:
            self._model()
        assert self.input_size is not None
        return self.input_size

    def build_transform(self) -> Callable[[Any], torch.Tensor]:
        a, d = self.recipe.aug, self.recipe.data
        tf = create_transform(self._size(), is_training=True, scale=tuple(a.crop_scale), hflip=d.hflip,
                              color_jitter=a.color_jitter, auto_augment=a.auto_augment, interpolation=a.interpolation,
                              mean=tuple(d.mean), std=tuple(d.std), re_prob=a.re_prob, re_mode=a.re_mode,
                              re_count=a.re_count)
        return _SeededPythonRandom(_pillow_safe(tf))

    def step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch.images, batch.targets  # labelled: checked in on_dataset
        if self.mixup_fn is not None:
            # timm Mixup draws lambda and the mix mode from numpy's global RNG: seed it from this batch's samples
            # so the step is the same after a resume and on any number of processes.
            state = np.random.get_state()
            np.random.seed(derive_seed(*batch.seeds[:4].tolist(), 0x313) % 2**32)
            try:
                x, y = self.mixup_fn(x, y)
            finally:
                np.random.set_state(state)
        logits = model(x)
        return self.criterion(logits.float(), y), {}

    def optimizer_kwargs(self, model: nn.Module) -> dict[str, Any]:
        # timm builds the per-block lr scale groups (param_groups_layer_decay) from the model's group_matcher.
        ld = self.recipe.model.layer_decay
        return {"layer_decay": ld} if ld < 1.0 else {}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"arch": self.arch, "model_args": self.model_args, "task": "finetune"}

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, ctx: RunContext) -> dict[str, float]:
        """Top-1/top-5 on the validation split, sharded over ranks and summed.

        Every rank runs the same number of equal-sized batches (the last shard is padded with repeats that are
        masked out of the sums), so FSDP's per-forward collectives can never wait on a rank that has finished.
        """
        r, d = self.recipe, self.recipe.data
        tf = create_transform(self._size(), is_training=False, interpolation=r.aug.interpolation
                              if r.aug.interpolation != "random" else "bicubic", mean=tuple(d.mean),
                              std=tuple(d.std), crop_pct=r.evaluation.crop_pct)
        ds = self.eval_dataset(ctx, tf)
        shard = _PaddedShard(ds, ctx.env.rank, ctx.env.world_size)
        model = ctx.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        sums = torch.zeros(4, dtype=torch.float64)  # top1 hits, top5 hits, loss sum, count
        try:
            for x, y, real in make_loader(shard, r.evaluation.batch_size, workers=min(d.num_workers, 4)):
                logits = model(x.to(dev)).float().cpu()
                y, real = torch.as_tensor(y).long(), torch.as_tensor(real).bool()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top.eq(y[:, None]) & real[:, None]
                loss = nn.functional.cross_entropy(logits, y, reduction="none")[real].sum()
                sums += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), loss.item(),
                                      real.sum().item()], dtype=torch.float64)
        finally:
            model.train(was_training)
        sums = all_reduce(sums.to(dev)).cpu() if ctx.env.distributed else sums
        n = max(float(sums[3]), 1.0)
        return {"top1": round(100.0 * float(sums[0]) / n, 4), "top5": round(100.0 * float(sums[1]) / n, 4),
                "val_loss": round(float(sums[2]) / n, 6), "num_val": int(sums[3])}

    def on_epoch_end(self, ctx: RunContext) -> None:
        every = self.recipe.evaluation.every_epochs
        if ctx.epoch % every and ctx.epoch < self.recipe.train.epochs:
            return
        rec = {"epoch": ctx.epoch, "step": ctx.global_step, "train_loss": ctx.epoch_loss, **self.evaluate(ctx)}
        self.history.append(rec)
        if ctx.env.is_main:
            with open(ctx.run_dir / EVAL_LOG, "a") as f:
                f.write(json.dumps(rec) + "\n")
            _logger.info("eval epoch %d: top-1 %.2f  top-5 %.2f  val loss %.4f", ctx.epoch, rec["top1"], rec["top5"],
                         rec["val_loss"])

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        history = read_eval_log(ctx.run_dir) if ctx.env.is_main else []  # includes epochs before a resume

        # rank 0 alone knows whether an evaluation is missing; every rank must run it (FSDP)
        dev = next(ctx.model.parameters()).device
        need = all_reduce(torch.tensor([0.0 if history or not ctx.env.is_main else 1.0], device=dev))
        fresh = self.evaluate(ctx) if float(need[0]) > 0 else None
        if not ctx.env.is_main:
            return {}
        final = history[-1] if history else {"epoch": ctx.epoch, **(fresh or {})}
        best = max((h["top1"] for h in history), default=final["top1"])

        assert ctx.state_dict is not None
        r = self.recipe
        model = ctx.model
        if r.train.fsdp and ctx.env.distributed:  # the live model is sharded: rebuild a full copy on rank 0
            model = build_finetune_model(r.model.pretrained, self.num_classes, img_size=r.model.img_size,
                                         random_init=True)
            model.load_state_dict(ctx.state_dict)
        schedule = self.schedule(ctx.epoch)
        meta = {"task": "finetune", "recipe_name": r.name, "recipe": to_dict(r), "pretrained": r.model.pretrained,
                "classes": self._class_names(ctx), "epochs": ctx.epoch, "global_step": ctx.global_step,
                "eval": {f"finetune:{Path(str(self.root)).name}": {"top1": final["top1"], "top5": final["top5"],
                                                                    "best_top1": best, "schedule": schedule}},
                "git_commit": git_commit(Path(__file__).parent)}
        model_dir = write_model_folder(ctx.run_dir / "model", self.arch, model, model_args=self.model_args, meta=meta)
        return {"model_dir": model_dir, "top1": final["top1"], "top5": final["top5"], "best_top1": best,
                "schedule": schedule}

    def schedule(self, epochs: int) -> dict[str, Any]:
        """The schedule behind a result: a fine-tune cut short with ``--set train.epochs=...`` is no evidence
        next to full-schedule numbers, so it says so (as a short pretraining run is published ``-partial``)."""
        return {"recipe_epochs": self.schedule_epochs, "epochs": epochs, "shortened": epochs < self.schedule_epochs}

    def finished_outputs(self, ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any] | None:
        """``RUN/model`` and the accuracy the finished run measured (from its summary), while the model is there."""
        keys = ("top1", "top5", "best_top1")
        model_dir = ctx.run_dir / "model"
        if not (model_dir / WEIGHTS_NAME).is_file() or any(k not in summary for k in keys):
            return None
        return {"model_dir": model_dir, **{k: summary[k] for k in keys},
                "schedule": summary.get("schedule") or self.schedule(ctx.epoch)}


class _PaddedShard(torch.utils.data.Dataset):
    """Rank ``rank``'s strided share of ``ds`` padded to ``ceil(N / world)`` items, yielding ``(x, y, real)``;
    padding repeats item 0 with ``real = False`` so equal batch counts on all ranks cost no accuracy."""

    def __init__(self, ds: Any, rank: int, world_size: int) -> None:
        self.ds = ds
        n = len(ds)
        per = -(-n // world_size)
        self.indices = [rank + j * world_size for j in range(per)]
        self.n = n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, bool]:
        idx = self.indices[i]
        real = idx < self.n
        x, y, *_ = self.ds[idx if real else 0]
        return x, int(y), real


def read_eval_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / EVAL_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    # a resumed run re-evaluates nothing twice, but keep the newest record per epoch to be safe
    return list({int(h["epoch"]): h for h in out}.values())


def finetune(recipe: FinetuneRecipe | str | os.PathLike[str] | dict[str, Any], overrides: Sequence[str] = (), *,
             output_dir: str | os.PathLike[str] | None = None) -> TrainResult:
    """Fine-tune per ``recipe`` (object, YAML path/name or mapping) + ``key=value`` overrides via the engine.

    A result of fewer epochs than the recipe (as given, before ``overrides``) is marked shortened."""
    written = recipe_epochs(recipe)
    if not isinstance(recipe, FinetuneRecipe):
        recipe = load_finetune_recipe(recipe, overrides)
    elif overrides:
        recipe = load_config(FinetuneRecipe, to_dict(recipe), list(overrides))
    if recipe.data.root == DEMO_ROOT:
        _logger.info("data.root: demo -> the built-in demo dataset")
    return run(recipe, FinetuneTask(recipe, schedule_epochs=written), output_dir)


def recipe_epochs(source: FinetuneRecipe | str | os.PathLike[str] | Mapping[str, Any]) -> int:
    """``train.epochs`` of a fine-tuning recipe as given, before ``--set`` overrides: its full schedule."""
    if isinstance(source, FinetuneRecipe):
        return source.train.epochs
    data = dict(source) if isinstance(source, Mapping) else read_yaml(find_recipe(source))
    epochs = (data.get("train") or {}).get("epochs") if isinstance(data.get("train"), Mapping) else None
    return int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else _finetune_train().epochs
