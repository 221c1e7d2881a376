"""Training throughput: one MFF pretraining step against Hugging Face ``ViTMAEForPreTraining``.

The peer is what a user would pick instead of mffzoo: ``transformers.ViTMAEForPreTraining`` built with the same
dimensions (encoder, decoder, mask ratio, norm_pix) and stepped with ``torch.optim.AdamW``. By default each mffzoo
row is compared with the peer **under the same precision** (``--peers auto``): ``hf-bf16`` where the row's recipe
resolves to bf16 autocast (:func:`~mffzoo.train.numerics.resolve_precision`), ``hf`` (its fp32 default) where it
falls back to fp32; ``--peers auto,hf`` adds the peer's fp32 default as a reference row. mffzoo rows are built,
configured and stepped by the training engine's own functions and task, with the recipe defaults of a size
(``--models``) or exactly what one recipe's run does (``--recipe``: model, ``batch_per_device``, precision,
attention, optimizer, ``cpu_threads`` and ``train.compile`` with its compilation, whose time is reported apart
from the step time). A step is forward + backward + optimizer step on the same random batch; img/s is the batch
over the median step time after warm-up. Speed claims are the ratio columns (same run, same machine), never
absolute numbers from another day.

Speed: per model, one fresh process builds every implementation and interleaves their steps, so other jobs on a
shared machine slow them alike. Memory: one fresh process per implementation, because on CPU the peak resident
memory (``VmHWM``) is per process and the allocator keeps freed pages — two models in one process would
contaminate the second peak.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import click
import timm.optim  # noqa: F401  (imported up front: library code must not count as a model's memory or step)
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..archs import describe_arch
from ..config import load_config
from ..errors import ConfigError, MffzooError
from ..table import print_table
from ..train.attention import choose_attention
from ..train.compile import compile_for_training
from ..train.data import Batch
from ..train.metrics import proc_status_kib, reset_peak_memory
from ..train.numerics import Tf32, precision_name, resolve_precision
from ..train.optim import build_optimizer
from ..train.pretrain import PretrainTask
from ..train.recipe import PretrainRecipe, find_recipe, load_recipe

__all__ = [
    "SIZES", "DEFAULT_BATCH", "IMPLS", "PEERS", "bench_train", "resolve_recipe", "hf_config", "build_model",
    "count_params", "measure", "add_ratios", "format_results", "print_results",
]

# Sizes the benchmark knows, and the per-step batch used for every implementation of that size: on a CPU small
# enough for the 24 GB / 2-core dev machine in fp32 and a run of a few minutes; on a GPU large enough that the
# step is compute-bound (at 16 images a GPU step is kernel-launch-bound and MFU means nothing), and small enough
# for the HF peer in fp32 on a 40 GB card. A recipe (``--recipe``) uses its own ``train.batch_per_device``.
SIZES = {"s": "mff_vit_small_patch16_224", "b": "mff_vit_base_patch16_224", "l": "mff_vit_large_patch16_224"}
SIZE_NAMES = {"s": "ViT-S/16", "b": "ViT-B/16", "l": "ViT-L/16"}
DEFAULT_BATCH = {"s": 16, "b": 8, "l": 4}
DEFAULT_BATCH_GPU = {"s": 256, "b": 128, "l": 64}

IMPLS = {
    "hf": "HF ViTMAEForPreTraining, its defaults (fp32)",
    "hf-bf16": "HF ViTMAEForPreTraining + bf16 autocast (the peer under mffzoo's bf16)",
    "hf-fp16": "HF ViTMAEForPreTraining + fp16 autocast + GradScaler (the peer under mffzoo's fp16)",
    "mffzoo": "mffzoo MFF, recipe settings, eager",
    "mffzoo-compile": "mffzoo MFF, recipe settings + torch.compile (as train.compile does)",
    "mffzoo-mae": "mffzoo MAE mode (fusion_layers=[last]), recipe settings, eager",
    "mffzoo-sdpa": "mffzoo MFF, recipe settings but train.attention=sdpa (what the attention choice is worth)",
}
# The peer rows and the autocast precision each runs under; a mffzoo row is compared with the one of its precision.
PEERS = {"hf": "fp32", "hf-bf16": "bf16", "hf-fp16": "fp16"}
_PEER_OF = {"fp32": "hf", "tf32": "hf", "bf16": "hf-bf16", "fp16": "hf-fp16"}
EAGER_TWIN = {"mffzoo-compile": "mffzoo"}  # compiled row -> the eager row of the same configuration
DEFAULT_IMPLS = ("mffzoo", "mffzoo-mae")

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


# --- recipes and models ---------------------------------------------------------------------------------------
def resolve_recipe(size: str, overrides: Sequence[str] = (), mae: bool = False, attention: str = "auto") -> Any:
    """The default pretraining recipe for a size, with ``key=value`` model overrides (e.g. ``depth=4``) checked
    by the same schema as ``mffzoo train`` — so the benchmarked model is exactly what a recipe builds.
    ``mae`` switches to the MAE baseline (``fusion_layers=[depth - 1]``); ``attention`` is ``train.attention``."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size '{size}'; allowed: {', '.join(SIZES)} (e.g. --models s,b)")
    sets = [o if o.startswith("model.") else f"model.{o}" for o in overrides] + [f"train.attention={attention}"]
    recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    if mae:
        sets.append(f"model.fusion_layers=[{recipe.model.depth - 1}]")
        recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    return recipe


