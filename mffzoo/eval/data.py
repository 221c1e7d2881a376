"""ImageNet-style evaluation data: check the folder once, then build loaders with the model's own transforms.

Every evaluation (kNN, linear probe, fine-tune, filter analysis) reads ``ROOT/train/<class>/*`` and
``ROOT/val/<class>/*``. A missing split, an empty split or train/val class lists that differ would otherwise
show up as a shape error deep inside a head or as silently wrong labels, so they are one-line
:class:`~mffzoo.errors.DataError` here.

Class indices follow timm's folder reader (``create_dataset``, which the training engine uses): class folders
sorted by timm's ``natural_key`` (case-insensitive, numbers by value: ``apple, Bird, c1, c2, c10``). A plain
``sorted`` (torchvision's ``ImageFolder``) would give ``Bird, apple, c1, c10, c2`` and silently permute the
labels of a model trained on the engine's labels, so every split here uses :func:`class_to_idx`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform, resolve_data_config
from timm.utils.misc import natural_key
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data.scan import walk_images
from ..errors import DataError

__all__ = ["SPLITS", "class_order", "class_to_idx", "check_image_folder", "model_input_size", "eval_transform",
           "train_transform", "EvalImageFolder", "open_split", "open_splits", "make_loader", "load_split"]

SPLITS = ("train", "val")
_HINT = "expected ROOT/train/<class>/*.png and ROOT/val/<class>/*.png (`mffzoo data demo ROOT` writes one)"


def class_order(names: Iterable[str]) -> list[str]:
    """Class names in the order timm's folder reader indexes them (``natural_key``), i.e. the training labels."""
    return sorted(names, key=natural_key)


def class_to_idx(classes: Iterable[str]) -> dict[str, int]:
    """``{class: index}`` in timm's training order, whatever order ``classes`` came in."""
    return {c: i for i, c in enumerate(class_order(classes))}


