"""Training throughput: one MFF pretraining step against Hugging Face ``ViTMAEForPreTraining``.

The peer is what a user would pick instead of mffzoo: ``transformers.ViTMAEForPreTraining`` built with the same
dimensions (encoder, 512x8 decoder, mask 0.75, norm_pix) and run with *its* defaults (fp32, its default attention
implementation). mffzoo runs with the recipe defaults (:mod:`mffzoo.train.recipe`: bf16 autocast, the attention
kernel ``train.attention=auto`` picks, fused AdamW with the no-decay groups), built, configured and stepped by the
training engine's own functions and task. A step is forward +
backward + optimizer step on the same random batch; img/s is the batch over the median step time after warm-up.
Speed claims are the ``ratio`` column (mffzoo / peer, same model size, same run, same machine), never absolute
numbers from another day.

Speed: per size, one fresh process builds every implementation and interleaves their steps, so other jobs on a
shared machine slow them alike. Memory: one fresh process per implementation, because on CPU the peak resident
memory (``VmHWM``) is per process and the allocator keeps freed pages — two models in one process would
contaminate the second peak.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, MffzooError
from ..train.metrics import proc_status_kib, reset_peak_memory

__all__ = [
    "SIZES", "DEFAULT_BATCH", "IMPLS", "PEER", "bench_train", "resolve_recipe", "hf_config", "build_model",
    "count_params", "measure", "add_ratios", "format_results", "print_results",
]

# Sizes the benchmark knows, and the per-step batch used for every implementation of that size: on a CPU small
# enough for the 24 GB / 2-core dev machine in fp32 and a run of a few minutes; on a GPU large enough that the
# step is compute-bound (at 16 images a GPU step is kernel-launch-bound and MFU means nothing), and small enough
# for the HF peer in fp32 on a 40 GB card.
SIZES = {"s": "mff_vit_small_patch16_224", "b": "mff_vit_base_patch16_224", "l": "mff_vit_large_patch16_224"}
SIZE_NAMES = {"s": "ViT-S/16", "b": "ViT-B/16", "l": "ViT-L/16"}
DEFAULT_BATCH = {"s": 16, "b": 8, "l": 4}
DEFAULT_BATCH_GPU = {"s": 256, "b": 128, "l": 64}

IMPLS = {
    "hf": "HF ViTMAEForPreTraining, its defaults",
    "mffzoo": "mffzoo MFF, recipe defaults",
    "mffzoo-mae": "mffzoo MAE mode (fusion_layers=[last]), recipe defaults",
    "hf-bf16": "HF ViTMAEForPreTraining + bf16 autocast (not its default)",
    "mffzoo-sdpa": "mffzoo MFF, recipe defaults but train.attention=sdpa (what the attention choice is worth)",
}
PEER = "hf"  # the ratio column divides by this row of the same model size
DEFAULT_IMPLS = ("hf", "mffzoo", "mffzoo-mae")

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


# --- models -------------------------------------------------------------------------------------------------
def resolve_recipe(size: str, overrides: Sequence[str] = (), mae: bool = False, attention: str = "auto") -> Any:
    """The default pretraining recipe for a size, with ``key=value`` model overrides (e.g. ``depth=4``) checked
    by the same schema as ``mffzoo train`` — so the benchmarked model is exactly what a recipe builds.
    ``mae`` switches to the MAE baseline (``fusion_layers=[depth - 1]``); ``attention`` is ``train.attention``."""
    from ..config import load_config
    from ..train.recipe import PretrainRecipe

    if size not in SIZES:
        raise ConfigError(f"unknown model size '{size}'; allowed: {', '.join(SIZES)} (e.g. --models s,b)")
    sets = [o if o.startswith("model.") else f"model.{o}" for o in overrides] + [f"train.attention={attention}"]
    recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    if mae:
        sets.append(f"model.fusion_layers=[{recipe.model.depth - 1}]")
        recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    return recipe


def hf_config(mc: Any) -> Any:
    """``ViTMAEConfig`` with the dimensions of a resolved ``ModelConfig`` (MLP ratio 4 as in timm's ViT).

    LayerNorm eps is set to timm's 1e-6 (HF's default is 1e-12): same model, and eps does not change speed."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        hidden_size=mc.embed_dim, num_hidden_layers=mc.depth, num_attention_heads=mc.num_heads,
        intermediate_size=4 * mc.embed_dim, decoder_hidden_size=mc.decoder_dim,
        decoder_num_hidden_layers=mc.decoder_depth, decoder_num_attention_heads=mc.decoder_heads,
        decoder_intermediate_size=4 * mc.decoder_dim, mask_ratio=mc.mask_ratio, norm_pix_loss=mc.norm_pix_loss,
        image_size=mc.img_size, patch_size=mc.patch_size, num_channels=3, layer_norm_eps=1e-6,
    )