def _base_recipe(spec: Mapping[str, Any]) -> Any:
    """The recipe a spec benches: ``spec["recipe"]`` with ``--set`` overrides, else a size's defaults."""
    if spec.get("recipe"):
        return load_recipe(spec["recipe"], list(spec.get("overrides", ())))
    return resolve_recipe(spec["size"], spec.get("overrides", ()))


def impl_recipe(base: Any, impl: str) -> Any:
    """What one mffzoo row runs: the base recipe, switched to MAE mode or SDPA attention by the row's name."""
    recipe = copy.deepcopy(base)
    if impl == "mffzoo-mae":
        recipe.model.fusion_layers = [recipe.model.depth - 1]
    elif impl == "mffzoo-sdpa":
        recipe.train.attention = "sdpa"
    return recipe


def recipe_compiles(recipe: Any) -> bool:
    """Whether a run of ``recipe`` may compile: ``true``, or ``auto`` (whose choice depends on the run's length and
    this configuration's measurements, :mod:`mffzoo.train.compile`): the bench then shows both rows."""
    return recipe.train.compile is not False


def hf_config(mc: Any) -> Any:
    """``ViTMAEConfig`` with the dimensions of a resolved ``ModelConfig`` (MLP ratio 4 as in timm's ViT).

    LayerNorm eps is set to timm's 1e-6 (HF's default is 1e-12): same model, and eps does not change speed."""
    from transformers import ViTMAEConfig  # optional dependency (mffzoo[bench]): only the peer needs it

    return ViTMAEConfig(
        hidden_size=mc.embed_dim, num_hidden_layers=mc.depth, num_attention_heads=mc.num_heads,
        intermediate_size=4 * mc.embed_dim, decoder_hidden_size=mc.decoder_dim,
        decoder_num_hidden_layers=mc.decoder_depth, decoder_num_attention_heads=mc.decoder_heads,
        decoder_intermediate_size=4 * mc.decoder_dim, mask_ratio=mc.mask_ratio, norm_pix_loss=mc.norm_pix_loss,
        image_size=mc.img_size, patch_size=mc.patch_size, num_channels=3, layer_norm_eps=1e-6,
    )


def build_model(impl: str, size: str = "s", overrides: Sequence[str] = (), *,
                recipe: Any = None) -> tuple[Any, Callable[[Any, Any], Any], Any]:
    """(model, loss_fn(module, images), recipe) for one implementation; ``recipe`` (a loaded recipe) replaces the
    size's defaults.

    mffzoo is built and stepped by the training engine's own ``PretrainTask`` (per-sample mask noise included);
    the peer gets the recipe's model dimensions and computes its own masking, as its users would run it."""
    if impl not in IMPLS:
        raise ConfigError(f"unknown implementation '{impl}'; allowed: {', '.join(IMPLS)}")
    recipe = impl_recipe(recipe if recipe is not None else resolve_recipe(size, overrides), impl)
    if impl.startswith("mffzoo"):
        task = PretrainTask(recipe)
        model = task.build_model()

        def loss_fn(module: Any, x: Any) -> Any:
            n = x.shape[0]
            seeds = torch.arange(n, dtype=torch.int64)
            batch = Batch(images=x, targets=torch.full((n,), -1, dtype=torch.int64), seeds=seeds)
            return task.step(module, batch)[0]

        return model, loss_fn, recipe
    from transformers import ViTMAEForPreTraining  # optional dependency (mffzoo[bench]): only the peer needs it

    model = ViTMAEForPreTraining(hf_config(recipe.model))
    return model, lambda module, x: module(pixel_values=x).loss, recipe


