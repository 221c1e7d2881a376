"""The dataset: timm's readers (an image folder, a ``.tar``, Hugging Face datasets) opened with the scans timm
trusts made safe, indexed by ``(index, seed)``: item ``(index, seed)`` is that image augmented under that seed
(:class:`SampleDataset`), an unreadable image replaced by the next readable one (:mod:`.unreadable`)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from timm.data.readers.class_map import load_class_map
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from ...data.demo import default_demo_root, write_demo_dataset
from ...data.scan import check_tar, walk_images
from ...errors import DataError
from ..recipe import DEMO_ROOT, DataConfig
from .augment import FastPretrainTransform
from .seeds import derive_seed
from .unreadable import describe_unreadable

_logger = logging.getLogger("mffzoo.train")

__all__ = ["SampleDataset", "build_dataset", "open_image_dataset", "resolve_root", "ScannedImageFolder"]

_MAX_RETRIES = 10  # consecutive unreadable images before giving up on a position (as timm)


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
        raise DataError(f"{_MAX_RETRIES} consecutive unreadable images starting at {describe_unreadable(*bad[0])}; "
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
