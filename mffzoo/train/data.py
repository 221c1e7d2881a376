"""Training data: timm dataset readers, torchvision augmentations, and a sampler that makes runs exact.

Randomness is a function of the *sample*, not of the process: the sampler hands out ``(index, seed)`` pairs
where ``seed`` derives from (recipe seed, epoch, dataset index), and the augmentation (here) and the mask noise
(the task) are drawn from that seed. So a run gives the same result on 1 or N processes with the same global
batch, in any number of loader workers, and a run resumed mid-epoch continues exactly where it stopped.

Unreadable images are skipped (replaced by the next readable image, so batch shapes stay fixed), counted once
per file however often a run meets them (:class:`UnreadableFiles`), and reported with their paths and whole error;
the engine stops when more than ``data.max_bad_fraction`` of the dataset fails.

"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from timm.data.readers.class_map import load_class_map
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from ..data.demo import default_demo_root, write_demo_dataset
from ..data.scan import check_tar, walk_images
from ..errors import DataError
from .recipe import DEMO_ROOT, DataConfig

_logger = logging.getLogger("mffzoo.train")

__all__ = [
    "Batch", "SampleDataset", "GlobalBatchSampler", "build_dataset", "build_loader", "pretrain_transform",
    "preview_transform", "resolve_root", "sample_seed", "derive_seed", "UnreadableFiles", "plain_pretrain_transform",
    "FastPretrainTransform", "AugParams", "open_image_dataset",
]

_MASK64 = (1 << 64) - 1
_MAX_RETRIES = 10  # consecutive unreadable images before giving up on a position (as timm)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*words: int) -> int:
    """Well-mixed 63-bit seed from integers (torch's CPU generator only uses the low 32 bits of a seed, so
    ``(epoch << 32) + index`` would collide; hashing first does not)."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (int(w) & _MASK64))
    return h >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset item ``index`` in ``epoch``: augmentation and masking noise both derive from it."""
    return derive_seed(seed, epoch, index)


# --------------------------------------------------------------------------------------------- transforms
def _interp(name: str):

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


# --------------------------------------------------------------------------------------------- dataset
def resolve_root(cfg: DataConfig) -> Path:
    """The dataset location; ``demo`` generates the built-in dataset on first use."""
    if cfg.root == DEMO_ROOT:

        d = cfg.demo
        try:
            return write_demo_dataset(default_demo_root(), num_classes=d.num_classes,
                                      train_per_class=d.train_per_class, val_per_class=d.val_per_class,
                                      image_size=d.image_size, seed=d.seed)
        except ValueError as exc:
            raise DataError(f"demo dataset: {exc}") from None
    root = Path(cfg.root).expanduser()
    if not cfg.dataset and not root.exists():
        raise DataError(
            f"data.root '{cfg.root}' does not exist; point the recipe at your data with "
            "--set data.root=/path/to/imagenet (a folder with train/<class>/*.JPEG), or run recipes/demo.yaml"
        )
    return root


@dataclass
class Batch:
    """What the loader yields and a task's ``step`` receives."""

    images: torch.Tensor  # (B, C, H, W), normalised
    targets: torch.Tensor  # (B,) class index, -1 when the dataset has no labels
    seeds: torch.Tensor  # (B,) int64 per-sample seeds (see :func:`sample_seed`)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, error) skipped while building this batch

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.seeds, self.bad)

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.targets.to(device, non_blocking=non_blocking), self.seeds, self.bad)


def collate(items: list[tuple[torch.Tensor, int, int, list[tuple[str, str]]]]) -> Batch:
    images, targets, seeds, bad = zip(*items, strict=True)
    return Batch(torch.stack(images), torch.as_tensor(targets, dtype=torch.long),
                 torch.as_tensor(seeds, dtype=torch.long), [p for b in bad for p in b])


def _describe(path: str, error: str) -> str:
    return f"{path} ({error})"