def count_params(model: Any) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _peer_optimizer(model: Any, recipe: Any, batch: int) -> Any:
    """Plain ``torch.optim.AdamW``, as the peer's users would build it; same hyper-parameters as the recipe's
    (they do not change speed)."""
    oc = recipe.optim
    return torch.optim.AdamW(model.parameters(), lr=oc.resolved_lr(batch), betas=tuple(oc.betas), eps=oc.eps,
                             weight_decay=oc.weight_decay)


def _quiet_precision(name: str, device: torch.device) -> str:
    """The precision name ``resolve_precision`` picks, without its fallback warning (the table says it)."""
    log = logging.getLogger("mffzoo.train")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return precision_name(resolve_precision(name, device)[0])
    finally:
        log.setLevel(level)


# --- peaks -------------------------------------------------------------------------------------------------
def _gpu_peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak of GPU ``name`` (``torch.cuda.get_device_name()``) for matmuls in ``precision``."""
    return next((peaks.get(precision) for key, peaks in GPU_PEAK_TFLOPS if key in name), None)


def default_batch(size: str, device: str) -> int:
    return (DEFAULT_BATCH_GPU if device == "cuda" else DEFAULT_BATCH)[size]


# --- measuring ----------------------------------------------------------------------------------------------
def _preimport(impls: Iterable[str]) -> None:
    """Import the peer up front: library code must not count as a model's memory or first step."""
    if any(i in PEERS for i in impls):
        import transformers.models.vit_mae.modeling_vit_mae  # noqa: F401  (optional dependency, mffzoo[bench])


def _setup(impl: str, spec: Mapping[str, Any], base: Any = None) -> dict[str, Any]:
    """Model, optimizer, AMP and ``step()`` closures for one implementation, plus what the report says of it.

    ``step`` is the timed step (through ``torch.compile`` for a compiled row); ``eager_step`` the same step on the
    plain module (what FLOPs are counted on)."""
    device, batch = spec["device"], int(spec["batch"])
    torch.manual_seed(int(spec.get("seed", 0)))
    model, loss_fn, recipe = build_model(impl, recipe=base if base is not None else _base_recipe(spec))
    model.to(device).train()
    dev = torch.device(device)
    size = recipe.model.img_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if impl.startswith("mffzoo"):  # exactly what the engine does with the recipe
        amp_dtype, use_scaler = resolve_precision(recipe.train.precision, dev)
        flags = Tf32.for_run(dev, amp_dtype)  # as a run holds it; only around this implementation's steps

        def forward() -> None:
            with flags, torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss_fn(model, images)

        with torch.random.fork_rng(devices=[]):
            attention = "timm " + choose_attention(model, recipe.train.attention, dev, amp_dtype, forward).kernel
        opt = build_optimizer(model, recipe.optim, batch)
        opt_name = f"timm {recipe.optim.opt}" + (" fused" if opt.defaults.get("fused") else "")
        clip = recipe.optim.clip_grad
    else:  # the peer: fp32 (its default), or under the autocast of the precision its row names
        want = PEERS[impl]
        supported = want != "bf16" or device == "cpu" or torch.cuda.is_bf16_supported()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(want) if supported else None
        use_scaler = amp_dtype == torch.float16
        flags = Tf32.for_run(dev, amp_dtype)  # fp32: torch's defaults (no TF32); AMP: what mffzoo's AMP rows get
        attention = f"transformers {model.config._attn_implementation}"
        opt, opt_name, clip = _peer_optimizer(model, recipe, batch), "torch AdamW", None
    compiled = compile_for_training(model, impl in EAGER_TWIN)  # the engine's own compile
    autocast = torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)

    def make_step(module: Any) -> Callable[[], None]:
        def step() -> None:  # the engine's optimizer step (engine._run), one micro-batch
            with flags:
                with autocast:
                    loss = loss_fn(module, images)
                scaler.scale(loss).backward()
                if clip is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

        return step

    with flags:  # what the matmuls of a step run in: the MFU peak to divide by
        tf32 = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    total, trainable = count_params(model)
    precision = precision_name(amp_dtype)
    return dict(step=make_step(compiled), eager_step=make_step(model), impl=impl, params=total,
                trainable_params=trainable, optimizer=opt_name, compiled=impl in EAGER_TWIN,
                precision="tf32" if tf32 and precision == "fp32" else precision, attention=attention)


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


