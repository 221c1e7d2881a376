"""``train.attention`` and ``train.compile`` decided for a run, at its start: kept from the checkpoint a run
resumes (under ``auto``), or chosen by the rules of :mod:`mffzoo.train.attention` and :mod:`mffzoo.train.compile`,
which on a CPU may first measure the run's own model on a synthetic batch. Every rank takes rank 0's choice; the
run's RNG streams and gradients are left as they were, so a run with a probe is bit-identical to one without."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from .attention import AttentionChoice, choose_attention, set_attention
from .checkpoint import capture_rng, restore_rng
from .compile import CompileCache, CompileDecision, CompileEstimate, CompileRecorder, decide_compile, time_eager_step
from .data import Batch
from .distributed import all_gather_object, all_reduce
from .state import RunState

__all__ = ["decide_run_attention", "decide_run_compile"]

_KEPT = "kept from the checkpoint: "


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Every global RNG (torch, CUDA, numpy, python) as it was afterwards: transforms and tasks draw from any."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def decide_run_attention(s: RunState, amp: Any) -> None:
    """``train.attention`` -> ``s.choices.attention``, applied to the model. Under ``auto`` a resumed run keeps its
    checkpoint's kernel; a CPU run under bf16 measures both kernels on the run's attention calls first
    (:mod:`mffzoo.train.attention`). ``amp``: the run's autocast context."""
    kept, core = s.choices.attention, s.trainee.core
    if s.tc.attention == "auto" and kept is not None:
        s.choices.attention = AttentionChoice(kept.kernel, _KEPT + kept.reason.removeprefix(_KEPT))
        set_attention(core, kept.kernel)
        return
    forward = None
    if not s.trainee.sharded:  # FSDP2-sharded attention modules cannot be called on their own
        task = copy.copy(s.task)  # a task that counts its steps (attributes it rebinds) does not count the probe

        def forward() -> None:  # called only where a measurement is needed: no sample read otherwise
            batch = _synthetic_batch(s, s.dataset[(0, 0)][0])
            with amp:
                task.step(core, batch)
    with _rng_kept():
        choice = choose_attention(core, s.tc.attention, s.device, s.trainee.amp_dtype, forward)
    s.choices.attention = all_gather_object(choice)[0]
    set_attention(core, s.choices.attention.kernel)


def decide_run_compile(s: RunState, amp: Any) -> CompileRecorder:
    """``train.compile`` -> ``s.choices.compile``; returns the recorder that times a compiled run's first steps.
    Under ``auto`` a resumed run keeps the decision in its checkpoint (it computes what the interrupted run would
    have); on a CPU a fresh one measures an eager step first (:mod:`mffzoo.train.compile`)."""
    mode, device, amp_dtype = s.tc.compile, s.device, s.trainee.amp_dtype
    remaining = s.position.total_steps - s.position.global_step
    if mode is False:  # nothing to measure or record: no sample to read
        s.choices.compile = decide_compile(False, device.type, remaining_steps=remaining, eager_step_s=None,
                                           estimate=CompileEstimate.default("fp32"))
        return CompileRecorder(None, None, device)
    with _rng_kept():
        sample = s.dataset[(0, 0)][0]  # one sample: the shape of a synthetic batch and of the cache key
        key = CompileCache.key_for(s.trainee.core, tuple(sample.shape), s.tc.batch_per_device, amp_dtype, device)
        eager_micro = None
        kept = s.choices.compile
        if mode == "auto" and kept is not None:
            reason = kept.reason.removeprefix(_KEPT)  # the original reason, however often resumed
            s.choices.compile = CompileDecision(kept.enabled, _KEPT + reason)
        else:
            if mode == "auto" and device.type == "cpu" and remaining > 0:
                eager_micro = _probe_eager_step(s, sample, amp)
            decision = decide_compile(mode, device.type, remaining_steps=remaining,
                                      eager_step_s=None if eager_micro is None else eager_micro * s.position.accum,
                                      estimate=CompileCache(key).estimate())
            s.choices.compile = all_gather_object(decision)[0]
        # Timings are recorded from single-process runs only: under torchrun a step's time includes gradient
        # communication, which the probe (on the unwrapped module) leaves out.
        record = s.choices.compile.enabled and remaining > 0 and not s.env.distributed
        if record and eager_micro is None:
            eager_micro = _probe_eager_step(s, sample, amp)  # what the compile time is measured against
    return CompileRecorder(CompileCache(key) if record else None, eager_micro, device)


def _synthetic_batch(s: RunState, sample: torch.Tensor) -> Batch:
    """A micro-batch of ``sample``'s shape (seeded noise, label 0): what the probes time."""
    n, device = s.tc.batch_per_device, s.device
    images = torch.randn((n, *sample.shape), generator=torch.Generator().manual_seed(0)).to(device)
    return Batch(images, torch.zeros(n, dtype=torch.long, device=device), torch.arange(n))


def _probe_eager_step(s: RunState, sample: torch.Tensor, amp: Any) -> float:
    """Seconds of one eager micro-step (forward + backward) on a synthetic batch of ``sample``'s shape, the
    slowest rank's; the run's RNG and gradients are left as they were."""
    device, core = s.device, s.trainee.core
    batch = _synthetic_batch(s, sample)
    task = copy.copy(s.task)  # a task that counts its steps (attributes it rebinds) does not count the probe

    def step() -> torch.Tensor:
        with amp:
            return task.step(core, batch)[0]

    elapsed = time_eager_step(core, step, device)
    return float(all_reduce(torch.tensor([elapsed], device=device), op="max")[0])
