"""MFF (and MAE) pretraining: an unmodified timm ViT encoder + multi-level fusion + the MAE decoder.

The forward follows the official implementation (mmpretrain ``MFFViT``/``MFF`` on top of ``MAEViT``/``MAE``)
step by step: fixed sin-cos position embeddings, per-sample random masking, cls token, encoder blocks with the
outputs of ``fusion_layers`` collected (a ``Linear(C, C)`` on every selected level but the last), a softmax-
weighted sum of the levels, the encoder's final LayerNorm on the fused tokens, the MAE decoder, and MSE on the
masked patches against per-patch normalised pixels. ``fusion_layers=[depth - 1]`` is exactly MAE.

The encoder is a plain ``timm.models.vision_transformer.VisionTransformer``: ``model.encoder.state_dict()``
loads (strict) into ``timm.create_model("mff_vit_*", num_classes=0)``. The encoder is built by name through
timm's registry, which ``import mffzoo`` fills (:mod:`mffzoo.zoo.registry`), so this module imports no zoo code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..archs import canonical_arch, check_fusion_layers, default_fusion_layers, pretrain_heads
from .pos_embed import sincos_2d_pos_embed

__all__ = ["MFFPretrainModel", "MultiLevelFusion", "PretrainOutput", "create_pretrain_model"]


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    pred: torch.Tensor  # (B, L, p*p*3) predicted (normalised) pixels for every patch
    mask: torch.Tensor  # (B, L) 1 = removed (predicted), 0 = visible
    fusion_weights: torch.Tensor  # (K,) softmax over the fused levels


class MultiLevelFusion(nn.Module):
    """Softmax-weighted sum of K encoder levels; every level but the last gets a Linear(C, C). ``layers`` are the
    fused block indices, as :func:`~mffzoo.archs.check_fusion_layers` returns them (the model checks them)."""

    def __init__(self, dim: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.layers = list(layers)
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(len(layers) - 1))
        # Initialised to ones (uniform 1/K after softmax); frozen when there is a single level (plain MAE).
        # Shape (K, 1, 1, 1) as mmpretrain's ``proj_weights``: that is also why the official optimizer config
        # applies weight decay to it (it matches none of its no-decay keys), and timm's rule (no decay for 1-D
        # params) does the same for this shape.
        self.weights = nn.Parameter(torch.ones(len(layers), 1, 1, 1), requires_grad=len(layers) > 1)

    def project(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Transform the output of the ``level``-th selected block (level indexes ``self.layers``)."""
        return self.proj[level](x) if level < len(self.proj) else x

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w = F.softmax(self.weights, dim=0)
        fused = (torch.stack(list(levels)) * w).sum(dim=0)
        return fused, w.view(-1)


class MFFPretrainModel(nn.Module):
    def __init__(
        self,
        encoder: VisionTransformer,
        fusion_layers: Sequence[int] | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None:
            raise TypeError("encoder must be a timm VisionTransformer with a class token")
        depth = len(encoder.blocks)
        fusion_layers = check_fusion_layers(
            default_fusion_layers(None, depth) if fusion_layers is None else fusion_layers, depth)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing
        dim = encoder.embed_dim
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.fusion = MultiLevelFusion(dim, fusion_layers)

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        self.initialize_weights()

    # --- construction -------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE initialisation: fixed sin-cos pos-embeds, xavier linears (patch-embed as a linear), N(0, .02) tokens."""
        enc = self.encoder
        enc.pos_embed.requires_grad_(False)
        enc.pos_embed.copy_(sincos_2d_pos_embed(self.grid_size, enc.embed_dim, cls_token=True))
        self.decoder_pos_embed.copy_(sincos_2d_pos_embed(self.grid_size, self.decoder_pos_embed.shape[-1]))
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if enc.patch_embed.proj.bias is not None:
            nn.init.zeros_(enc.patch_embed.proj.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (besides 1-D params), as in MAE."""
        return {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed"}

    # --- patches ------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), channel-last within a patch (MAE layout)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, (gh, gw), c = self.patch_size, self.grid_size, self.in_chans
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    # --- forward ------------------------------------------------------------------------------------------
    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the (1 - ratio) patches with the smallest noise; ``mask`` is 1 where a patch was removed."""
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(imgs)
        x = x + enc.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, self.mask_ratio if mask_ratio is None else mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        levels = []
        selected = self.fusion.layers
        for i, blk in enumerate(enc.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in selected:
                levels.append(self.fusion.project(selected.index(i), x))
        fused, weights = self.fusion(levels)
        return enc.norm(fused), mask, ids_restore, weights

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        t = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        return t

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = (pred.float() - self.target(imgs).float()) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> PretrainOutput:
        latent, mask, ids_restore, weights = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return PretrainOutput(self.forward_loss(imgs, pred, mask), pred, mask, weights)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images (same normalisation as the input) for visualisation: masked input, prediction, and
        prediction pasted into the visible patches. With ``norm_pix`` the prediction is de-normalised with each
        patch's own mean/std, as in the MAE demo."""
        out = self(imgs, noise=noise)
        pred = out.pred.float()
        if self.norm_pix_loss:
            t = self.patchify(imgs.float())
            pred = pred * (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        m = out.mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        m_img = self.unpatchify(m)
        recon = self.unpatchify(pred)
        return {
            "input": imgs.float(),
            "masked": imgs.float() * (1 - m_img),
            "reconstruction": recon,
            "pasted": imgs.float() * (1 - m_img) + recon * m_img,
            "mask": m_img[:, :1],
        }

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights with timm keys (no fusion/decoder): what the zoo publishes."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def extras_state_dict(self) -> dict[str, torch.Tensor]:
        """Fusion + decoder weights (pretraining-only), for resuming or visualising."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def create_pretrain_model(
    arch: str = "mff_vit_base_patch16_224",
    *,
    fusion_layers: Sequence[int] | None = None,
    decoder_dim: int | None = None,
    decoder_depth: int | None = None,
    decoder_heads: int | None = None,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    grad_checkpointing: bool = False,
    **encoder_kwargs: Any,
) -> MFFPretrainModel:
    """Pretraining model for a registered arch; ``encoder_kwargs`` (img_size, depth, ...) override timm's.

    Defaults per size (fusion levels, decoder) come from ``PRETRAIN_DEFAULTS``; pass ``fusion_layers=[depth-1]``
    for the MAE baseline.
    """
    arch = canonical_arch(arch)
    encoder = timm.create_model(arch, pretrained=False, num_classes=0, **encoder_kwargs)
    depth = len(encoder.blocks)
    heads = pretrain_heads(arch, depth, fusion_layers=fusion_layers, decoder_dim=decoder_dim or None,
                           decoder_depth=decoder_depth or None, decoder_heads=decoder_heads or None)
    return MFFPretrainModel(
        encoder,
        **heads,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        grad_checkpointing=grad_checkpointing,
    )
