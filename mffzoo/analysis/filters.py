"""Accuracy on low-pass and high-pass filtered images: which frequencies a representation relies on.

Each validation image (after the model's test transform, i.e. in the normalised space the model sees) is
filtered with an ideal circular mask in its centred 2-D spectrum: low-pass keeps frequencies with normalised
radius ``r <= cutoff``, high-pass keeps ``r > cutoff``, so the two are exact complements. ``r`` is measured per
axis as a fraction of Nyquist (``r = 1`` touches the edge of the spectrum; corners are at ``sqrt(2)``). The head
(k-NN or linear probe) is fitted on clean training features and only the validation images are filtered.
Encoder, filtering and head run on ``device`` (``auto``: a CUDA GPU when one is visible).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import DataError
from ..eval.data import check_image_folder, eval_transform, load_split, open_split
from ..eval.features import extract_features, frozen_features, load_eval_model, resolve_device
from ..eval.knn import knn_accuracy
from ..eval.linear import LinearProbeConfig, evaluate_head, tensor_batches, train_linear_head
from ..io import save_figure
from ..progress import Progress

__all__ = ["DEFAULT_RADII", "radial_frequency", "filter_mask", "filter_images", "filter_accuracy", "plot_filters"]

DEFAULT_RADII = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def radial_frequency(h: int, w: int) -> torch.Tensor:
    """``(h, w)`` distance of each centred-spectrum bin from DC, per axis as a fraction of Nyquist."""
    fy = (torch.arange(h) - h // 2).float() / (h / 2)
    fx = (torch.arange(w) - w // 2).float() / (w / 2)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def filter_mask(h: int, w: int, cutoff: float, mode: Literal["low", "high"]) -> torch.Tensor:
    """Boolean mask over the centred spectrum: what ``mode``-pass filtering at ``cutoff`` keeps."""
    if mode not in ("low", "high"):
        raise ValueError(f"mode must be 'low' or 'high', got {mode!r}")
    r = radial_frequency(h, w)
    return r <= cutoff if mode == "low" else r > cutoff


def filter_images(imgs: torch.Tensor, cutoff: float, mode: Literal["low", "high"]) -> torch.Tensor:
    """Ideal circular low-/high-pass filter of ``(..., H, W)`` images in the 2-D Fourier domain."""
    h, w = imgs.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(imgs.float()), dim=(-2, -1))
    spec = spec * filter_mask(h, w, cutoff, mode).to(spec.device)
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real.to(imgs.dtype)


def _features(net: torch.nn.Module, imgs: torch.Tensor, pool: str, batch_size: int, bf16: bool,
              filt: tuple[float, Literal["low", "high"]] | None = None) -> torch.Tensor:
    """``pool`` features of ``imgs``, each batch moved to the model's device and (optionally) filtered there."""
    dev = next(net.parameters()).device

    def batches() -> Any:
        for x in imgs.split(batch_size):
            x = x.to(dev, non_blocking=True)
            yield (x if filt is None else filter_images(x, *filt)), torch.zeros(len(x), dtype=torch.long)

    return extract_features(net, batches(), bf16=bf16)[pool]


