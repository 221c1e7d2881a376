"""The position-embedding resize of a dynamic-size export, written as two matrix products every runtime runs alike.

With ``dynamic_img_size=True`` timm resizes the position embedding to the input's patch grid on every call
(``resample_abs_pos_embed``: ``F.interpolate(mode="bicubic", antialias=True)``). Exported as it is, that is an
ONNX ``Resize`` (cubic, ``antialias=1``, ``cubic_coeff_a=-0.5``, ``exclude_outside=1``): ONNX Runtime computes it
as PyTorch does, OpenVINO 2026.4 does not (measured on a tiny ViT: max abs 3e-3 when enlarging the grid, 1.5e-2
when shrinking it, against ONNX Runtime's 1e-6), and TensorRT's ONNX parser has no antialiased resize. So while
the graph is traced, :func:`traceable_pos_embed` swaps that one function for :func:`resample_bicubic_aa`: the
same antialiased bicubic weights as PyTorch's CPU kernel (``a = -0.5``, support scaled by the shrink factor,
taps outside the grid dropped and the rest renormalised), built in the graph from the input's size and applied as
``R_h @ grid @ R_w^T``. The parity check compares the artefact with timm's own (unpatched) model at several
sizes, so the swap is checked on every export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["aa_bicubic_matrix", "resample_bicubic_aa", "traceable_pos_embed"]

_A = -0.5  # PyTorch's (and PIL's) cubic coefficient for antialiased bicubic


def aa_bicubic_matrix(out_n: Any, in_n: int) -> torch.Tensor:
    """``(out_n, in_n)`` weights of PyTorch's antialiased bicubic resize of ``in_n`` samples to ``out_n``
    (``align_corners=False``); ``out_n`` may be symbolic (an exported graph's input size)."""
    i = torch.arange(out_n, dtype=torch.float32)
    scale = torch.full_like(i[:1], float(in_n)) / (i[-1:] + 1)  # in_n / out_n, as a graph value
    center = (i + 0.5) * scale
    j = torch.arange(in_n, dtype=torch.float32)
    x = ((j[None, :] + 0.5 - center[:, None]) / torch.clamp(scale, min=1.0)).abs()
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    w = torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    return w / w.sum(1, keepdim=True)


def resample_bicubic_aa(posemb: torch.Tensor, new_size: Sequence[Any], old_size: Sequence[int],
                        num_prefix_tokens: int = 1) -> torch.Tensor:
    """``posemb`` (1, prefix + gh*gw, C) resized to ``new_size`` patches, as timm's ``resample_abs_pos_embed``
    with its defaults (bicubic, antialias), computed in fp32 and returned in ``posemb``'s dtype."""
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    gh, gw = int(old_size[0]), int(old_size[1])
    c = grid.shape[-1]
    g = grid.float().reshape(gh, gw * c)
    rows = torch.matmul(aa_bicubic_matrix(new_size[0], gh), g).reshape(-1, gw, c)  # (H, gw, C)
    out = torch.matmul(aa_bicubic_matrix(new_size[1], gw), rows)  # (W, gw) @ (H, gw, C) -> (H, W, C)
    out = out.reshape(1, -1, c).to(posemb.dtype)
    return torch.cat([prefix, out], dim=1) if num_prefix_tokens else out


@contextlib.contextmanager
def traceable_pos_embed(model: torch.nn.Module) -> Iterator[None]:
    """While tracing ``model`` for export: its ``_pos_embed`` resizes through :func:`resample_bicubic_aa` (calls
    with other settings than timm's defaults keep timm's own function). Restored on exit."""
    fn = getattr(type(model), "_pos_embed", None)
    scope: dict[str, Any] = getattr(fn, "__globals__", {})
    original = scope.get("resample_abs_pos_embed")
    if original is None:
        yield
        return

    def resample(posemb: torch.Tensor, new_size: Sequence[Any], old_size: Sequence[int] | None = None,
                 num_prefix_tokens: int = 1, interpolation: str = "bicubic", antialias: bool = True,
                 verbose: bool = False, align_corners: bool | None = None) -> torch.Tensor:
        if interpolation != "bicubic" or not antialias or align_corners or old_size is None:
            return original(posemb, new_size, old_size, num_prefix_tokens, interpolation, antialias, verbose,
                            align_corners)
        return resample_bicubic_aa(posemb, new_size, old_size, num_prefix_tokens)

    scope["resample_abs_pos_embed"] = resample
    try:
        yield
    finally:
        scope["resample_abs_pos_embed"] = original
