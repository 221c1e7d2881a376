"""The model catalog as data: architectures, pretrained tags, pretraining defaults, and their resolvers.

Standard library only, so everything (the recipe validator, the CLI, the timm entrypoints in
:mod:`mffzoo.zoo.mff_vision_transformer`, the pretraining model) reads one table without importing torch or timm.
Local tags name no path here: their weights are found in the zoo home (``MFFZOO_HOME``) when a model is created, so
changing ``MFFZOO_HOME`` after import works.

Paper: "Improving Pixel-based MIM by Reducing Wasted Modeling Capability", Liu et al., ICCV 2023
(arXiv 2308.00261). Official code and weights: open-mmlab/mmpretrain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

_logger = logging.getLogger("mffzoo")

__all__ = ["ARCHS", "ARCH_LABELS", "PRETRAIN_DEFAULTS", "ALIASES", "ZOO_TAGS", "CLASSIFIER_TAG_KWARGS", "LOCAL_FILE",
           "canonical_arch", "describe_arch", "is_local_cfg", "pretrain_heads", "published_tag",
           "registered_schedule"]

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
    # `file` only makes timm list the tag as pretrained; the resolver replaces it with the current home's path.
    return _cfg(
        file=LOCAL_FILE,
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

# Fine-tuned classifiers were trained with global average pooling + fc_norm (mmpretrain's ln2); timm builds
# the same structure from these kwargs.
CLASSIFIER_TAG_KWARGS = dict(global_pool="avg", fc_norm=True)


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


def pretrain_heads(
    arch: str, depth: int, *, fusion_layers: Sequence[int] | None = None, decoder_dim: int | None = None,
    decoder_depth: int | None = None, decoder_heads: int | None = None,
) -> dict[str, Any]:
    """Fusion levels and decoder sizes for a ``depth``-block encoder of ``arch``: what is given, else the size's
    ``PRETRAIN_DEFAULTS``. The default levels are block indices of the registered depth; an encoder of another
    depth gets ``[depth - 1]`` (plain MAE), which is logged, since fusion then silently disappears.
    Validation of given values is the caller's (the recipe reports them as config errors)."""
    defaults = PRETRAIN_DEFAULTS[canonical_arch(arch)]
    if fusion_layers is None:
        default = defaults["fusion_layers"]
        if default[-1] == depth - 1:
            fusion_layers = list(default)
        else:
            fusion_layers = [depth - 1]
            _logger.info("mffzoo: %s with %d blocks (not the registered %d): no default fusion levels, "
                         "fusion_layers=[%d] (plain MAE); set model.fusion_layers for MFF", arch, depth,
                         default[-1] + 1, depth - 1)
    given = dict(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
    return {"fusion_layers": list(fusion_layers),
            **{k: defaults[k] if v is None else v for k, v in given.items()}}
