"""MAE vs MFF at small scale: a CPU-sized check of the paper's direction that anyone can rerun.

Both methods pretrain the same tiny ViT on the built-in demo dataset with the same recipe, data order, masks and
budget; the only difference is ``model.fusion_layers`` (``[depth-1]`` = MAE, several levels = MFF). Each run is
then read out with a k-NN and a linear probe on frozen features, its reconstruction loss on fixed validation
masks, and the frequency profile of its blocks. Several seeds give mean ± std.

This is a check of *direction* at toy scale (a 6-block, 128-wide ViT, a few thousand 64-px images, minutes of
CPU), not the paper's ImageNet result; see ``docs/reproduction.md`` for the published numbers next to ours.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..data.demo import write_demo_dataset
from ..eval.data import load_split, open_split
from ..eval.knn import knn_eval
from ..eval.linear import LinearProbeConfig, linear_probe
from ..io import default_demo_root, write_json
from ..models.mff import create_pretrain_model
from ..progress import configure_console_logging
from ..train import train
from ..train.checkpoint import CheckpointManager
from ..train.data import preview_transform
from ..train.engine import FINAL_LOSS_KIND
from ..train.recipe import DataConfig
from ..zoo import load_checkpoint_file
from .freq import frequency_analysis, plot_frequency

__all__ = ["TINY_MODEL", "FUSION", "QUICK_NOTE", "pretrain_recipe", "reproduce", "aggregate", "summary_rows",
           "markdown_table", "val_reconstruction_loss"]

# The encoder both methods share. depth 6 keeps the frequency analysis meaningful (an 8x8 token grid at 64 px).
TINY_MODEL: dict[str, Any] = dict(arch="mff_vit_small", img_size=64, patch_size=8, embed_dim=128, depth=6,
                                  num_heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4, mask_ratio=0.75,
                                  norm_pix_loss=True)
# MAE: the last block only. MFF: the paper's 6 levels (ViT-B: [0, 2, 4, 6, 8, 11] of 12 blocks) scaled to 6
# blocks, i.e. every block, as in recipes/demo.yaml; our choice for this depth.
FUSION: dict[str, list[int]] = {"mae": [5], "mff": [0, 1, 2, 3, 4, 5]}
# Budget chosen so 3 seeds x 2 methods + evaluation stay under 30 minutes on a 2-core CPU (measured: docs).
DEFAULT_EPOCHS = 6
BATCH = 64
LR = 1.0e-3  # absolute; the linear-scaling blr (1.5e-4 x 64/256) is far too small for a ~200-step budget
# Linear probe: SGD, since LARS's trust ratio (tuned for ~7k ImageNet iterations) barely moves a head in ~800.
PROBE: dict[str, Any] = dict(epochs=90, batch_size=256, blr=0.1, optimizer="sgd", warmup_epochs=10)
# What every output of `--quick` says (printed, reproduction.json, table.md, freq.png): its numbers come from a
# 1-epoch run of a 4-block model on 4 classes of 32-px images, so they test the plumbing and mean nothing else.
QUICK_NOTE = ("smoke run (--quick: tiny data, 1 epoch), not a result: it checks that the pipeline runs; its "
              "numbers say nothing about MAE vs MFF")


def pretrain_recipe(method: str, seed: int, epochs: int, data_root: str | os.PathLike[str],
                    model: dict[str, Any] | None = None, batch: int = BATCH) -> dict[str, Any]:
    """The recipe mapping for one run; MAE and MFF differ only in ``model.fusion_layers``."""
    m = dict(model or TINY_MODEL)
    depth = m["depth"]
    if depth == TINY_MODEL["depth"]:
        fusion = FUSION[method]
    else:  # other depths (the --quick smoke run): the same rule
        fusion = [depth - 1] if method == "mae" else list(range(depth))
    return {
        "name": f"{method}_seed{seed}",
        "description": f"mffzoo reproduce: {method.upper()} tiny ViT on the demo data (seed {seed})",
        "data": {"root": str(data_root), "augment": "mff", "num_workers": 0, "persistent_workers": False,
                 "pin_memory": False},
        "train": {"epochs": epochs, "batch_size": batch, "batch_per_device": batch, "precision": "fp32",
                  "device": "cpu", "seed": seed},
        "optim": {"lr": LR, "warmup_epochs": min(1.0, epochs / 2), "weight_decay": 0.05},  # --quick: 1 epoch
        "model": {**m, "fusion_layers": fusion},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "log": {"every_steps": 10, "progress": "epoch", "tensorboard": False, "vis_every_epochs": 0, "vis_images": 8},
        "publish": {"tag": None, "zoo": False},
    }


@torch.no_grad()
def val_reconstruction_loss(run_dir: Path, data_root: Path, num_images: int = 480, seed: int = 1234) -> float:
    """Masked-patch MSE on validation images with masks fixed by ``seed``: the same masks for every run."""
    newest = CheckpointManager(run_dir / "checkpoints").list()
    if not newest:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    state = load_checkpoint_file(newest[0])
    m = state["recipe"]["model"]
    net = create_pretrain_model(m["arch"], fusion_layers=m["fusion_layers"], decoder_dim=m["decoder_dim"],
                                decoder_depth=m["decoder_depth"], decoder_heads=m["decoder_heads"],
                                mask_ratio=m["mask_ratio"], norm_pix_loss=m["norm_pix_loss"],
                                img_size=m["img_size"], patch_size=m["patch_size"], embed_dim=m["embed_dim"],
                                depth=m["depth"], num_heads=m["num_heads"])
    net.load_state_dict(state["model"])
    net.eval()
    imgs, _ = load_split(open_split(data_root, "val", preview_transform(DataConfig(), m["img_size"])),
                          limit=num_images)
    num_patches = (m["img_size"] // m["patch_size"]) ** 2
    noise = torch.rand(len(imgs), num_patches, generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for x, n in zip(imgs.split(128), noise.split(128)):
        total += float(net(x, noise=n).loss) * len(x)
    return total / len(imgs)


def _mean_std(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def _run_one(method: str, seed: int, epochs: int, data_root: Path, out: Path, model: dict[str, Any],
             batch: int, log: Callable[[str], None], parent: int | None = None) -> dict[str, Any]:
    if parent is not None and os.getppid() != parent:
        # The driver is gone (killed): a pool worker must not start the queued runs on its own.
        raise SystemExit(1)

    run_dir = out / f"{method}_seed{seed}"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    t0 = time.time()
    if not (summary.get("completed") and (run_dir / "model" / "model.safetensors").is_file()
            and summary.get("total_steps") == summary.get("global_step")
            and summary.get("epochs") == epochs):
        log(f"[{method} seed {seed}] pretraining {epochs} epochs -> {run_dir}")
        train(pretrain_recipe(method, seed, epochs, data_root, model, batch), output_dir=run_dir)
        summary = json.loads(summary_path.read_text())
    else:
        log(f"[{method} seed {seed}] reusing finished run {run_dir}")
    t_train = time.time() - t0
    model_dir = run_dir / "model"
    cache = out / "feature_cache"
    # Read-outs on the CPU, like the pretraining: the recorded numbers do not depend on a GPU being visible.
    knn = knn_eval(model_dir, data_root, cache=str(cache), device="cpu")
    probe = linear_probe(model_dir, data_root, LinearProbeConfig(**PROBE, seed=seed), cache=str(cache), device="cpu")
    freq = frequency_analysis([model_dir], data_root, num_images=256, labels=[f"{method}_seed{seed}"], device="cpu")
    meta = json.loads((model_dir / "mffzoo.json").read_text())
    rec = {
        "method": method, "seed": seed, "run_dir": str(run_dir),
        "train_wall_s": round(summary.get("wall_s", t_train), 1),
        "steps": summary.get("global_step"),
        # a reused run of an older mffzoo recorded a last log window's loss, not the last epoch's mean: left out
        "train_loss_final": summary.get("final_loss") if summary.get("final_loss_kind") == FINAL_LOSS_KIND else None,
        "val_recon_loss": val_reconstruction_loss(run_dir, data_root),
        "knn_cls_top1": knn["results"]["cls"]["top1"], "knn_avg_top1": knn["results"]["avg"]["top1"],
        "linear_top1": probe["results"]["cls"]["top1"], "linear_top5": probe["results"]["cls"]["top5"],
        "fusion_layers": meta.get("fusion_layers"), "fusion_weights": meta.get("fusion_weights"),
        "freq": freq["models"][f"{method}_seed{seed}"],
    }
    log(f"[{method} seed {seed}] kNN {rec['knn_cls_top1']:.1f} / linear {rec['linear_top1']:.1f} / val recon "
        f"{rec['val_recon_loss']:.4f} / Δ@high(last block) {rec['freq']['high_freq'][-1]:+.3f} "
        f"({time.time() - t0:.0f} s)")
    return rec


METRICS = (("knn_cls_top1", "k-NN top-1 (cls token)"), ("knn_avg_top1", "k-NN top-1 (avg-pooled patch tokens)"),
           ("linear_top1", "linear top-1 (cls token)"), ("val_recon_loss", "val recon. loss"),
           ("train_loss_final", "final train loss (last-epoch mean)"),
           ("high_freq_last", "Δ log-amp @ high freq, last block"),
           ("high_freq_mean", "Δ log-amp @ high freq, mean of blocks"))


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std over seeds of every metric in :data:`METRICS`, the mean frequency curves and (MFF)
    the mean fusion weights. Adds ``high_freq_last`` / ``high_freq_mean`` to each run record."""
    for r in runs:
        r["high_freq_last"] = r["freq"]["high_freq"][-1]
        r["high_freq_mean"] = r["freq"]["mean_high_freq"]
    agg: dict[str, dict[str, Any]] = {}
    for method in ("mae", "mff"):
        mine = [r for r in runs if r["method"] == method]
        agg[method] = {k: _mean_std([float(r[k]) for r in mine if r.get(k) is not None]) for k, _ in METRICS
                       if any(r.get(k) is not None for r in mine)}
        curves = torch.tensor([r["freq"]["blocks"] for r in mine]).mean(dim=0)
        agg[method]["freq"] = {"frequencies": mine[0]["freq"]["frequencies"], "grid": mine[0]["freq"]["grid"],
                               "blocks": curves.tolist(), "high_freq": curves[:, -1].tolist(),
                               "mean_high_freq": float(curves[:, -1].mean())}
        if method == "mff":
            ws = torch.tensor([r["fusion_weights"] for r in mine if r.get("fusion_weights")])
            if len(ws):
                agg[method]["fusion_weights_mean"] = ws.mean(dim=0).tolist()
                agg[method]["fusion_layers"] = mine[0]["fusion_layers"]
    return agg


