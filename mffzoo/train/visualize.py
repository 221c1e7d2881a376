"""PNG figures of a pretraining run (matplotlib, Agg backend: no display needed).

- :func:`save_reconstruction_grid`: original / masked / reconstruction / reconstruction with the visible patches
  pasted back, de-normalised, for a fixed set of images and a fixed mask, so grids of different epochs compare.
- :func:`save_fusion_plot`: the softmax fusion weight of each fused level over training (the paper analyses
  how MFF distributes weight across depths), plus the final weights as bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_reconstruction_grid", "save_fusion_plot"]

_ROWS = (("input", "original"), ("masked", "masked"), ("reconstruction", "reconstruction"),
         ("pasted", "recon. + visible"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_reconstruction_grid(
    images: dict[str, torch.Tensor], path: str | Path, mean: Sequence[float], std: Sequence[float],
    title: str = "",
) -> Path:
    """``images`` is the dict of :meth:`MFFPretrainModel.reconstruct` (normalised tensors)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    n = images["input"].shape[0]
    fig, axes = plt.subplots(len(_ROWS), n, figsize=(1.5 * n + 0.9, 1.5 * len(_ROWS) + 0.4), squeeze=False)
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
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


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
    w = torch.tensor([p[1] for p in pts])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    cmap = plt.get_cmap("viridis")
    k = w.shape[1]
    for i in range(k):
        ax.plot(steps, w[:, i].numpy(), color=cmap(i / max(k - 1, 1)), label=f"block {layers[i]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("softmax fusion weight")
    ax.set_title("fusion weights over training", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    bx.bar(range(k), w[-1].numpy(), color=[cmap(i / max(k - 1, 1)) for i in range(k)])
    bx.set_xticks(range(k), [str(layer) for layer in layers])
    bx.axhline(1.0 / k, color="grey", lw=0.8, ls="--", label="uniform 1/K")
    bx.set_xlabel("encoder block")
    bx.set_title(f"final (step {steps[-1]})", fontsize=10)
    bx.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
