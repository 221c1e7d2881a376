"""A run's numerics: the autocast precision (with its fallback where the hardware lacks it), TF32 and
deterministic-algorithm switches, and the one spelling of a precision (``bf16``, ``fp16``, ``fp32``, as recipes
write it) that logs, caches and checkpoints use."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..cpu import cpu_features
from ..errors import ConfigError

_logger = logging.getLogger("mffzoo.train")

__all__ = ["Tf32", "numerics", "precision_name", "resolve_precision"]


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``bf16``/``fp16``/``fp32`` for an autocast dtype (None: no autocast), as recipes spell precisions."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype,
                                                                             str(amp_dtype).replace("torch.", ""))


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler); bf16 falls back where the hardware lacks it. No global state
    changes here: TF32 for the ops autocast leaves in fp32 is :class:`Tf32`'s, for the duration of a run."""
    if name == "fp32":
        return None, False
    if name == "fp16":
        return torch.float16, True
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        _logger.warning("bf16 is not supported on %s; using fp16 + GradScaler", torch.cuda.get_device_name())
        return torch.float16, True
    cpu = cpu_features()
    if cpu.native_bf16:
        return torch.bfloat16, False
    _logger.warning("this CPU (%s, %s) has no native bf16 (that needs AVX512-BF16 or AMX); training in fp32",
                    cpu.model, cpu.kind.upper())
    return None, False


class Tf32:
    """While active, allow TF32 in CUDA matmuls and convolutions (with mixed precision on a GPU: the ops autocast
    leaves in fp32 may use TF32 too); restores the previous flags on exit, so a process that also runs true fp32
    code (the benchmark's peer, a parity check) is not switched to TF32 behind its back. Reusable."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._saved: list[tuple[bool, bool]] = []

    @classmethod
    def for_run(cls, device: torch.device, amp_dtype: torch.dtype | None) -> Tf32:
        return cls(device.type == "cuda" and amp_dtype is not None)

    def __enter__(self) -> Tf32:
        self._saved.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        if self.enabled:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved.pop()


@contextlib.contextmanager
def numerics(tc: Any, device: torch.device) -> Iterator[None]:
    """The run's global numeric settings, restored afterwards: TF32 under mixed precision on CUDA, and with
    ``train.deterministic`` torch's deterministic algorithms (deterministic SDPA backward, scatter/index_add),
    cuDNN without autotuning, and the cuBLAS workspace setting deterministic cuBLAS needs."""
    det = bool(getattr(tc, "deterministic", False))
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if det:
        # read when torch creates its cuBLAS handles (lazily, at the first matmul): set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with Tf32(device.type == "cuda" and tc.precision != "fp32"):  # on CUDA every non-fp32 precision autocasts
            yield
    except RuntimeError as exc:
        if det and "deterministic" in str(exc):
            raise ConfigError(f"train.deterministic: {str(exc).splitlines()[0][:200]}; set "
                              "--set train.deterministic=false to train with this operation") from None
        raise
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
