"""Procedural, download-free image dataset for masked-image-modelling demos.

Every class is a *shape* painted with a *colour + texture*, and each shape and
each appearance is shared by several classes, so neither cue alone solves the
task. Backgrounds mix smooth gradients (low frequency) with noise, stripes and
clutter (high frequency), which keeps MAE/MFF reconstructions and frequency
analyses meaningful while a tiny ViT still learns in minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import default_demo_root
from ..progress import Progress

__all__ = ["DEMO_CLASSES", "DEMO_DATASET_VERSION", "default_demo_root", "write_demo_dataset"]

DEMO_DATASET_NAME = "mffzoo-demo-shapes"
# Bump whenever the pixels change, so cached copies are detected as stale.
DEMO_DATASET_VERSION = 1
_META_FILE = "demo_dataset.json"
_SPLITS = ("train", "val")
_BATCH = 64  # images rendered per numpy call; bounds memory for big datasets

_SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
# (name, base RGB in [0, 1], texture kind)
_APPEARANCES: tuple[tuple[str, tuple[float, float, float], str], ...] = (
    ("red", (0.86, 0.12, 0.10), "solid"),
    ("blue_striped", (0.12, 0.32, 0.92), "stripes"),
    ("green_checked", (0.10, 0.66, 0.20), "checks"),
    ("yellow_dotted", (0.97, 0.85, 0.10), "dots"),
    ("purple_wavy", (0.60, 0.20, 0.85), "waves"),
    ("orange_speckled", (1.00, 0.52, 0.05), "speckle"),
)


def _catalogue() -> tuple[tuple[str, int, int], ...]:
    # Diagonal walk over shape x appearance: any prefix of length >= 12 uses
    # every shape and every appearance at least twice, so both cues matter.
    n = len(_SHAPES)
    out = []
    for k in range(n * len(_APPEARANCES)):
        shape_id = k % n
        app_id = (shape_id + k // n) % len(_APPEARANCES)
        out.append((f"{_APPEARANCES[app_id][0]}_{_SHAPES[shape_id]}", shape_id, app_id))
    return tuple(out)


_CATALOGUE = _catalogue()
MAX_DEMO_CLASSES = len(_CATALOGUE)

#: Class names of the default 12-class dataset, sorted as ImageFolder indexes them.
DEMO_CLASSES: tuple[str, ...] = tuple(sorted(name for name, _, _ in _CATALOGUE[:12]))


# --------------------------------------------------------------------------- drawing
# Each image gets its own Generator (order-independent seeding) but only draws raw
# random vectors from it; all shaping of those numbers and all pixel work happens
# on whole batches in channel-first float32, because per-image numpy calls on
# 64x64 arrays are dominated by call overhead.

_F32 = np.float32
_TAU = 2 * math.pi
_NUM_BLOBS = 3
_NUM_UNIFORM = 96  # per-image uniform budget; columns are handed out by _Columns
_NOISE_GRID = 6


class _Columns:
    """Hands out consecutive columns of a (n, _NUM_UNIFORM) uniform matrix, rescaled."""

    def __init__(self, u: np.ndarray) -> None:
        self.u, self.i = u, 0

    def __call__(self, lo: float, hi: float, k: int = 0) -> np.ndarray:
        width = max(k, 1)
        x = self.u[:, self.i : self.i + width]
        self.i += width
        if self.i > self.u.shape[1]:
            raise RuntimeError("_NUM_UNIFORM too small")
        x = lo + (hi - lo) * x
        return x if k else x[:, 0]


def _b(x: np.ndarray) -> np.ndarray:
    """(n,) -> (n, 1, 1): per-image scalars broadcast over (n, h, w) fields."""
    return np.asarray(x, dtype=_F32)[:, None, None]


def _rgb(x: np.ndarray) -> np.ndarray:
    """(n, 3) -> (n, 3, 1, 1): per-image colours broadcast over (n, 3, h, w) images."""
    return np.asarray(x, dtype=_F32)[:, :, None, None]


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of coarse (n, c, k, k) grids via two small matmuls."""
    k = grid.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * k / size - 0.5, 0, k - 1)
    i0 = np.floor(pos).astype(np.intp)
    w = np.zeros((size, k), dtype=_F32)
    np.add.at(w, (np.arange(size), i0), 1 - (pos - i0))
    np.add.at(w, (np.arange(size), np.minimum(i0 + 1, k - 1)), pos - i0)
    return w @ grid.astype(_F32) @ w.T


def _muted(col: _Columns) -> np.ndarray:
    c = col(0.0, 1.0, 3)
    grey = c.mean(axis=1, keepdims=True)
    return np.clip(grey + (c - grey) * col(0.15, 0.6)[:, None], 0, 1) * col(0.45, 1.0)[:, None]


