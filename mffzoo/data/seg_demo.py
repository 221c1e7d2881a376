"""Procedural, download-free segmentation dataset in the ADE20K layout, for ``mffzoo eval seg --data demo``.

Each image is one of the classification demo's backgrounds (:mod:`mffzoo.data.demo`: gradients, noise, stripes,
muted clutter blobs) with one to three shapes painted over it, later shapes occluding earlier ones. An object class
is a shape with its own colour and texture (the demo's diagonal catalogue: ``red_circle``, ``blue_striped_square``,
..., ``blue_striped_circle``: from the seventh class on, a colour/texture is shared by two shapes, so appearance
alone does not name the class). Images have varied sizes (each side drawn from ``[min_size, max_size]``).

The tree is what ``ADEChallengeData2016`` ships, so the loader that reads the real dataset reads this one::

    images/training/demo_train_00000.png        annotations/training/demo_train_00000.png
    images/validation/demo_val_00000.png        annotations/validation/demo_val_00000.png

Masks are single-channel PNGs: 1 = background, 2.. = the object classes in catalogue order, 0 = ignore. The masks
are exact: shapes are rasterised at 2x and box-filtered, as in the classification demo; a pixel a shape covers
completely has the shape's label, a pixel it covers partly is a blend of two regions and is 0 (ignore). Nothing
else is ignored. ``objects.json`` lists each image's shapes (label, shape, centre, radius, angle, stretch).

Each image is seeded from ``(seed, split, index)``: reruns are byte-identical and a smaller dataset is a prefix of
a larger one. The tree is written to ``<root>.tmp-<pid>`` and renamed into place, the metadata file last.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import cache_root
from ..progress import Progress
from .demo import _APPEARANCES, _CATALOGUE, _NOISE_GRID, _NUM_UNIFORM, _SHAPE_FNS, _background, _Columns, _fill

__all__ = ["SEG_DEMO_META", "SEG_DEMO_VERSION", "SEG_SPLITS", "MAX_SEG_DEMO_OBJECTS", "default_seg_demo_root",
           "read_seg_demo_meta", "render_seg_sample", "write_seg_demo_dataset"]

SEG_DEMO_NAME = "mffzoo-seg-demo-shapes"
# Bump whenever the pixels change (also when demo.py's backgrounds or fills change), so cached copies are stale.
SEG_DEMO_VERSION = 1
SEG_DEMO_META = "seg_demo_dataset.json"
SEG_SPLITS = ("training", "validation")
_PREFIX = {"training": "demo_train", "validation": "demo_val"}
MAX_SEG_DEMO_OBJECTS = len(_CATALOGUE)
_MAX_SHAPES = 3  # shapes per image: 1 to 3
_F32 = np.float32


def default_seg_demo_root() -> Path:
    """``$MFFZOO_SEG_DEMO_DATA``, else ``<cache root>/seg-demo-data`` (beside the classification demo's
    ``demo-data``), so every ``eval seg --data demo`` reuses one copy."""
    override = os.environ.get("MFFZOO_SEG_DEMO_DATA")
    return Path(override).expanduser() if override else cache_root() / "seg-demo-data"


def read_seg_demo_meta(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The demo's metadata (``num_classes``, ``classes`` by label 1..), or None if ``root`` holds no demo tree."""
    try:
        meta = json.loads((Path(root) / SEG_DEMO_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == SEG_DEMO_NAME else None


# --------------------------------------------------------------------------- drawing
def _paint_shape(rng: np.random.Generator, img: np.ndarray, label: np.ndarray, obj_class: int,
                 obj_label: int) -> dict[str, Any]:
    """Paint one shape of catalogue class ``obj_class`` over ``img`` (1, 3, h, w) in place; full-coverage pixels
    get ``obj_label`` in ``label`` (h, w), partly covered ones 0 (ignore). Returns the shape's geometry."""
    h, w = img.shape[2:]
    name, shape_id, app_id = _CATALOGUE[obj_class]
    g = rng.random(7)
    short = min(h, w)
    radius = float(short * (0.14 + 0.14 * g[0]))
    cy, cx = float(radius * 0.6 + (h - 1.2 * radius) * g[1]), float(radius * 0.6 + (w - 1.2 * radius) * g[2])
    angle, stretch, light = float(math.tau * g[3]), float(0.8 + 0.45 * g[4]), float(math.tau * g[5])
    ca, sa = _F32(math.cos(angle)), _F32(math.sin(angle))

    def local(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x - cx) * ca + (y - cy) * sa, (y - cy) * ca - (x - cx) * sa

    fy = ((np.arange(2 * h, dtype=_F32) + 0.5) / 2)[:, None]
    fx = ((np.arange(2 * w, dtype=_F32) + 0.5) / 2)[None, :]
    su, sv = local(fy, fx)
    f = _SHAPE_FNS[shape_id](su / _F32(radius * stretch), sv * _F32(stretch / radius)).astype(_F32)
    cover = (f[::2, ::2] + f[1::2, ::2] + f[::2, 1::2] + f[1::2, 1::2]) * _F32(0.25)  # 0, .25, .5, .75 or 1

    yy, xx = np.arange(h, dtype=_F32)[:, None] + 0.5, np.arange(w, dtype=_F32)[None, :] + 0.5
    tu, tv = local(yy, xx)
    speckle = rng.random((1, h, w), dtype=_F32) if _APPEARANCES[app_id][2] == "speckle" else None
    z = rng.standard_normal((1, 3 * _NOISE_GRID**2 + 3))
    fg = _fill(_Columns(rng.random((1, 8))), z, speckle, app_id, tu[None], tv[None])
    shade = 1.0 + 0.18 * np.clip((tu * _F32(math.cos(light)) + tv * _F32(math.sin(light))) / _F32(radius), -1, 1)
    img += cover[None, None] * (fg * shade[None, None] - img)
    label[cover >= 1.0] = obj_label
    label[(cover > 0.0) & (cover < 1.0)] = 0
    return {"label": obj_label, "class": name, "shape": int(shape_id), "cy": round(cy, 4), "cx": round(cx, 4),
            "radius": round(radius, 4), "angle": round(angle, 6), "stretch": round(stretch, 6)}


def render_seg_sample(seed: int, split: str, index: int, *, num_objects: int = 8, min_size: int = 48,
                      max_size: int = 96) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One image (h, w, 3) uint8, its mask (h, w) uint8 (0 ignore, 1 background, 2.. objects) and its shapes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEG_SPLITS.index(split), index]))
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    s = max(h, w)
    col = _Columns(rng.random((1, _NUM_UNIFORM)))
    z = rng.standard_normal((1, 3 * _NOISE_GRID**2 + 3))
    grid = np.arange(s, dtype=_F32) + 0.5
    img = np.ascontiguousarray(_background(col, z, s, grid[:, None], grid[None, :])[:, :, :h, :w])
    label = np.ones((h, w), dtype=np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, _MAX_SHAPES + 1))):
        c = int(rng.integers(0, num_objects))
        objects.append(_paint_shape(rng, img, label, c, c + 2))
    img += rng.standard_normal((1, 3, h, w), dtype=_F32) * _F32(0.02)  # sensor-like pixel noise
    out = (np.clip(img[0], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(out), label, objects


# --------------------------------------------------------------------------- dataset folder
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _is_complete(root: Path, meta: dict[str, Any]) -> bool:
    for split in SEG_SPLITS:
        for sub in ("images", "annotations"):
            d = root / sub / split
            if not d.is_dir() or sum(1 for _ in d.glob("*.png")) != meta["counts"][split]:
                return False
    return True


def _reuse(root: Path, meta: dict[str, Any], overwrite: bool) -> bool:
    """True if ``root`` already holds this dataset; raise (ValueError) if it holds something else."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    found = read_seg_demo_meta(root) if root.is_dir() else None
    if found == meta and _is_complete(root, meta):
        return True
    if overwrite:
        return False
    what = ("an incomplete segmentation demo dataset" if found == meta else
            "a segmentation demo dataset with other parameters" if found is not None else
            "something that is not an mffzoo segmentation demo dataset")
    raise ValueError(f"{root} holds {what}; pass overwrite=True or choose another directory")


def _generate(tmp: Path, meta: dict[str, Any], root: Path) -> None:
    objects: dict[str, list[dict[str, Any]]] = {}
    total = sum(meta["counts"].values())
    kw = dict(num_objects=meta["num_classes"] - 1, min_size=meta["size_range"][0], max_size=meta["size_range"][1])
    with Progress(total=total, desc=f"writing the segmentation demo dataset ({total} images) to {root}",
                  unit="img") as progress:
        for split in SEG_SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for i in range(meta["counts"][split]):
                pixels, label, objs = render_seg_sample(meta["seed"], split, i, **kw)
                stem = f"{_PREFIX[split]}_{i:05d}"
                Image.fromarray(pixels).save(tmp / "images" / split / f"{stem}.png", compress_level=6)
                Image.fromarray(label, mode="L").save(tmp / "annotations" / split / f"{stem}.png", compress_level=6)
                objects[f"{split}/{stem}"] = objs
                progress.update(1)
    (tmp / "objects.json").write_text(json.dumps(objects, sort_keys=True) + "\n")
    (tmp / SEG_DEMO_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # last: marks it complete


def _publish(tmp: Path, root: Path, meta: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``root``; what is there (an empty folder, or what ``overwrite`` replaces) goes first."""
    aside = None
    if root.exists() or root.is_symlink():
        aside = root.with_name(f"{root.name}.old-{os.getpid()}")
        _remove(aside)
        root.rename(aside)
    try:
        tmp.rename(root)
    except OSError:  # a concurrent writer got there first: fine if it wrote the same dataset
        if read_seg_demo_meta(root) != meta or not _is_complete(root, meta):
            raise ValueError(f"{root} was created by someone else meanwhile; retry") from None
        _remove(tmp)
    finally:
        if aside is not None:
            _remove(aside)


def write_seg_demo_dataset(root: str | os.PathLike[str], *, num_objects: int = 8, train: int = 240,
                           val: int = 60, min_size: int = 48, max_size: int = 96, seed: int = 0,
                           overwrite: bool = False) -> Path:
    """Materialise the segmentation demo (``num_objects`` object classes + background) in the ADE20K layout,
    reusing a matching copy; ``train``/``val`` images per split, each side in ``[min_size, max_size]``."""
    num_objects, train, val = map(operator.index, (num_objects, train, val))
    min_size, max_size, seed = map(operator.index, (min_size, max_size, seed))
    if not 1 <= num_objects <= MAX_SEG_DEMO_OBJECTS:
        raise ValueError(f"num_objects must be in [1, {MAX_SEG_DEMO_OBJECTS}], got {num_objects}")
    if train < 1 or val < 1:
        raise ValueError(f"train and val must be >= 1, got {train}, {val}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root).expanduser().absolute()
    meta = {"name": SEG_DEMO_NAME, "version": SEG_DEMO_VERSION, "seed": seed, "num_classes": num_objects + 1,
            "classes": ["background", *(name for name, _, _ in _CATALOGUE[:num_objects])],
            "size_range": [min_size, max_size], "counts": {"training": train, "validation": val}}
    if _reuse(root, meta, overwrite):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    _remove(tmp)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        _generate(tmp, meta, root)
        _publish(tmp, root, meta)
    except BaseException:  # an interrupted or failed write leaves nothing behind
        _remove(tmp)
        raise
    return root
