"""The MFF/MAE pretraining model against an independent re-computation of the official forward."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TINY, TINY_DECODER

import mffzoo  # noqa: F401
from mffzoo.models import create_pretrain_model
from mffzoo.models.pos_embed import sincos_2d_pos_embed


def tiny(fusion_layers=(0, 1, 3), **kw):
    torch.manual_seed(0)
    return create_pretrain_model("mff_vit_small", fusion_layers=list(fusion_layers), **TINY, **TINY_DECODER, **kw)


def reference_loss(model, imgs, noise, fusion_layers):
    """Official MFF forward written out directly (mmpretrain MFFViT.forward + MAE neck + head)."""
    enc = model.encoder
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * 0.25)
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(n, -1, -1), x], 1)
    res = []
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        if i in fusion_layers:
            res.append(model.fusion.proj[fusion_layers.index(i)](x) if i != fusion_layers[-1] else x)
    w = F.softmax(model.fusion.weights.view(-1, 1, 1, 1), dim=0)
    latent = enc.norm((torch.stack(res) * w).sum(0))
    y = model.decoder_embed(latent)
    toks = torch.cat([y[:, 1:], model.mask_token.repeat(n, length + 1 - y.shape[1], 1)], 1)
    toks = torch.gather(toks, 1, ids_restore[..., None].repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1], toks], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        y = blk(y)
    pred = model.decoder_pred(model.decoder_norm(y))[:, 1:]
    p = model.patch_size
    t = imgs.reshape(n, 3, imgs.shape[2] // p, p, imgs.shape[3] // p, p)
    t = t.permute(0, 2, 4, 3, 5, 1).reshape(n, length, -1)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - t) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def test_forward_matches_official_recomputation():
    model = tiny()
    with torch.no_grad():
        model.fusion.weights.copy_(torch.tensor([0.3, -1.0, 2.0]).view(3, 1, 1, 1))  # non-uniform weighting
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    out = model(imgs, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_loss(model, imgs, noise, [0, 1, 3])
    torch.testing.assert_close(out.pred, ref_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mask, ref_mask)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.fusion_weights, torch.softmax(torch.tensor([0.3, -1.0, 2.0]), 0))


def test_last_layer_only_is_plain_mae():
    model = tiny(fusion_layers=[3])
    assert len(model.fusion.proj) == 0 and not model.fusion.weights.requires_grad
    assert all(not n.startswith("fusion.proj") for n, _ in model.named_parameters())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    # Plain MAE: all blocks, final norm, decoder — no fusion at all.
    enc = model.encoder
    latent, mask, ids_restore, w = model.forward_encoder(imgs, noise=noise)
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    x, _, _ = model.random_masking(x, 0.75, noise)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    torch.testing.assert_close(latent, enc.norm(enc.blocks(x)))
    assert w.tolist() == [1.0]


def test_masking_is_deterministic_given_noise_and_counts_are_exact():
    model = tiny()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.mask, b.mask)
    assert a.mask.sum(1).tolist() == [12.0, 12.0]  # 75 % of 16 patches removed
    # the kept patches are the ones with the smallest noise
    kept = noise.argsort(1)[:, :4]
    assert torch.all(torch.gather(a.mask, 1, kept) == 0)
    c = model(imgs, noise=torch.rand(2, 16))
    assert not torch.equal(a.mask, c.mask)


def test_loss_only_on_masked_patches_and_norm_pix_target():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, noise=torch.rand(2, 16))
    pred = out.pred.detach().clone()
    visible = out.mask == 0
    pred[visible] += 100.0  # garbage where nothing is predicted must not change the loss
    torch.testing.assert_close(model.forward_loss(imgs, pred, out.mask), out.loss.detach())
    pred2 = out.pred.detach().clone()
    pred2[~visible] += 1.0
    assert model.forward_loss(imgs, pred2, out.mask) > out.loss
    t = model.target(imgs)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    raw = tiny(norm_pix_loss=False)
    torch.testing.assert_close(raw.target(imgs), raw.patchify(imgs))


def test_patchify_roundtrip_and_layout():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(model.unpatchify(patches), imgs)
    # patch 1 is the second patch of the first row; values are (row, col, channel) within the patch
    torch.testing.assert_close(patches[0, 1].view(8, 8, 3), imgs[0, :, 0:8, 8:16].permute(1, 2, 0))


def test_gradients_reach_every_fusion_parameter():
    model = tiny()
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.fusion.weights.grad.abs().min() > 0


def official_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """mmpretrain's 2-D sin-cos table written out entry by entry (square grid, tokens row-major, cls row zero):
    channels [sin(r w_k), cos(r w_k), sin(c w_k), cos(c w_k)] for row r, column c, w_k = 10000^(-k / (dim/4))."""
    q = dim // 4
    rows = [[0.0] * dim]
    for r in range(grid):
        for c in range(grid):
            w = [10000.0 ** (-k / q) for k in range(q)]
            rows.append([math.sin(r * x) for x in w] + [math.cos(r * x) for x in w]
                        + [math.sin(c * x) for x in w] + [math.cos(c * x) for x in w])
    return torch.tensor([rows], dtype=torch.float32)


def test_pos_embed_pinned_values():
    """Known numbers of the official layout: row in the first half, column in the second (MAE's numpy code has
    them the other way round)."""
    s1, c1, s01, c01 = 0.84147098, 0.54030231, 0.00999983, 0.99995000  # sin/cos of 1 and of 0.01
    expected = torch.tensor([[
        [0, 0, 0, 0, 0, 0, 0, 0],  # cls
        [0, 0, 1, 1, 0, 0, 1, 1],  # row 0, column 0
        [0, 0, 1, 1, s1, s01, c1, c01],  # row 0, column 1
        [s1, s01, c1, c01, 0, 0, 1, 1],  # row 1, column 0
        [s1, s01, c1, c01, s1, s01, c1, c01],  # row 1, column 1
    ]])
    torch.testing.assert_close(sincos_2d_pos_embed((2, 2), 8), expected, atol=1e-7, rtol=0)
    emb = sincos_2d_pos_embed((3, 3), 16)  # w_1 = 10000^(-1/4) = 0.1
    assert emb[0, 1 + 2 * 3 + 1, 1].item() == pytest.approx(math.sin(0.2), abs=1e-7)  # row 2: sin(2 * 0.1)
    assert emb[0, 1 + 2 * 3 + 1, 8 + 1].item() == pytest.approx(math.sin(0.1), abs=1e-7)  # column 1: sin(0.1)
    torch.testing.assert_close(emb, official_pos_embed(3, 16))
    torch.testing.assert_close(sincos_2d_pos_embed((14, 14), 768), official_pos_embed(14, 768))  # ViT-B/16 at 224


def test_mae_initialisation():
    model = tiny()
    enc = model.encoder
    assert not enc.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.data, official_pos_embed(4, 64))
    torch.testing.assert_close(model.decoder_pos_embed.data, official_pos_embed(4, 32))
    assert torch.all(enc.pos_embed[0, 0] == 0)
    assert model.fusion.weights.shape == (3, 1, 1, 1) and torch.all(model.fusion.weights == 1)  # as mmpretrain
    assert torch.all(model.fusion.proj[0].bias == 0)
    assert 0.005 < model.mask_token.std() < 0.05
    assert torch.all(enc.blocks[0].norm1.weight == 1)


def test_reconstruct_and_bf16_autocast():
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    rec = model.reconstruct(imgs, noise=torch.rand(2, 16))
    assert set(rec) == {"input", "masked", "reconstruction", "pasted", "mask"}
    assert rec["pasted"].shape == imgs.shape
    visible = rec["mask"].expand_as(imgs) == 0
    torch.testing.assert_close(rec["pasted"][visible], imgs[visible])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(imgs, noise=torch.rand(2, 16))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_activation_checkpointing_gives_same_gradients(monkeypatch: pytest.MonkeyPatch):
    """Same gradients, and checkpointing really is on: every encoder block goes through torch's checkpoint (a spy
    on the real call) and the forward keeps fewer tensors for backward (counted by a saved-tensors hook)."""
    import mffzoo.models.mff as mff

    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    real = mff.checkpoint
    monkeypatch.setattr(mff, "checkpoint", spy)

    def forward_saving(model, imgs, noise):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(imgs, noise=noise).loss
        return loss, len(saved)

    a, b = tiny(), tiny(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss_a, saved_a = forward_saving(a, imgs, noise)
    assert not calls
    loss_b, saved_b = forward_saving(b, imgs, noise)
    assert calls == list(b.encoder.blocks), calls
    assert saved_b < saved_a, (saved_b, saved_a)
    loss_a.backward()
    loss_b.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bad_fusion_layers_rejected():
    with pytest.raises(ValueError, match="outside"):
        tiny(fusion_layers=[0, 4])
    with pytest.raises(ValueError, match="last block"):
        tiny(fusion_layers=[0, 2])
    with pytest.raises(ValueError, match="increasing"):
        tiny(fusion_layers=[1, 0, 3])


@pytest.mark.parametrize("arch", ["mff_vit_small", "mff_vit_base"])
def test_official_sizes_encoder_loads_strict(arch):
    model = create_pretrain_model(arch)
    assert model.fusion.layers == [0, 2, 4, 6, 8, 11]
    assert model.decoder_embed.out_features == 512 and len(model.decoder_blocks) == 8
    backbone = timm.create_model(arch, num_classes=0)
    backbone.load_state_dict(model.encoder_state_dict(), strict=True)


@pytest.mark.slow
def test_torch_compile_runs():
    model = tiny()
    compiled = torch.compile(model)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(compiled(imgs, noise=noise).loss, model(imgs, noise=noise).loss, rtol=1e-4, atol=1e-5)
