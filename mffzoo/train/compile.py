"""Whether to ``torch.compile`` the training model (``train.compile: auto|true|false``), and compiling it.

Compilation pays back only over enough steps: ~95 s of compilation for a 1.14x faster ViT-S/16 step on an AMX
CPU under bf16 (issue 13), minutes for a large model. ``auto`` therefore compiles on CUDA (any real GPU run
amortises it) and on a CPU only when the estimated saving of the remaining run exceeds the compile time::

    remaining steps x eager step time x expected gain  >  compile time

The eager step time is measured before training (:func:`time_eager_step`: two forward+backward passes on a
synthetic batch, under a forked RNG, gradients restored afterwards, so the run itself is unchanged). Compile time
and gain come from an on-disk cache of what earlier compiled runs of the same configuration measured
(:class:`CompileCache`, keyed by model shapes, batch, precision, device type and torch version), else from the
conservative defaults below. Each compiled run times its first steps and records them (:class:`CompileRecorder`),
so the next decision uses measurements. The engine stores the decision in its checkpoints and a resumed run
keeps it: a resumed run computes what the interrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import cache_root, write_json
from .numerics import precision_name

_logger = logging.getLogger("mffzoo.train")

__all__ = ["CompileDecision", "CompileEstimate", "CompileCache", "CompileRecorder", "compile_for_training",
           "decide_compile", "time_eager_step", "DEFAULT_CPU_COMPILE_S", "DEFAULT_CPU_GAIN"]

# Defaults for a CPU without measurements of this configuration, by precision (rounded towards not compiling).
# bf16: issue 13's trial of torch.compile on the pretraining step, ViT-S/16 on an AMX CPU: ~95 s of compilation,
# 1.14x faster steps (12% of a step saved). fp32: `mffzoo bench train --recipe` on the AVX2 machine (2026-12-02,
# docs/benchmarks.md): compiled steps at 0.99x of eager for ViT-S/16 and ViT-B/16 after 105-117 s of cold
# compilation, i.e. no gain, so ``auto`` keeps fp32 CPU runs eager until a measurement here says otherwise.
DEFAULT_CPU_COMPILE_S = 90.0
DEFAULT_CPU_GAIN = {"bf16": 0.10, "fp16": 0.0, "fp32": 0.0}


@dataclass(frozen=True)
class CompileDecision:
    """Compile or not, and why (the reason is what the run's header line prints)."""

    enabled: bool
    reason: str

    def __str__(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"enabled": self.enabled, "reason": self.reason}

    @classmethod
    def from_state(cls, state: Any) -> CompileDecision | None:
        if not isinstance(state, dict) or not isinstance(state.get("enabled"), bool):
            return None
        return cls(state["enabled"], str(state.get("reason", "")))


@dataclass(frozen=True)
class CompileEstimate:
    """What compiling costs (seconds, once) and gains (the fraction of an eager step's time saved: 1.14x faster
    steps save 12%)."""

    compile_s: float
    gain: float
    measured: bool  # from this configuration's earlier runs, not the defaults

    @classmethod
    def default(cls, precision: str) -> CompileEstimate:
        """The unmeasured estimate for a CPU run at ``precision`` (``bf16``, ``fp16`` or ``fp32``)."""
        return cls(DEFAULT_CPU_COMPILE_S, DEFAULT_CPU_GAIN.get(precision, 0.0), measured=False)


def _secs(x: float) -> str:
    return f"{x:.0f} s" if abs(x) >= 10 else f"{x:.2g} s"


def decide_compile(mode: str | bool, device_type: str, *, remaining_steps: int, eager_step_s: float | None,
                   estimate: CompileEstimate) -> CompileDecision:
    """The policy, a pure function. ``mode`` is ``train.compile`` as the recipe validated it at load (``auto``,
    true or false); ``eager_step_s`` is one optimizer step's eager time (needed only for ``auto`` on a CPU)."""
    if mode is True or mode is False:
        return CompileDecision(mode, f"train.compile={str(mode).lower()}")
    if device_type == "cuda":
        return CompileDecision(True, "auto: on cuda")
    if device_type != "cpu" or eager_step_s is None:
        return CompileDecision(False, f"auto: no step time measured on {device_type}")
    saving = remaining_steps * eager_step_s * estimate.gain
    on = saving > estimate.compile_s
    source = "measured" if estimate.measured else "default estimate"
    return CompileDecision(on, f"auto: {remaining_steps} steps x {_secs(eager_step_s)} x {estimate.gain:.0%} = "
                               f"{_secs(saving)} {'>' if on else '<'} ~{_secs(estimate.compile_s)} compile on cpu, "
                               f"{source}")


def compile_for_training(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``torch.compile`` the module a training step calls (or return it unchanged when not ``enabled``).

    ``model`` may be DDP-wrapped: the wrapper is compiled, as PyTorch recommends for DDP (TorchDynamo's
    DDPOptimizer splits the graph at DDP's bucket boundaries, so gradient all-reduce still overlaps the backward,
    and ``no_sync`` keeps working). An FSDP2 model (``fully_shard`` applied in place) is compiled as it is. The
    result is a wrapper whose ``state_dict`` keys carry ``_orig_mod.``: save from the unwrapped module."""
    return torch.compile(model) if enabled else model


def time_eager_step(model: nn.Module, step: Callable[[], torch.Tensor], device: torch.device,
                    repeats: int = 2) -> float:
    """Seconds of one eager forward+backward (``step`` returns the loss), timed on the last of ``repeats`` (the
    first one pays one-time allocation). Runs under a forked RNG and puts every gradient back as it was, so a run
    with the probe is bit-identical to one without."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    elapsed = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step().backward()
            _sync(device)
            elapsed = time.perf_counter() - t0
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileCache:
    """Measured compile time and compiled/eager step times of one configuration: a small JSON file under
    ``<cache root>/compile/``, written atomically."""

    def __init__(self, key: dict[str, Any], root: Path | None = None) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = (root or cache_root() / "compile") / f"{digest}.json"

    @staticmethod
    def key_for(model: nn.Module, sample_shape: tuple[int, ...], batch_per_device: int,
                amp_dtype: torch.dtype | None, device: torch.device) -> dict[str, Any]:
        """Architecture (class and every parameter's shape, hashed), batch, precision, device type, torch."""
        shapes = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in model.named_parameters()]).encode())
        return {"model": type(model).__name__, "params": shapes.hexdigest()[:20], "sample": list(sample_shape),
                "batch_per_device": batch_per_device, "precision": precision_name(amp_dtype),
                "device": device.type, "torch": torch.__version__}

    def estimate(self) -> CompileEstimate:
        """The measured estimate when this configuration was compiled before, else the defaults."""
        try:
            rec = json.loads(self.path.read_text())
            return CompileEstimate(float(rec["compile_s"]), float(rec["gain"]), measured=True)
        except (OSError, ValueError, KeyError, TypeError):
            return CompileEstimate.default(str(self.key.get("precision", "fp32")))

    def record(self, compile_s: float, eager_step_s: float, compiled_step_s: float) -> None:
        gain = 1.0 - compiled_step_s / eager_step_s if eager_step_s > 0 else 0.0  # the fraction of a step saved
        rec = {"key": self.key, "compile_s": round(max(compile_s, 0.0), 3), "gain": round(gain, 4),
               "eager_micro_step_s": round(eager_step_s, 5), "compiled_micro_step_s": round(compiled_step_s, 5),
               "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json(self.path, rec)
        except OSError as exc:  # a read-only cache must not stop training
            _logger.warning("could not record compile timings in %s (%s)", self.path, exc)


class CompileRecorder:
    """Times the first micro-steps of a compiled run and records, in ``cache``, the compile time (first compiled
    step minus an eager one) and the compiled step time (the fastest of the next two). A no-op when ``cache`` is
    None (not compiled, or not a single-process run) or there is no eager time."""

    MICRO_STEPS = 3

    def __init__(self, cache: CompileCache | None, eager_micro_step_s: float | None, device: torch.device) -> None:
        self.cache = cache if eager_micro_step_s is not None else None
        self.device = device
        self.eager_s = eager_micro_step_s or 0.0
        self.steps: list[float] = []

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.steps.append(time.perf_counter() - t0)
        if len(self.steps) == self.MICRO_STEPS:
            self._write()

    def step(self) -> contextlib.AbstractContextManager[None]:
        """Wrap one micro-step (forward + backward)."""
        if self.cache is None or len(self.steps) >= self.MICRO_STEPS:
            return contextlib.nullcontext()
        return self._timed()

    def _write(self) -> None:
        assert self.cache is not None
        first, rest = self.steps[0], self.steps[1:]
        compiled = min(rest)
        self.cache.record(first - self.eager_s, self.eager_s, compiled)
        _logger.info("compile: %.1f s to compile, micro-step %.3g s compiled vs %.3g s eager (recorded in %s)",
                     max(first - self.eager_s, 0.0), compiled, self.eager_s, self.cache.path)