class UnreadableFiles:
    """The distinct unreadable files of a run, over all ranks, epochs and resumes.

    A bad file is met again every epoch, and also by each position whose retry walks over it, so counting
    meetings overstates the damage (3 bad files read as "4", then "8" after two epochs). Each rank records the
    files new to it (:meth:`add`); :meth:`sync` merges them across ranks at the engine's log window.
    """

    def __init__(self, files: dict[str, str] | None = None) -> None:
        self.files: dict[str, str] = dict(files or {})  # path -> error, in the order first met
        self._pending: dict[str, str] = {}

    @classmethod
    def from_state(cls, stats: dict[str, Any] | None) -> UnreadableFiles:
        return cls((stats or {}).get("bad_files"))

    def add(self, bad: Iterable[tuple[str, str]]) -> int:
        """Record a batch's skipped files; returns how many this rank had not seen yet."""
        new = 0
        for path, error in bad:
            if path not in self.files and path not in self._pending:
                self._pending[path] = error
                new += 1
        return new

    def sync(self, gather: Callable[[Any], list[Any]]) -> int:
        """Merge every rank's new files (``gather``: an all-gather of one object per rank, called on every rank);
        returns how many files the run had not seen before."""
        before = len(self.files)
        for pending in gather(self._pending):
            for path, error in pending.items():
                self.files.setdefault(path, error)
        self._pending = {}
        return len(self.files) - before

    @property
    def count(self) -> int:
        return len(self.files)

    def examples(self, n: int) -> str:
        return "; ".join(_describe(p, e) for p, e in list(self.files.items())[:n])

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (``bad_images``/``bad_examples`` for readers, ``bad_files`` for resume)."""
        return {"bad_images": self.count, "bad_examples": [_describe(p, e) for p, e in list(self.files.items())[:10]],
                "bad_files": dict(self.files)}


def _decode_rgb(im: Image.Image) -> Image.Image:
    return im.convert("RGB")  # convert() decodes


class SampleDataset(Dataset):
    """A timm dataset's reader, indexed by ``(index, seed)``; augments under that seed and survives bad files."""

    def __init__(self, reader: Any, transform: Callable[[Image.Image], torch.Tensor] | FastPretrainTransform | None,
                 root: str) -> None:
        self.reader = reader
        self.transform = transform
        self.root = root

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        try:
            return str(self.reader.filename(index, absolute=True))
        except Exception:  # noqa: BLE001 - readers without file names (e.g. hfds)
            return f"{self.root}[{index}]"

    def load_image(self, index: int, decode: Callable[[Image.Image], Any] = _decode_rgb) -> tuple[Any, int]:
        """``decode`` of the image at ``index``; it gets the image opened but not yet decoded."""
        img, target, *_ = self.reader[index]
        if isinstance(img, Image.Image):
            return decode(img), target
        try:
            with Image.open(img) as im:
                return decode(im), target  # decoding happens here, so truncated files fail here
        finally:
            close = getattr(img, "close", None)
            if close is not None:
                close()

    def load(self, index: int, decode: Callable[[Image.Image], Any] = _decode_rgb,
             ) -> tuple[Any, int, list[tuple[str, str]]]:
        """The image at ``index`` or, if unreadable, the next readable one; plus the (file, error) skipped."""
        bad: list[tuple[str, str]] = []
        n = len(self)
        for attempt in range(_MAX_RETRIES):
            i = (index + attempt) % n
            try:
                img, target = self.load_image(i, decode)
                return img, target, bad
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                bad.append((self.filename(i), f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        raise DataError(f"{_MAX_RETRIES} consecutive unreadable images starting at {_describe(*bad[0])}; "
                        "check the dataset")

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, list[tuple[str, str]]]:
        index, seed = item
        tf = self.transform
        if isinstance(tf, FastPretrainTransform):  # draws come first: they decide how small to decode
            (pixels, params), target, bad = self.load(index, lambda im: tf.decode(im, seed))
            return tf.finish(pixels, params), -1 if target is None else int(target), seed, bad
        img, target, bad = self.load(index)
        # The augmentation draws from torch's global RNG: run it under this sample's seed, restore afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0))
            x = tf(img) if tf is not None else img
        return x, -1 if target is None else int(target), seed, bad


_SPLIT_SYNONYMS = (("train", "training"), ("val", "valid", "validation", "eval", "evaluation"))


def _split_folder(root: Path, split: str) -> Path:
    """``root/<split>``, else a synonym of it, else ``root``: timm's ``create_dataset`` split search."""
    name = split.split("[")[0]
    if (root / name).exists():
        return root / name
    for group in _SPLIT_SYNONYMS:
        if name in group:
            return next((root / s for s in group if (root / s).exists()), root)
    return root


class ScannedImageFolder(ReaderImageFolder):
    """timm's folder reader over :func:`~mffzoo.data.scan.walk_images`: for a folder without link loops the very
    samples, labels and order of timm's ``find_images_and_targets`` (labels: leaf folder names in
    ``natural_key`` order); a link back to an ancestor folder is not followed (timm's ``os.walk`` followed it
    up to the kernel's ELOOP limit, counting 32 images as 14,432) and each real image counts once."""

    def __init__(self, root: str | os.PathLike[str], class_map: dict[str, int] | str = "") -> None:
        Reader.__init__(self)
        self.root = root = os.fspath(root)
        types = get_img_extensions(as_set=True)
        scan, walk = walk_images(root, lambda name: os.path.splitext(name)[1].lower() in types)
        files: list[str] = []
        labels: list[str] = []
        for folder, names in walk:
            label = os.path.basename(os.path.relpath(folder, root)) if folder != root else ""
            files += [os.path.join(folder, n) for n in names]
            labels += [label] * len(names)
        scan.report(_logger)
        self.class_to_idx = (load_class_map(class_map, root) if class_map else
                             {c: i for i, c in enumerate(sorted(set(labels), key=natural_key))})
        samples = [(f, self.class_to_idx[c]) for f, c in zip(files, labels, strict=True) if c in self.class_to_idx]
        self.samples = sorted(samples, key=lambda s: natural_key(s[0]))
        if not self.samples:
            raise RuntimeError(f"Found 0 images in subfolders of {root}. Supported image extensions are "
                               f"{', '.join(get_img_extensions())}")


def open_image_dataset(name: str, root: Path, split: str, *, is_training: bool,
                       class_map: dict[str, int] | None = None, transform: Callable[[Any], Any] | None = None,
                       ) -> Any:
    """timm's ``create_dataset`` for a recipe's data, with the two scans timm trusts made safe: an image folder is
    read by :class:`ScannedImageFolder` (link loops), a ``.tar`` root is checked by
    :func:`~mffzoo.data.scan.check_tar` first (random bytes, a cut-off archive, no images: one DataError line)."""
    if not name and root.is_dir():
        folder = _split_folder(root, split)
        return ImageDataset(str(folder), reader=ScannedImageFolder(folder, class_map or ""), transform=transform)
    if not name and root.is_file() and root.suffix == ".tar":
        check_tar(root, get_img_extensions(as_set=True))
    extra = {"transform": transform} if transform is not None else {}
    return create_dataset(name, root=str(root), split=split, is_training=is_training, class_map=class_map, **extra)


def build_dataset(cfg: DataConfig, transform: Callable[[Image.Image], torch.Tensor] | FastPretrainTransform | None,
                  ) -> SampleDataset:
    """Open the recipe's dataset through timm's ``create_dataset`` (folder, tar, Hugging Face datasets)."""


    if cfg.dataset.lower().startswith("hfds/") and importlib.util.find_spec("datasets") is None:
        raise DataError(f"data.dataset '{cfg.dataset}' needs Hugging Face datasets; pip install datasets")
    root = resolve_root(cfg)
    try:
        ds = open_image_dataset(cfg.dataset, root, cfg.split, is_training=True)
    except DataError:
        raise
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot read dataset at data.root '{root}' ({msg[:160]}); expected an ImageNet-style folder "
            "(train/<class>/*.JPEG) or set --set data.root=/path/to/imagenet"
        ) from None
    reader = getattr(ds, "reader", None)
    if reader is None:
        raise DataError(f"data.dataset '{cfg.dataset}' has no random-access reader; use an image folder or hfds/")
    if len(reader) == 0:
        raise DataError(f"dataset at '{root}' is empty; check data.root and data.split")
    return SampleDataset(reader, transform, str(root))


