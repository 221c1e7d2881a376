"""``mffzoo bench data``: the training loader alone (decode + augmentation + collate), fast vs plain decoding.

Both paths are the engine's own code (:func:`mffzoo.train.data.build_dataset`, ``pretrain_transform``,
``collate``, ``build_loader``) on the recipe's data settings; they differ only in ``data.fast_decode``. The peer
is ``plain``: PIL full decode + the torchvision augmentation (what ran before ``fast_decode``). Rounds interleave
the two paths (alternating which goes first) so that load from other processes hits both alike; each round
decodes every image once per path. "Per worker" is one process with one intra-op thread (what a DataLoader worker
gets); ``workers`` adds the multi-process loader (persistent workers, started before timing).

Without ``--data`` it measures generated ImageNet-sized photos: smooth colour fields, shapes, texture and noise,
500x375 JPEG quality 90 (about the size and entropy of an ImageNet JPEG), deterministic, cached on first use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..errors import ConfigError
from ..io import cache_root
from ..train.data import GlobalBatchSampler, SampleDataset, build_dataset, build_loader, collate, pretrain_transform
from ..train.recipe import PretrainRecipe, load_recipe
from .infer import _cpu_name

__all__ = ["PATHS", "DataBenchResult", "bench_jpegs", "run_data_bench", "workers_needed"]

PATHS = {"plain": False, "fast": True}  # name -> data.fast_decode
_JPEG_VERSION = 2  # bump when the generated pixels change


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image: a smooth colour field, a few soft-edged shapes, fine texture and sensor noise."""
    field_ = Image.fromarray(rng.integers(0, 256, (rng.integers(3, 7), rng.integers(3, 7), 3), dtype=np.uint8))
    img = field_.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    a = np.asarray(img, dtype=np.float32)
    # texture: noise low-passed to half resolution (foliage, fabric, grain), then per-pixel sensor noise
    t = rng.normal(0, 40, (h // 2, w // 2)).clip(-128, 127).astype(np.float32) + 128
    t = np.asarray(Image.fromarray(t.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
    a = a + t[..., None] * rng.uniform(0.5, 1.2) + rng.normal(0, rng.uniform(6, 14), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def bench_jpegs(num_images: int = 256, size: tuple[int, int] = (500, 375), quality: int = 90,
                root: str | os.PathLike[str] | None = None) -> Path:
    """An ImageNet-style folder (``train/<class>/*.JPEG``) of generated photos; written once, then reused."""
    w, h = size
    base = Path(root) if root is not None else cache_root()
    out = base / f"bench-jpegs-v{_JPEG_VERSION}-{w}x{h}-q{quality}-n{num_images}"
    if (out / "done").is_file():
        return out
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-jpegs-", dir=base))
    try:
        rng = np.random.default_rng(0xDA7A)
        for k in range(num_images):
            d = tmp / "train" / f"c{k % 8}"
            d.mkdir(parents=True, exist_ok=True)
            _photo(rng, w, h).save(d / f"{k:05d}.JPEG", "JPEG", quality=quality)
        (tmp / "done").write_text("")
        try:
            tmp.rename(out)  # atomic: a concurrent or killed writer never leaves a half-written folder
        except OSError:  # another process finished first
            if not (out / "done").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class PathResult:
    name: str
    fast_decode: bool
    in_process: list[float] = field(default_factory=list)  # img/s per round, one process, one thread
    workers: list[float] = field(default_factory=list)  # img/s per round with N loader workers (all of them)


@dataclass
class DataBenchResult:
    recipe: str
    augment: str
    img_size: int
    images: str
    num_images: int
    image_size: tuple[int, int] | None
    batch: int
    num_workers: int
    rounds: int
    paths: dict[str, PathResult]
    target_img_s: float | None = None
    machine: str = ""

    def per_worker(self, name: str) -> float:
        """Median img/s of one worker: with N workers, their total / N; else the in-process measurement."""
        r = self.paths[name]
        rates = [x / self.num_workers for x in r.workers] if r.workers else r.in_process
        return statistics.median(rates)

    def ratios(self, key: str) -> list[float]:
        """fast / plain per round (same round, so the same machine load)."""
        fast, plain = getattr(self.paths["fast"], key), getattr(self.paths["plain"], key)
        return [f / p for f, p in zip(fast, plain, strict=True)]

    def table(self) -> tuple[list[list[str]], list[str]]:
        rows = []
        for name, r in self.paths.items():
            row = [name, "true" if r.fast_decode else "false", f"{statistics.median(r.in_process):.0f}",
                   f"{min(r.in_process):.0f}..{max(r.in_process):.0f}"]
            if self.num_workers:
                row += [f"{statistics.median(r.workers):.0f}", f"{self.per_worker(name):.0f}"]
            if name == "fast":
                row.append(_ratio_text(self.ratios("in_process")))
                if self.num_workers:
                    row.append(_ratio_text(self.ratios("workers")))
            else:
                row += ["1.00 (peer)"] + (["1.00 (peer)"] if self.num_workers else [])
            if self.target_img_s:
                row.append(str(workers_needed(self.target_img_s, self.per_worker(name))))
            rows.append(row)
        header = ["path", "fast_decode", "img/s 1 worker", "spread"]
        if self.num_workers:
            header += [f"img/s {self.num_workers} workers", "per worker"]
        header += ["vs plain (1 worker)"] + ([f"vs plain ({self.num_workers} workers)"] if self.num_workers else [])
        if self.target_img_s:
            header.append(f"workers for {self.target_img_s:.0f} img/s")
        return rows, header

    def notes(self) -> list[str]:
        r = self.ratios("in_process")
        lines = [
            f"{self.recipe}: augment={self.augment}, img_size={self.img_size}, {self.num_images} images"
            + (f" of {self.image_size[0]}x{self.image_size[1]}" if self.image_size else "") + f" from {self.images},"
            f" batch {self.batch}, {self.rounds} interleaved rounds; {self.machine}",
            f"fast decode vs plain (PIL full decode + torchvision, the peer), 1 worker: "
            f"{statistics.median(r):.2f}x (rounds {min(r):.2f}..{max(r):.2f})",
        ]
        if self.target_img_s:
            lines.append(f"to feed {self.target_img_s:.0f} img/s per training process: "
                         f"{workers_needed(self.target_img_s, self.per_worker('fast'))} workers with fast_decode, "
                         f"{workers_needed(self.target_img_s, self.per_worker('plain'))} without (plus cores for "
                         "the training process itself)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio_in_process"] = self.ratios("in_process")
        d["ratio_workers"] = self.ratios("workers") if self.num_workers else []
        return d


def _ratio_text(r: list[float]) -> str:
    return f"{statistics.median(r):.2f}x ({min(r):.2f}..{max(r):.2f})"


def workers_needed(target_img_s: float, per_worker_img_s: float) -> int:
    """Loader workers (one core each) a training process needs to never wait for data at ``target_img_s``."""
    return max(1, math.ceil(target_img_s / per_worker_img_s))


def _epoch_in_process(ds: SampleDataset, sampler: GlobalBatchSampler) -> int:
    """Decode, augment and collate every batch of one epoch in this process; returns the images done."""
    items, n = [], 0
    for item in sampler:
        items.append(ds[item])
        if len(items) == sampler.batch_per_device:
            n += len(collate(items))
            items = []
    return n


def _epoch_loader(loader: torch.utils.data.DataLoader) -> int:
    return sum(len(b) for b in loader)


def _timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def run_data_bench(
    recipe: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (), *, data: str | None = None,
    num_images: int = 256, rounds: int = 3, num_workers: int = 2, batch: int | None = None,
    target_img_s: float | None = None, steps_per_s: float | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> DataBenchResult:
    """Loader throughput of both decoding paths of ``recipe``'s pretraining augmentation, interleaved."""
    if num_images < 2 or rounds < 1 or num_workers < 0:
        raise ConfigError(f"need --images >= 2, --rounds >= 1 and --workers >= 0, got {num_images}, {rounds}, "
                          f"{num_workers}; e.g. --images 256 --rounds 3 --workers 2")
    if (target_img_s is not None and target_img_s <= 0) or (steps_per_s is not None and steps_per_s <= 0):
        raise ConfigError("--target-img-s and --steps-per-s must be > 0; e.g. --target-img-s 1200 (a GPU's "
                          "training img/s per process)")
    if target_img_s is not None and steps_per_s is not None:
        raise ConfigError("give either --target-img-s or --steps-per-s, not both")
    r = load_recipe(recipe, overrides)
    if not isinstance(r, PretrainRecipe):  # pragma: no cover - load_recipe defaults to PretrainRecipe
        raise ConfigError(f"'{recipe}' is not a pretraining recipe; bench data measures the pretraining loader")
    bpd = batch if batch is not None else min(r.train.batch_per_device, 32)
    if steps_per_s is not None:
        target_img_s = steps_per_s * r.train.batch_per_device
    if data is None:
        root, image_size = bench_jpegs(num_images), (500, 375)
        log(f"images: {num_images} generated 500x375 JPEGs (quality 90) in {root}")
    else:
        root, image_size = Path(data), None
    base = dataclasses.replace(r.data, root=str(root), dataset="" if data is None else r.data.dataset)
    datasets = {}
    for name, fast in PATHS.items():
        cfg = dataclasses.replace(base, fast_decode=fast)
        datasets[name] = build_dataset(cfg, pretrain_transform(cfg, r.model.img_size))
    n = min(num_images, len(datasets["plain"]))
    if bpd < 1 or bpd > n:
        raise ConfigError(f"--batch {bpd} must be in 1..{n} (the images measured); lower --batch or raise --images")
    sampler = GlobalBatchSampler(n, bpd * (n // bpd), bpd, seed=r.train.seed)
    results = {name: PathResult(name, fast) for name, fast in PATHS.items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's setting; more threads on a shared box only spin
    try:
        for name, ds in datasets.items():  # warm-up: imports, file cache
            log(f"warm-up {name}")
            ds[next(iter(sampler))]
        for k in range(rounds):
            order = list(datasets) if k % 2 == 0 else list(datasets)[::-1]
            for name in order:
                results[name].in_process.append(_timed(lambda ds=datasets[name]: _epoch_in_process(ds, sampler)))
                log(f"round {k + 1}/{rounds} {name}, 1 worker: {results[name].in_process[-1]:.0f} img/s")
    finally:
        torch.set_num_threads(threads)
    if num_workers:
        loaders = {}
        for name, ds in datasets.items():
            cfg = dataclasses.replace(base, num_workers=num_workers, persistent_workers=True, fast_decode=PATHS[name])
            loaders[name] = build_loader(ds, sampler, cfg, pin_memory=False, seed=r.train.seed, rank=0)
        try:
            for name, loader in loaders.items():  # starts the (persistent) workers
                log(f"starting {num_workers} workers for {name}")
                _epoch_loader(loader)
            for k in range(rounds):
                order = list(loaders) if k % 2 == 0 else list(loaders)[::-1]
                for name in order:
                    results[name].workers.append(_timed(lambda ld=loaders[name]: _epoch_loader(ld)))
                    log(f"round {k + 1}/{rounds} {name}, {num_workers} workers: {results[name].workers[-1]:.0f} img/s")
        finally:
            for loader in loaders.values():
                it = getattr(loader, "_iterator", None)
                if it is not None:
                    it._shutdown_workers()
    return DataBenchResult(
        recipe=str(recipe), augment=r.data.augment, img_size=r.model.img_size, images=str(root), num_images=n,
        image_size=image_size, batch=bpd, num_workers=num_workers, rounds=rounds, paths=results,
        target_img_s=target_img_s, machine=f"{_cpu_name()}, {os.cpu_count()} cores",
    )
