"""``mffzoo bench infer``: inference latency and throughput per backend, against PyTorch eager fp32.

Every backend gets the same inputs (real demo images, preprocessed for the model) in the same process. Calls
are interleaved (one call of every backend, then the next ...) so that load from other processes on a shared
machine hits all backends alike; the spread of the per-round throughput is reported, and every headline (img/s,
ratio) is the median of its per-round values, so it always lies inside the printed range. Warm-up calls (and
torch.compile's compilation, ONNX export, quantisation, engine builds) are excluded. Exported backends are built by
the export pipeline itself (:func:`mffzoo.export.pipeline.build_artefact`; TensorRT tuned for ``--batch``). Each
backend's output is compared with eager fp32 through the export parity code and judged by the same per-precision gates.
The exported rows are the export format registry's (:data:`mffzoo.export.formats.FORMATS`): format x precision x
device, named ``<bench_prefix>-<precision>`` (ort-fp32, ov-int8, trt-fp16, ...).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..export.api import load_export_model
from ..export.formats import FORMATS
from ..export.inputs import default_image_root, load_image_batch, model_img_size
from ..export.parity import compare_outputs, gate_failures, worst
from ..export.pipeline import SigtermGuard, build_artefact
from ..export.profile import BatchRange, ExportProfile, GateSet, QuantizeConfig, SizeRange
from ..export.sidecar import tool_versions
from ..export.wrappers import TORCH_DTYPES, ExportModule, Features, feature_spec
from ..io import write_json

__all__ = ["backends", "BackendSpec", "available_backends", "run_infer_bench", "InferBenchResult"]

_logger = logging.getLogger("mffzoo")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    device: str  # "cpu" | "cuda"
    precision: str  # gate used for its parity vs eager fp32
    kind: str  # "torch" | the format's backend ("onnxruntime", "tensorrt", "openvino")
    description: str
    exported: bool = False
    format: str | None = None  # the export format (mffzoo.export.formats.FORMATS) of an exported row
    quantize: str = "dynamic"  # quantize.mode of an exported row's export profile


_TORCH_ROWS = (
    BackendSpec("eager", "cpu", "fp32", "torch", "PyTorch eager fp32 (the peer)"),
    BackendSpec("eager-bf16", "cpu", "bf16", "torch",
                "PyTorch eager, torch.autocast bf16 (native on AMX/AVX512-BF16 CPUs, else emulated)"),
    BackendSpec("compile", "cpu", "fp32", "torch", "torch.compile (inductor) fp32"),
    BackendSpec("cuda-eager", "cuda", "fp32", "torch", "PyTorch eager fp32 on the GPU (TF32 off)"),
    BackendSpec("cuda-fp16", "cuda", "fp16", "torch", "PyTorch eager, weights and compute in fp16"),
    BackendSpec("cuda-bf16", "cuda", "bf16", "torch", "PyTorch eager, weights and compute in bf16"),
    BackendSpec("cuda-compile-fp16", "cuda", "fp16", "torch", "torch.compile (inductor), fp16"),
)


def exported_rows() -> list[BackendSpec]:
    """The exported rows: every registered format x its bench variants (precision, device), in registry order."""
    return [BackendSpec(name, v.device, v.precision, fmt.backend, v.description, True, fmt.name, v.quantize)
            for fmt in FORMATS.values() for name, v in zip(fmt.bench_names(), fmt.bench)]


def backends() -> dict[str, BackendSpec]:
    """Every bench row by name, per device (CPU, then GPU): the PyTorch rows, then the exported ones, read from the
    format registry when called (so a format registered later has its rows)."""
    rows = [*_TORCH_ROWS, *exported_rows()]
    return {b.name: b for dev in ("cpu", "cuda") for b in rows if b.device == dev}



def available_backends() -> dict[str, str | None]:
    """Backend -> None when it runs here, else the reason it does not."""
    cuda = None if torch.cuda.is_available() else "no CUDA GPU"
    out: dict[str, str | None] = {}
    for b in backends().values():
        if b.device == "cuda" and cuda:
            out[b.name] = cuda
        else:
            out[b.name] = FORMATS[b.format].unavailable(b.precision, b.device) if b.format else None
    return out


@dataclass
class BackendResult:
    name: str
    device: str
    precision: str
    description: str
    latency_ms_p50: float
    latency_ms_p90: float
    throughput: float  # img/s at the bench batch: median of the per-round img/s (inside their spread)
    throughput_rounds: list[float]  # per-round img/s (the spread)
    ratio_vs_peer: float | None = None  # median of ratio_rounds, so it lies inside their range
    ratio_rounds: list[float] = field(default_factory=list)  # per-round ratio: robust to load drifting between rounds
    parity: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0


@dataclass
class InferBenchResult:
    meta: dict[str, Any]
    results: list[BackendResult]
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "results": [dataclasses.asdict(r) for r in self.results], "skipped": self.skipped}

    def table(self) -> tuple[list[list[str]], list[str]]:
        b = self.meta["batch"]
        rows = []
        for r in self.results:
            p = r.parity
            par = "peer" if p.get("peer") else f"cos {p['cosine']:.6f}, max {p['max_abs']:.1e}"
            gate = "" if p.get("peer") else ("pass" if not p["failures"] else "FAIL " + "; ".join(p["failures"]))
            lo, hi = min(r.throughput_rounds), max(r.throughput_rounds)
            ratio = "-" if r.ratio_vs_peer is None else f"{r.ratio_vs_peer:.2f}x"
            if len(r.ratio_rounds) > 1 and not p.get("peer"):
                ratio += f" ({min(r.ratio_rounds):.2f}-{max(r.ratio_rounds):.2f})"
            rows.append([r.name, r.device, f"{r.latency_ms_p50:.1f}", f"{r.latency_ms_p90:.1f}", f"{r.throughput:.1f}",
                         f"{lo:.1f}-{hi:.1f}", ratio, par, gate])
        return rows, ["backend", "device", "b1 p50 ms", "b1 p90 ms", f"img/s b{b}", "spread", "vs eager (rounds)",
                      f"parity vs {self.meta['parity_reference']}", "gate"]

    def notes(self) -> list[str]:
        m = self.meta
        weights = "random-init weights: speed does not depend on them" if m["random_init"] else "trained weights"
        gpu = f"; gpu: {m['machine']['gpu']}" if m["machine"].get("gpu") else ""
        out = [f"model {m['model']} ({weights}), {m['img_size'][0]}px, {m['threads']} threads, {m['rounds']} "
               f"interleaved rounds x {m['iters']} calls; cpu: {m['machine']['cpu']}{gpu}"]
        for best in best_exported(self.results):
            out.append(f"best exported {best.device} backend passing its gate: {best.name} at "
                       f"{best.ratio_vs_peer:.2f}x {'cuda-eager' if best.device == 'cuda' else 'eager'} fp32 "
                       f"throughput")
        by_name = {r.name: r for r in self.results}
        if "ort-fp32" in by_name:  # OpenVINO's target peer: the ONNX Runtime serving it replaces
            for r in self.results:
                if backends()[r.name].kind == "openvino":
                    med, rounds = round_ratios(r.throughput_rounds, by_name["ort-fp32"].throughput_rounds)
                    out.append(f"{r.name} vs ort-fp32 throughput: {med:.2f}x (rounds {min(rounds):.2f}-"
                               f"{max(rounds):.2f})")
        for k, why in self.skipped.items():
            out.append(f"skipped {k}: {why}")
        return out


def round_ratios(rounds: list[float], peer_rounds: list[float]) -> tuple[float, list[float]]:
    """Per-round ratios of two interleaved measurements and their median: the headline, inside their range.

    (A ratio of two all-round medians can fall outside every round's ratio when load drifts between rounds:
    ``ort-int8 2.70x (2.34-2.39)`` was printed that way.)
    """
    ratios = [a / b for a, b in zip(rounds, peer_rounds)]
    return float(np.median(ratios)), ratios


def best_exported(results: list[BackendResult]) -> list[BackendResult]:
    """Per device, the exported backend with the highest ratio to that device's eager peer among those that pass
    their parity gate (a GPU's img/s and a CPU's are never compared)."""
    best: dict[str, BackendResult] = {}
    for r in results:
        if not backends()[r.name].exported or r.ratio_vs_peer is None or r.parity.get("failures"):
            continue
        if r.device not in best or r.ratio_vs_peer > best[r.device].ratio_vs_peer:  # type: ignore[operator]
            best[r.device] = r
    return list(best.values())


class _Backend:
    """prepare(numpy) -> device input; run(input) -> output tensor/array; sync() waits for the device."""

    def __init__(self, run: Callable[[Any], Any], prepare: Callable[[np.ndarray], Any], device: str) -> None:
        self.run, self.prepare, self.device = run, prepare, device

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def numpy(self, out: Any) -> np.ndarray | list[np.ndarray]:
        """One output as numpy; several (levels) as a list of them."""
        if isinstance(out, (list, tuple)):
            return [self.numpy(o) for o in out]  # type: ignore[misc]
        return out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _torch_backend(module: torch.nn.Module, device: str, autocast: torch.dtype | None = None) -> _Backend:
    module = module.to(device).eval()

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            return module(x)

    return _Backend(run, lambda a: torch.from_numpy(a).to(device), device)


def _bench_profile(spec: BackendSpec, batch: int, dynamic_size: SizeRange | None = None) -> ExportProfile:
    """The export settings of an exported backend: the shipped defaults, tuned (TensorRT ``opt``) for ``batch``."""
    return ExportProfile(
        format=spec.format or "onnx", precision=spec.precision, batch=BatchRange(1, batch, max(batch, 64)),
        quantize=QuantizeConfig(mode=spec.quantize), dynamic_size=dynamic_size)  # type: ignore[arg-type]


def _build(name: str, fp32: torch.nn.Module, features: Features, tmp: Path, threads: int, calib: np.ndarray,
           batch: int, onnx_cache: dict[tuple[Any, ...], Path], dynamic_size: SizeRange | None = None) -> _Backend:
    spec = backends().get(name)
    if spec is None:
        raise ConfigError(f"unknown backend '{name}'")
    if spec.exported:  # built exactly as `mffzoo export` builds it (one shared pipeline)
        built = build_artefact(fp32, features, _bench_profile(spec, batch, dynamic_size), tmp, calibration=calib,
                               onnx_cache=onnx_cache)
        fmt = FORMATS[spec.format or "onnx"]
        run, prepare = fmt.bench_call(fmt.runner(built.artefact, spec.precision, device=spec.device, threads=threads))
        return _Backend(run, prepare, spec.device)
    dtype = TORCH_DTYPES[spec.precision]
    if name == "eager":
        return _torch_backend(ExportModule(fp32, features), "cpu")
    if name == "eager-bf16":
        return _torch_backend(ExportModule(fp32, features), "cpu", autocast=torch.bfloat16)
    if name == "compile":
        return _torch_backend(torch.compile(ExportModule(fp32, features), dynamic=False), "cpu")
    if name == "cuda-eager":
        return _torch_backend(ExportModule(copy.deepcopy(fp32), features), "cuda")
    if name in ("cuda-fp16", "cuda-bf16"):
        return _torch_backend(ExportModule(fp32, features, dtype), "cuda")  # ExportModule copies
    if name == "cuda-compile-fp16":
        return _torch_backend(torch.compile(ExportModule(fp32, features, dtype).cuda(), dynamic=False), "cuda")
    raise ConfigError(f"backend '{name}' has no builder")


def _time_calls(b: _Backend, x: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        b.run(x)
        b.sync()
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 off on the GPU, so fp32 backends are compared as fp32."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tools(names: list[str]) -> dict[str, str]:
    """The export tools' versions, plus those a format that ran names (OpenVINO's and NNCF's for ov-*)."""
    out = tool_versions()
    fmts = {backends()[n].format for n in names} - {None}
    for pkg in dict.fromkeys(p for f in FORMATS.values() if f.name in fmts for p in f.bench_tools):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def _select(wanted: list[str] | None, avail: dict[str, str | None]) -> list[str]:
    """The backends to run, each device's peer (eager fp32) first: ratios and parity are against it."""
    names = wanted or [n for n, why in avail.items() if why is None]
    table = backends()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown backend '{unknown[0]}'; choose from {', '.join(table)}")
    skipped = {n: avail[n] for n in names if avail[n]}
    if wanted and skipped:
        n = next(iter(skipped))
        raise ConfigError(f"backend '{n}' cannot run here: {skipped[n]}; drop it from --backends")
    names = [n for n in names if not avail[n]]
    devices = {table[n].device for n in names}
    peers = [p for p, dev in (("eager", "cpu"), ("cuda-eager", "cuda")) if dev in devices]
    return peers + [n for n in names if n not in peers]


