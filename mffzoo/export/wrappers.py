"""The module that gets exported: one output meaning, fp32 in and out, any compute precision inside.

fp32 I/O keeps every artefact a drop-in replacement for the fp32 model (same preprocessing, same consumer code);
the casts inside are what a strongly typed TensorRT network and ONNX Runtime then run in fp16/bf16.
``features: levels`` has one output per chosen encoder block (``level0``.. ``levelN-1``, each ``(B, C, H/p, W/p)``
NCHW): exactly timm's ``forward_intermediates(x, indices=levels, norm=..., output_fmt="NCHW",
intermediates_only=True)`` (see docs/dense.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..archs import resolve_dense_levels
from ..errors import ExportError

__all__ = ["ExportModule", "Features", "OUTPUT_NAMES", "feature_spec", "output_specs", "resolve_features",
           "TORCH_DTYPES"]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}

# features -> (output name, what it means; recorded in the sidecar)
OUTPUT_NAMES = {
    "pooled": ("embedding", "pooled image embedding (B, D): the backbone's global pool + final norm, pre-logits"),
    "tokens": ("tokens", "all output tokens (B, prefix + patches, D) after the final norm, prefix (cls) first"),
    "logits": ("logits", "classifier logits (B, num_classes)"),
    "levels": ("level", "patch tokens of one encoder block as a map (B, D, H/p, W/p), NCHW, prefix (cls) dropped"),
}


@dataclass(frozen=True)
class Features:
    """What an artefact outputs: ``kind`` (pooled, tokens, logits, levels) and, for levels, which blocks."""

    kind: str
    levels: tuple[int, ...] = ()  # block indices (levels only)
    norm: bool = False  # final norm applied to every level (timm's norm=True)

    @property
    def names(self) -> list[str]:
        """The artefact's output tensor names, in order."""
        if self.kind == "levels":
            return [f"level{i}" for i in range(len(self.levels))]
        return [OUTPUT_NAMES[self.kind][0]]


def resolve_features(features: str, model: nn.Module) -> str:
    """``auto`` means logits for a classifier (num_classes > 0), the pooled embedding otherwise."""
    if features == "auto":
        return "logits" if getattr(model, "num_classes", 0) else "pooled"
    return features


def feature_spec(features: str | Features, model: nn.Module, levels: Sequence[int] | None = None,
                 norm: bool = False) -> Features:
    """``features`` resolved for ``model``: levels default to the arch's (:func:`mffzoo.archs.default_dense_levels`)
    and must be blocks of this encoder. A classifier's levels are its encoder's (the head is not used)."""
    if isinstance(features, Features):
        return features
    kind = resolve_features(features, model)
    if kind not in OUTPUT_NAMES:
        raise ValueError(f"features must be one of {sorted(OUTPUT_NAMES)}, got {features!r}")
    if kind != "levels":
        return Features(kind)
    depth = len(model.blocks)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return Features("levels", tuple(resolve_dense_levels(levels, depth, arch)), bool(norm))


class ExportModule(nn.Module):
    """``model`` -> its output(s) (pooled / tokens / logits / levels), computed in ``dtype``, fp32 in and out."""

    def __init__(self, model: nn.Module, features: str | Features = "pooled",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        spec = feature_spec(features, model)
        if spec.kind == "logits" and not getattr(model, "num_classes", 0):
            raise ExportError("--features logits needs a classifier (num_classes > 0); this model is a backbone: "
                              "use --features pooled, tokens or levels")
        # A copy, so the caller's fp32 model stays the reference.
        self.model = copy.deepcopy(model).to(dtype).eval() if dtype != torch.float32 else model.eval()
        self.spec = spec
        self.features = spec.kind
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        m, spec = self.model, self.spec
        x = x.to(self.dtype)
        if spec.kind == "levels":  # stop_early skips the blocks after the last level: same values, less work
            ys = m.forward_intermediates(x, indices=list(spec.levels), norm=spec.norm, stop_early=True,
                                         output_fmt="NCHW", intermediates_only=True)
            return tuple(y.float() for y in ys)
        if spec.kind == "logits":
            y = m(x)
        else:
            y = m.forward_features(x)
            if spec.kind == "pooled":
                y = m.forward_head(y, pre_logits=True)
        return y.float()


def output_specs(model: nn.Module, spec: Features, img: tuple[int, int], dynamic: bool) -> list[dict[str, Any]]:
    """Every output as the sidecar describes it: name, dtype, shape (symbolic where the input size is dynamic),
    meaning; for levels also the block index, stride (the patch size) and channels."""
    with torch.no_grad():
        outs = ExportModule(model, spec)(torch.zeros(1, 3, *img))
    outs = outs if isinstance(outs, tuple) else (outs,)
    patch = int(model.patch_embed.patch_size[0])
    meaning = OUTPUT_NAMES[spec.kind][1]
    specs = []
    for i, (name, y) in enumerate(zip(spec.names, outs)):
        shape: list[Any] = ["batch", *y.shape[1:]]
        if dynamic and spec.kind == "levels":
            shape[2:] = [f"height/{patch}", f"width/{patch}"]
        elif dynamic and spec.kind == "tokens":
            shape[1] = f"{int(model.num_prefix_tokens)} + (height/{patch})*(width/{patch})"
        item: dict[str, Any] = {"name": name, "dtype": "float32", "shape": shape, "meaning": meaning}
        if spec.kind == "levels":
            item.update(layout="NCHW", block=spec.levels[i], stride=patch, channels=int(y.shape[1]),
                        norm=spec.norm)
        specs.append(item)
    return specs
