"""Measuring for ``mffzoo bench train``: the interleaved step timing of one model's implementations
(:func:`measure`), one implementation's peak memory (:func:`measure_memory`), and the fresh worker process each
runs in (:func:`measure_isolated`, :func:`memory_isolated`; the spec and the result go over pipes as JSON).

Speed: per model, one process builds every implementation and interleaves their steps, so other jobs on a shared
machine slow them alike. Memory: one fresh process per implementation, because on CPU the peak resident memory
(``VmHWM``) is per process and the allocator keeps freed pages — two models in one process would contaminate the
second peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..archs import describe_arch
from ..errors import MffzooError
from ..train.metrics import proc_status_kib, reset_peak_memory
from .train_impls import EAGER_TWIN, SIZE_NAMES, ImplSetup, base_recipe, preimport, setup_impl
from .train_rows import Memory, Speed, TrainBenchRow

__all__ = ["GPU_PEAK_TFLOPS", "BenchError", "gpu_peak_tflops", "measure", "measure_memory", "measure_isolated",
           "memory_isolated"]

# Dense (no sparsity) peak TFLOP/s per matmul precision, from NVIDIA's product data sheets, by a substring of
# torch.cuda.get_device_name(); first match wins, so the specific names come first ("H100 NVL" and "H100 PCIe"
# are not the SXM "H100 80GB HBM3"). MFU divides by the peak of the row's own precision: a fp32 row by the fp32
# (CUDA-core) peak, a TF32 row by the TF32 peak, a bf16/fp16 row by the tensor-core peak. Unknown GPUs get no MFU
# rather than a guessed one.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
)

_RESULT_MARK = "MFFZOO_BENCH_RESULT "


class BenchError(MffzooError):
    """A benchmark configuration could not run on this machine (e.g. killed for memory)."""


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak of GPU ``name`` (``torch.cuda.get_device_name()``) for matmuls in ``precision``."""
    return next((peaks.get(precision) for key, peaks in GPU_PEAK_TFLOPS if key in name), None)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _model_label(spec: Mapping[str, Any], recipe: Any) -> str:
    """What was timed, from the model's own args: ``ViT-S/16``, ``ViT-S/16 (custom settings)``, a resized model
    by its numbers (``ViT (dim 192, depth 6, ...; shrunk from ViT-S/16)``, never "ViT-S/16"), and for
    ``--recipe`` the recipe's name: ``ViT-S/16 (vits recipe)``."""
    mc = recipe.model
    name = describe_arch(mc.arch, mc.encoder_kwargs())
    if spec.get("recipe"):
        return f"{name} ({recipe.name} recipe)"
    stock = name in SIZE_NAMES.values()
    return name + (" (custom settings)" if stock and spec.get("overrides") else "")


def _count_flops(setups: list[ImplSetup]) -> dict[str, int]:
    """FLOPs of a step, counted once on each eager module (an extra warm-up step). CUDA only: the CPU
    flash-attention kernels are not registered with the counter, so a CPU count would silently miss attention."""
    flops = {}
    for s in setups:
        with FlopCounterMode(display=False) as counter:
            s.eager_step()
        flops[s.impl] = counter.get_total_flops()
    return flops


def _interleave(setups: list[ImplSetup], warmup: int, steps: int,
                cuda: bool) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(timed, warm-up) step times per implementation. Round r runs one step of each implementation, starting
    order rotated per round, so load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {s.impl: [] for s in setups}
    warm: dict[str, list[float]] = {s.impl: [] for s in setups}
    for r in range(warmup + steps):
        for k in range(len(setups)):
            s = setups[(r + k) % len(setups)]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            s.step()
            if cuda:
                torch.cuda.synchronize()
            (times if r >= warmup else warm)[s.impl].append(time.perf_counter() - t0)
    return times, warm


def _speed(s: ImplSetup, times: dict[str, list[float]], warm: dict[str, list[float]], batch: int,
           flops: int | None, peak: float | None) -> Speed:
    """One implementation's :class:`Speed` of one run (load average left to the caller)."""
    own = times[s.impl]
    step_s = statistics.median(own)
    compile_s = None
    if s.compiled:
        twin = EAGER_TWIN[s.impl]
        ref = statistics.median(times[twin]) if twin in times else step_s
        compile_s = sum(max(0.0, t - ref) for t in warm[s.impl])
    tflops = flops / step_s / 1e12 if flops else None
    return Speed(img_s=batch / step_s, img_s_best=batch / min(own), step_s=step_s, step_times_s=own,
                 warmup_times_s=warm[s.impl], compile_s=compile_s, flops_per_step=flops, tflops=tflops,
                 peak_tflops=peak, mfu=tflops / peak if tflops and peak else None)


