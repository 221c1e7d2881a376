"""Segmentation data in the ADE20K layout (``ADEChallengeData2016``): check the folder once, then load pairs.

``ROOT/images/{training,validation}/NAME.jpg`` (or ``.jpeg``/``.png``) and ``ROOT/annotations/{training,
validation}/NAME.png``: single-channel masks the size of their image, label 0 = ignore ("other" in ADE20K),
labels 1..K = the K classes. The built-in demo (:mod:`mffzoo.data.seg_demo`) writes the same tree.

Everything a user can get wrong with the files is one line of :class:`~mffzoo.errors.DataError` before the model
is built: a missing folder, an image without a mask or a mask without an image (named), a mask whose size is not
its image's, a mask that is not single-channel (sizes and modes come from the file headers), and a label above the
class count (:func:`check_labels` reads every mask, in threads: seconds on ADE20K's 22k masks with a few cores).

Preprocessing (our choice; DINOv2's linear probe trains on 512-px crops with augmentation): the shorter side is
resized to ``size`` (the model's interpolation for the image, nearest for the mask) and the centre
``size x size`` is cropped, for training and validation alike, so every image gives one fixed-size feature map
and the frozen features can be cached. Scores are on that crop's pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..progress import Progress

__all__ = ["SEG_SPLITS", "IGNORE_INDEX", "SegPair", "SegDataset", "check_seg_folder", "check_labels", "to_targets",
           "describe_pairs"]

SEG_SPLITS = ("training", "validation")
IGNORE_INDEX = -1  # what label 0 becomes: cross-entropy and the metrics skip it
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_MASK_MODES = ("L", "P", "I", "I;16")
_HINT = ("expected ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png "
         "(ADEChallengeData2016's layout; `--data demo` writes one)")


@dataclass(frozen=True)
class SegPair:
    image: Path
    mask: Path


def _stems(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        p = Path(entry.path)
        if entry.name.startswith(".") or p.suffix.lower() not in exts or not entry.is_file():
            continue
        if p.stem in out:
            raise DataError(f"two files named {p.stem} in '{folder}' ({out[p.stem].name}, {p.name}); keep one")
        out[p.stem] = p
    return out


def _unpaired(kind: str, stems: list[str], have: dict[str, Path], other_dir: Path, ext: str) -> DataError:
    first = have[stems[0]]
    other = "mask" if kind == "image" else "image"
    more = f" ({len(stems) - 1} more {kind}s without one)" if len(stems) > 1 else ""
    return DataError(f"{kind} '{first}' has no {other} '{other_dir / (first.stem + ext)}'{more}; every image needs "
                     "a mask of the same name and every mask an image")


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read {what} '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None


def _check_pair(pair: SegPair) -> None:
    img_size, _ = _header(pair.image, "image")
    mask_size, mode = _header(pair.mask, "mask")
    if mode not in _MASK_MODES:
        raise DataError(f"mask '{pair.mask}' is {mode}; expected a single-channel label PNG (8-bit, 0 = ignore, "
                        "1..K = classes)")
    if mask_size != img_size:
        raise DataError(f"mask '{pair.mask}' is {mask_size[0]}x{mask_size[1]} but its image '{pair.image}' is "
                        f"{img_size[0]}x{img_size[1]}; a mask must be the size of its image")


def check_seg_folder(root: str | os.PathLike[str]) -> dict[str, list[SegPair]]:
    """``{split: [SegPair, ...]}`` (sorted by name) of an ADE20K-layout folder, or a one-line :class:`DataError`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist; {_HINT}")
    for sub in ("images", "annotations"):
        if not (root / sub).is_dir():
            raise DataError(f"dataset '{root}' has no {sub}/ folder; {_HINT}")
    out: dict[str, list[SegPair]] = {}
    for split in SEG_SPLITS:
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(f"dataset '{root}' has no {d.relative_to(root)}/ folder; {_HINT}")
        images, masks = _stems(img_dir, _IMAGE_EXTS), _stems(ann_dir, (".png",))
        if not images:
            raise DataError(f"'{img_dir}' holds no images ({', '.join(_IMAGE_EXTS)}); {_HINT}")
        if no_mask := [s for s in images if s not in masks]:
            raise _unpaired("image", no_mask, images, ann_dir, ".png")
        if no_image := [s for s in masks if s not in images]:
            raise _unpaired("mask", no_image, masks, img_dir, ".jpg")
        out[split] = [SegPair(images[s], masks[s]) for s in images]
        for pair in out[split]:
            _check_pair(pair)
    return out