def _scorer(train: Any, num_classes: int, y: torch.Tensor, head: str, pool: str, linear_epochs: int,
            seed: int, device: torch.device) -> Any:
    """``features -> top-1`` with a head fitted once on clean training features."""
    bank, bank_y = train[pool].to(device), train.labels.to(device)  # once, not per scored filter setting
    if head == "knn":
        return lambda x: knn_accuracy(bank, bank_y, x, y, num_classes, device=device)["top1"]
    cfg = LinearProbeConfig(epochs=linear_epochs, optimizer="sgd", warmup_epochs=min(10, linear_epochs // 10),
                            pool=pool, seed=seed)
    bs = min(cfg.batch_size, len(train))
    probe, _ = train_linear_head(bank.shape[1], num_classes, tensor_batches(bank, bank_y, bs, seed),
                                 max(1, len(train) // bs), cfg, device=device)
    return lambda x: evaluate_head(probe, x, y)["top1"]


def filter_accuracy(models: Sequence[str | os.PathLike[str]], data: str | os.PathLike[str], *,
                    radii: Sequence[float] = DEFAULT_RADII, head: Literal["knn", "linear"] = "knn",
                    pool: Literal["cls", "avg"] = "cls", labels: Sequence[str] | None = None,
                    img_size: int | None = None, random_init: bool = False, num_images: int | None = None,
                    batch_size: int = 128, workers: int = 0, bf16: bool = False, cache: bool | str = True,
                    linear_epochs: int = 90, seed: int = 0, device: str | torch.device = "auto") -> dict[str, Any]:
    """Top-1 of each model on clean, low-pass and high-pass filtered validation images for every cut-off.

    The linear head here is trained with SGD (lr 0.1 per 256) for ``linear_epochs`` on cached clean features.
    """
    dev = resolve_device(device)
    check_image_folder(data)

    if head not in ("knn", "linear"):
        raise DataError(f"unknown head '{head}'; choose knn or linear")
    radii = sorted(float(r) for r in radii)
    if not radii or radii[0] < 0:
        raise DataError(f"cut-off radii must be >= 0, got {radii}")
    labels = list(labels) if labels else [str(m) for m in models]
    if len(labels) != len(models):
        raise DataError(f"got {len(labels)} labels for {len(models)} models; give one label per model")
    out: dict[str, Any] = {"data": str(data), "head": head, "pool": pool, "radii": radii, "random_init": random_init,
                           "device": dev.type, "models": {}}
    for spec, label in zip(models, labels):
        net = load_eval_model(spec, img_size=img_size, random_init=random_init, seed=seed, device=dev)
        train, _, classes, info = frozen_features(net, data, img_size=img_size, batch_size=batch_size,
                                                  workers=workers, bf16=bf16, cache=cache)
        imgs, y = load_split(open_split(data, "val", eval_transform(net, img_size)), limit=num_images,
                              workers=workers)
        score = _scorer(train, len(classes), y, head, pool, linear_epochs, seed, dev)
        passes = 1 + 2 * len(radii)
        with Progress(total=passes, desc=f"filtered inputs: {label}, {len(imgs)} images x {passes} passes (clean, "
                      f"low/high-pass at {len(radii)} radii)", unit="pass") as progress:
            res: dict[str, Any] = {"model": str(spec), "clean": score(_features(net, imgs, pool, batch_size, bf16))}
            progress.update()
            for mode in ("low", "high"):
                res[mode] = []
                for r in radii:
                    res[mode].append(score(_features(net, imgs, pool, batch_size, bf16, (r, mode))))
                    progress.update()
        out["models"][label] = res
        out.update(num_val=len(imgs), num_classes=info["num_classes"], img_size=info["img_size"])
    return out


def plot_filters(result: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Two panels (low-pass, high-pass): top-1 vs cut-off radius, one line per model, its clean (unfiltered)
    accuracy dashed, chance dotted; the title names the data (``title`` replaces it)."""
    import matplotlib  # heavy: only drawing a figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only drawing a figure needs it

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True, layout="constrained")
    radii = result["radii"]
    for i, (label, m) in enumerate(result["models"].items()):
        colour = f"C{i}"
        short = (label if len(label) < 40 else "..." + label[-37:]) + (" (random init)" if result.get("random_init")
                                                                      else "")
        for ax, mode in zip(axes, ("low", "high")):
            ax.plot(radii, m[mode], marker="o", markersize=3, color=colour, label=f"{short}: filtered")
            ax.axhline(m["clean"], color=colour, linestyle="--", linewidth=0.8,
                       label=f"{short}: clean (no filter) {m['clean']:.1f} %")
    classes = result.get("num_classes")
    if classes:
        for ax in axes:
            ax.axhline(100.0 / classes, color="grey", linestyle=":", linewidth=1.0,
                       label=f"chance (1/{classes} = {100.0 / classes:.1f} %)")
    for ax, name in zip(axes, ("low-pass (keep r <= cut-off)", "high-pass (keep r > cut-off)")):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cut-off radius (x Nyquist)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 % ({result['head']} head)")
    axes[1].legend(fontsize=7, loc="best")
    data = Path(str(result.get("data", ""))).name or str(result.get("data", "?"))
    default = (f"top-1 under Fourier-filtered inputs: {data} val ({result.get('num_val', '?')} images, "
               f"{classes or '?'} classes)")
    fig.suptitle(title or default, fontsize=10)
    return save_figure(fig, path, dpi=110)