def _background(col: _Columns, z: np.ndarray, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    n = z.shape[0]
    c0, c1 = _muted(col), _muted(col)
    kind = np.minimum(col(0, 3).astype(np.intp), 2)
    angle, center, blotch = col(0, _TAU), col(0, s, 2), col(0, 1, 16).reshape(n, 1, 4, 4)
    t = np.empty((n, s, s), dtype=_F32)
    sel = kind == 0  # linear gradient
    if sel.any():
        g = xx * _b(np.cos(angle[sel])) + yy * _b(np.sin(angle[sel]))
        lo, hi = g.min(axis=(1, 2), keepdims=True), g.max(axis=(1, 2), keepdims=True)
        t[sel] = (g - lo) / np.maximum(hi - lo, 1e-6)
    sel = kind == 1  # radial gradient
    if sel.any():
        dy, dx = yy - _b(center[sel, 0]), xx - _b(center[sel, 1])
        g = np.sqrt(dy * dy + dx * dx)
        t[sel] = g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-6)
    sel = kind == 2  # blotchy two-colour noise
    if sel.any():
        t[sel] = _upsample(blotch[sel], s)[:, 0]
    img = _rgb(c0) + _rgb(c1 - c0) * t[:, None]

    # mid-frequency colour noise on every background
    grid = z[:, : 3 * _NOISE_GRID**2].reshape(n, 3, _NOISE_GRID, _NOISE_GRID)
    img += _upsample(grid, s) * _rgb(col(0.02, 0.07)[:, None])

    # faint oriented texture on about half of them
    amp = col(0.03, 0.1) * (col(0, 1) < 0.5)
    a, period, phase = col(0, math.pi), col(3, 9), col(0, _TAU)
    arg = (xx * _b(np.cos(a)) + yy * _b(np.sin(a))) * _b(_TAU / period) + _b(phase)
    img += (np.sin(arg) * _b(amp))[:, None]

    # small muted clutter blobs
    count = col(0, _NUM_BLOBS + 1).astype(np.intp)
    radius, pos, squash = col(0.03 * s, 0.08 * s, _NUM_BLOBS), col(0, s, 2 * _NUM_BLOBS), col(0.5, 1.5, _NUM_BLOBS)
    for j in range(_NUM_BLOBS):
        colour = _muted(col)  # drawn for every blob so the column layout is fixed
        on = count > j
        if not on.any():
            continue
        dy, dx = (yy - _b(pos[:, 2 * j])) / _b(squash[:, j]), xx - _b(pos[:, 2 * j + 1])
        alpha = np.clip(_b(radius[:, j]) + 0.5 - np.sqrt(dy * dy + dx * dx), 0, 1) * _b(on)
        img += alpha[:, None] * (_rgb(colour) - img)
    return img


def _half_planes(u: np.ndarray, v: np.ndarray, count: int, offset: float, dist: float) -> list[np.ndarray]:
    """Which side of `count` lines (normals at offset + k*2pi/count, at distance dist) each point is on."""
    out = []
    for k in range(count):
        a = offset + k * _TAU / count
        out.append(u * _F32(math.cos(a)) + v * _F32(math.sin(a)) <= dist)
    return out


def _in_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # A pentagram is exactly the set of points violating at most one of its five edge lines.
    outside = sum((~h).astype(np.uint8) for h in _half_planes(u, v, 5, math.pi / 2 + math.pi / 5, 0.309))
    return outside <= 1


def _in_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = _half_planes(u, v, 3, -math.pi / 2, 0.58)  # inradius 0.58: an inscribed one looks small
    return h[0] & h[1] & h[2]


def _in_cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _in_ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


_SHAPE_FNS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 1.0,
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    _in_triangle,
    _in_cross,
    _in_ring,
    _in_star,
)


