"""Why the engine builds AdamW with ``fused=True`` on CPU too: one optimizer step of a pretraining model, the
engine's optimizer (:func:`mffzoo.train.engine.build_optimizer`: timm's factory, no-decay groups, torch's fused
kernel) against the same timm optimizer with torch's default (for-each) implementation. Steps interleaved, same
gradients, same process; prints the ratio.

    python bench/optimizer_step.py [--model mff_vit_small] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.optim import create_optimizer_v2

from mffzoo.models import create_pretrain_model
from mffzoo.train.engine import build_optimizer
from mffzoo.train.recipe import OptimConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mff_vit_small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_pretrain_model(args.model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    oc = OptimConfig()
    opts = {
        "engine (fused)": build_optimizer(model, oc, 4096),
        "timm default (for-each)": create_optimizer_v2(model, opt=oc.opt, lr=oc.resolved_lr(4096),
                                                       weight_decay=oc.weight_decay, betas=tuple(oc.betas)),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(args.steps + 2):  # 2 warm-up steps (optimizer state allocation)
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model} pretraining model, {n / 1e6:.1f}M trainable parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:26} {v:8.1f} ms")
    print(f"  fused vs for-each: {med['timm default (for-each)'] / med['engine (fused)']:.2f}x faster")


if __name__ == "__main__":
    main()
