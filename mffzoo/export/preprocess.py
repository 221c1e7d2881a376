"""timm's eval transform in numpy + PIL: the one preprocessing of the parity check and of served models.

Torch-free and import-free on purpose (only numpy, PIL and the standard library): ``mffzoo export
--triton-preprocess`` copies this file unchanged next to the Triton Python-backend ``model.py``, so the server
preprocesses exactly as the parity check did. ``cfg`` is the sidecar's ``preprocessing`` section (timm's data
config): ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``,
``value_range``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["preprocess_image", "preprocess_batch", "resize_crop"]

_PIL_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
               "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _to_pil(image: Any) -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...), a uint8 HWC array (RGB or gray) or a PIL image -> RGB PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 HW or HWC, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


def resize_crop(image: Image.Image, cfg: dict[str, Any]) -> np.ndarray:
    """Resize (shorter side to ``floor(size / crop_pct)``) and center crop, as timm's eval transform: uint8 HWC."""
    h, w = (int(v) for v in cfg["input_size"][-2:])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    interp = _PIL_INTERP[cfg.get("interpolation", "bilinear")]
    if h != w or mode not in ("center", "squash"):
        raise ValueError(f"preprocessing supports square inputs with crop_mode center/squash, got {h}x{w} {mode}")
    scale = math.floor(h / crop_pct)
    iw, ih = image.size
    if mode == "squash":
        size = (scale, scale)
    elif iw <= ih:  # torchvision Resize(int): shorter side to `scale`, longer side truncated
        size = (scale, int(scale * ih / iw))
    else:
        size = (int(scale * iw / ih), scale)
    if size != image.size:
        image = image.resize(size, interp)
    arr = np.asarray(image)
    ph, pw = max(h - arr.shape[0], 0), max(w - arr.shape[1], 0)
    if ph or pw:  # crop_pct > 1: torchvision pads with zeros before cropping
        arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    top = int(round((arr.shape[0] - h) / 2.0))
    left = int(round((arr.shape[1] - w) / 2.0))
    return arr[top:top + h, left:left + w]


def preprocess_image(image: Any, cfg: dict[str, Any]) -> np.ndarray:
    """One image (bytes, uint8 HWC array or PIL image) -> normalised float32 CHW, as the model expects."""
    lo, hi = (np.float32(v) for v in cfg.get("value_range", (0.0, 1.0)))
    x = resize_crop(_to_pil(image), cfg).astype(np.float32) / np.float32(255.0) * (hi - lo) + lo
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def preprocess_batch(images: Any, cfg: dict[str, Any]) -> np.ndarray:
    """A batch of images (e.g. a Triton BYTES tensor of encoded images, any shape) -> float32 NCHW."""
    if isinstance(images, np.ndarray) and images.dtype == object:
        images = images.reshape(-1)
    return np.stack([preprocess_image(im, cfg) for im in images]).astype(np.float32)
