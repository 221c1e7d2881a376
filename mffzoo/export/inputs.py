"""Check and calibration inputs: random tensors and real images preprocessed exactly as the model expects.

Random tensors exercise every weight; real images exercise the activation ranges that serving sees (they are
what int8 calibration and low-precision overflow depend on). Both are fp32 NCHW numpy arrays.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import resolve_data_config

from ..data.demo import default_demo_root, write_demo_dataset
from ..errors import DataError
from .preprocess import preprocess_image

__all__ = ["preprocessing", "random_inputs", "image_files", "load_image_batch", "default_image_root"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def model_img_size(model: torch.nn.Module) -> tuple[int, int]:
    size = model.patch_embed.img_size
    return int(size[0]), int(size[1])


def preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """timm's eval data config for ``model`` at its actual input size (what the sidecar tells users to do)."""
    h, w = model_img_size(model)
    cfg = resolve_data_config({"input_size": (3, h, w)}, model=model)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    out["value_range"] = [0.0, 1.0]  # pixels scaled to this range before mean/std (timm's ToTensor)
    out["steps"] = (f"RGB; resize shorter side to {math.floor(h / cfg['crop_pct'])} ({cfg['interpolation']}); "
                    f"center crop {h}x{w}; scale to [0, 1]; normalise with mean/std; NCHW float32")
    return out


def random_inputs(n: int, img_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Standard-normal images: the scale of normalised pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *img_size, generator=g).numpy()


def default_image_root() -> Path:
    """The built-in demo dataset's val split (written on first use, no download)."""
    return write_demo_dataset(default_demo_root()) / "val"


def image_files(root: str | os.PathLike[str], n: int) -> list[Path]:
    """``n`` images spread evenly over a folder tree (so every class folder contributes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist; pass a folder of images (e.g. an ImageNet val dir)")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:  # e.g. a folder without read permission
        raise DataError(f"image folder '{root}' cannot be read ({exc.strerror}); fix its permissions or pass "
                        "another folder") from None
    if not files:
        raise DataError(f"image folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}); pass another folder")
    idx = np.linspace(0, len(files) - 1, num=min(n, len(files))).round().astype(int)
    picked = [files[i] for i in idx]
    while len(picked) < n:  # fewer files than needed: cycle, the check still sees every batch size
        picked.append(files[len(picked) % len(files)])
    return picked


def load_image_batch(root: str | os.PathLike[str], n: int, model: torch.nn.Module) -> np.ndarray:
    """``n`` real images through the model's eval transform (:mod:`.preprocess`: what served models run too)."""
    cfg = preprocessing(model)
    out = []
    for path in image_files(root, n):
        try:
            with Image.open(path) as im:
                out.append(preprocess_image(im, cfg))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image '{path}' cannot be read ({exc}); remove it or pass another folder") from None
    return np.stack(out).astype(np.float32)
