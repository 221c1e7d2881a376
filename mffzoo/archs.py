"""The model catalog as data: architectures, pretrained tags, pretraining defaults, and their resolvers.

Neither torch nor timm is imported, so everything (the recipe validator, the CLI, the timm entrypoints in
:mod:`mffzoo.zoo.mff_vision_transformer`, the pretraining model) reads one table without them. The fusion levels
get their default (:func:`default_fusion_layers`) and their validation (:func:`check_fusion_layers`) here, once,
for the recipe (at load) and the model constructor alike.
Local tags name no path here: their weights are found in the zoo home (``MFFZOO_HOME``) when a model is created, so
changing ``MFFZOO_HOME`` after import works.

Paper: "Improving Pixel-based MIM by Reducing Wasted Modeling Capability", Liu et al., ICCV 2023
(arXiv 2308.00261). Official code and weights: open-mmlab/mmpretrain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import require

_logger = logging.getLogger("mffzoo")

__all__ = ["ARCHS", "ARCH_LABELS", "PRETRAIN_DEFAULTS", "ALIASES", "TAGS", "ZOO_TAGS", "CLASSIFIER_TAG_KWARGS",
           "LOCAL_FILE", "LocalTag", "OfficialTag", "ZooTag", "canonical_arch", "check_fusion_layers",
           "DENSE_LEVELS", "default_dense_levels", "check_level_order",
           "resolve_dense_levels", "default_fusion_layers", "describe_arch", "is_local_cfg",
           "local_tag", "pretrain_heads", "published_tag", "registered_schedule", "zoo_tag"]

# timm.data.IMAGENET_DEFAULT_MEAN/STD (copied: this module imports neither torch nor timm)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# What a local tag's registered `file` says: not a path, a pointer to where mffzoo.zoo.weights looks.
LOCAL_FILE = "$MFFZOO_HOME/<arch>.<tag>/model.safetensors"

# --- architectures (timm kwargs); LayerNorm eps 1e-6, qkv bias and MLP ratio 4 are timm's ViT defaults ---
ARCHS: dict[str, dict[str, Any]] = {
    "mff_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mff_vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mff_vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
# What each registered architecture is called, as registered (224 px); :func:`describe_arch` names any other size.
ARCH_LABELS = {
    "mff_vit_small_patch16_224": "ViT-S/16",
    "mff_vit_base_patch16_224": "ViT-B/16",
    "mff_vit_large_patch16_224": "ViT-L/16",
}
ALIASES = {
    "mff_vit_small": "mff_vit_small_patch16_224",
    "mff_vit_base": "mff_vit_base_patch16_224",
    "mff_vit_large": "mff_vit_large_patch16_224",
}

# --- pretraining heads per size (reference: mff-method.md) ---
# ViT-B fusion levels are the official config's. ViT-S reuses them (same depth). ViT-L was not published:
# [0, 4, 8, 12, 16, 23] keeps the same relative depths; it is mffzoo's choice, not the paper's.
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mff_vit_small_patch16_224": dict(fusion_layers=[0, 2, 4, 6, 8, 11], decoder_dim=512, decoder_depth=8,
                                      decoder_heads=16),
    "mff_vit_base_patch16_224": dict(fusion_layers=[0, 2, 4, 6, 8, 11], decoder_dim=512, decoder_depth=8,
                                     decoder_heads=16),
    "mff_vit_large_patch16_224": dict(fusion_layers=[0, 4, 8, 12, 16, 23], decoder_dim=512, decoder_depth=8,
                                      decoder_heads=16),
}

# --- dense-task levels (`mffzoo export --features levels`): the blocks a segmentation/detection head reads ---
# mmsegmentation's UperNet configs: MAE-B (configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py) takes
# out_indices [3, 5, 7, 11] of 12 blocks, BEiT-L (configs/beit/upernet_beit-large_fp16_8x1_640x640_160k_ade20k.py)
# [7, 11, 15, 23] of 24. ViT-S has 12 blocks too and reuses ViT-B's (mffzoo's choice: no ViT-S config exists).
DENSE_LEVELS: dict[str, tuple[int, ...]] = {
    "mff_vit_small_patch16_224": (3, 5, 7, 11),
    "mff_vit_base_patch16_224": (3, 5, 7, 11),
    "mff_vit_large_patch16_224": (7, 11, 15, 23),
}


def default_dense_levels(arch: str | None, depth: int) -> list[int]:
    """The default ``--levels`` of a ``depth``-block encoder: ``arch``'s :data:`DENSE_LEVELS` when the encoder has
    its registered depth; else the same relative depths (blocks ending at 1/3, 1/2, 2/3 and all of the encoder,
    which is what both mmseg configs are; mffzoo's choice for other depths)."""
    levels = DENSE_LEVELS.get(canonical_arch(arch)) if arch else None
    if levels and levels[-1] == depth - 1:
        return list(levels)
    return sorted({max(round(depth * k / 12) - 1, 0) for k in (4, 6, 8, 12)})



def check_level_order(levels: Sequence[int], key: str = "levels") -> list[int]:
    """``levels`` as a list if they are block indices >= 0, increasing and without repeats, else a one-line
    ConfigError naming ``key``: the check that needs no model (an export profile makes it
    at load)."""
    lv = [int(i) for i in levels]
    require(bool(lv) and min(lv) >= 0 and all(a < b for a, b in zip(lv, lv[1:])), key,
            f"must be block indices >= 0, increasing and without repeats, got {lv}; write e.g. --levels 3,5,7,11")
    return lv


def resolve_dense_levels(levels: Sequence[int] | None, depth: int, arch: str | None = None,
                         key: str = "levels") -> list[int]:
    """The blocks of a ``depth``-block encoder that ``levels`` names (ordered already: :func:`check_level_order`),
    or :func:`default_dense_levels` for None; a one-line ConfigError for a block the encoder does not have."""
    if levels is None:
        return default_dense_levels(arch, depth)
    bad = [i for i in levels if not 0 <= i < depth]
    require(not bad, key, f"block {bad[0] if bad else ''} is not a block of this {depth}-block encoder "
            f"(0..{depth - 1}): out of range; pass --levels within 0..{depth - 1}, e.g. "
            f"{','.join(map(str, default_dense_levels(arch, depth)))}")
    return [int(i) for i in levels]


_MMPRETRAIN = "https://download.openmmlab.com/mmpretrain/v1.0/mff"
_PAPER = dict(
    paper_name="Improving Pixel-based MIM by Reducing Wasted Modeling Capability",
    paper_ids="arXiv:2308.00261",
)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **_PAPER,
        **kwargs,
    }


