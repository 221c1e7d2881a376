"""The sampler: which dataset items each rank reads, one optimizer step (global batch) after another."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .seeds import derive_seed, sample_seed

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(Sampler):
    """Yields ``(index, seed)`` for this rank, one optimizer step (global batch) after another.

    Each epoch is a permutation seeded by (seed, epoch). Global batch ``s`` is positions ``[s*B, (s+1)*B)``;
    it is cut into ``world_size x accum`` micro-batches of ``batch_per_device`` and micro-batch ``a`` of rank
    ``r`` is chunk ``a * world_size + r``. The last incomplete global batch is dropped (as MAE). Unlike
    ``DistributedSampler`` it can start mid-epoch (``set_epoch(epoch, start_step)``) and keeps the same global
    batches on any world size, which is what makes exact resume and 1-vs-N equivalence hold.
    ``batch_size`` is a multiple of ``batch_per_device x world_size``: the recipe checks it at load and
    :func:`~mffzoo.train.optim.accumulation_steps` for the run's world size, before a sampler is built.
    """

    def __init__(self, num_samples: int, batch_size: int, batch_per_device: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        per_step = batch_per_device * world_size
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
