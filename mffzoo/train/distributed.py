"""Process-group setup from torchrun's environment (NCCL on GPU, gloo on CPU) and the few collectives we use.

Without torchrun (or with ``WORLD_SIZE=1``) nothing is initialised and every helper is a no-op, so the same
engine code runs single-process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistEnv", "init_distributed", "destroy", "all_reduce", "all_gather_object", "barrier", "StopVote"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is visible; use --set train.device=cpu")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {n} CUDA devices; lower --nproc_per_node to {n}")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def destroy(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) across ranks; identity single-process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


class StopVote:
    """Ranks agree on a stop request (a signal number, 0 = none) one optimizer step late, at no cost to the
    training stream.

    Every step, :meth:`poll` waits for the vote it started the step before and starts the next: an async
    all-reduce (MAX) of one CPU int on a gloo group of its own, so NCCL/DDP/FSDP collectives and the GPU queue
    never wait on it, and a request seen by any rank during step k stops every rank after step k + 1. All ranks
    call :meth:`poll` at the same steps (they step in lockstep), which keeps the collectives matched. Single
    process: the local request, at once.
    """

    def __init__(self, env: DistEnv) -> None:
        self.distributed = env.distributed and dist.is_initialized()
        self.group: Any = None
        if self.distributed:  # collective: every rank creates it, in the same order
            self.group = dist.new_group(backend="gloo")
        self._work: Any = None
        self._buf = torch.zeros(1, dtype=torch.int32)

    def _wait(self) -> int:
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._buf.item())

    def poll(self, local: int, sync: bool = False) -> int:
        """The agreed request: the vote of the previous call (and, with ``sync``, of this one, blocking)."""
        if not self.distributed:
            return local
        agreed = self._wait()
        self._buf = torch.tensor([local], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if sync:
            agreed = max(agreed, self._wait())
        return agreed

    def close(self) -> None:
        """Finish the vote in flight (before the process group goes away)."""
        if self.distributed:
            self._wait()


def all_gather_object(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
