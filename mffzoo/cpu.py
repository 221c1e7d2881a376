"""What this CPU offers for bf16 and int8 matrix math: the one place every automatic choice reads it from.

Three kinds of development CPU so far, each needing different defaults (docs/benchmarks.md keeps their tables
apart): an Intel Xeon with AMX (bf16/int8 tile units), an AMD EPYC Zen 4 with AVX512-BF16 + AVX512-VNNI but no
AMX, and an AMD EPYC with AVX2 only (bf16 emulated, no int8 dot products). Native bf16 is what torch's own probes
report (they decide whether oneDNN runs bf16 kernels); the rest comes from the kernel's CPU flags.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CpuFeatures", "cpu_features"]


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's name and the instruction-set extensions mffzoo's choices depend on."""

    model: str
    amx: bool  # AMX tiles with bf16 (Intel Sapphire Rapids and later)
    avx512_bf16: bool
    vnni: bool  # int8 dot products: AVX512-VNNI, AVX-VNNI or AMX-INT8
    avx512: bool
    avx2: bool
    flags_known: bool = True  # False where /proc/cpuinfo cannot be read: the flags above are then unknown

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than fp32."""
        return self.amx or self.avx512_bf16

    @property
    def kind(self) -> str:
        """``amx``, ``avx512-bf16`` or ``avx2`` (or ``other``): the keys of the per-CPU benchmark tables."""
        if self.amx:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        return "avx2" if self.avx2 else "other"

    def describe(self) -> str:
        """What this CPU has, in the words the docs use (e.g. 'AVX512-BF16 + AVX512-VNNI, no AMX')."""
        if self.amx:
            return "AMX (bf16/int8 matrix units)"
        if self.avx512_bf16:
            return "AVX512-BF16" + (" + AVX512-VNNI" if self.vnni else "") + ", no AMX"
        if self.avx512:
            return "AVX-512 without bf16" + (", with VNNI" if self.vnni else "") + " (bf16 emulated)"
        if self.avx2:
            return "AVX2 only" + (" + AVX-VNNI" if self.vnni else "") + ", no native bf16 (emulated)"
        return f"{platform.machine() or 'unknown'}, no native bf16 known"


def _flags() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not model and key.strip() == "model name":
            model = value.strip()
        elif not flags and key.strip() == "flags":
            flags = set(value.split())
    return model or platform.machine(), flags


def _torch_probe(name: str) -> bool | None:
    probe = getattr(torch.cpu, name, None)
    return None if probe is None else bool(probe())


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU (read once per process)."""
    model, flags = _flags()
    amx = _torch_probe("_is_amx_tile_supported")
    bf16 = _torch_probe("_is_avx512_bf16_supported")
    return CpuFeatures(
        model=model,
        amx=amx if amx is not None else "amx_bf16" in flags,
        avx512_bf16=bf16 if bf16 is not None else "avx512_bf16" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
        avx512=any(f.startswith("avx512") for f in flags),
        avx2="avx2" in flags,
        flags_known=bool(flags),
    )
