"""MFF-pretrained Vision Transformers registered with timm, with their weights resolved by the zoo.

The backbones are unmodified ``timm.models.vision_transformer.VisionTransformer`` instances; what MFF changes is
how they were pretrained (see :mod:`mffzoo.models.mff`). The architectures and tags are data in
:mod:`mffzoo.archs`; this module turns them into timm entrypoints whose ``pretrained=True`` goes through
:func:`mffzoo.zoo.weights.resolve_pretrained` and whose checkpoint filter is :mod:`mffzoo.zoo.convert`, so timm
loads every supported checkpoint format. ``import mffzoo`` imports this module once timm is loaded (timm has no
plugin discovery); ``mffzoo.zoo`` imports it too, so any use of the zoo has the models registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.error import URLError

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from ..archs import ALIASES, ARCHS, CLASSIFIER_TAG_KWARGS, ZOO_TAGS, OfficialTag, zoo_tag
from ..errors import CheckpointError, ConfigError, WeightsNotFoundError
from .catalog import download_cache_path
from .checkpoint_io import SAFE_EXTRA_GLOBALS
from .convert import convert_state_dict
from .weights import resolve_pretrained

__all__ = ["checkpoint_filter_fn", "default_cfgs"]

# timm's register_model reads `default_cfgs` of the entrypoints' module: every <arch>.<tag> of the catalog.
default_cfgs = generate_default_cfgs(
    {f"{arch}.{tag}": cfg for arch, tags in ZOO_TAGS.items() for tag, cfg in tags.items()}
)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionTransformer) -> dict[str, Any]:
    """timm ``pretrained_filter_fn``: any supported checkpoint format -> this backbone's keys."""
    return convert_state_dict(state_dict, target=model).backbone


def _create_mff_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build a backbone; precedence of model kwargs: caller > the local weights' config.json > ``ARCHS``."""
    out_indices = kwargs.pop("out_indices", 3)
    tag = kwargs.get("pretrained_cfg")
    saved_args: dict[str, Any] = {}
    if pretrained:
        entry = zoo_tag(variant, tag) if isinstance(tag, str) else None
        if isinstance(entry, OfficialTag) and entry.num_classes:  # a fine-tuned classifier: its head's settings
            kwargs = {**CLASSIFIER_TAG_KWARGS, **kwargs}
        kwargs["pretrained_cfg"], kwargs["pretrained_cfg_overlay"], saved_args = resolve_pretrained(
            variant, tag, kwargs.get("pretrained_cfg_overlay")
        )
    kwargs = {**saved_args, **kwargs}
    width = kwargs.get("embed_dim", ARCHS[variant]["embed_dim"])
    if width != ARCHS[variant]["embed_dim"] and "num_heads" not in kwargs:
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
        except CheckpointError as exc:  # the checkpoint filter (convert + check against the model) names no file
            source = _weights_source(kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
            if source is None or source in str(exc):
                raise
            raise CheckpointError(f"weights '{source}': {exc}") from None
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg.pop("state_dict", None)  # the weights were copied into the model; do not hold a second copy
    return model


def _weights_source(cfg: Any, overlay: Any) -> str | None:
    """Where the weights being loaded come from (a file, a Hub repo, a URL), for an error that must name it."""
    for where in (overlay or {}, cfg if isinstance(cfg, dict) else {}):
        for key in ("file", "hf_hub_id", "url"):
            if where.get(key):
                return str(where[key])
    return None


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


# timm entrypoints: one per architecture and one per alias (timm registers a function under its __name__).
_ENTRY_DOCS = {
    "mff_vit_small_patch16_224": "ViT-S/16 (22M) pretrained with MFF; weights come from the user's own runs "
                                 "(no official release).",
    "mff_vit_base_patch16_224": "ViT-B/16 (86M) pretrained with MFF; official mmpretrain weights (300/800 ep, and "
                                "fine-tuned).",
    "mff_vit_large_patch16_224": "ViT-L/16 (304M) pretrained with MFF; weights come from the user's own runs "
                                 "(no official release).",
}


def _register(name: str, variant: str, doc: str) -> Callable[..., VisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _create_mff_vit(variant, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    globals()[name] = register_model(entrypoint)
    return entrypoint


for _variant, _doc in _ENTRY_DOCS.items():
    _register(_variant, _variant, _doc)
for _alias, _variant in ALIASES.items():
    _register(_alias, _variant, f"Alias of ``{_variant}``.")