def _soft(x: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    """Signed periodic signal -> [0, 1] with roughly 1px anti-aliased edges."""
    return np.clip(x * _F32(sharpness), -1.0, 1.0) * _F32(0.5) + _F32(0.5)


def _fill(
    col: _Columns, z: np.ndarray, speckle: np.ndarray | None, app_id: int, tu: np.ndarray, tv: np.ndarray
) -> np.ndarray:
    _, base_rgb, texture = _APPEARANCES[app_id]
    tint = z[:, 3 * _NOISE_GRID**2 : 3 * _NOISE_GRID**2 + 3] * 0.03
    base = _rgb(np.clip(np.asarray(base_rgb) * col(0.8, 1.08)[:, None] + tint, 0, 1))
    period, ph0, ph1 = _b(col(4.0, 8.0)), _b(col(0, 1)), _b(col(0, 1))
    if texture == "solid":
        img = np.broadcast_to(base, base.shape[:2] + tu.shape[1:])
    elif texture == "stripes":
        q = _soft(np.sin(_F32(_TAU) * (tu / period + ph0)))
        img = base + (0.45 + 0.55 * base - base) * q[:, None]
    elif texture == "checks":
        q = (np.floor(tu / period + ph0) + np.floor(tv / period + ph1)) % 2
        img = base * (1 - 0.55 * q[:, None])
    elif texture == "dots":
        du = np.mod(tu / period + ph0, 1) - 0.5
        dv = np.mod(tv / period + ph1, 1) - 0.5
        q = np.clip((0.3 - np.sqrt(du * du + dv * dv)) * period + 0.5, 0, 1)
        img = base * (1 - 0.75 * q[:, None])
    elif texture == "waves":
        warp = 0.35 * np.sin(_F32(_TAU) * tv / (2.5 * period))
        q = _soft(np.sin(_F32(_TAU) * (tu / period + warp + ph0)))
        img = base * (0.55 + 0.6 * q[:, None])
    else:  # speckle
        assert speckle is not None
        img = base * (0.5 + 0.65 * speckle[:, None])
    return img


def _image_randomness(words: list[int], s: int, speckle: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(np.random.SeedSequence(words))
    out = [rng.random(_NUM_UNIFORM), rng.standard_normal(3 * _NOISE_GRID**2 + 3)]
    out.append(rng.standard_normal((3, s, s), dtype=_F32))
    if speckle:
        out.append(rng.random((s, s), dtype=_F32))
    return tuple(out)


def _render_batch(seeds: list[list[int]], shape_id: int, app_id: int, s: int) -> np.ndarray:
    """Render one class's images (one seed word list each) as (n, s, s, 3) uint8."""
    speckle = _APPEARANCES[app_id][2] == "speckle"
    parts = list(zip(*(_image_randomness(w, s, speckle) for w in seeds), strict=True))
    col, z, pixel_noise = _Columns(np.stack(parts[0])), np.stack(parts[1]), np.stack(parts[2])

    grid = np.arange(s, dtype=_F32) + 0.5
    yy, xx = grid[:, None], grid[None, :]
    img = _background(col, z, s, yy, xx)

    radius = col(0.2 * s, 0.36 * s)
    cy, cx = (radius[:, None] + (s - 2 * radius[:, None]) * col(0, 1, 2)).T
    angle, stretch, light = col(0, _TAU), col(0.85, 1.15), col(0, _TAU)
    ca, sa, cy, cx = _b(np.cos(angle)), _b(np.sin(angle)), _b(cy), _b(cx)

    def local(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x - cx) * ca + (y - cy) * sa, (y - cy) * ca - (x - cx) * sa

    # Silhouette at 2x resolution, box-filtered down: anti-aliased edges.
    fine = (np.arange(2 * s, dtype=_F32) + 0.5) / 2
    su, sv = local(fine[:, None], fine[None, :])
    f = _SHAPE_FNS[shape_id](su / _b(radius * stretch), sv * _b(stretch / radius)).astype(_F32)
    mask = ((f[:, ::2, ::2] + f[:, 1::2, ::2] + f[:, ::2, 1::2] + f[:, 1::2, 1::2]) * _F32(0.25))[:, None]

    tu, tv = local(yy, xx)
    fg = _fill(col, z, np.stack(parts[3]) if speckle else None, app_id, tu, tv)
    # directional shading so the shape reads as a lit surface, not a flat decal
    shade = 1.0 + 0.18 * np.clip((tu * _b(np.cos(light)) + tv * _b(np.sin(light))) / _b(radius), -1, 1)
    img += mask * (fg * shade[:, None] - img)
    img += pixel_noise * _F32(0.02)  # sensor-like pixel noise
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- dataset folder


def _metadata(classes: list[str], seed: int, image_size: int, train_per_class: int, val_per_class: int) -> dict:
    return {
        "name": DEMO_DATASET_NAME,
        "version": DEMO_DATASET_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_classes": len(classes),
        "classes": sorted(classes),
        "counts": {
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "train": train_per_class * len(classes),
            "val": val_per_class * len(classes),
        },
    }


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / _META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == DEMO_DATASET_NAME else None


def _is_complete(root: Path, meta: dict) -> bool:
    per_split = {"train": meta["counts"]["train_per_class"], "val": meta["counts"]["val_per_class"]}
    for split, count in per_split.items():
        for name in meta["classes"]:
            d = root / split / name
            if not d.is_dir() or sum(1 for _ in d.glob("*.png")) != count:
                return False
    return True


def _describe_mismatch(found: dict, wanted: dict) -> str:
    diffs = [f"{k}={found.get(k)!r} (wanted {wanted[k]!r})" for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(d if len(d) < 80 else d[:77] + "..." for d in diffs)


def _check_existing(root: Path, wanted: dict, overwrite: bool) -> bool:
    """True if `root` already holds the wanted dataset; raise if it holds something else."""
    if not root.exists():
        return False
    if root.is_dir() and not any(root.iterdir()):
        return False
    fix = "pass overwrite=True (--overwrite) or choose another directory"
    found = _read_meta(root) if root.is_dir() else None
    if found == wanted:
        if _is_complete(root, wanted):
            return True
        problem = f"{root} holds an incomplete demo dataset (files missing)"
    elif found is not None:
        problem = f"{root} holds a demo dataset with different parameters: {_describe_mismatch(found, wanted)}"
    else:
        problem = f"{root} already exists and is not an mffzoo demo dataset"
    if overwrite:
        return False
    raise ValueError(f"{problem}; {fix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _generate(tmp: Path, chosen: tuple[tuple[str, int, int], ...], meta: dict, root: Path) -> None:
    size, seed = meta["image_size"], meta["seed"]
    jobs = []
    for split_id, split in enumerate(_SPLITS):
        count = meta["counts"][f"{split}_per_class"]
        for class_id, (name, shape_id, app_id) in enumerate(chosen):
            out_dir = tmp / split / name
            out_dir.mkdir(parents=True)
            for start in range(0, count, _BATCH):
                indices = range(start, min(start + _BATCH, count))
                jobs.append((out_dir, indices, [[seed, split_id, class_id, i] for i in indices], shape_id, app_id))

    def run(job: tuple) -> int:
        out_dir, indices, seeds, shape_id, app_id = job
        for i, pixels in zip(indices, _render_batch(seeds, shape_id, app_id, size), strict=True):
            Image.fromarray(pixels).save(out_dir / f"{i:05d}.png", format="PNG", compress_level=6)
        return len(indices)

    total = sum(len(job[1]) for job in jobs)
    # Threads suffice: large numpy ops and PNG compression both release the GIL.
    pool = ThreadPoolExecutor(max_workers=min(4, _cpu_count()))
    try:
        with Progress(total=total, desc=f"writing the demo dataset ({total} images, {size} px) to {root}",
                      unit="img") as progress:
            for n in pool.map(run, jobs):
                progress.update(n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # Metadata last: its presence marks the tree as complete.
    (tmp / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, root: Path, meta: dict, overwrite: bool) -> None:
    if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
        root.rmdir()
    if not (root.exists() or root.is_symlink()):
        try:
            tmp.rename(root)
            return
        except OSError:
            if not root.exists():
                raise
    # Something appeared at root meanwhile (or overwrite=True replaces it).
    if _read_meta(root) == meta and _is_complete(root, meta):
        _remove(tmp)  # a concurrent writer produced the same dataset first
        return
    if not overwrite:
        raise ValueError(f"{root} was created by someone else meanwhile; pass overwrite=True (--overwrite) or retry")
    old = root.with_name(f"{root.name}.old-{os.getpid()}")
    _remove(old)
    root.rename(old)
    try:
        tmp.rename(root)
    except OSError:
        old.rename(root)
        raise
    _remove(old)


def write_demo_dataset(
    root: str | os.PathLike,
    *,
    num_classes: int = 12,
    train_per_class: int = 200,
    val_per_class: int = 40,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Materialise the demo dataset as an ImageFolder tree, reusing a matching copy.

    Images are written to ``<root>.tmp-<pid>`` and renamed into place, so an
    interrupted run never leaves a tree that looks complete. Each image is seeded
    from ``(seed, split, class, index)``: reruns are byte-identical and a smaller
    dataset is a prefix of a larger one. ``overwrite`` only matters when ``root``
    holds something else; a matching dataset is always reused as is. The sizes are checked
    here, as this is public API called with plain ints (a recipe's ``data.demo`` is also
    checked at load, so a training run fails before it gets here).
    """
    num_classes, train_per_class, val_per_class = map(operator.index, (num_classes, train_per_class, val_per_class))
    image_size, seed = operator.index(image_size), operator.index(seed)
    if not 1 <= num_classes <= MAX_DEMO_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_DEMO_CLASSES}], got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class and val_per_class must be >= 1, got {train_per_class}, {val_per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    root = Path(root).expanduser().absolute()
    chosen = _CATALOGUE[:num_classes]
    meta = _metadata([name for name, _, _ in chosen], seed, image_size, train_per_class, val_per_class)
    if _check_existing(root, meta, overwrite):
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        _generate(tmp, chosen, meta, root)
        _publish(tmp, root, meta, overwrite)
    finally:
        if tmp.exists():
            _remove(tmp)
    return root
