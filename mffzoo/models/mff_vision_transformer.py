"""MFF-pretrained Vision Transformers as timm models.

The backbones are unmodified ``timm.models.vision_transformer.VisionTransformer`` instances; what MFF changes is
how they were pretrained (see :mod:`mffzoo.models.pretrain`). This module holds the architectures, the pretrained
tags and their metadata as data, the checkpoint filter that lets timm load every supported checkpoint format,
and the registrations at the bottom. Registration happens on ``import mffzoo`` (timm has no plugin discovery).

Paper: "Improving Pixel-based MIM by Reducing Wasted Modeling Capability", Liu et al., ICCV 2023
(arXiv 2308.00261). Official code and weights: open-mmlab/mmpretrain.
"""

from __future__ import annotations

from typing import Any
from urllib.error import URLError

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from ..errors import WeightsNotFoundError
from ..zoo.catalog import download_cache_path
from ..zoo.checkpoint_io import SAFE_EXTRA_GLOBALS
from ..zoo.home import WEIGHTS_NAME, entry_dir

__all__ = ["ARCHS", "PRETRAIN_DEFAULTS", "ALIASES", "ZOO_TAGS", "canonical_arch", "checkpoint_filter_fn",
           "published_tag", "registered_schedule"]

# --- architectures (timm kwargs); LayerNorm eps 1e-6, qkv bias and MLP ratio 4 are timm's ViT defaults ---
ARCHS: dict[str, dict[str, Any]] = {
    "mff_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mff_vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mff_vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
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


def _official(url: str, *, description: str, notes: tuple[str, ...], **kwargs: Any) -> dict[str, Any]:
    return _cfg(
        url=url,
        license="apache-2.0",
        origin_url="https://github.com/open-mmlab/mmpretrain/tree/main/configs/mff",
        description=description,
        notes=("source: official mmpretrain checkpoint, converted on load", *notes),
        **kwargs,
    )


def _local(recipe: str, description: str, epochs: int) -> dict[str, Any]:
    # No download exists: the weights come from the user's own `mffzoo train` run, resolved from the zoo home
    # (MFFZOO_HOME) at creation time by mffzoo.zoo.weights. `notes` marks the tag as local for that resolver;
    # the schedule is what the tag promises (a shorter run publishes as <tag>-partial, see published_tag).
    return _cfg(
        license="apache-2.0",
        description=description,
        notes=("source: local", f"recipe: {recipe}", f"produce with: mffzoo train {recipe}",
               f"schedule: {epochs} epochs"),
    )


def is_local_cfg(cfg: Any) -> bool:
    """True for tags whose weights come from the user's own runs in the zoo home."""
    notes = cfg.get("notes") if isinstance(cfg, dict) else getattr(cfg, "notes", None)
    return bool(notes) and "source: local" in notes


def _local_runs(size: str, mff_prefix: str, mae_prefix: str, desc: str) -> dict[str, dict[str, Any]]:
    """Tags for recipes/vit{size}[_mae][_{800,1600}e].yaml, i.e. what each recipe's `publish.tag` names.

    A prefix ending in "_" gets the epochs appended (mff_in1k_300e); otherwise 300 ep is the bare prefix
    (mff_local) and longer schedules get a suffix (mff_local_800e).
    """
    out = {}
    for method, prefix, suffix in (("MFF", mff_prefix, ""), ("MAE baseline", mae_prefix, "_mae")):
        for ep in (300, 800, 1600):
            tag = f"{prefix}{ep}e" if prefix.endswith("_") else (prefix if ep == 300 else f"{prefix}_{ep}e")
            recipe = f"recipes/vit{size}{suffix}{'' if ep == 300 else f'_{ep}e'}.yaml"
            out[tag] = _local(recipe, f"{method} {desc}, {ep} ep ImageNet-1k pretraining (trained locally)", ep)
    return out


# ZOO_TAGS: arch -> tag -> pretrained cfg. The first tag of each arch is its default (timm convention).
ZOO_TAGS: dict[str, dict[str, dict[str, Any]]] = {
    "mff_vit_small_patch16_224": {
        **_local_runs("s", "mff_in1k_", "mae_in1k_", "ViT-S/16"),
        "demo": _local("recipes/demo.yaml", "tiny-budget MFF demo run on the built-in demo data", 6),
    },
    "mff_vit_base_patch16_224": {
        "mff_in1k_800e": _official(
            f"{_MMPRETRAIN}/mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/"
            "mff_vit-base-p16_8xb512-amp-coslr-800e_in1k_20230801-3af7cd9d.pth",
            description="MFF ViT-B/16 encoder, 800 ep ImageNet-1k pretraining (official)",
            notes=("reported: 83.7 top-1 fine-tuned (100 ep), 68.3 linear probe (90 ep)",),
        ),
        "mff_in1k_300e": _official(
            f"{_MMPRETRAIN}/mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/"
            "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230801-3c1bcce4.pth",
            description="MFF ViT-B/16 encoder, 300 ep ImageNet-1k pretraining (official)",
            notes=("reported: 83.0 top-1 fine-tuned (100 ep), 64.2 linear probe (90 ep)",),
        ),
        "mff_ft_in1k_800e": _official(
            f"{_MMPRETRAIN}/mff_vit-base-p16_8xb512-amp-coslr-800e_in1k/vit-base-p16_8xb128-coslr-100e/"
            "vit-base-p16_8xb128-coslr-100e_20230802-6780e47d.pth",
            description="MFF ViT-B/16 800 ep, fine-tuned 100 ep on ImageNet-1k (official), 83.7 top-1",
            notes=("reported: 83.7 top-1 ImageNet-1k val",),
            num_classes=1000,
        ),
        "mff_ft_in1k_300e": _official(
            f"{_MMPRETRAIN}/mff_vit-base-p16_8xb512-amp-coslr-300e_in1k/vit-base-p16_8xb128-coslr-100e_in1k/"
            "vit-base-p16_8xb128-coslr-100e_in1k_20230802-d746fdb7.pth",
            description="MFF ViT-B/16 300 ep, fine-tuned 100 ep on ImageNet-1k (official), 83.0 top-1",
            notes=("reported: 83.0 top-1 ImageNet-1k val",),
            num_classes=1000,
        ),
        # Local ViT-B runs get *_local tags: mff_in1k_* are the official downloads.
        **_local_runs("b", "mff_local", "mae_local", "ViT-B/16"),
    },
    "mff_vit_large_patch16_224": _local_runs("l", "mff_in1k_", "mae_in1k_", "ViT-L/16"),
}

# Local tags point at their folder in the zoo home so timm lists them as pretrained; the path is resolved
# again at creation time (MFFZOO_HOME may change after import).
for _arch, _tags in ZOO_TAGS.items():
    for _tag, _c in _tags.items():
        if is_local_cfg(_c):
            _c["file"] = str(entry_dir(_arch, _tag) / WEIGHTS_NAME)

# Fine-tuned classifiers were trained with global average pooling + fc_norm (mmpretrain's ln2); timm builds
# the same structure from these kwargs.
CLASSIFIER_TAG_KWARGS = dict(global_pool="avg", fc_norm=True)

default_cfgs = generate_default_cfgs(
    {f"{arch}.{tag}": cfg for arch, tags in ZOO_TAGS.items() for tag, cfg in tags.items()}
)


def registered_schedule(arch: str, tag: str) -> int | None:
    """Epochs a registered local tag stands for (its recipe's schedule); None for other tags."""
    notes = ZOO_TAGS.get(canonical_arch(arch), {}).get(tag, {}).get("notes") or ()
    return next((int(n.split()[1]) for n in notes if n.startswith("schedule: ")), None)


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


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionTransformer) -> dict[str, Any]:
    """timm ``pretrained_filter_fn``: any supported checkpoint format -> this backbone's keys."""
    from ..zoo.convert import convert_state_dict

    return convert_state_dict(state_dict, target=model).backbone