def _top_label(path: Path) -> int:
    with Image.open(path) as m:
        return int(np.asarray(m).max(initial=0))


def check_labels(pairs: dict[str, list[SegPair]], num_classes: int) -> None:
    """A one-line :class:`DataError` naming the first mask with a label above ``num_classes``, before any model
    runs. Reads every mask (threads: PNG decoding releases the GIL); shows progress for a large dataset."""
    masks = [p.mask for split in SEG_SPLITS for p in pairs.get(split, [])]
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    big = len(masks) >= 2000  # seconds of decoding: worth a progress line; a small set's error stays one line
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            Progress(total=len(masks), desc=f"checking the labels of {len(masks)} masks", unit="mask",
                     enabled=big) as progress:
        for path, top in zip(masks, pool.map(_top_label, masks)):
            progress.update(1)
            if top > num_classes:
                raise DataError(f"mask '{path}' has label {top} but there are {num_classes} classes (labels "
                                f"1..{num_classes}, 0 = ignore); pass --num-classes")


def _resize_crop(im: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class SegDataset(torch.utils.data.Dataset):
    """``(image (3, S, S) normalised, raw mask (S, S) int64, index)`` of each pair (see the module docstring)."""

    def __init__(self, pairs: list[SegPair], size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 interpolation: str = "bicubic") -> None:
        self.pairs, self.size = pairs, int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.interpolation = interpolation
        self.resample = _RESAMPLE.get(interpolation, Image.BICUBIC)

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> str:
        """What the preprocessing is, for the feature cache key."""
        return f"seg-resize-crop-{self.size}-{self.interpolation}-{self.mean.flatten().tolist()}-" \
               f"{self.std.flatten().tolist()}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pair = self.pairs[i]
        with Image.open(pair.image) as im:
            img = _resize_crop(im.convert("RGB"), self.size, self.resample)
        with Image.open(pair.mask) as m:
            mask = _resize_crop(m if m.mode != "P" else m.convert("L"), self.size, Image.NEAREST)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        y = torch.from_numpy(np.asarray(mask).astype(np.int64))
        return (x - self.mean) / self.std, y, i


def to_targets(raw: torch.Tensor, index: torch.Tensor, ds: SegDataset, num_classes: int) -> torch.Tensor:
    """Raw masks (0 ignore, 1..K) -> targets (``IGNORE_INDEX``, 0..K-1); a label above K is a DataError naming
    the mask."""
    top = raw.flatten(1).amax(dim=1)
    bad = (top > num_classes).nonzero().flatten()
    if len(bad):
        j = int(bad[0])
        raise DataError(f"mask '{ds.pairs[int(index[j])].mask}' has label {int(top[j])} but there are "
                        f"{num_classes} classes (labels 1..{num_classes}, 0 = ignore); pass --num-classes")
    return raw - 1  # 0 -> -1 = IGNORE_INDEX


def describe_pairs(pairs: list[SegPair], extra: str) -> Any:
    """An object :func:`mffzoo.eval.features.dataset_fingerprint` hashes: each image and mask file's
    path/size/mtime, plus ``extra`` (the preprocessing)."""
    return SimpleNamespace(samples=[(str(p), k) for pair in pairs for k, p in enumerate((pair.image, pair.mask))],
                           transform=extra)