def build_model(impl: str, size: str, overrides: Sequence[str] = ()) -> tuple[Any, Callable[[Any], Any], Any]:
    """(model, loss_fn(images), recipe) for one implementation.

    mffzoo is built and stepped by the training engine's own ``PretrainTask`` (per-sample mask noise included);
    the peer gets the recipe's model dimensions and computes its own masking, as its users would run it."""
    if impl not in IMPLS:
        raise ConfigError(f"unknown implementation '{impl}'; allowed: {', '.join(IMPLS)}")
    recipe = resolve_recipe(size, overrides, mae=impl == "mffzoo-mae",
                            attention="sdpa" if impl == "mffzoo-sdpa" else "auto")
    if impl.startswith("mffzoo"):
        import torch

        from ..train.data import Batch
        from ..train.pretrain import PretrainTask

        task = PretrainTask(recipe)
        model = task.build_model()

        def loss_fn(x: Any) -> Any:
            n = x.shape[0]
            seeds = torch.arange(n, dtype=torch.int64)
            batch = Batch(images=x, targets=torch.full((n,), -1, dtype=torch.int64), seeds=seeds)
            return task.step(model, batch)[0]

        return model, loss_fn, recipe
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining(hf_config(recipe.model))
    return model, lambda x: model(pixel_values=x).loss, recipe


def count_params(model: Any) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _peer_optimizer(model: Any, recipe: Any, batch: int) -> Any:
    """Plain ``torch.optim.AdamW``, as the peer's users would build it; same hyper-parameters as the recipe's
    (they do not change speed)."""
    import torch

    oc = recipe.optim
    return torch.optim.AdamW(model.parameters(), lr=oc.resolved_lr(batch), betas=tuple(oc.betas), eps=oc.eps,
                             weight_decay=oc.weight_decay)


# --- peaks -------------------------------------------------------------------------------------------------
def _gpu_peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak of GPU ``name`` (``torch.cuda.get_device_name()``) for matmuls in ``precision``."""
    return next((peaks.get(precision) for key, peaks in GPU_PEAK_TFLOPS if key in name), None)


def default_batch(size: str, device: str) -> int:
    return (DEFAULT_BATCH_GPU if device == "cuda" else DEFAULT_BATCH)[size]


# --- measuring ----------------------------------------------------------------------------------------------
def _preimport(impls: Iterable[str]) -> None:
    """Import what the builds need up front: library code must not count as a model's memory or first step."""
    import timm.optim  # noqa: F401

    from ..train import engine, pretrain  # noqa: F401

    if any(i.startswith("hf") for i in impls):
        import transformers.models.vit_mae.modeling_vit_mae  # noqa: F401


