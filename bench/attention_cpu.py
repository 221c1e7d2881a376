"""Why ``train.attention=auto`` picks math attention on CPU under bf16: one attention call, forward + backward,
through timm's two code paths (fused ``F.scaled_dot_product_attention`` vs ``q @ k^T -> softmax -> @ v``) at the
shapes MFF pretraining runs (B, heads, tokens, head dim). Prints the ratio math / SDPA per shape and precision,
both measured in this process, steps interleaved so other load hits both alike.

    python bench/attention_cpu.py [--batch 16] [--iters 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, heads, tokens, head dim): the 224-px pretraining shapes (49 visible patches + cls in the encoder at
# mask 0.75, all 196 patches + cls in the 512-wide, 16-head decoder) and a full-sequence encoder (fine-tuning).
SHAPES = [
    ("ViT-S encoder, 25% visible", 6, 50, 64),
    ("ViT-B encoder, 25% visible", 12, 50, 64),
    ("decoder 512 x 16 heads", 16, 197, 32),
    ("ViT-S encoder, all tokens", 6, 197, 64),
]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # timm Attention with fused_attn=False
    return attn.softmax(dim=-1) @ v


def _step(fn, q, k, v, dtype) -> float:
    for t in (q, k, v):
        t.grad = None
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = fn(q, k, v)
    out.float().sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fwd+bwd, median of "
          f"{args.iters} (ms)")
    print(f"{'shape (heads, tokens, head dim)':44} {'precision':9} {'sdpa':>8} {'math':>8}  math vs sdpa")
    kernels = {"sdpa": F.scaled_dot_product_attention, "math": _math}
    for name, h, n, d in SHAPES:
        for dtype, label in ((torch.bfloat16, "bf16"), (None, "fp32")):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(args.batch, h, n, d, generator=g, requires_grad=True) for _ in range(3))
            times: dict[str, list[float]] = {key: [] for key in kernels}
            for i in range(args.iters + 3):  # 3 warm-up rounds
                for key in (kernels if i % 2 == 0 else reversed(list(kernels))):
                    t = _step(kernels[key], q, k, v, dtype)
                    if i >= 3:
                        times[key].append(t)
            sdpa, math = (statistics.median(times[key]) * 1e3 for key in ("sdpa", "math"))
            print(f"{name + f' ({h}, {n}, {d})':44} {label:9} {sdpa:8.2f} {math:8.2f}  {sdpa / math:.2f}x faster"
                  if math < sdpa else
                  f"{name + f' ({h}, {n}, {d})':44} {label:9} {sdpa:8.2f} {math:8.2f}  {math / sdpa:.2f}x slower")


if __name__ == "__main__":
    main()