@dataclass(frozen=True)
class OfficialTag:
    """A registered tag whose weights are an official download (converted on load)."""

    arch: str
    tag: str
    url: str
    description: str
    reported: str  # the official result, shown by `mffzoo zoo` (e.g. "83.7 top-1 ImageNet-1k val")
    num_classes: int = 0  # 1000 for the fine-tuned classifiers

    def cfg(self) -> dict[str, Any]:
        """The timm pretrained cfg; ``notes`` is prose for people (no code reads it back)."""
        return _cfg(
            url=self.url,
            license="apache-2.0",
            origin_url="https://github.com/open-mmlab/mmpretrain/tree/main/configs/mff",
            description=self.description,
            notes=("source: official mmpretrain checkpoint, converted on load", f"reported: {self.reported}"),
            num_classes=self.num_classes,
        )


@dataclass(frozen=True)
class LocalTag:
    """A registered tag whose weights come from the user's own ``mffzoo train RECIPE`` run, found in the zoo home
    (``$MFFZOO_HOME/<arch>.<tag>/``, see :data:`LOCAL_FILE`) when a model is created."""

    arch: str
    tag: str
    recipe: str  # the recipe that produces the weights, e.g. recipes/vits.yaml
    schedule_epochs: int  # what the tag promises; a shorter run publishes as <tag>-partial (see published_tag)
    description: str

    @property
    def produce(self) -> str:
        """The command that makes these weights."""
        return f"mffzoo train {self.recipe}"

    @property
    def path(self) -> str:
        """Where the weights are looked for (relative to the zoo home of the moment, never frozen at import)."""
        return LOCAL_FILE.replace("<arch>", self.arch).replace("<tag>", self.tag)

    def cfg(self) -> dict[str, Any]:
        """The timm pretrained cfg: ``file`` only makes timm list the tag as pretrained (the resolver replaces it
        with the current home's path); ``notes`` is prose for people (no code reads it back)."""
        return _cfg(
            file=LOCAL_FILE,
            license="apache-2.0",
            description=self.description,
            notes=("source: local", f"recipe: {self.recipe}", f"produce with: {self.produce}",
                   f"schedule: {self.schedule_epochs} epochs"),
        )


ZooTag = OfficialTag | LocalTag


def _official(arch: str, tag: str, file: str, description: str, reported: str, **kwargs: Any) -> OfficialTag:
    return OfficialTag(arch, tag, f"{_MMPRETRAIN}/{file}", description, reported, **kwargs)


