"""How much of a pretraining step is matrix multiplication and attention, for mffzoo and its peer: the upper
bound on what any change outside those kernels can gain (Amdahl). One step each of ``mffzoo`` and HF
``ViTMAEForPreTraining`` as ``mffzoo bench train`` builds them (recipe defaults, same batch), under
``torch.profiler``; prints each one's share of CPU self time in GEMM + SDPA kernels, the largest ops, and the
bound ``1 / share`` on the ratio that everything else could still buy.

    python bench/train_step_profile.py [--size s] [--batch 16] [--threads 2] [--steps 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mffzoo.bench import train_impls

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="s", choices=sorted(train_impls.SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = {"device": "cpu", "batch": args.batch, "seed": 0, "size": args.size}
    for impl in ("mffzoo", "hf"):
        setup = train_impls.setup_impl(impl, spec)
        for _ in range(2):  # warm-up: allocator and kernel selection
            setup.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                setup.step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        share = sum(e.self_cpu_time_total for e in events if e.key.startswith(KERNELS)) / total
        print(f"{impl} ({setup.precision}, {setup.attention}): {total / args.steps / 1e6:.2f} s CPU self time "
              f"per step; GEMM + SDPA kernels {share:.1%}; everything else could buy at most {1 / share:.2f}x")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
            print(f"    {e.key:55s} {e.self_cpu_time_total / total:6.1%}")


if __name__ == "__main__":
    main()