def _create_mff_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build a backbone; precedence of model kwargs: caller > the local weights' config.json > ``ARCHS``."""
    from ..zoo.weights import resolve_pretrained

    out_indices = kwargs.pop("out_indices", 3)
    tag = kwargs.get("pretrained_cfg")
    saved_args: dict[str, Any] = {}
    if pretrained:
        if isinstance(tag, str) and tag.startswith("mff_ft_"):
            kwargs = {**CLASSIFIER_TAG_KWARGS, **kwargs}
        kwargs["pretrained_cfg"], kwargs["pretrained_cfg_overlay"], saved_args = resolve_pretrained(
            variant, tag, kwargs.get("pretrained_cfg_overlay")
        )
    kwargs = {**saved_args, **kwargs}
    width = kwargs.get("embed_dim", ARCHS[variant]["embed_dim"])
    if width != ARCHS[variant]["embed_dim"] and "num_heads" not in kwargs:
        from ..errors import ConfigError

        raise ConfigError(  # a silent guess would build a model that loads the weights and computes garbage
            f"a {width}-wide {variant} needs num_heads=... (weights from mffzoo record it; other "
            "checkpoints of non-standard widths do not)"
        )
    kwargs = {**ARCHS[variant], **kwargs}
    # timm loads .pth files with weights_only=True; mmengine's `meta` may hold numpy scalars, which are data.
    with torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
        try:
            model = build_model_with_cfg(
                VisionTransformer,
                variant,
                pretrained,
                pretrained_filter_fn=checkpoint_filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                **kwargs,
            )
        except URLError as exc:  # offline, proxy, or the server is gone: say which file and how to go without it
            raise _download_error(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"),
                                  exc) from None
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg.pop("state_dict", None)  # the weights were copied into the model; do not hold a second copy
    return model