def measure(spec: Mapping[str, Any]) -> list[TrainBenchRow]:
    """Time every implementation in ``spec["impls"]`` for one model, in *this* process, steps interleaved.

    The rotation of :func:`_interleave` keeps the ratio honest on a shared machine. The warm-up rounds hold a
    compiled row's compilation: ``compile_s`` = the sum over them of (its step time - the eager twin's median
    step, or its own median without a twin). ``spec`` is JSON-able."""
    impls, device = list(spec["impls"]), spec["device"]
    batch, steps, warmup = int(spec["batch"]), int(spec["steps"]), int(spec["warmup"])
    base = base_recipe(spec)
    if device == "cpu" and base.train.cpu_threads:  # as the engine sets it for the whole run
        torch.set_num_threads(base.train.cpu_threads)
    preimport(impls)
    load_before = _load()
    setups = [setup_impl(i, spec, base) for i in impls]
    cuda = device == "cuda"
    flops = _count_flops(setups) if cuda and warmup > 0 else {}
    times, warm = _interleave(setups, warmup, steps, cuda)
    load_after = _load()
    if cuda:
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    label = _model_label(spec, base)
    rows = []
    for s in setups:
        speed = _speed(s, times, warm, batch, flops.get(s.impl),
                       gpu_peak_tflops(dev_name, s.precision) if cuda else None)
        speed.load_before, speed.load_after = load_before, load_after
        rows.append(TrainBenchRow(
            model=label, impl=s.impl, precision=s.precision, speed=speed, size=spec.get("size"),
            recipe=spec.get("recipe"), device=dev_name, overrides=list(spec.get("overrides", ())), batch=batch,
            steps=steps, warmup=warmup, params=s.params, trainable_params=s.trainable_params,
            attention=s.attention, optimizer=s.optimizer, compiled=s.compiled,
        ))
    return rows


def measure_memory(spec: Mapping[str, Any]) -> Memory:
    """Peak MiB of one implementation's steps, and what it is; meaningful only in a fresh process (CPU: VmHWM
    minus the RSS before the build, since the allocator keeps freed pages; CUDA: max_memory_allocated)."""
    (impl,) = spec["impls"]
    preimport([impl])
    base = base_recipe(spec)
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        if base.train.cpu_threads:
            torch.set_num_threads(base.train.cpu_threads)
        reset_peak_memory(torch.device("cpu"))
    rss0 = proc_status_kib("VmRSS")
    s = setup_impl(impl, spec, base)
    for _ in range(2):  # the optimizer state appears in the first step; the second shows the steady state
        s.step()
    if cuda:
        return Memory(torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated")
    hwm = proc_status_kib("VmHWM")
    if hwm is None or rss0 is None:
        return Memory(None, "not measured (no /proc/self/status)")
    return Memory((hwm - rss0) / 1024, "peak RSS (VmHWM) - RSS before the build, fresh process")


def _worker() -> None:
    """Subprocess entry: spec JSON on stdin, one marked result line on stdout (flat rows, or the memory record)."""
    spec = json.loads(sys.stdin.read())  # this module's import already imported mffzoo: the models are registered
    if spec.get("mode") == "memory":
        result: Any = dataclasses.asdict(measure_memory(spec))
    else:
        result = [r.to_dict() for r in measure(spec)]
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _in_subprocess(spec: Mapping[str, Any]) -> Any:
    what = f"{'/'.join(spec['impls'])} on {spec.get('recipe') or SIZE_NAMES[spec['size']]}"
    cmd = [sys.executable, "-c", "from mffzoo.bench.train_measure import _worker; _worker()"]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="mffzoo-bench-inductor-") as cache:
        if any(i in EAGER_TWIN for i in spec["impls"]) and "TORCHINDUCTOR_CACHE_DIR" not in env:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as a run's first start pays it
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env)
    if proc.returncode < 0:
        raise BenchError(
            f"the benchmark process for {what} was killed by signal {-proc.returncode} (out of memory?); "
            f"lower the batch (--batch-size, now {spec['batch']})"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker for {what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_RESULT_MARK):])


def measure_isolated(spec: Mapping[str, Any]) -> list[TrainBenchRow]:
    """:func:`measure` in a fresh process."""
    return [TrainBenchRow.from_dict(d) for d in _in_subprocess({**spec, "mode": "speed"})]


def memory_isolated(spec: Mapping[str, Any]) -> Memory:
    """:func:`measure_memory` in a fresh process (the only place its number means something)."""
    return Memory(**_in_subprocess({**spec, "mode": "memory"}))
