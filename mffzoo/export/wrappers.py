"""The module that gets exported: one output meaning, fp32 in and out, any compute precision inside.

fp32 I/O keeps every artefact a drop-in replacement for the fp32 model (same preprocessing, same consumer code);
the casts inside are what a strongly typed TensorRT network and ONNX Runtime then run in fp16/bf16.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ExportError

__all__ = ["ExportModule", "OUTPUT_NAMES", "resolve_features", "TORCH_DTYPES"]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}

# features -> (output name, what it means; recorded in the sidecar)
OUTPUT_NAMES = {
    "pooled": ("embedding", "pooled image embedding (B, D): the backbone's global pool + final norm, pre-logits"),
    "tokens": ("tokens", "all output tokens (B, prefix + patches, D) after the final norm, prefix (cls) first"),
    "logits": ("logits", "classifier logits (B, num_classes)"),
}


def resolve_features(features: str, model: nn.Module) -> str:
    """``auto`` means logits for a classifier (num_classes > 0), the pooled embedding otherwise."""
    if features == "auto":
        return "logits" if getattr(model, "num_classes", 0) else "pooled"
    return features


class ExportModule(nn.Module):
    """``model`` -> one output (pooled / tokens / logits), computed in ``dtype`` with fp32 input and output."""

    def __init__(self, model: nn.Module, features: str = "pooled", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if features not in OUTPUT_NAMES:
            raise ValueError(f"features must be one of {sorted(OUTPUT_NAMES)}, got {features!r}")
        if features == "logits" and not getattr(model, "num_classes", 0):
            raise ExportError("--features logits needs a classifier (num_classes > 0); this model is a backbone: "
                              "use --features pooled or tokens")
        # A copy, so the caller's fp32 model stays the reference.
        self.model = copy.deepcopy(model).to(dtype).eval() if dtype != torch.float32 else model.eval()
        self.features = features
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = x.to(self.dtype)
        if self.features == "logits":
            y = m(x)
        else:
            y = m.forward_features(x)
            if self.features == "pooled":
                y = m.forward_head(y, pre_logits=True)
        return y.float()
