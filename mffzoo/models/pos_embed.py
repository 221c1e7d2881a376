"""Fixed 2-D sin-cos position embeddings, laid out as in mmpretrain (the official MFF code).

mmpretrain puts the row coordinate in the first half of the channels and the column in the second; the
original MAE numpy code has them the other way round. Both are valid; we follow the official MFF code so a
resumed official checkpoint sees the embedding it was trained with.
"""

from __future__ import annotations

import torch


def sincos_2d_pos_embed(
    grid_size: tuple[int, int], embed_dim: int, cls_token: bool = True, temperature: float = 10000.0
) -> torch.Tensor:
    """(1, [1 +] H*W, C) fixed embedding; the cls row (if any) is zeros, as in MAE."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    h, w = grid_size
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    if cls_token:
        emb = torch.cat([torch.zeros(1, 1, embed_dim), emb], dim=1)
    return emb