def _download_error(variant: str, tag: Any, overlay: Any, exc: URLError) -> WeightsNotFoundError:
    cfg = get_pretrained_cfg(f"{variant}.{tag}" if isinstance(tag, str) else variant)
    explicit = tag if isinstance(tag, dict) else {}  # a pretrained_cfg dict passed by the caller
    url = (overlay or {}).get("url") or explicit.get("url") or getattr(cfg, "url", None) or "?"
    name = f"{variant}.{cfg.tag}" if cfg is not None and cfg.tag else variant
    reason = str(getattr(exc, "reason", exc)).replace("\n", " ")
    return WeightsNotFoundError(
        f"could not download the weights of {name} from {url} ({reason}); without network, fetch that file "
        f"elsewhere and put it at {download_cache_path(url)}, or load it from any path with "
        f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
        "(or `mffzoo convert PATH OUT` for a model folder)"
    )


def _build(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    return _create_mff_vit(variant, pretrained=pretrained, **kwargs)


@register_model
def mff_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 (22M) pretrained with MFF; weights come from the user's own runs (no official release)."""
    return _build("mff_vit_small_patch16_224", pretrained, kwargs)


@register_model
def mff_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (86M) pretrained with MFF; official mmpretrain weights (300/800 ep, and fine-tuned)."""
    return _build("mff_vit_base_patch16_224", pretrained, kwargs)


@register_model
def mff_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16 (304M) pretrained with MFF; weights come from the user's own runs (no official release)."""
    return _build("mff_vit_large_patch16_224", pretrained, kwargs)


@register_model
def mff_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Alias of ``mff_vit_small_patch16_224``."""
    return _build("mff_vit_small_patch16_224", pretrained, kwargs)


@register_model
def mff_vit_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Alias of ``mff_vit_base_patch16_224``."""
    return _build("mff_vit_base_patch16_224", pretrained, kwargs)


@register_model
def mff_vit_large(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Alias of ``mff_vit_large_patch16_224``."""
    return _build("mff_vit_large_patch16_224", pretrained, kwargs)