def _init_worker(threads: int) -> None:
    # Tiny matmuls scale badly across threads and OpenMP spin-waits collapse under CPU contention: one process
    # per core with one thread each is the fastest layout on a small CPU (measured in docs/reproduction.md).
    torch.set_num_threads(threads)
    configure_console_logging(level=logging.WARNING)  # a spawned process has no logging set up: no timm chatter


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def reproduce(output: str | os.PathLike[str] = "runs/reproduce", *, seeds: int = 3, epochs: int | None = None,
              quick: bool = False, workers: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain MAE and MFF for ``seeds`` seeds, evaluate both, aggregate, plot; rerunning reuses finished runs.

    Runs go to ``workers`` processes (default: one per core, at most 2, so MAE and MFF of a seed train side by
    side under the same load) with ``cores // workers`` threads each.
    """
    t0 = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = dict(TINY_MODEL)
    batch = BATCH
    if quick:  # plumbing check only: tiny data, 1 epoch
        data_root = write_demo_dataset(out / "demo-data-quick", num_classes=4, train_per_class=32, val_per_class=16,
                                       image_size=32)
        model.update(img_size=32, depth=4, embed_dim=64)
        epochs = epochs or 1
        batch = 32
    else:
        data_root = write_demo_dataset(default_demo_root())
        epochs = epochs or DEFAULT_EPOCHS
    cores = os.cpu_count() or 1
    workers = max(1, workers or min(2, cores))
    threads = max(1, cores // workers)
    jobs = [(method, seed) for seed in range(seeds) for method in ("mae", "mff")]
    log(f"reproduce: {len(jobs)} runs x {epochs} epochs on {data_root}, {workers} process(es) x {threads} thread(s)")
    if quick:
        log(f"reproduce: {QUICK_NOTE}")
    if workers == 1:
        _init_worker(threads)
        runs = [_run_one(m, s, epochs, data_root, out, model, batch, log) for m, s in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(_run_one, m, s, epochs, data_root, out, model, batch, _log_stderr, os.getpid())
                       for m, s in jobs]
            runs = [f.result() for f in futures]
    agg = aggregate(runs)
    n = len(runs) // 2
    plot_frequency({"models": {f"MAE (mean of {n} seeds)": agg["mae"]["freq"],
                               f"MFF (mean of {n} seeds)": agg["mff"]["freq"]}}, out / "freq.png",
                   title="relative log amplitude of block feature maps (demo data)"
                   + ("\nsmoke run (--quick), not a result" if quick else ""))
    res = {"quick": quick, **({"note": QUICK_NOTE} if quick else {}),
           "epochs": epochs, "seeds": seeds, "batch": batch, "lr": LR, "model": model,
           "fusion_layers": {"mae": runs[0]["fusion_layers"], "mff": runs[1]["fusion_layers"]}, "probe": PROBE,
           "data": str(data_root), "workers": workers, "threads_per_worker": threads, "cpu_count": cores,
           "runs": runs, "aggregate": agg, "wall_s": round(time.time() - t0, 1)}
    write_json(out / "reproduction.json", res)
    (out / "table.md").write_text(markdown_table(res))
    log(f"reproduce: done in {res['wall_s'] / 60:.1f} min")
    return res


def _fmt(m: dict[str, float], digits: int) -> str:
    if not m or not math.isfinite(m["mean"]):
        return "n/a"
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def summary_rows(res: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """(rows, header): one row per metric, ``mean ± std`` for MAE and MFF (n/a where a metric is missing)."""
    a = res["aggregate"]
    rows = []
    for key, name in METRICS:
        digits = 4 if "loss" in key else (3 if "high" in key else 2)
        rows.append([name, _fmt(a["mae"].get(key, {}), digits), _fmt(a["mff"].get(key, {}), digits)])
    return rows, ["metric (mean ± std over seeds)", "MAE", "MFF"]


def markdown_table(res: dict[str, Any]) -> str:
    """:func:`summary_rows` as a Markdown table (docs/reproduction.md), plus MFF's mean fusion weights; a
    ``--quick`` result opens with :data:`QUICK_NOTE`."""
    rows, header = summary_rows(res)
    lines = [f"**{QUICK_NOTE[0].upper()}{QUICK_NOTE[1:]}.**", ""] if res.get("quick") else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    fw = res["aggregate"]["mff"].get("fusion_weights_mean")
    if fw:
        layers = res["aggregate"]["mff"].get("fusion_layers") or list(range(len(fw)))
        lines.append("")
        lines.append("MFF softmax fusion weights (mean over seeds): " +
                     ", ".join(f"block {i}: {w:.3f}" for i, w in zip(layers, fw)))
    return "\n".join(lines) + "\n"