def _setup(impl: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Model, optimizer, AMP and a ``step()`` closure for one implementation, plus what the report says of it."""
    import torch

    device, batch = spec["device"], int(spec["batch"])
    torch.manual_seed(int(spec.get("seed", 0)))
    model, loss_fn, recipe = build_model(impl, spec["size"], spec.get("overrides", ()))
    model.to(device).train()
    dev = torch.device(device)
    from ..train.engine import Tf32

    if impl.startswith("mffzoo"):  # exactly what the engine does with the recipe
        from ..train.engine import build_optimizer, configure_attention, resolve_precision

        amp_dtype, use_scaler = resolve_precision(recipe.train.precision, dev)
        flags = Tf32.for_run(dev, amp_dtype)  # as a run holds it; only around this implementation's steps
        attention = "timm " + configure_attention(model, recipe.train.attention, dev, amp_dtype)
        opt = build_optimizer(model, recipe.optim, batch)
        opt_name = f"timm {recipe.optim.opt}" + (" fused" if opt.defaults.get("fused") else "")
    else:  # the peer in fp32 unless its (labelled) bf16 row is asked for
        bf16 = impl == "hf-bf16" and (device == "cpu" or torch.cuda.is_bf16_supported())
        amp_dtype, use_scaler = (torch.bfloat16 if bf16 else None), False
        flags = Tf32(False)  # the process's own flags: torch's defaults (fp32 matmuls), the peer's default
        attention = f"transformers {model.config._attn_implementation}"
        opt, opt_name = _peer_optimizer(model, recipe, batch), "torch AdamW"
    autocast = torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)
    size = recipe.model.img_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with flags:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(images)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    with flags:  # what the matmuls of a step run in: the MFU peak to divide by
        tf32 = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    total, trainable = count_params(model)
    return dict(step=step, impl=impl, params=total, trainable_params=trainable, optimizer=opt_name,
                precision={None: "tf32" if tf32 else "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
                attention=attention)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measure(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Time every implementation in ``spec["impls"]`` for one size, in *this* process, steps interleaved.

    Round r runs one step of each implementation (starting order rotated per round), so load from other
    processes on a shared machine hits all of them alike and the ratio stays honest. ``spec`` is JSON-able."""
    import torch

    impls, device = list(spec["impls"]), spec["device"]
    batch, steps, warmup = int(spec["batch"]), int(spec["steps"]), int(spec["warmup"])
    _preimport(impls)
    load_before = _load()
    setups = [_setup(i, spec) for i in impls]
    cuda = device == "cuda"
    flops: dict[str, int | None] = {i: None for i in impls}
    times: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(warmup + steps):
        for k in range(len(setups)):
            s = setups[(r + k) % len(setups)]
            if r == 0 and cuda and warmup > 0:
                # FLOPs of a step, counted once in a warm-up step. CUDA only: the CPU flash-attention kernels
                # are not registered with the counter, so a CPU count would silently miss attention.
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    s["step"]()
                flops[s["impl"]] = counter.get_total_flops()
                continue
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            s["step"]()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[s["impl"]].append(time.perf_counter() - t0)

    load_after = _load()
    if cuda:
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    size = spec["size"]
    rows = []
    for s in setups:
        impl = s["impl"]
        peak = _gpu_peak_tflops(dev_name, s["precision"]) if cuda else None
        step_s = statistics.median(times[impl])
        tflops = flops[impl] / step_s / 1e12 if flops[impl] else None
        rows.append({
            "model": SIZE_NAMES[size] + (" (custom)" if spec.get("overrides") else ""), "size": size,
            "impl": impl, "label": IMPLS[impl], "device": dev_name, "precision": s["precision"],
            "attention": s["attention"], "optimizer": s["optimizer"], "overrides": list(spec.get("overrides", ())),
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
    import torch

    (impl,) = spec["impls"]
    _preimport([impl])
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_memory(torch.device("cpu"))
    rss0 = proc_status_kib("VmRSS")
    s = _setup(impl, spec)
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
    spec = json.loads(sys.stdin.read())
    import mffzoo  # noqa: F401  (registers the timm models)

    result = measure_memory(spec) if spec.get("mode") == "memory" else measure(spec)
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _in_subprocess(spec: Mapping[str, Any]) -> Any:
    what = f"{'/'.join(spec['impls'])} on {SIZE_NAMES[spec['size']]}"
    cmd = [sys.executable, "-c", "from mffzoo.throughput.train import _worker; _worker()"]
    proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True)
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
    """One row from repeated runs: medians of the per-run img/s and of the per-run (paired) ratios; every run's
    values are kept for the spread."""
    row = dict(runs[0])
    row["img_s_runs"] = [r["img_s"] for r in runs]
    row["ratio_runs"] = [r["ratio"] for r in runs]
    row["step_times_s"] = [t for r in runs for t in r["step_times_s"]]
    row["img_s"] = statistics.median(row["img_s_runs"])
    row["step_s"] = row["batch"] / row["img_s"]
    row["ratio"] = None if None in row["ratio_runs"] else statistics.median(row["ratio_runs"])
    row["img_s_best"] = max(r["img_s_best"] for r in runs)
    bests = [r["ratio_best"] for r in runs]
    row["ratio_best_runs"] = bests
    row["ratio_best"] = None if None in bests else statistics.median(bests)
    if row.get("flops_per_step"):
        row["tflops"] = row["flops_per_step"] / row["step_s"] / 1e12
        row["mfu"] = row["tflops"] / row["peak_tflops"] if row.get("peak_tflops") else None
    row["load_before"] = max((r["load_before"] for r in runs if r["load_before"] is not None), default=None)
    row["load_after"] = max((r["load_after"] for r in runs if r["load_after"] is not None), default=None)
    return row


def add_ratios(rows: list[dict[str, Any]], peer: str = PEER) -> list[dict[str, Any]]:
    """``ratio`` = img/s / the peer's img/s for the same model size (None when the peer was not measured); the
    same for ``ratio_best`` (fastest step of each), the steadier number when other jobs share the machine."""
    peers = {r["model"]: r for r in rows if r["impl"] == peer}
    for r in rows:
        p = peers.get(r["model"])
        r["ratio"] = r["img_s"] / p["img_s"] if p else None
        if "img_s_best" in r:
            r["ratio_best"] = r["img_s_best"] / p["img_s_best"] if p else None
    return rows


def bench_train(
    models: Iterable[str] = ("s", "b"),
    *,
    impls: Iterable[str] = DEFAULT_IMPLS,
    batch_size: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 1,
    device: str = "auto",
    overrides: Sequence[str] = (),
    isolate: bool = True,
    memory: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every (size, implementation); one dict per pair, with ``ratio`` against the HF peer.

    Per size, one process times all implementations with interleaved steps (:func:`measure`); ``repeats`` runs
    that again in a fresh process and keeps every run's img/s and ratio (``img_s_runs``, ``ratio_runs``) for the
    spread. Then, with ``memory``, each implementation's peak memory is taken in a process of its own.
    ``batch_size`` None uses :data:`DEFAULT_BATCH` (CPU) or :data:`DEFAULT_BATCH_GPU` per size (the same for every
    implementation). ``overrides``
    are recipe ``model.*`` keys (``depth=4``) applied to every size — tiny models for tests. ``isolate=False``
    measures in this process (quick; no memory is reported then, it would not be per implementation).
    """
    models, impls = [m.strip().lower() for m in models], [i.strip().lower() for i in impls]
    for m in models:
        if m not in SIZES:
            raise ConfigError(f"unknown model size '{m}'; allowed: {', '.join(SIZES)} (e.g. --models s,b)")
    for i in impls:
        if i not in IMPLS:
            raise ConfigError(f"unknown implementation '{i}'; allowed: {', '.join(IMPLS)}")
    if not models or not impls:
        raise ConfigError("nothing to measure: give at least one model size and one implementation")
    for name, value, low in (("batch size", batch_size, 1), ("steps", steps, 1), ("warm-up steps", warmup, 0),
                             ("repeats", repeats, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no GPU; use --device cpu")
    if any(i.startswith("hf") for i in impls):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the peer (Hugging Face transformers) is not installed; pip install 'mffzoo[bench]'"
            ) from None
    for m in models:  # validate overrides once, before minutes of work
        resolve_recipe(m, overrides)

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(repeats):
        for m in models:
            spec = dict(mode="speed", impls=impls, size=m, device=device, batch=batch_size or default_batch(m, device),
                        steps=steps, warmup=warmup, overrides=list(overrides), seed=seed)
            for r in add_ratios(_in_subprocess(spec) if isolate else measure(spec)):
                if log:
                    log(f"[run {rep + 1}/{repeats}] {r['model']} {r['impl']}: {r['img_s']:.2f} img/s, ratio "
                        f"{_fmt(r['ratio'])}, load {_fmt(r['load_before'])}->{_fmt(r['load_after'])}")
                runs.setdefault((m, r["impl"]), []).append(r)
    rows = [_merge_runs(runs[(m, i)]) for m in models for i in impls]
    if isolate and memory:
        for r in rows:
            spec = dict(mode="memory", impls=[r["impl"]], size=r["size"], device=device, batch=r["batch"],
                        overrides=list(overrides), seed=seed)
            r["peak_mem_mib"], r["mem_kind"] = _in_subprocess(spec)
            if log:
                log(f"[memory] {r['model']} {r['impl']}: {_fmt(r['peak_mem_mib'], '.0f')} MiB")
    return rows


# --- reporting ------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_results(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: what the table printers show."""
    cuda = any(r.get("flops_per_step") for r in rows)
    header = ["model", "implementation", "precision", "batch", "params (M)", "img/s", "img/s best",
              "peak mem (MiB)", f"ratio vs {PEER}", "ratio per run", "ratio best"]
    if cuda:
        header += ["TFLOP/s", "MFU (peak of its precision)"]
    out = []
    for r in rows:
        line = [r["model"], r["impl"], r["precision"], str(r["batch"]), f"{r['params'] / 1e6:.2f}",
                _fmt(r["img_s"]), _fmt(r.get("img_s_best")), _fmt(r["peak_mem_mib"], ".0f"),
                _fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
                " / ".join(_fmt(v) for v in r.get("ratio_runs", [r["ratio"]])),
                _fmt(r.get("ratio_best"), ".2f") + ("x" if r.get("ratio_best") is not None else "")]
        if cuda:
            line += [_fmt(r.get("tflops"), ".1f"), _fmt(r["mfu"] * 100, ".1f") + "%" if r.get("mfu") else "-"]
        out.append(line)
    return header, out


def print_results(rows: list[dict[str, Any]], markdown: bool = False) -> None:
    """Aligned text table (or Markdown for docs/) plus the like-for-like parameter check and the machine."""
    import click

    header, body = format_results(rows)
    if markdown:
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "|".join("---" for _ in header) + "|")
        for line in body:
            click.echo("| " + " | ".join(line) + " |")
    else:
        from ..table import print_table

        print_table(body, header)
    click.echo("")
    for r in rows:
        click.echo(f"{r['model']} {r['impl']}: {r['params']:,} params ({r['trainable_params']:,} trainable), "
                   f"attention {r['attention']}, optimizer {r['optimizer']}, load {_fmt(r['load_before'])}"
                   f"->{_fmt(r['load_after'])}")
    if rows:
        r = rows[0]
        if r["overrides"]:
            click.echo(f"custom model: {', '.join(r['overrides'])}")
        click.echo(f"device: {r['device']}; img/s = batch / median of {r['steps']} timed steps after {r['warmup']} "
                   "warm-up, implementations' steps interleaved in one process per run; ratio = median over runs "
                   f"of img/s / {PEER} img/s of the same run; best = fastest timed step (steadier when other jobs "
                   f"share the machine); memory: {r['mem_kind']}")