def _class_dirs(split_dir: Path) -> list[str]:
    return class_order(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds a file ImageFolder reads; stops at the first one, so it is cheap."""
    exts = tuple(IMG_EXTENSIONS)
    _, walk = walk_images(folder, lambda path: path.lower().endswith(exts))  # a link loop is not followed
    return any(names for _, names in walk)


def check_image_folder(root: str | os.PathLike[str], splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Class names shared by every split of ``root`` in training-label order (:func:`class_order`), or a one-line
    :class:`DataError` saying what is wrong (missing/empty split, a class folder without images, a mismatch)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist; {_HINT}")
    classes: dict[str, list[str]] = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise DataError(f"dataset '{root}' has no {split}/ folder; {_HINT}")
        names = _class_dirs(d)
        if not names:
            raise DataError(f"dataset split '{d}' has no class folders; {_HINT}")
        classes[split] = names
    first, *rest = splits
    for split in rest:
        if classes[split] != classes[first]:
            only_a = sorted(set(classes[first]) - set(classes[split]))
            only_b = sorted(set(classes[split]) - set(classes[first]))
            parts = [f"only in {first}: {', '.join(only_a[:5])}" if only_a else "",
                     f"only in {split}: {', '.join(only_b[:5])}" if only_b else ""]
            raise DataError(
                f"class folders differ between {first}/ and {split}/ in '{root}' ({'; '.join(p for p in parts if p)}); "
                "both splits need the same class folders so labels mean the same thing"
            )
    for split in splits:  # last: the scan stops at each folder's first image, but it does touch every folder
        empty = [n for n in classes[split] if not _has_image(root / split / n)]
        if empty:
            raise DataError(f"class folder '{root / split / empty[0]}' has no images ({len(empty)} empty in {split}/); "
                            f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folder")
    return classes[first]


def model_input_size(model: nn.Module, img_size: int | None = None) -> int:
    """Square input side: the override, else the model's own patch-embed size, else its pretrained_cfg."""
    if img_size:
        return int(img_size)
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None and not getattr(pe, "dynamic_img_size", False):
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _data_config(model: nn.Module, img_size: int | None) -> dict[str, Any]:
    cfg = resolve_data_config(model=model)
    size = model_input_size(model, img_size)
    cfg["input_size"] = (3, size, size)
    return cfg


def eval_transform(model: nn.Module, img_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The model's pretrained_cfg test transform (resize, centre crop, its mean/std) at the model's input size."""
    return create_transform(**_data_config(model, img_size), is_training=False)


def train_transform(model: nn.Module, img_size: int | None = None, **aug: Any) -> Callable[[Any], torch.Tensor]:
    """timm's training transform (RandomResizedCrop + flip by default; ``aug`` passes RandAugment, mixup-free
    options such as ``auto_augment='rand-m9-mstd0.5-inc1'``, ``re_prob`` through to ``create_transform``)."""
    cfg = _data_config(model, img_size)
    cfg.pop("crop_pct", None)
    cfg.pop("crop_mode", None)
    return create_transform(**{**cfg, **aug}, is_training=True)


class EvalImageFolder(ImageFolder):
    """ImageFolder whose class indices are timm's training order (:func:`class_order`), not a plain sort."""

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        classes = _class_dirs(Path(directory))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, class_to_idx(classes)

    def make_dataset(  # type: ignore[override]  # torchvision declares it a staticmethod-like instance method
        self, directory: str | os.PathLike[str], class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None, is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """torchvision's listing (classes, then folders and files, each sorted) over
        :func:`~mffzoo.data.scan.walk_images`: its ``os.walk(followlinks=True)`` followed a link back to an
        ancestor folder until ELOOP, counting images many times over; here such links are skipped, each real
        image counts once, and one warning line says what was skipped."""
        directory = os.fspath(directory)
        if is_valid_file is None:
            exts = tuple(e.lower() for e in (extensions or IMG_EXTENSIONS))
            is_valid_file = lambda path: path.lower().endswith(exts)  # noqa: E731
        scan, walk = walk_images(directory, is_valid_file)
        found: dict[str, dict[str, list[str]]] = {}  # class -> folder -> file names
        for folder, names in walk:
            cls = os.path.relpath(folder, directory).split(os.sep)[0]
            if folder != directory and cls in class_to_idx and names:
                found.setdefault(cls, {}).setdefault(folder, []).extend(names)
        scan.report()
        samples = [(os.path.join(folder, n), class_to_idx[cls]) for cls in sorted(class_to_idx)
                   for folder in sorted(found.get(cls, {})) for n in sorted(found[cls][folder])]
        empty = [c for c in sorted(class_to_idx) if c not in found]
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(extensions or IMG_EXTENSIONS)}")
        return samples


def open_split(root: str | os.PathLike[str], split: str, transform: Callable[[Any], Any] | None) -> ImageFolder:
    """ImageFolder for one split with training-order labels; unreadable/empty class folders become a
    :class:`DataError`."""
    path = Path(root).expanduser() / split
    try:
        return EvalImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        msg = str(exc).splitlines()[0]  # torchvision's message already lists the supported extensions
        raise DataError(f"cannot read '{path}': {msg}") from None


def open_splits(
    root: str | os.PathLike[str],
    train_tf: Callable[[Any], Any] | None,
    val_tf: Callable[[Any], Any] | None,
) -> tuple[ImageFolder, ImageFolder]:
    """Checked (train, val) datasets with identical class-to-index maps."""
    check_image_folder(root)
    return open_split(root, "train", train_tf), open_split(root, "val", val_tf)


def make_loader(ds: torch.utils.data.Dataset, batch_size: int, *, shuffle: bool = False, workers: int = 0,
                drop_last: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last, generator=g, persistent_workers=False)


def load_split(ds: torch.utils.data.Dataset, *, limit: int | None = None, batch_size: int = 128,
                workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole (small) split as one ``(N, 3, H, W)`` tensor + labels, for analyses that transform images."""
    if limit is not None and limit < len(ds):
        # Spread the subset over all classes (ImageFolder is sorted by class).
        idx = torch.linspace(0, len(ds) - 1, limit).round().long().tolist()
        ds = torch.utils.data.Subset(ds, idx)
    xs, ys = [], []
    for x, y in make_loader(ds, batch_size, workers=workers):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