# --------------------------------------------------------------------------------------------- sampler
class GlobalBatchSampler(Sampler):
    """Yields ``(index, seed)`` for this rank, one optimizer step (global batch) after another.

    Each epoch is a permutation seeded by (seed, epoch). Global batch ``s`` is positions ``[s*B, (s+1)*B)``;
    it is cut into ``world_size x accum`` micro-batches of ``batch_per_device`` and micro-batch ``a`` of rank
    ``r`` is chunk ``a * world_size + r``. The last incomplete global batch is dropped (as MAE). Unlike
    ``DistributedSampler`` it can start mid-epoch (``set_epoch(epoch, start_step)``) and keeps the same global
    batches on any world size, which is what makes exact resume and 1-vs-N equivalence hold.
    """

    def __init__(self, num_samples: int, batch_size: int, batch_per_device: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        per_step = batch_per_device * world_size
        if batch_size % per_step:
            raise ValueError(f"batch_size {batch_size} not divisible by batch_per_device x world_size {per_step}")
        self.num_samples, self.batch_size, self.batch_per_device = num_samples, batch_size, batch_per_device
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.accum = batch_size // per_step
        self.steps_per_epoch = num_samples // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size}

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5EED))
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step) * self.accum * self.batch_per_device

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation().tolist()
        b, pd = self.batch_size, self.batch_per_device
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.accum):
                start = step * b + (micro * self.world_size + self.rank) * pd
                for idx in perm[start:start + pd]:
                    yield idx, sample_seed(self.seed, self.epoch, idx)


def _worker_init(worker_id: int) -> None:
    # Schedulers, `timeout` and torchrun signal the whole process group: a worker that died of SIGTERM (torch's
    # worker handler) or SIGINT took the main process down before it could checkpoint. The main process owns
    # shutdown; it stops its workers itself, and SIGKILL still ends them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Augmentation and masking are seeded per sample; this only makes stray numpy/random use reproducible.
    info = torch.utils.data.get_worker_info()
    base = info.seed if info is not None else worker_id
    np.random.seed(derive_seed(base, 1) % 2**32)
    random.seed(derive_seed(base, 2))


def build_loader(dataset: SampleDataset, sampler: GlobalBatchSampler, cfg: DataConfig, *, pin_memory: bool,
                 seed: int, rank: int) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=sampler.batch_per_device,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory and cfg.pin_memory,
        drop_last=False,  # the sampler already yields whole micro-batches only
        persistent_workers=workers > 0 and cfg.persistent_workers,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # A private generator: creating an iterator must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(derive_seed(seed, rank, 0x10AD)),
    )
