"""Augmentations: the recipe's (official MFF: resize + padded random crop + flip; MAE: random resized crop +
flip), drawn under the sample's seed, and the same draws with cheaper decoding (``data.fast_decode``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from ..recipe import DataConfig
from .seeds import derive_seed

__all__ = ["pretrain_transform", "plain_pretrain_transform", "preview_transform", "FastPretrainTransform",
           "AugParams"]


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def pretrain_transform(cfg: DataConfig, img_size: int) -> Callable[[Image.Image], torch.Tensor] | FastPretrainTransform:
    """The recipe's augmentation: official MFF (resize + padded random crop + flip) or MAE (RRC + flip).

    With ``data.fast_decode`` the same augmentation (same crops and flips per sample seed) as a
    :class:`FastPretrainTransform`, which decodes the file itself at the smallest size the crop allows."""
    if cfg.fast_decode:
        return FastPretrainTransform(cfg, img_size)
    return plain_pretrain_transform(cfg, img_size)


def plain_pretrain_transform(cfg: DataConfig, img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The torchvision pipeline on a fully decoded PIL image (``data.fast_decode: false``; the reference)."""
    if cfg.augment == "mae":
        geometric = [T.RandomResizedCrop(img_size, scale=tuple(cfg.crop_scale),
                                         interpolation=_interp(cfg.interpolation or "bicubic"))]
    else:
        geometric = [
            T.Resize(img_size, interpolation=_interp(cfg.interpolation or "bilinear")),
            T.RandomCrop(img_size, padding=cfg.crop_padding or None, padding_mode="reflect"),
        ]
    return T.Compose([
        *geometric,
        T.RandomHorizontalFlip(cfg.hflip),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def preview_transform(cfg: DataConfig, img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic resize + centre crop (for the fixed visualisation images)."""
    return T.Compose([
        T.Resize(img_size, interpolation=_interp(cfg.interpolation or "bicubic")),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


# --------------------------------------------------------------------------------------------- fast decoding
@dataclass(frozen=True)
class AugParams:
    """One sample's draws, in full-resolution pixel coordinates (what torchvision would have drawn)."""

    size: tuple[int, int]  # (w, h) of the full image
    box: tuple[int, int, int, int]  # mae: the RandomResizedCrop box (left, top, right, bottom); mff: whole image
    resized: tuple[int, int]  # (w, h) the box is resized to: mae (S, S); mff the short-side resize
    crop: tuple[int, int]  # mff: (top, left) of the crop in the padded resized image; mae: (0, 0)
    flip: bool


def _reflect_crop(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``x[start:start + length]`` along ``dim`` of ``x`` reflect-padded (np.pad 'reflect'): slices, no gather."""
    n = x.shape[dim]
    if start >= 0 and start + length <= n:
        return x.narrow(dim, start, length)
    parts = []
    if start < 0:
        parts.append(x.narrow(dim, 1, -start).flip(dim))
    parts.append(x.narrow(dim, max(start, 0), min(start + length, n) - max(start, 0)))
    if start + length > n:
        parts.append(x.narrow(dim, 2 * n - start - length - 1, start + length - n).flip(dim))
    return torch.cat(parts, dim)


class FastPretrainTransform:
    """:func:`plain_pretrain_transform` with cheaper decoding; same draws, same geometry, same distribution.

    The random parameters are drawn first, from a generator seeded like the plain path's global RNG and in
    torchvision's order, so every sample gets exactly the crop box and flip the plain path gives it. Then the
    file is decoded knowing what the crop needs: JPEG draft mode (DCT scaling by 1/2, 1/4, 1/8) at the largest
    reduction that still leaves >= ``img_size`` pixels on each side of the crop (PIL then resamples the crop box
    mapped to the reduced image), otherwise a full decode with torchvision's libjpeg-turbo decoder straight into
    a tensor and torch's antialiased uint8 resize (PIL's filters, pixel values within 1). Crop, reflect padding,
    flip and normalisation are one gather and one fused float pass.
    """

    def __init__(self, cfg: DataConfig, img_size: int) -> None:
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.size = int(img_size)
        self.augment = cfg.augment
        self.interpolation = cfg.interpolation or ("bicubic" if cfg.augment == "mae" else "bilinear")
        self.scale, self.ratio = tuple(cfg.crop_scale), (3.0 / 4.0, 4.0 / 3.0)  # ratio: torchvision's default
        self.padding = int(cfg.crop_padding)
        self.hflip = float(cfg.hflip)
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(cfg.std).view(3, 1, 1) * 255.0)

    # ---- draws
    def params(self, size: tuple[int, int], seed: int) -> AugParams:
        """The draws of sample ``seed`` on an image of ``size`` (w, h): torchvision's, from the same seed."""
        g = torch.Generator().manual_seed(derive_seed(seed, 0))
        width, height = size
        s = self.size
        if self.augment == "mae":
            i, j, h, w = self._rrc(width, height, g)
            box, resized, crop = (j, i, j + w, i + h), (s, s), (0, 0)
        else:
            short, long = min(width, height), max(width, height)
            new_long = int(s * long / short)
            resized = (s, new_long) if width <= height else (new_long, s)
            ph, pw = resized[1] + 2 * self.padding, resized[0] + 2 * self.padding
            if ph < s or pw < s:
                raise ValueError(f"Required crop size {(s, s)} is larger than input image size {(ph, pw)}")
            crop = (0, 0) if (ph, pw) == (s, s) else (int(torch.randint(0, ph - s + 1, (1,), generator=g)),
                                                     int(torch.randint(0, pw - s + 1, (1,), generator=g)))
            box = (0, 0, width, height)
        flip = bool(torch.rand(1, generator=g) < self.hflip)
        return AugParams((width, height), box, resized, crop, flip)

    def _rrc(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """``RandomResizedCrop.get_params`` drawing from ``g`` (tests check it against torchvision's)."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), generator=g))
                j = int(torch.randint(0, width - w + 1, size=(1,), generator=g))
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draft_request(self, p: AugParams) -> tuple[int, int]:
        """The size to ask ``Image.draft`` for: PIL picks the largest 1/2^k reduction that stays >= it, so the
        box keeps >= its resized size in pixels (never upsampling what the plain path downsamples)."""
        (width, height), (x0, t, r, b), (rw, rh) = p.size, p.box, p.resized
        return max(1, math.ceil(width * rw / (r - x0))), max(1, math.ceil(height * rh / (b - t)))

    # ---- decode and apply
    def decode(self, im: Image.Image, seed: int) -> tuple[torch.Tensor, AugParams]:
        """Draw, then decode ``im`` (opened, not yet decoded) to the resized box as uint8 (3, h, w)."""
        p = self.params(im.size, seed)
        (x0, t, r, b), (rw, rh) = p.box, p.resized
        drafted = im.draft("RGB", self.draft_request(p)) if im.format == "JPEG" else None
        if drafted is not None and drafted[1][2] < p.size[0]:  # reduced: PIL resamples the mapped box
            sx, sy = p.size[0] / drafted[1][2], p.size[1] / drafted[1][3]
            small = im.convert("RGB").resize((rw, rh), _PIL_FILTERS[self.interpolation],
                                              box=(x0 / sx, t / sy, r / sx, b / sy))
            return _pil_to_tensor(small), p
        x = self._full_decode(im)[:, t:b, x0:r]
        if (r - x0, b - t) != (rw, rh):
            x = torch.nn.functional.interpolate(x[None], size=(rh, rw), mode=self.interpolation, antialias=True,
                                                align_corners=False)[0]
        return x, p

    def _full_decode(self, im: Image.Image) -> torch.Tensor:
        fp = getattr(im, "fp", None)
        if im.format == "JPEG" and im.mode == "RGB" and fp is not None and hasattr(fp, "read"):
            fp.seek(0)
            data = torch.frombuffer(bytearray(fp.read()), dtype=torch.uint8)
            try:
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec's
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return self._decode_jpeg(data, mode=self._rgb)
            except RuntimeError:  # truncated, corrupt or unsupported: PIL decides, as on the plain path
                pass
        return _pil_to_tensor(im.convert("RGB"))

    def finish(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """Crop (with reflect padding), flip and normalise the resized box."""
        s = self.size
        if self.augment == "mae":
            out = x.flip(-1) if p.flip else x
        else:
            out = _reflect_crop(_reflect_crop(x, 1, p.crop[0] - self.padding, s), 2, p.crop[1] - self.padding, s)
            out = out.flip(-1) if p.flip else out
        return (out.float() - self.mean).mul_(self.inv_std)

    def __call__(self, im: Image.Image, seed: int) -> torch.Tensor:
        """The augmented tensor of sample ``seed`` (``im`` opened and not yet decoded, for draft mode to apply)."""
        return self.finish(*self.decode(im, seed))


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)  # np.array: a writable copy (asarray is read-only)


_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