def measure(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Time every implementation in ``spec["impls"]`` for one model, in *this* process, steps interleaved.

    Round r runs one step of each implementation (starting order rotated per round), so load from other
    processes on a shared machine hits all of them alike and the ratio stays honest. The warm-up rounds hold a
    compiled row's compilation: ``compile_s`` = the sum over them of (its step time - the eager twin's median
    step, or its own median without a twin). ``spec`` is JSON-able."""
    impls, device = list(spec["impls"]), spec["device"]
    batch, steps, warmup = int(spec["batch"]), int(spec["steps"]), int(spec["warmup"])
    base = _base_recipe(spec)
    if device == "cpu" and base.train.cpu_threads:  # as the engine sets it for the whole run
        torch.set_num_threads(base.train.cpu_threads)
    _preimport(impls)
    load_before = _load()
    setups = [_setup(i, spec, base) for i in impls]
    cuda = device == "cuda"
    flops: dict[str, int | None] = {i: None for i in impls}
    if cuda and warmup > 0:
        # FLOPs of a step, counted once on the eager module (an extra warm-up step). CUDA only: the CPU
        # flash-attention kernels are not registered with the counter, so a CPU count would silently miss attention.
        for s in setups:
            with FlopCounterMode(display=False) as counter:
                s["eager_step"]()
            flops[s["impl"]] = counter.get_total_flops()
    times: dict[str, list[float]] = {i: [] for i in impls}
    warm: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(warmup + steps):
        for k in range(len(setups)):
            s = setups[(r + k) % len(setups)]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            s["step"]()
            if cuda:
                torch.cuda.synchronize()
            (times if r >= warmup else warm)[s["impl"]].append(time.perf_counter() - t0)

    load_after = _load()
    if cuda:
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    label = _model_label(spec, base)
    rows = []
    for s in setups:
        impl = s["impl"]
        peak = _gpu_peak_tflops(dev_name, s["precision"]) if cuda else None
        step_s = statistics.median(times[impl])
        compile_s = None
        if s["compiled"]:
            twin = EAGER_TWIN[impl]
            ref = statistics.median(times[twin]) if twin in times else step_s
            compile_s = sum(max(0.0, t - ref) for t in warm[impl])
        tflops = flops[impl] / step_s / 1e12 if flops[impl] else None
        rows.append({
            "model": label, "size": spec.get("size"), "recipe": spec.get("recipe"),
            "impl": impl, "label": IMPLS[impl], "device": dev_name, "precision": s["precision"],
            "peer": impl if impl in PEERS else _PEER_OF[s["precision"]],
            "attention": s["attention"], "optimizer": s["optimizer"], "overrides": list(spec.get("overrides", ())),
            "compiled": s["compiled"], "compile_s": compile_s, "warmup_times_s": warm[impl],
            "batch": batch, "params": s["params"], "trainable_params": s["trainable_params"], "steps": steps,
            "warmup": warmup, "step_times_s": times[impl], "step_s": step_s, "img_s": batch / step_s,
            "img_s_best": batch / min(times[impl]),
            "peak_mem_mib": None, "mem_kind": "not measured", "flops_per_step": flops[impl], "tflops": tflops,
            "peak_tflops": peak, "mfu": tflops / peak if tflops and peak else None,
            "load_before": load_before, "load_after": load_after,
        })
    return rows


def measure_memory(spec: Mapping[str, Any]) -> tuple[float | None, str]:
    """(peak MiB, what it is) of one implementation's steps; meaningful only in a fresh process (CPU: VmHWM
    minus the RSS before the build, since the allocator keeps freed pages; CUDA: max_memory_allocated)."""
    (impl,) = spec["impls"]
    _preimport([impl])
    base = _base_recipe(spec)
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        if base.train.cpu_threads:
            torch.set_num_threads(base.train.cpu_threads)
        reset_peak_memory(torch.device("cpu"))
    rss0 = proc_status_kib("VmRSS")
    s = _setup(impl, spec, base)
    for _ in range(2):  # the optimizer state appears in the first step; the second shows the steady state
        s["step"]()
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    hwm = proc_status_kib("VmHWM")
    if hwm is None or rss0 is None:
        return None, "not measured (no /proc/self/status)"
    return (hwm - rss0) / 1024, "peak RSS (VmHWM) - RSS before the build, fresh process"


def _worker() -> None:
    """Subprocess entry: spec JSON on stdin, one marked result line on stdout."""
    spec = json.loads(sys.stdin.read())  # this module's import already imported mffzoo: the models are registered
    result = measure_memory(spec) if spec.get("mode") == "memory" else measure(spec)
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _in_subprocess(spec: Mapping[str, Any]) -> Any:
    what = f"{'/'.join(spec['impls'])} on {spec.get('recipe') or SIZE_NAMES[spec['size']]}"
    cmd = [sys.executable, "-c", "from mffzoo.throughput.train import _worker; _worker()"]
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


# --- the whole benchmark --------------------------------------------------------------------------------------
def _merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the median of the per-run img/s (every run's value is kept for the spread and
    for the paired ratios of :func:`add_ratios`)."""
    row = dict(runs[0])
    row["img_s_runs"] = [r["img_s"] for r in runs]
    row["img_s_best_runs"] = [r["img_s_best"] for r in runs]
    row["step_times_s"] = [t for r in runs for t in r["step_times_s"]]
    row["warmup_times_s"] = [t for r in runs for t in r.get("warmup_times_s", [])]
    row["img_s"] = statistics.median(row["img_s_runs"])
    row["step_s"] = row["batch"] / row["img_s"]
    row["img_s_best"] = max(row["img_s_best_runs"])
    compiles = [r["compile_s"] for r in runs if r.get("compile_s") is not None]
    row["compile_s_runs"] = compiles
    row["compile_s"] = statistics.median(compiles) if compiles else None
    if row.get("flops_per_step"):
        row["tflops"] = row["flops_per_step"] / row["step_s"] / 1e12
        row["mfu"] = row["tflops"] / row["peak_tflops"] if row.get("peak_tflops") else None
    row["load_before"] = max((r["load_before"] for r in runs if r["load_before"] is not None), default=None)
    row["load_after"] = max((r["load_after"] for r in runs if r["load_after"] is not None), default=None)
    return row


