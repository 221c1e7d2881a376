"""Fourier analysis of latent features: how much high-frequency content each block's feature map carries.

Method (Park & Kim, "How Do Vision Transformers Work?", which the MFF paper's analysis builds on): take each
block's patch-token map (cls dropped) as ``C x h x w``, compute ``log |FFT2|``, shift DC to the centre, average
over images and channels, read the amplitude along the diagonal from DC to the highest frequency and subtract
the DC value. A curve that falls faster means a more low-pass (smoother, more semantic) representation; the
paper's claim is that MFF's deep features are lower-frequency than MAE's because shallow levels feed the
decoder the detail it needs.

The frequency axis is the diagonal index as a fraction of Nyquist along each axis (``2 i / h``). The curve
runs from DC to the last bin *below* Nyquist: on an even grid the Nyquist bin (which fftshift puts at the
array's first row/column, not on the diagonal towards the edge) is left out, so the last point is
``(h - 2) / h`` x Nyquist — 0.75 on an 8 x 8 grid, 0.857 on 14 x 14 — and ``(h - 1) / h`` on an odd grid.
Encoder and FFTs run on ``device`` (``auto``: a CUDA GPU when one is visible).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..eval.data import check_image_folder, eval_transform, load_split, open_split
from ..eval.features import load_eval_model, resolve_device
from ..io import save_figure

__all__ = ["relative_log_amplitude", "normalized_frequencies", "block_feature_maps", "model_frequency_profile",
           "frequency_analysis", "plot_frequency"]


def relative_log_amplitude(fmap: torch.Tensor) -> torch.Tensor:
    """Δ log amplitude along the spectrum's diagonal for ``(B, C, H, W)`` maps, DC to the last bin below Nyquist
    (see the module docstring), with ``[0] = 0``."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(fmap.shape)}")
    h, w = fmap.shape[-2:]
    amp = torch.fft.fft2(fmap.float()).abs().add(1e-6).log()
    amp = torch.fft.fftshift(amp, dim=(-2, -1)).mean(dim=(0, 1))
    n = min(h - h // 2, w - w // 2)
    diag = torch.stack([amp[h // 2 + i, w // 2 + i] for i in range(n)])
    return diag - diag[0]


def normalized_frequencies(h: int, w: int | None = None) -> list[float]:
    """Frequency of each diagonal point as a fraction of the Nyquist frequency (per axis); ends below 1."""
    w = w or h
    n = min(h - h // 2, w - w // 2)
    return [2.0 * i / min(h, w) for i in range(n)]


@torch.no_grad()
def block_feature_maps(model: nn.Module, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output as ``(B, C, h, w)`` (prefix tokens dropped), via timm's ``forward_intermediates``."""
    fi = getattr(model, "forward_intermediates", None)
    if fi is None:
        raise DataError(f"{type(model).__name__} has no forward_intermediates(); frequency analysis needs a timm "
                        "ViT (or another timm model that exposes per-block features)")
    model.eval()
    return [f.float() for f in fi(imgs, intermediates_only=True, output_fmt="NCHW")]


@torch.no_grad()
def model_frequency_profile(model: nn.Module, imgs: torch.Tensor, batch_size: int = 64) -> dict[str, Any]:
    """Per-block Δ log-amplitude curves, averaged over ``imgs`` (log-amplitudes averaged batch by batch); each
    batch runs on the model's device."""
    dev = next(model.parameters()).device
    sums: list[torch.Tensor] | None = None
    shape = None
    for x in imgs.split(batch_size):
        maps = block_feature_maps(model, x.to(dev, non_blocking=True))
        shape = maps[0].shape[-2:]
        curves = [relative_log_amplitude(m) * len(x) for m in maps]
        sums = curves if sums is None else [s + c for s, c in zip(sums, curves)]
    if sums is None or shape is None:
        raise DataError("no images for the frequency analysis")
    if min(shape) < 4:
        raise DataError(f"the feature grid is {shape[0]}x{shape[1]} tokens, too small for a spectrum; use a larger "
                        "--img-size (at least 4 patches per side)")
    curves = [(s / len(imgs)).cpu().tolist() for s in sums]
    freqs = normalized_frequencies(int(shape[0]), int(shape[1]))
    return {"grid": [int(shape[0]), int(shape[1])], "frequencies": freqs, "blocks": curves,
            "high_freq": [c[-1] for c in curves],
            "mean_high_freq": float(sum(c[-1] for c in curves) / len(curves))}


def frequency_analysis(models: Sequence[str | os.PathLike[str]], data: str | os.PathLike[str], *,
                       num_images: int = 256, img_size: int | None = None, random_init: bool = False,
                       split: str = "val", labels: Sequence[str] | None = None, seed: int = 0,
                       batch_size: int = 64, device: str | torch.device = "auto") -> dict[str, Any]:
    """Frequency profiles of several MODEL specs on the same images from ``data/split`` (each model's transform).

    ``random_init`` is recorded in the result so an architecture-only run is never mistaken for the weights'."""
    dev = resolve_device(device)
    check_image_folder(data, (split,))
    labels = list(labels) if labels else [str(m) for m in models]
    if len(labels) != len(models):
        raise DataError(f"got {len(labels)} labels for {len(models)} models; give one label per model")
    out: dict[str, Any] = {"data": str(data), "split": split, "num_images": None, "random_init": random_init,
                           "device": dev.type, "models": {}}
    for spec, label in zip(models, labels):
        net = load_eval_model(spec, img_size=img_size, random_init=random_init, seed=seed, device=dev)
        imgs, _ = load_split(open_split(data, split, eval_transform(net, img_size)), limit=num_images)
        out["num_images"] = len(imgs)
        out["models"][label] = {"model": str(spec), **model_frequency_profile(net, imgs, batch_size)}
    return out


def plot_frequency(result: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """One panel per model: Δ log amplitude vs normalised frequency, one curve per block coloured by its 0-based
    index (the numbering of ``fusion_layers`` and of the fusion plot)."""
    import matplotlib  # heavy: only drawing a figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only drawing a figure needs it
    from matplotlib import cm  # heavy: only drawing a figure needs it
    from matplotlib.colors import ListedColormap, Normalize  # heavy: only drawing a figure needs it

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.0, 3.8), squeeze=False, sharey=True,
                             layout="constrained")
    cmap = ListedColormap(plt.get_cmap("plasma")(torch.linspace(0.0, 0.85, 256).numpy()))  # no pale-yellow end
    depth = max(len(m["blocks"]) for m in models.values())
    norm = Normalize(vmin=0, vmax=max(depth - 1, 1))  # 0-based block index, as fusion_layers and the fusion plot
    for ax, (label, m) in zip(axes[0], models.items()):
        for i, curve in enumerate(m["blocks"]):
            ax.plot(m["frequencies"], curve, color=cmap(norm(i)), marker="o", markersize=2.5, linewidth=1.2)
        name = label if len(label) < 40 else "..." + label[-37:]
        ax.set_title(name + (" (random init)" if result.get("random_init") else ""), fontsize=9)
        ax.set_xlabel("normalised frequency (x Nyquist)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ log amplitude")
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(sm, ax=axes[0].tolist(), label="block (0 = first, as fusion_layers)")
    if depth <= 16:
        bar.set_ticks(range(depth))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)

