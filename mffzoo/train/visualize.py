"""PNG figures of a pretraining run (matplotlib, Agg backend: no display needed).

- :func:`save_reconstruction_grid`: original / masked input / prediction / visible + prediction, de-normalised,
  for a fixed set of images and a fixed mask, so grids of different epochs compare. Each row says what it shows:
  the loss covers the masked patches only, so the raw prediction is noise at the visible ones, by design. With a
  norm-pix target (``norm_pix=True``) the model predicts each patch's normalised pixels, so the picture borrows the
  true patch's mean/std to be viewable; the caption says so, since the colours are then partly the target's.
- :func:`save_fusion_plot`: the softmax fusion weight of each fused level over training (the paper analyses
  how MFF distributes weight across depths), plus the final weights as bars. Weights start uniform (1/K) and
  move a few percent, so both panels plot the deviation from 1/K, with the weights written on them.
  :func:`draw_fusion_bars` / :func:`draw_fusion_history` draw the panels for ``mffzoo analyze fusion`` too.

Encoder blocks are named by their 0-based index everywhere (as ``fusion_layers`` and timm's ``blocks.{i}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import save_figure

__all__ = ["save_reconstruction_grid", "save_fusion_plot", "draw_fusion_bars", "draw_fusion_history", "block_names"]

_ROWS = (("input", "original"), ("masked", "masked input\n(grey: hidden)"),
         ("reconstruction", "prediction\n(masked patches\nonly; visible ones\nunsupervised)"),
         ("pasted", "visible +\nprediction"))


def _pyplot():
    import matplotlib  # heavy: loaded only when a figure is drawn, not by every training run's import

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # heavy: only drawing a figure needs it

    return plt


def save_reconstruction_grid(
    images: dict[str, torch.Tensor], path: str | Path, mean: Sequence[float], std: Sequence[float],
    title: str = "", norm_pix: bool = False,
) -> Path:
    """``images`` is the dict of :meth:`MFFPretrainModel.reconstruct` (normalised tensors); ``norm_pix``: the
    model's loss target was normalised pixels, so the prediction was de-normalised with each true patch's mean/std
    (as ``reconstruct`` does), which the figure then says."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    n = images["input"].shape[0]
    fig, axes = plt.subplots(len(_ROWS), n, figsize=(1.5 * n + 1.6, 1.5 * len(_ROWS) + 0.9), squeeze=False)
    for r, (key, label) in enumerate(_ROWS):
        x = (images["input" if key == "masked" else key].detach().float().cpu() * s + m).clamp(0, 1)
        if key == "masked":  # removed patches in grey, as in the MAE figures
            mask = images["mask"].detach().float().cpu()
            x = x * (1 - mask) + 0.5 * mask
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(x[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    ratio = float(images["mask"].float().mean())
    caption = (f"{ratio:.0%} of the patches hidden; the loss covers those only, so the prediction at visible "
               "patches is unconstrained (noise there is expected)")
    if norm_pix:
        caption += ("\nprediction shown with each patch's true mean/std (norm_pix target: the model predicts "
                    "normalised pixels, not the patch's brightness or contrast)")
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.07 if norm_pix else 0.04, 1, 1))
    return save_figure(fig, path, dpi=100)


def _deviation_label(k: int) -> str:
    return f"weight - 1/K (percentage points; 1/K = {1.0 / k:.3f})"


def draw_fusion_bars(ax: Any, weights: Sequence[float], names: Sequence[str]) -> None:
    """Final softmax weights as bars of their deviation from uniform, each labelled with weight and deviation."""
    k = len(weights)
    dev = [100.0 * (w - 1.0 / k) for w in weights]
    bars = ax.bar(range(k), dev, color=[f"C{i}" for i in range(k)])
    ax.bar_label(bars, labels=[f"{w:.3f}\n{d:+.2f}" for w, d in zip(weights, dev)], fontsize=7, padding=2)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(k), list(names), rotation=30, fontsize=8)
    ax.set_ylabel(_deviation_label(k), fontsize=8)
    ax.margins(y=0.3)


def draw_fusion_history(ax: Any, steps: Sequence[int], weights: Sequence[Sequence[float]],
                        names: Sequence[str]) -> None:
    """Each level's deviation from uniform over training; the legend gives its first and last weight."""
    w = torch.tensor([list(r) for r in weights], dtype=torch.float64)
    k = w.shape[1]
    for i in range(k):
        ax.plot(list(steps), (100.0 * (w[:, i] - 1.0 / k)).tolist(), color=f"C{i}",
                label=f"{names[i]}: {w[0, i]:.3f} -> {w[-1, i]:.3f}")
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_deviation_label(k), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def block_names(layers: Sequence[int] | None, k: int) -> list[str]:
    """``block i`` (0-based, as ``fusion_layers``) when the levels' blocks are known, else ``level i``."""
    return [f"block {i}" for i in layers] if layers and len(layers) == k else [f"level {i}" for i in range(k)]


def save_fusion_plot(
    records: list[dict[str, Any]], layers: Sequence[int], path: str | Path, title: str = ""
) -> Path | None:
    """Fusion weights per level vs step, from the ``fusion_weights`` of the metrics records."""
    pts = [(r["step"], r["fusion_weights"]) for r in records if r.get("fusion_weights")]
    if not pts:
        return None
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [p[0] for p in pts]
    weights = [p[1] for p in pts]
    names = block_names(layers, len(weights[-1]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    draw_fusion_history(ax, steps, weights, names)
    ax.set_title("fusion weights over training (deviation from uniform)", fontsize=10)
    draw_fusion_bars(bx, weights[-1], names)
    bx.set_title(f"final (step {steps[-1]})", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