def _local_runs(arch: str, size: str, mff_prefix: str, mae_prefix: str) -> dict[str, ZooTag]:
    """Tags for recipes/vit{size}[_mae][_{800,1600}e].yaml, i.e. what each recipe's `publish.tag` names.

    A prefix ending in "_" gets the epochs appended (mff_in1k_300e); otherwise 300 ep is the bare prefix
    (mff_local) and longer schedules get a suffix (mff_local_800e).
    """
    out: dict[str, ZooTag] = {}
    for method, prefix, suffix in (("MFF", mff_prefix, ""), ("MAE baseline", mae_prefix, "_mae")):
        for ep in (300, 800, 1600):
            tag = f"{prefix}{ep}e" if prefix.endswith("_") else (prefix if ep == 300 else f"{prefix}_{ep}e")
            recipe = f"recipes/vit{size}{suffix}{'' if ep == 300 else f'_{ep}e'}.yaml"
            desc = f"{method} {ARCH_LABELS[arch]}, {ep} ep ImageNet-1k pretraining (trained locally)"
            out[tag] = LocalTag(arch, tag, recipe, ep, desc)
    return out


_S, _B, _L = ARCHS
# TAGS: arch -> tag -> what the tag is (typed). The first tag of each arch is its default (timm convention).
TAGS: dict[str, dict[str, ZooTag]] = {
    _S: {
        **_local_runs(_S, "s", "mff_in1k_", "mae_in1k_"),
        "demo": LocalTag(_S, "demo", "recipes/demo.yaml", 6, "tiny-budget MFF demo run on the built-in demo data"),
    },
    _B: {
        "mff_in1k_800e": _official(
            _B, "mff_in1k_800e", "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/"
            "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k_20230801-3af7cd9d.pth",
            "MFF ViT-B/16 encoder, 800 ep ImageNet-1k pretraining (official)",
            "83.7 top-1 fine-tuned (100 ep), 68.3 linear probe (90 ep)",
        ),
        "mff_in1k_300e": _official(
            _B, "mff_in1k_300e", "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/"
            "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230801-3c1bcce4.pth",
            "MFF ViT-B/16 encoder, 300 ep ImageNet-1k pretraining (official)",
            "83.0 top-1 fine-tuned (100 ep), 64.2 linear probe (90 ep)",
        ),
        "mff_ft_in1k_800e": _official(
            _B, "mff_ft_in1k_800e", "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/vit-base-p16_8xb128-coslr-100e/"
            "vit-base-p16_8xb128-coslr-100e_20230802-6780e47d.pth",
            "MFF ViT-B/16 800 ep, fine-tuned 100 ep on ImageNet-1k (official), 83.7 top-1",
            "83.7 top-1 ImageNet-1k val", num_classes=1000,
        ),
        "mff_ft_in1k_300e": _official(
            _B, "mff_ft_in1k_300e", "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/"
            "vit-base-p16_8xb128-coslr-100e_in1k/vit-base-p16_8xb128-coslr-100e_in1k_20230802-d746fdb7.pth",
            "MFF ViT-B/16 300 ep, fine-tuned 100 ep on ImageNet-1k (official), 83.0 top-1",
            "83.0 top-1 ImageNet-1k val", num_classes=1000,
        ),
        # Local ViT-B runs get *_local tags: mff_in1k_* are the official downloads.
        **_local_runs(_B, "b", "mff_local", "mae_local"),
    },
    _L: _local_runs(_L, "l", "mff_in1k_", "mae_in1k_"),
}
# ZOO_TAGS: arch -> tag -> timm pretrained cfg (what the entrypoints register), derived from TAGS.
ZOO_TAGS: dict[str, dict[str, dict[str, Any]]] = {
    arch: {tag: t.cfg() for tag, t in tags.items()} for arch, tags in TAGS.items()
}


def zoo_tag(arch: str, tag: str | None) -> ZooTag | None:
    """What a registered ``<arch>.<tag>`` is (alias or long arch name); None for tags not registered."""
    return TAGS.get(canonical_arch(arch), {}).get(tag or "") if tag is not None else None


def local_tag(arch: str, tag: str | None) -> LocalTag | None:
    """The registered local tag ``<arch>.<tag>``; None for official downloads and unregistered tags."""
    entry = zoo_tag(arch, tag)
    return entry if isinstance(entry, LocalTag) else None


def is_local_cfg(cfg: Any) -> bool:
    """True for a registered tag's pretrained cfg (a :data:`ZOO_TAGS` dict or timm's ``PretrainedCfg``) whose
    weights come from the user's own runs in the zoo home: its registered ``file`` is :data:`LOCAL_FILE`."""
    file = cfg.get("file") if isinstance(cfg, Mapping) else getattr(cfg, "file", None)
    return file == LOCAL_FILE


# Fine-tuned classifiers were trained with global average pooling + fc_norm (mmpretrain's ln2); timm builds
# the same structure from these kwargs.
CLASSIFIER_TAG_KWARGS = dict(global_pool="avg", fc_norm=True)


def registered_schedule(arch: str, tag: str) -> int | None:
    """Epochs a registered local tag stands for (its recipe's schedule); None for other tags."""
    entry = local_tag(arch, tag)
    return entry.schedule_epochs if entry is not None else None


