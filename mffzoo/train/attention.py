"""Which attention kernel a run uses (``train.attention: auto|sdpa|math``), and why.

The switch is timm's runtime ``fused_attn`` attribute on every ``Attention``: fused SDPA or matmul + softmax.
Weights, state dict and exports do not change. Which one is faster depends on the machine:

- CUDA, and any CPU in fp32: fused SDPA (measured on the AMX Xeon and the AVX2 EPYC, docs/benchmarks.md).
- A CPU under bf16 autocast: no rule holds. On the AMX Xeon math attention was several times faster than torch's
  CPU flash-attention kernel (forward + backward); on the AVX512-BF16 EPYC (Zen 4) math was faster too, by a
  smaller margin (6.63 vs 5.86 img/s for a ViT-S/16 step); other CPUs and torch versions may differ. So ``auto``
  measures there: it records the shape of every attention call of one forward pass of the run's own model on a
  batch of the run's size, then times forward + backward of those calls with each kernel (interleaved, best of
  three) and takes the faster. The run's header says which and the two timings.

The choice is stored in checkpoints and a resumed run keeps it: it changes the numerics in the last bits, and
a resumed run must compute what the interrupted one would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cpu import cpu_features

__all__ = ["AttentionChoice", "choose_attention", "legacy_attention", "set_attention", "time_attention_kernels",
           "KERNELS"]

KERNELS = ("sdpa", "math")


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel (``sdpa``, ``math``, or ``n/a`` for a model without timm attention) and why it was chosen."""

    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kernel} attention ({self.reason})"

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"kernel": self.kernel, "reason": self.reason}

    @classmethod
    def from_state(cls, state: Any) -> AttentionChoice | None:
        if not isinstance(state, dict) or state.get("kernel") not in (*KERNELS, "n/a"):
            return None
        return cls(state["kernel"], str(state.get("reason", "")))


def set_attention(model: nn.Module, kernel: str) -> bool:
    """Switch every timm ``Attention`` of ``model`` to ``kernel``; False when the model has none."""
    found = False
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = kernel == "sdpa"
            found = True
    return found


def _attention_calls(model: nn.Module, forward: Callable[[], Any]) -> list[tuple[nn.Module, torch.Size]]:
    """(module, input shape) of every timm attention call made by one ``forward()`` (run without gradients)."""
    calls: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0].shape)))
             for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return calls


def time_attention_kernels(model: nn.Module, forward: Callable[[], Any], device: torch.device,
                           amp_dtype: torch.dtype | None, repeats: int = 3) -> dict[str, float]:
    """Seconds of forward + backward (input gradient) of all attention calls one ``forward()`` makes, per
    kernel: each distinct (module kind, input shape) timed once and weighted by how often it occurs; kernels
    interleaved, the first round a warm-up, the best of ``repeats``. Parameters' ``.grad`` and torch's RNG are
    left as they were (a task's numpy/python draws are the caller's); the caller sets the kernel afterwards."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # e.g. the mask's noise
        calls = _attention_calls(model, forward)
    for mod, shape in calls:
        key = (type(mod), tuple(shape), getattr(mod, "num_heads", None), getattr(mod, "head_dim", None))
        groups.setdefault(key, [mod, shape, 0])[2] += 1
    gen = torch.Generator().manual_seed(0)
    inputs = [(mod, torch.randn(shape, generator=gen).to(device).requires_grad_(), n)
              for mod, shape, n in groups.values()]
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else None
    best = {k: float("inf") for k in KERNELS}
    for rnd in range(repeats + 1):
        for kernel in KERNELS:
            total = 0.0
            for mod, x, n in inputs:
                mod.fused_attn = kernel == "sdpa"
                t0 = time.perf_counter()
                if amp is not None:
                    with amp():
                        y = mod(x)
                else:
                    y = mod(x)
                torch.autograd.grad(y.float().sum(), x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                total += (time.perf_counter() - t0) * n
            if rnd:
                best[kernel] = min(best[kernel], total)
    return best


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def choose_attention(model: nn.Module, mode: str, device: torch.device, amp_dtype: torch.dtype | None,
                     forward: Callable[[], Any] | None = None) -> AttentionChoice:
    """Decide ``train.attention`` for this run and apply it to ``model``. ``mode`` is as the recipe validated it
    at load (``auto`` or one of :data:`KERNELS`). ``forward`` runs one forward pass of a batch of the run's shape;
    without it (or where the model's modules cannot be called on their own, e.g. FSDP2-sharded) a CPU under bf16
    falls back to the rule measured so far: math where bf16 is native."""
    if not any(hasattr(m, "fused_attn") for m in model.modules()):
        return AttentionChoice("n/a", "no timm attention in the model")
    if mode in KERNELS:
        choice = AttentionChoice(mode, f"train.attention={mode}")
    elif device.type != "cpu":
        choice = AttentionChoice("sdpa", f"auto: fused SDPA on {device.type}")
    elif amp_dtype is None:
        choice = AttentionChoice("sdpa", "auto: fused SDPA in fp32 on cpu")
    elif forward is None:
        native = cpu_features().native_bf16
        choice = AttentionChoice("math" if native else "sdpa",
                                 f"auto: {'math' if native else 'SDPA'} on a cpu "
                                 f"{'with' if native else 'without'} native bf16 (not measured here)")
    else:
        t = time_attention_kernels(model, forward, device, amp_dtype)
        kernel = "math" if t["math"] < t["sdpa"] else "sdpa"
        other = "sdpa" if kernel == "math" else "math"
        choice = AttentionChoice(kernel, f"auto: measured on this cpu under {_dtype_name(amp_dtype)}, fwd+bwd of the "
                                         f"run's attention calls: {kernel} {_ms(t[kernel])} vs {other} "
                                         f"{_ms(t[other])}")
    set_attention(model, choice.kernel)
    return choice


def legacy_attention(mode: str, device: torch.device, amp_dtype: torch.dtype | None) -> AttentionChoice | None:
    """For a checkpoint written before choices were stored: what ``auto`` chose then (math only on AMX under
    bf16); None unless ``mode`` is ``auto``."""
    if mode != "auto":
        return None
    amx = device.type == "cpu" and amp_dtype == torch.bfloat16 and cpu_features().amx
    return AttentionChoice("math" if amx else "sdpa", "auto: the rule of the mffzoo version that wrote the checkpoint")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))