def _paired(a: Mapping[str, Any], b: Mapping[str, Any] | None, key: str = "img_s") -> tuple[float | None, list]:
    """(median, per-run list) of a's / b's ``key`` run by run: paired, so a run slowed by load cancels out."""
    if b is None:
        return None, []
    xs, ys = a.get(f"{key}_runs") or [a[key]], b.get(f"{key}_runs") or [b[key]]
    per_run = [x / y for x, y in zip(xs, ys)]
    return statistics.median(per_run), per_run


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model (label), for every row:

    - ``ratio`` (and ``ratio_runs``, ``ratio_best``): img/s / img/s of the peer under the row's own precision
      (``peer``; None when that peer row was not measured); the median of the per-run ratios;
    - ``ratio_fastest``: img/s / img/s of the fastest peer row of the run (``fastest_peer``);
    - ``ratio_eager``: a compiled row's img/s / its eager twin's (what compilation gains).
    ``best`` uses each side's fastest step, the steadier number when other jobs share the machine."""
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        by_impl = {r["impl"]: r for r in group}
        peers = [r for r in group if r["impl"] in PEERS]
        fastest = max(peers, key=lambda r: r["img_s"]) if peers else None
        for r in group:
            peer = by_impl.get(r.get("peer") or (r["impl"] if r["impl"] in PEERS else _PEER_OF[r["precision"]]))
            r["ratio"], r["ratio_runs"] = _paired(r, peer)
            if "img_s_best" in r:
                r["ratio_best"], r["ratio_best_runs"] = _paired(r, peer, "img_s_best")
            r["fastest_peer"] = fastest["impl"] if fastest else None
            r["ratio_fastest"], r["ratio_fastest_runs"] = _paired(r, fastest)
            r["ratio_eager"] = _paired(r, by_impl.get(EAGER_TWIN.get(r["impl"], "")))[0]
    return rows


def _names(values: Iterable[str], allowed: Iterable[str], what: str, hint: str) -> list[str]:
    out = list(dict.fromkeys(v.strip().lower() for v in values if v.strip()))
    allowed = list(allowed)
    for v in out:
        if v not in allowed:
            raise ConfigError(f"unknown {what} '{v}'; allowed: {', '.join(allowed)}{hint}")
    return out