def published_tag(arch: str, tag: str, epochs_done: int) -> str:
    """The tag a finished run is published under: a registered tag names a whole schedule (``mff_local`` is 300
    ImageNet epochs), so a run that trained fewer epochs (a smoke test, an override) gets ``<tag>-partial`` and
    never shadows real weights. Unregistered tags are the user's own and are kept."""
    planned = registered_schedule(arch, tag)
    return f"{tag}-partial" if planned is not None and epochs_done < planned else tag


def canonical_arch(name: str) -> str:
    """Long registered name for an alias or long name (tag stripped)."""
    base = name.split(".", 1)[0]
    return ALIASES.get(base, base)


def describe_arch(arch: str, model_args: Mapping[str, Any] | None = None) -> str:
    """What a backbone really is, from its model args: ``ViT-S/16`` for a registered size as registered, else its
    own numbers, e.g. ``ViT (dim 192, depth 6, 3 heads, patch 8, 64 px; shrunk from ViT-S/16)``. The arch name
    (``mff_vit_small_patch16_224``) only names the entrypoint that built it, whatever the args made of it."""
    base = canonical_arch(arch)
    if base not in ARCHS:
        return arch
    std, label = ARCHS[base], ARCH_LABELS[base]
    args = {**std, "img_size": 224, **{k: v for k, v in (model_args or {}).items() if v is not None}}
    size = args["img_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    px = f"{h} px" if h == w else f"{h}x{w} px"
    if all(args[k] == v for k, v in std.items()):
        return label if (h, w) == (224, 224) else f"{label} at {px}"
    smaller = all(args[k] <= std[k] for k in ("embed_dim", "depth")) and max(h, w) <= 224
    return (f"ViT (dim {args['embed_dim']}, depth {args['depth']}, {args['num_heads']} heads, patch "
            f"{args['patch_size']}, {px}; {'shrunk' if smaller else 'resized'} from {label})")


def default_fusion_layers(arch: str | None, depth: int) -> list[int]:
    """The default fusion levels of a ``depth``-block encoder (the only place they are defaulted): ``arch``'s
    ``PRETRAIN_DEFAULTS`` levels, which are block indices of its registered depth, when the encoder has that depth;
    else ``[depth - 1]`` (plain MAE), logged for a registered arch since its fusion then silently disappears.
    ``arch=None`` (an encoder given without its arch, as :class:`~mffzoo.models.MFFPretrainModel` gets) is plain
    MAE."""
    if arch is not None:
        default = PRETRAIN_DEFAULTS[canonical_arch(arch)]["fusion_layers"]
        if default[-1] == depth - 1:
            return list(default)
        _logger.info("mffzoo: %s with %d blocks (not the registered %d): no default fusion levels, "
                     "fusion_layers=[%d] (plain MAE); set model.fusion_layers for MFF", arch, depth,
                     default[-1] + 1, depth - 1)
    return [depth - 1]


def check_fusion_layers(fusion_layers: Sequence[int], depth: int, key: str = "fusion_layers") -> list[int]:
    """``fusion_layers`` as a list if they are valid fusion levels of a ``depth``-block encoder, else a one-line
    :class:`~mffzoo.errors.ConfigError` (a ``ValueError``) naming ``key``. The one validation of fusion levels: the
    recipe calls it at load (``model.fusion_layers``), the model constructor for a model built in Python."""
    fl = [int(i) for i in fusion_layers]
    last = depth - 1
    require(bool(fl), key, f"must list at least one block; [{last}] is plain MAE")
    bad = [i for i in fl if not 0 <= i <= last]
    require(not bad, key, f"indices {bad} are outside the encoder's blocks 0..{last}")
    require(fl == sorted(set(fl)), key, f"must be strictly increasing, got {fl}")
    # The official model always fuses the last block (it is the one used without projection).
    require(fl[-1] == last, key, f"must end with the last block ({last}), got {fl}; [{last}] alone is plain MAE")
    return fl


def pretrain_heads(
    arch: str, depth: int, *, fusion_layers: Sequence[int] | None = None, decoder_dim: int | None = None,
    decoder_depth: int | None = None, decoder_heads: int | None = None,
) -> dict[str, Any]:
    """Fusion levels and decoder sizes for a ``depth``-block encoder of ``arch``: what is given, else the size's
    ``PRETRAIN_DEFAULTS`` (fusion levels: :func:`default_fusion_layers`). Given fusion levels are validated by
    :func:`check_fusion_layers`, at the recipe's load and in the model constructor, not here."""
    defaults = PRETRAIN_DEFAULTS[canonical_arch(arch)]
    levels = default_fusion_layers(arch, depth) if fusion_layers is None else list(fusion_layers)
    given = dict(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
    return {"fusion_layers": levels, **{k: defaults[k] if v is None else v for k, v in given.items()}}
