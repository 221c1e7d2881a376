"""Typed training recipes on top of :mod:`mffzoo.config`.

A recipe is a tree of dataclasses. The sections every training run needs (data loading, schedule, optimiser,
checkpoints, logging) live in :class:`EngineRecipe`, which the engine reads; :class:`PretrainRecipe` adds the
MFF/MAE model and zoo publishing. Another objective (e.g. fine-tuning) subclasses :class:`EngineRecipe` with its
own model section and reuses the engine unchanged.

Defaults are the official MFF/MAE ViT-B settings (mmpretrain ``configs/mff``); every value the paper does not
publish is marked "our choice" here and in ``recipes/*.yaml``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from timm.optim import list_optimizers

from ..archs import ARCHS, canonical_arch, check_fusion_layers, pretrain_heads
from ..config import MAX_IMG_SIZE, check_name, check_path, load_config, require
from ..data.demo import MAX_DEMO_CLASSES
from ..errors import ConfigError

__all__ = [
    "DataConfig", "DemoDataConfig", "TrainConfig", "OptimConfig", "CheckpointConfig", "LogConfig", "EngineRecipe",
    "ModelConfig", "PublishConfig", "PretrainRecipe", "load_recipe", "find_recipe", "DEMO_ROOT",
]

# ``data.root: demo`` means "the built-in demo dataset", generated on first use (mffzoo.data.demo).
DEMO_ROOT = "demo"


@dataclass
class DemoDataConfig:
    """Size of the generated demo dataset (only used when ``data.root: demo``)."""

    num_classes: int = 12
    train_per_class: int = 200
    val_per_class: int = 40
    image_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        require(1 <= self.num_classes <= MAX_DEMO_CLASSES, "data.demo.num_classes",
                f"must be in 1..{MAX_DEMO_CLASSES}, got {self.num_classes}")
        require(self.train_per_class >= 1, "data.demo.train_per_class", "must be >= 1")
        require(self.val_per_class >= 1, "data.demo.val_per_class", "must be >= 1")
        require(8 <= self.image_size <= 1024, "data.demo.image_size",
                f"must be in 8..1024 (generated images; the demo uses 64), got {self.image_size}")


@dataclass
class DataConfig:
    root: str = DEMO_ROOT  # an ImageNet-style folder (root/train/<class>/*), a .tar, or "demo"
    dataset: str = ""  # timm create_dataset name: "" = folder/tar, "hfds/<name>" = Hugging Face datasets
    split: str = "train"
    # "mff": Resize(short side) + RandomCrop(padding=4, reflect) + flip (official MFF configs);
    # "mae": RandomResizedCrop(scale 0.2-1, bicubic) + flip (MAE). Compare MAE and MFF with the same one.
    augment: Literal["mff", "mae"] = "mff"
    # null: the augmentation's official choice (mff: torchvision's default bilinear Resize; mae: bicubic).
    interpolation: Literal["bilinear", "bicubic"] | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)  # "mae" augmentation only
    crop_padding: int = 4  # "mff" augmentation only
    hflip: float = 0.5
    # Same augmentation (same crops and flips per sample), cheaper decoding: JPEG draft mode at the smallest size
    # the crop allows, libjpeg-turbo straight to a tensor, torch's uint8 resize. false: torchvision on full PIL
    # decodes (pixels differ by resampling only; docs/training.md). Our choice.
    fast_decode: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = 8  # our choice (per process)
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # Unreadable images are skipped (replaced by the next readable one) and counted; more than this fraction of
    # the dataset unreadable stops training with an error. Our choice.
    max_bad_fraction: float = 0.001
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)

    def validate(self) -> None:
        require(bool(self.root), "data.root", "is empty; set it to your dataset folder (or 'demo')")
        lo, hi = self.crop_scale
        require(0.0 < lo <= hi <= 1.0, "data.crop_scale", f"must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
        require(self.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {self.crop_padding}")
        require(0.0 <= self.hflip <= 1.0, "data.hflip", f"must be in [0, 1], got {self.hflip}")
        require(all(s > 0 for s in self.std), "data.std", "must be positive")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        require(0.0 <= self.max_bad_fraction < 1.0, "data.max_bad_fraction",
                f"must be in [0, 1), got {self.max_bad_fraction}")
        prefix = self.dataset.partition("/")[0].lower() if "/" in self.dataset else ""
        require(prefix in ("", "hfds"), "data.dataset",
                f"'{self.dataset}' is a streaming (iterable) dataset, which cannot resume exactly mid-epoch; "
                "allowed: '' (image folder or .tar) or 'hfds/<name>'")


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 4096  # effective (global) batch, kept on any number of devices by gradient accumulation
    # micro-batch per process (official: 8 GPUs x 512); lower it to fit memory. Where it is more than each
    # process's share of batch_size (the demo's 64 on 2 or 4 processes), each process takes its share instead.
    batch_per_device: int = 512
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # bf16 autocast where supported, else fp32 (CPU)/fp16
    # torch.compile the model: auto = on CUDA, and on a CPU when the run is long enough to pay the compilation
    # back (measured eager step vs cached or default compile cost; mffzoo.train.compile); true/false force it.
    compile: Literal["auto", True, False] = "auto"
    # auto: fused SDPA on CUDA and in fp32; on a CPU under bf16, the faster of SDPA and matmul + softmax,
    # measured at the run's shapes (mffzoo.train.attention; no rule held across CPUs). Speed only: same weights.
    attention: Literal["auto", "sdpa", "math"] = "auto"
    fsdp: bool = False  # shard parameters/gradients/optimizer with torch FSDP2 (fully_shard), for ViT-L
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch's deterministic algorithms (+ cuBLAS workspace config): bitwise-exact resume on CUDA too (the SDPA
    # backward is otherwise non-deterministic there), at some speed. CPU runs are exact without it.
    deterministic: bool = False
    # CPU intra-op threads per process (null: torch's default, all cores). On a small or shared CPU, 1 thread
    # next to a loader worker avoids OpenMP threads spinning against each other, which can cost 10x.
    cpu_threads: int | None = None
    seed: int = 0  # our choice (mmpretrain used 2)

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.batch_per_device >= 1, "train.batch_per_device", f"must be >= 1, got {self.batch_per_device}")
        require(
            self.batch_size % self.batch_per_device == 0, "train.batch_size",
            f"{self.batch_size} is not divisible by train.batch_per_device={self.batch_per_device}; the effective "
            "batch must be batch_per_device x devices x accumulation steps (e.g. --set train.batch_per_device="
            f"{_largest_divisor(self.batch_size, self.batch_per_device)})",
        )
        require(self.seed >= 0, "train.seed", "must be >= 0")
        require(isinstance(self.compile, bool) or self.compile == "auto", "train.compile",
                f"must be auto, true or false, got {self.compile!r}")
        require(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads", "must be >= 1 or null")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


@dataclass
class OptimConfig:
    opt: str = "adamw"  # any timm optimizer name
    blr: float = 1.5e-4  # base lr; lr = blr * batch_size / 256 (MAE/MFF)
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # end of the cosine (mmpretrain: eta_min 0)
    weight_decay: float = 0.05  # not applied to norms, biases, pos_embed, cls_token, mask_token
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    warmup_epochs: float = 40.0  # linear, per iteration
    warmup_start_factor: float = 1.0e-4  # warmup starts at lr x this (mmpretrain LinearLR start_factor)
    clip_grad: float | None = None  # max grad norm; MAE/MFF pretraining does not clip

    def validate(self) -> None:
        names = list_optimizers()
        require(self.opt in names, "optim.opt", f"unknown optimizer '{self.opt}'; e.g. adamw, lamb, lars, sgd")
        require(self.blr > 0, "optim.blr", f"must be > 0, got {self.blr}")
        require(self.lr is None or self.lr > 0, "optim.lr", f"must be > 0 (or null to use blr), got {self.lr}")
        require(self.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {self.min_lr}")
        require(self.eps > 0, "optim.eps", f"must be > 0 (it keeps the optimiser's update finite where a gradient "
                f"is 0), got {self.eps}; the default is 1e-8")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", f"must be in [0, 1), got {list(self.betas)}")
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        require(0.0 < self.warmup_start_factor <= 1.0, "optim.warmup_start_factor", "must be in (0, 1]")
        require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", "must be > 0 or null")

    def resolved_lr(self, batch_size: int) -> float:
        """Absolute peak lr: the linear scaling rule of MAE unless ``lr`` is given."""
        return self.lr if self.lr is not None else self.blr * batch_size / 256


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # our choice; 0 = only at epoch ends
    every_epochs: int = 1
    keep_last: int = 3  # our choice
    resume: bool = True  # continue from the newest valid checkpoint in the run directory
    restart: bool = False  # start from step 0; existing checkpoints are moved to checkpoints.discarded-N

    def validate(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only at epoch ends)")
        require(self.every_epochs >= 1, "checkpoint.every_epochs", "must be >= 1")
        require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class LogConfig:
    every_steps: int = 20  # losses are synced to the host only this often; our choice
    # auto: a bar on a terminal, else one line per epoch. YAML reads a bare `off` as false: both mean off.
    progress: Literal["auto", "bar", "epoch", "off", False] = "auto"
    tensorboard: bool = True  # events in RUN/tensorboard when the tensorboard package is installed
    vis_every_epochs: int = 20  # reconstruction PNG every N epochs (and at the end); 0 = only at the end
    vis_images: int = 8

    def validate(self) -> None:
        require(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        require(self.vis_every_epochs >= 0, "log.vis_every_epochs", "must be >= 0")
        require(0 <= self.vis_images <= 64, "log.vis_images", "must be in 0..64")


@dataclass
class EngineRecipe:
    """The sections the engine reads; subclass it to add a model section for another objective."""

    name: str = ""  # run name (default: the recipe file's stem); the run directory is runs/<name>
    description: str = ""
    output_dir: str | None = None  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        require(self.optim.warmup_epochs <= self.train.epochs, "optim.warmup_epochs",
                f"({self.optim.warmup_epochs}) must not exceed train.epochs ({self.train.epochs})")
        peak = self.optim.resolved_lr(self.train.batch_size)
        require(math.isfinite(peak), "optim.blr",
                f"{self.optim.blr} x train.batch_size {self.train.batch_size} / 256 is beyond a float; set a "
                "realistic optim.blr (e.g. 1.5e-4) or an absolute optim.lr")
        require(self.optim.min_lr <= peak, "optim.min_lr",
                f"({self.optim.min_lr:g}) is above the peak lr {peak:g} (optim.lr, else optim.blr x "
                "train.batch_size / 256), so the cosine would rise; lower optim.min_lr or raise the lr")
        if self.name:  # the run directory runs/<name> must stay in runs/ (an explicit output_dir may go anywhere)
            check_name(self.name, "name")
        if self.output_dir is not None:
            check_path(self.output_dir, "output_dir")

    def run_dir(self, output_dir: str | os.PathLike[str] | None = None) -> Path:
        return Path(output_dir or self.output_dir or Path("runs") / (self.name or "run")).expanduser()


@dataclass
class ModelConfig:
    arch: str = "mff_vit_base_patch16_224"
    img_size: int = 224
    # null: the architecture's value (mffzoo.archs.ARCHS)
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    # null: the size's default (PRETRAIN_DEFAULTS); [depth - 1] = plain MAE
    fusion_layers: list[int] | None = None
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0  # MAE/MFF pretraining uses none
    grad_checkpointing: bool = False  # activation checkpointing of the encoder blocks (memory for compute)

    def validate(self) -> None:
        """Check ranges and fill the nulls, so the recipe written to the run directory is explicit."""
        arch = canonical_arch(self.arch)
        require(arch in ARCHS, "model.arch", f"unknown architecture '{self.arch}'; allowed: {', '.join(ARCHS)}")
        self.arch = arch
        for k, v in ARCHS[arch].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        assert self.patch_size and self.embed_dim and self.depth and self.num_heads
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size"):
            require(getattr(self, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(self, k)}")
        require(self.img_size <= MAX_IMG_SIZE, "model.img_size",
                f"must be at most {MAX_IMG_SIZE} px (pretraining uses 224), got {self.img_size}")
        require(self.img_size % self.patch_size == 0, "model.img_size",
                f"{self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        require(self.embed_dim % self.num_heads == 0, "model.num_heads",
                f"model.embed_dim={self.embed_dim} is not divisible by {self.num_heads} heads")
        require(0.0 < self.mask_ratio < 1.0, "model.mask_ratio", f"must be in (0, 1) exclusive, got {self.mask_ratio}")
        num_patches = (self.img_size // self.patch_size) ** 2
        require(int(num_patches * (1 - self.mask_ratio)) >= 1, "model.mask_ratio",
                f"{self.mask_ratio} leaves no visible patch out of {num_patches}; lower it")
        heads = pretrain_heads(arch, self.depth, fusion_layers=self.fusion_layers, decoder_dim=self.decoder_dim,
                               decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)
        self.fusion_layers = check_fusion_layers(heads["fusion_layers"], self.depth, "model.fusion_layers")
        for k in ("decoder_dim", "decoder_depth", "decoder_heads"):
            setattr(self, k, heads[k])
            require(getattr(self, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(self, k)}")
        require(self.decoder_dim % self.decoder_heads == 0, "model.decoder_heads",
                f"model.decoder_dim={self.decoder_dim} is not divisible by {self.decoder_heads} heads")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")

    @property
    def is_mae(self) -> bool:
        return self.fusion_layers is not None and len(self.fusion_layers) == 1

    def encoder_kwargs(self) -> dict[str, Any]:
        """timm kwargs of the encoder (what the zoo's config.json records as model_args)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads)


@dataclass
class PublishConfig:
    tag: str | None = None  # zoo tag: the encoder lands in $MFFZOO_HOME/<arch>.<tag>; null = do not publish
    zoo: bool = True  # set false to keep the weights only in the run directory

    def validate(self) -> None:
        if self.tag is not None:
            ok = bool(self.tag) and all(c.isalnum() or c in "_-" for c in self.tag)
            require(ok, "publish.tag", f"'{self.tag}' must be letters, digits, '_' or '-' (e.g. mff_in1k_300e)")


@dataclass
class PretrainRecipe(EngineRecipe):
    """MFF (or MAE) pretraining: ``mffzoo train RECIPE``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def validate(self) -> None:
        super().validate()
        self.model.validate()  # idempotent; resolves the nulls of a recipe without a model section too
        if self.publish.tag is not None:  # the zoo folder <arch>.<tag> must fit the file system
            check_name(f"{self.model.arch}.{self.publish.tag}", "publish.tag")


def find_recipe(spec: str | os.PathLike[str]) -> Path:
    """A recipe file, or a bare name (``demo``, ``vits``) looked up in the source checkout's ``recipes/``."""
    p = check_path(spec, "RECIPE", existing=True)  # an over-long name: is_file() itself would raise
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1 and len(str(p)) < 200:  # <name>.yaml must fit a file name
        for candidate in (Path("recipes") / f"{p}.yaml", Path(__file__).resolve().parents[2] / "recipes" / f"{p}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"recipe '{spec}' does not exist; pass a YAML file such as recipes/demo.yaml or "
                      "recipes/vits.yaml")


def load_recipe(
    source: str | os.PathLike[str] | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
    cls: type[EngineRecipe] = PretrainRecipe,
) -> Any:
    """Load and validate a recipe file (or mapping) with ``key=value`` overrides; the name defaults to the stem."""
    path = None if isinstance(source, dict) else find_recipe(source)
    recipe = load_config(cls, source if path is None else path, overrides)
    if not recipe.name:
        recipe.name = check_name(path.stem, "name") if path is not None else "run"
    return recipe