def bench_train(
    models: Iterable[str] | None = None,
    *,
    recipe: str | os.PathLike[str] | None = None,
    impls: Iterable[str] | None = None,
    peers: Iterable[str] = ("auto",),
    batch_size: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 1,
    device: str | None = None,
    overrides: Sequence[str] = (),
    isolate: bool = True,
    memory: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every (model, implementation); one dict per pair, with the ratios of :func:`add_ratios`.

    ``models`` are sizes (default s, b) run with the recipe defaults; ``overrides`` then are ``model.*`` keys
    (``depth=4``: tiny models for tests). Or ``recipe`` (a file or bare name): what that recipe's run does here,
    with ``overrides`` as any recipe key (``train.batch_per_device=16``); its default rows are ``mffzoo`` and,
    when the recipe compiles, ``mffzoo-compile``. ``peers``: ``auto`` = the peer under the precision each mffzoo
    row resolves to, plus any named peer rows. Per model, one process times all implementations with interleaved
    steps (:func:`measure`); ``repeats`` runs that again in a fresh process and keeps every run's img/s for the
    spread and the paired ratios. Then, with ``memory``, each implementation's peak memory is taken in a process
    of its own. ``batch_size`` None uses the recipe's ``train.batch_per_device``, or per size
    :data:`DEFAULT_BATCH` (CPU) / :data:`DEFAULT_BATCH_GPU`. ``isolate=False`` measures in this process (quick;
    no memory is reported then, it would not be per implementation).
    """
    ours_allowed = [i for i in IMPLS if i not in PEERS]
    impl_list = None if impls is None else _names(impls, ours_allowed, "implementation",
                                                  " (peers go in --peers: auto, " + ", ".join(PEERS) + ")")
    peer_list = _names(peers, ["auto", *PEERS], "peer", "")
    for name, value, low in (("batch size", batch_size, 1), ("steps", steps, 1), ("warm-up steps", warmup, 0),
                             ("repeats", repeats, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if recipe is not None:
        if models:
            raise ConfigError("--models and --recipe exclude each other: the recipe names its model; drop --models")
        loaded = load_recipe(recipe, list(overrides))
        targets = [(None, loaded)]
        device = device or loaded.train.device
        recipe = str(find_recipe(recipe).resolve())  # absolute: a worker process finds it from any directory
        if impl_list is None:
            impl_list = ["mffzoo-compile", "mffzoo"] if recipe_compiles(loaded) else ["mffzoo"]
    else:
        sizes = _names(models if models is not None else ("s", "b"), SIZES, "model size", " (e.g. --models s,b)")
        targets = [(m, resolve_recipe(m, overrides)) for m in sizes]  # validates the overrides before any work
        if impl_list is None:
            impl_list = list(DEFAULT_IMPLS)
    if not targets:
        raise ConfigError("nothing to measure: give at least one model size (--models s,b)")
    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no GPU; use --device cpu")
    if any(i in EAGER_TWIN for i in impl_list) and warmup < 1:
        raise ConfigError("a compiled row needs warm-up steps (its compilation runs in them); use --warmup 2")

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[tuple[str, str]] = []
    for rep in range(repeats):
        for size, rec in targets:
            ours = impl_list
            same = {_PEER_OF[_quiet_precision(impl_recipe(rec, i).train.precision, torch.device(device))]
                    for i in ours}
            wanted = [p for p in PEERS if p in peer_list or ("auto" in peer_list and p in same)]
            names = wanted + ours
            if not names:
                raise ConfigError("nothing to measure: give at least one implementation (--impls) or peer (--peers)")
            if any(n in PEERS for n in names):
                try:
                    import transformers  # noqa: F401  (optional dependency, mffzoo[bench])
                except ImportError:
                    raise ConfigError(
                        "the peer (Hugging Face transformers) is not installed; pip install 'mffzoo[bench]'"
                    ) from None
            batch = batch_size or (rec.train.batch_per_device if recipe else default_batch(size, device))
            spec = dict(mode="speed", impls=names, size=size, recipe=recipe, device=device, batch=batch,
                        steps=steps, warmup=warmup, overrides=list(overrides), seed=seed)
            for r in _in_subprocess(spec) if isolate else measure(spec):
                key = (r["model"], r["impl"])
                if key not in runs:
                    order.append(key)
                runs.setdefault(key, []).append(r)
                if log:
                    extra = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
                    log(f"[run {rep + 1}/{repeats}] {r['model']} {r['impl']} ({r['precision']}): "
                        f"{r['img_s']:.2f} img/s{extra}, load {_fmt(r['load_before'])}->{_fmt(r['load_after'])}")
    rows = add_ratios([_merge_runs(runs[k]) for k in order])
    if isolate and memory:
        for r in rows:
            spec = dict(mode="memory", impls=[r["impl"]], size=r["size"], recipe=r["recipe"], device=device,
                        batch=r["batch"], overrides=list(overrides), seed=seed)
            r["peak_mem_mib"], r["mem_kind"] = _in_subprocess(spec)
            if log:
                log(f"[memory] {r['model']} {r['impl']}: {_fmt(r['peak_mem_mib'], '.0f')} MiB")
    return rows


# --- reporting ------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_results(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: what the table printers show."""
    cuda = any(r.get("flops_per_step") for r in rows)
    compiled = any(r.get("compiled") for r in rows)
    header = ["model", "implementation", "precision", "batch", "params (M)", "img/s", "img/s best",
              "peak mem (MiB)", "peer (same precision)", "ratio vs peer", "ratio per run", "ratio best",
              "ratio vs fastest peer"]
    if compiled:
        header += ["ratio vs eager", "compile (s)"]
    if cuda:
        header += ["TFLOP/s", "MFU (peak of its precision)"]
    out = []
    for r in rows:
        line = [r["model"], r["impl"], r["precision"], str(r["batch"]), f"{r['params'] / 1e6:.2f}",
                _fmt(r["img_s"]), _fmt(r.get("img_s_best")), _fmt(r.get("peak_mem_mib"), ".0f"),
                r.get("peer") or "-", _x(r["ratio"]),
                " / ".join(_fmt(v) for v in r.get("ratio_runs") or [None]),
                _x(r.get("ratio_best")), _x(r.get("ratio_fastest"))]
        if compiled:
            line += [_x(r.get("ratio_eager")), _fmt(r.get("compile_s"), ".1f")]
        if cuda:
            line += [_fmt(r.get("tflops"), ".1f"), _fmt(r["mfu"] * 100, ".1f") + "%" if r.get("mfu") else "-"]
        out.append(line)
    return header, out


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model: the fastest peer row of the run and every mffzoo row's ratio to it."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        fastest = group[0].get("fastest_peer")
        if fastest is None:
            continue
        peer = next(r for r in group if r["impl"] == fastest)
        ours = ", ".join(f"{r['impl']} {_x(r['ratio_fastest'])}" for r in group if r["impl"] not in PEERS)
        out.append(f"{model}: fastest peer {fastest} ({peer['precision']}, {peer['img_s']:.2f} img/s); "
                   f"vs it: {ours or 'no mffzoo row'}")
    return out


def print_results(rows: list[dict[str, Any]], markdown: bool = False) -> None:
    """Aligned text table (or Markdown for docs/) plus the fastest-peer summary, the like-for-like parameter
    check and the machine."""
    header, body = format_results(rows)
    if markdown:
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "|".join("---" for _ in header) + "|")
        for line in body:
            click.echo("| " + " | ".join(line) + " |")
    else:
        print_table(body, header)
    click.echo("")
    for line in summary_lines(rows):
        click.echo(line)
    for r in rows:
        click.echo(f"{r['model']} {r['impl']}: {r['params']:,} params ({r['trainable_params']:,} trainable), "
                   f"attention {r['attention']}, optimizer {r['optimizer']}, load {_fmt(r['load_before'])}"
                   f"->{_fmt(r['load_after'])}"
                   + (f", compile s per run {' / '.join(_fmt(c, '.1f') for c in r['compile_s_runs'])}"
                      if r.get("compile_s_runs") else ""))
    if rows:
        r = rows[0]
        if r.get("recipe"):
            click.echo(f"recipe: {r['recipe']}" + (f" with {', '.join(r['overrides'])}" if r["overrides"] else ""))
        elif r["overrides"]:
            click.echo(f"custom model: {', '.join(r['overrides'])}")
        click.echo(f"device: {r['device']}; img/s = batch / median of {r['steps']} timed steps after {r['warmup']} "
                   "warm-up, implementations' steps interleaved in one process per run; ratios = median over runs "
                   "of the run's img/s / the other row's img/s (peer: the HF peer under the row's precision); best = "
                   "fastest timed step (steadier when other jobs share the machine); compile = a compiled row's "
                   f"warm-up time beyond its eager twin's step; memory: {r['mem_kind']}")
