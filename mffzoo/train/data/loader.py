"""The loader: what it yields (:class:`Batch`), how items become one (:func:`collate`), and the ``DataLoader``
over a dataset and sampler with its workers seeded and shielded from the signals the main process handles."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..recipe import DataConfig
from .dataset import SampleDataset
from .sampler import GlobalBatchSampler
from .seeds import derive_seed

__all__ = ["Batch", "collate", "build_loader"]


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
    """The run's loader: ``sampler``'s micro-batches of ``dataset`` items, collated into :class:`Batch`."""
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