def _prepare_all(names: list[str], fp32: torch.nn.Module, features: Features, tmp: Path, threads: int,
                 calib: np.ndarray, batch: int, x1: np.ndarray, xb: np.ndarray, dynamic_size: SizeRange | None,
                 ) -> tuple[dict[str, _Backend], dict[str, tuple[Any, Any]], dict[str, float]]:
    """Build every backend and warm it up (compilation included); none of it is timed."""
    built: dict[str, _Backend] = {}
    inputs: dict[str, tuple[Any, Any]] = {}
    setup: dict[str, float] = {}
    onnx_cache: dict[tuple[Any, ...], Path] = {}
    for n in names:
        t = time.perf_counter()
        _logger.info("bench: preparing %s", n)
        b = _build(n, fp32, features, tmp, threads, calib, batch, onnx_cache, dynamic_size)
        inputs[n] = (b.prepare(x1), b.prepare(xb))
        for x in inputs[n]:  # warm-up (and compilation), excluded
            for _ in range(2):
                b.run(x)
            b.sync()
        built[n] = b
        setup[n] = time.perf_counter() - t
    return built, inputs, setup


def _measure(built: dict[str, _Backend], inputs: dict[str, tuple[Any, Any]], batch: int, rounds: int,
             iters: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Batch-1 latencies and per-round img/s at ``batch``, call by call across backends: load from other processes
    drifts slowly, so each backend sees it alike."""
    names = list(built)
    lat: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        _logger.info("bench: round %d/%d", r + 1, rounds)
        for which in (0, 1):
            cur: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(iters):
                for n in names:
                    cur[n] += _time_calls(built[n], inputs[n][which], 1)
            for n in names:
                if which:
                    per_round[n].append(batch / float(np.median(cur[n])))
                else:
                    lat[n] += cur[n]
    return lat, per_round


def _results(built: dict[str, _Backend], inputs: dict[str, tuple[Any, Any]], lat: dict[str, list[float]],
             per_round: dict[str, list[float]], setup: dict[str, float], classifier: bool,
             gates: GateSet) -> list[BackendResult]:
    """One row per backend, parity against the first (the peer) judged by its precision's gate."""
    ref_name = next(iter(built))
    ref = built[ref_name].numpy(built[ref_name].run(inputs[ref_name][1]))
    results = []
    for n, b in built.items():
        spec = backends()[n]
        ms = compare_outputs(b.numpy(b.run(inputs[n][1])), ref, classifier=classifier)  # per output (levels)
        gate = gates.for_precision(spec.precision)
        fails = [f"{f} [output {i}]" if len(ms) > 1 else f for i, m in enumerate(ms) for f in gate_failures(m, gate)]
        par: dict[str, Any] = {"peer": True} if n == ref_name else {**dataclasses.asdict(worst(ms)), "failures": fails}
        results.append(BackendResult(
            name=n, device=spec.device, precision=spec.precision, description=spec.description,
            latency_ms_p50=float(np.percentile(lat[n], 50) * 1e3),
            latency_ms_p90=float(np.percentile(lat[n], 90) * 1e3),
            throughput=float(np.median(per_round[n])), throughput_rounds=per_round[n], parity=par,
            setup_s=round(setup[n], 2)))
    peers = {r.device: r for r in results if r.name in ("eager", "cuda-eager")}
    for r in results:
        if r.device in peers:
            r.ratio_vs_peer, r.ratio_rounds = round_ratios(r.throughput_rounds, peers[r.device].throughput_rounds)
    return results


def run_infer_bench(
    model: str,
    *,
    random_init: bool = False,
    batch: int = 8,
    backends: list[str] | None = None,
    rounds: int = 3,
    iters: int = 10,
    threads: int | None = None,
    img_size: int | None = None,
    json_path: str | os.PathLike[str] | None = None,
    model_args: dict[str, Any] | None = None,
    images: str | os.PathLike[str] | None = None,
    features: str = "auto",
    levels: list[int] | None = None,
    levels_norm: bool = False,
    dynamic_size: SizeRange | None = None,
) -> InferBenchResult:
    """Measure every backend in ``backends`` (default: all that run here) on the same inputs, interleaved.

    ``features``/``levels``/``levels_norm``/``dynamic_size`` are the export profile's keys of the same names
    (e.g. ``features="levels"``: the dense-task artefact, each output compared with eager on its own); the
    timing inputs are at the model's own size."""
    if batch < 1 or rounds < 1 or iters < 1:
        raise ConfigError(f"--batch, --rounds and --iters must be >= 1, got {batch}, {rounds}, {iters}")
    avail = available_backends()
    names = _select(backends, avail)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    prof = ExportProfile(model=model, random_init=random_init, img_size=img_size, model_args=dict(model_args or {}),
                         features=features, levels=levels, levels_norm=levels_norm,  # type: ignore[arg-type]
                         dynamic_size=dynamic_size)
    prof.validate_dense()  # the rest of the profile is the bench's own, known good
    fp32 = load_export_model(prof)
    spec = feature_spec(features, fp32, levels, levels_norm)
    root = images or default_image_root()
    xb = load_image_batch(root, batch, fp32)
    calib = load_image_batch(root, 32, fp32)
    gates = GateSet()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="mffzoo-bench-", ignore_cleanup_errors=True)  # SIGTERM removes it
    with SigtermGuard() as guard, tmp_ctx as tmpdir, _strict_fp32():
        guard.remove_on_term(tmpdir)
        built, inputs, setup = _prepare_all(names, fp32, spec, Path(tmpdir), threads, calib, batch,
                                            xb[:1].copy(), xb, dynamic_size)
        lat, per_round = _measure(built, inputs, batch, rounds, iters)
        results = _results(built, inputs, lat, per_round, setup, spec.kind == "logits", gates)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = {
        "command": "mffzoo " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("mffzoo", "__main__.py") else None,
        "model": model, "architecture": (fp32.pretrained_cfg or {}).get("architecture"), "random_init": random_init,
        "features": spec.kind, "levels": list(spec.levels) or None, "outputs": spec.names,
        "dynamic_size": dataclasses.asdict(dynamic_size) if dynamic_size else None,
        "batch": batch, "img_size": list(model_img_size(fp32)), "threads": threads,
        "rounds": rounds, "iters": iters, "inputs": f"{batch} demo images from {root}",
        "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "gpu": gpu}, "tools": _tools(names),
        "peer": "PyTorch eager fp32 of the same device (eager, cuda-eager)", "parity_reference": names[0],
        "gates": dataclasses.asdict(gates), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    result = InferBenchResult(meta, results, {} if backends else {k: v for k, v in avail.items() if v})
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, result.to_dict())
    return result
