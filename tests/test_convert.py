"""Conversion of every supported checkpoint format, checked against an independent forward."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
from helpers import MM_NAMES, TIMM_NAMES, TINY, TINY_DECODER, functional_vit, random_state_dict, timm_to_mm

import mffzoo  # noqa: F401
from mffzoo.cli.main import main
from mffzoo.errors import CheckpointError
from mffzoo.models import create_pretrain_model
from mffzoo.train.publish import build_hub_folder
from mffzoo.zoo import convert_checkpoint, convert_state_dict, load_checkpoint_file


def tiny_backbone(**kw):
    return timm.create_model("mff_vit_small", pretrained=False, num_classes=0, **TINY, **kw)


@pytest.fixture
def imgs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def mm_pretrain_checkpoint(seed=0):
    """An mmpretrain MFF pretraining checkpoint: backbone + fusion + neck, with an mmengine meta dict."""
    model = create_pretrain_model("mff_vit_small", fusion_layers=[0, 1, 3], **TINY, **TINY_DECODER)
    sd = random_state_dict(model, seed)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    mm = timm_to_mm(enc)
    mm["backbone.proj_weights"] = torch.randn(3, 1, 1, 1)
    for k in range(2):
        mm[f"backbone.proj_layers.{k}.weight"] = sd[f"fusion.proj.{k}.weight"]
        mm[f"backbone.proj_layers.{k}.bias"] = sd[f"fusion.proj.{k}.bias"]
    mm["neck.mask_token"] = sd["mask_token"]
    mm["neck.decoder_pos_embed"] = sd["decoder_pos_embed"]
    for part in ("decoder_embed", "decoder_pred"):
        for wb in ("weight", "bias"):
            mm[f"neck.{part}.{wb}"] = sd[f"{part}.{wb}"]
    for wb in ("weight", "bias"):
        mm[f"neck.ln1.{wb}"] = sd[f"decoder_norm.{wb}"]
    for k, v in timm_to_mm({key.replace("decoder_blocks", "blocks"): v for key, v in sd.items()
                            if key.startswith("decoder_blocks.")}).items():
        mm[k.replace("backbone.layers", "neck.decoder_blocks")] = v
    meta = {"epoch": 300, "iter": 100, "mmengine_version": "0.8.4", "seed": 2, "cfg": "model = dict(type='MFF')",
            "dataset_meta": {"classes": ["a", "b"]}, "best_loss": np.float64(0.41), "steps": np.int64(7)}
    return {"meta": meta, "state_dict": mm}, sd


def test_mmpretrain_pretraining_checkpoint(imgs):
    ckpt, ours = mm_pretrain_checkpoint()
    conv = convert_state_dict(ckpt)
    assert conv.source_format == "mmpretrain" and not conv.is_classifier
    model = tiny_backbone()
    model.load_state_dict(conv.backbone, strict=True)
    with torch.no_grad():
        expected = functional_vit(ckpt["state_dict"], imgs, MM_NAMES, num_heads=4)
        got = model.forward_head(model.forward_features(imgs), pre_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # fusion + decoder land in the pretraining model's own names, and load back into it
    assert conv.extras["fusion.weights"].shape == (3, 1, 1, 1)  # mmpretrain's own layout, loads as is
    pre = create_pretrain_model("mff_vit_small", fusion_layers=[0, 1, 3], **TINY, **TINY_DECODER)
    full = {**{"encoder." + k: v for k, v in conv.backbone.items()}, **conv.extras}
    pre.load_state_dict(full, strict=True)
    torch.testing.assert_close(pre.decoder_blocks[0].mlp.fc2.weight, ours["decoder_blocks.0.mlp.fc2.weight"])
    torch.testing.assert_close(pre.fusion.weights.data, ckpt["state_dict"]["backbone.proj_weights"])


def test_mmpretrain_finetuned_classifier_same_logits(imgs):
    clf = timm.create_model("mff_vit_small", pretrained=False, num_classes=10, global_pool="avg", fc_norm=True, **TINY)
    sd = random_state_dict(clf, 3)
    ckpt = {"meta": {"epoch": 100}, "state_dict": timm_to_mm(sd)}
    assert "backbone.ln2.weight" in ckpt["state_dict"] and "backbone.ln1.weight" not in ckpt["state_dict"]
    conv = convert_state_dict(ckpt)
    assert conv.is_classifier and conv.arch_kwargs()["num_classes"] == 10
    assert conv.arch_kwargs()["global_pool"] == "avg"
    clf.load_state_dict(conv.backbone, strict=True)
    with torch.no_grad():
        expected = functional_vit(ckpt["state_dict"], imgs, MM_NAMES, num_heads=4, pool="avg")
        torch.testing.assert_close(clf(imgs), expected, rtol=1e-4, atol=1e-5)


def test_finetuned_classifier_file_through_timm_overlay_keeps_its_head(tmp_path, imgs):
    """`pretrained_cfg_overlay=dict(file=...)` with a fine-tuned classifier: the file's head and pooling decide,
    with no extra kwargs (the tags' cfg says num_classes=0, which would otherwise drop the head)."""
    clf = timm.create_model("mff_vit_small", num_classes=10, global_pool="avg", fc_norm=True, **TINY)
    ckpt = {"meta": {"epoch": 100}, "state_dict": timm_to_mm(random_state_dict(clf, 6))}
    torch.save(ckpt, tmp_path / "ft.pth")
    overlay = dict(file=str(tmp_path / "ft.pth"))
    model = timm.create_model("mff_vit_small", pretrained=True, pretrained_cfg_overlay=overlay, num_heads=4).eval()
    assert model.num_classes == 10 and model.global_pool == "avg"
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept around
    assert model.pretrained_cfg["file"] == str(tmp_path / "ft.pth")  # provenance (export sidecars record it)
    with torch.no_grad():
        expected = functional_vit(ckpt["state_dict"], imgs, MM_NAMES, num_heads=4, pool="avg")
        torch.testing.assert_close(model(imgs), expected, rtol=1e-4, atol=1e-5)
    # asking for another head is timm's fine-tuning behaviour: a fresh head, the backbone kept
    fresh = timm.create_model("mff_vit_small", pretrained=True, num_classes=3, num_heads=4,
                              pretrained_cfg_overlay=overlay)
    assert fresh.num_classes == 3 and torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_mae_release_format_with_decoder(imgs):
    pre = create_pretrain_model("mff_vit_small", fusion_layers=[3], **TINY, **TINY_DECODER)
    sd = random_state_dict(pre, 5)
    mae = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in sd.items()
           if not k.startswith("fusion.")}
    conv = convert_state_dict({"model": mae})
    assert conv.source_format == "mae"
    assert set(conv.extras) == {k for k in mae if k.startswith(("decoder", "mask_token"))}
    model = tiny_backbone()
    model.load_state_dict(conv.backbone, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(imgs), pre_logits=True),
                                   functional_vit(mae, imgs, TIMM_NAMES, num_heads=4), rtol=1e-4, atol=1e-5)


def test_mffzoo_training_checkpoint_with_wrappers(imgs):
    pre = create_pretrain_model("mff_vit_small", fusion_layers=[0, 1, 3], **TINY, **TINY_DECODER)
    sd = random_state_dict(pre, 7)
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}  # DDP + torch.compile prefixes
    ckpt = {"model": wrapped, "model_args": dict(TINY), "arch": "mff_vit_small_patch16_224", "epoch": 3}
    conv = convert_state_dict(ckpt)
    assert conv.source_format == "mffzoo"
    assert conv.arch_kwargs()["num_heads"] == 4  # from model_args, not guessed
    model = tiny_backbone()
    model.load_state_dict(conv.backbone, strict=True)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(imgs), pre_logits=True),
                                   functional_vit(enc, imgs, TIMM_NAMES, num_heads=4), rtol=1e-4, atol=1e-5)


def test_leftover_keys_and_shape_mismatch_are_clear_errors():
    ckpt, _ = mm_pretrain_checkpoint()
    ckpt["state_dict"]["backbone.something_new.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"no mapping: backbone\.something_new\.weight"):
        convert_state_dict(ckpt)
    ckpt, _ = mm_pretrain_checkpoint()
    with pytest.raises(CheckpointError, match="does not match the model"):
        convert_state_dict(ckpt, target=timm.create_model("mff_vit_small", num_classes=0, **{**TINY, "embed_dim": 96}))
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        convert_state_dict({"foo.bar": torch.zeros(1)})


def test_blind_replace_pitfalls_are_avoided():
    """`ln1` is norm1 inside a layer but the final norm at the top; proj_layers must not become attn.proj."""
    ckpt, _ = mm_pretrain_checkpoint()
    conv = convert_state_dict(ckpt)
    torch.testing.assert_close(conv.backbone["norm.weight"], ckpt["state_dict"]["backbone.ln1.weight"])
    sd = ckpt["state_dict"]
    torch.testing.assert_close(conv.backbone["blocks.2.norm1.weight"], sd["backbone.layers.2.ln1.weight"])
    assert not any("proj_layers" in k for k in conv.backbone)
    assert {k for k in conv.extras if k.startswith("fusion.proj")} == {
        "fusion.proj.0.weight", "fusion.proj.0.bias", "fusion.proj.1.weight", "fusion.proj.1.bias"}


def test_convert_file_to_folder_and_load_via_timm(tmp_path, imgs):
    ckpt, _ = mm_pretrain_checkpoint()
    src = tmp_path / "official.pth"
    torch.save(ckpt, src)
    out = convert_checkpoint(src, tmp_path / "converted", num_heads=4, keep_extras=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "mff_vit_small_patch16_224" and cfg["model_args"]["embed_dim"] == 64
    assert (out / "model.safetensors").is_file() and (out / "pretrain_extras.safetensors").is_file()
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(imgs), pre_logits=True),
                                   functional_vit(ckpt["state_dict"], imgs, MM_NAMES, num_heads=4),
                                   rtol=1e-4, atol=1e-5)
    meta = json.loads((out / "mffzoo.json").read_text())
    assert meta["source_format"] == "mmpretrain" and meta["fusion_levels"] == 3


def test_converted_folders_are_labelled_by_what_the_source_is(tmp_path, capsys):
    """A plain timm state dict carries no sign of how it was pretrained: its folder says "unknown" (not MFF, not
    the MFF paper in config.json, not an MFF model card), while an mmpretrain file with fusion weights is MFF."""
    timm_src = tmp_path / "plain_timm.pth"
    torch.save(random_state_dict(tiny_backbone(), 3), timm_src)
    mm_src = tmp_path / "official.pth"
    torch.save(mm_pretrain_checkpoint()[0], mm_src)
    label = "ViT (dim 64, depth 4, 4 heads, patch 8, 32 px; shrunk from ViT-S/16)"
    main(["convert", str(timm_src), str(tmp_path / "timm"), "--num-heads", "4"])
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'timm'}: {label}, from a timm state dict, pretraining method unknown (load " in printed
    for name, src, method, kind in (
            ("timm", timm_src, "unknown", "timm state dict, pretraining method unknown"),
            ("mm", mm_src, "mff", "mmpretrain MFF checkpoint (3 fused levels)")):
        out = tmp_path / name
        if not out.exists():
            convert_checkpoint(src, out, num_heads=4)
        meta = json.loads((out / "mffzoo.json").read_text())
        assert (meta["method"], meta["source_kind"], meta["model"]) == (method, kind, label)
        cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
        assert ("paper_ids" in cfg) is (method == "mff")
        card = (build_hub_folder(out, tmp_path / f"hub-{name}", "me/x") / "README.md").read_text()
        assert (f"| method | {kind} |" in card) is (method == "unknown")
        assert ("MFF (multi-level feature fusion)" in card) is (method == "mff")
        assert ("\n- mff\n" in card) is (method == "mff") and ("@inproceedings{liu2023mff" in card) is (method == "mff")


@pytest.mark.parametrize("fmt", ["mmpretrain", "mae", "mffzoo", "safetensors"])
def test_pretrained_cfg_overlay_file_every_format(tmp_path, fmt, imgs):
    """timm's own `pretrained_cfg_overlay=dict(file=...)` route, through our pretrained_filter_fn."""
    ckpt, ours = mm_pretrain_checkpoint()
    enc = {k[len("encoder."):]: v for k, v in ours.items() if k.startswith("encoder.")}
    enc.update({k: v for k, v in convert_state_dict(ckpt).backbone.items()})
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "mmpretrain":
        torch.save(ckpt, path)
    elif fmt == "mae":
        torch.save({"model": enc}, path)
    elif fmt == "mffzoo":
        torch.save({"model": {"encoder." + k: v for k, v in enc.items()}, "model_args": TINY}, path)
    else:
        from safetensors.torch import save_file

        save_file(enc, str(path))
    model = timm.create_model("mff_vit_small", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(imgs), pre_logits=True),
                                   functional_vit(enc, imgs, TIMM_NAMES, num_heads=4), rtol=1e-4, atol=1e-5)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1)}, "meta": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint_file(path)
    # timm's own route (pretrained_cfg_overlay=dict(file=...)) goes through the same weights-only loader
    with pytest.raises(CheckpointError, match="refusing to load"):
        timm.create_model("mff_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    # and timm's loader itself, should anything reach it, is weights_only too
    from timm.models import load_checkpoint

    with pytest.raises((pickle.UnpicklingError, RuntimeError), match="weights_only"):
        load_checkpoint(tiny_backbone(), str(path))
    assert not marker.exists()


def test_corrupt_and_truncated_checkpoints(tmp_path):
    ckpt, _ = mm_pretrain_checkpoint()
    path = tmp_path / "c.pth"
    torch.save(ckpt, path)
    data = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated"):
        load_checkpoint_file(tmp_path / "trunc.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint_file(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pth")


def test_convert_never_replaces_a_model_folder_silently_nor_the_users_files(tmp_path, capsys):
    """Defect: `mffzoo convert SRC DEST` replaced an existing folder whole: weights, recorded evaluations, the
    user's own files. Now: refused without --overwrite (as `mffzoo export` refuses); with it only the model's
    files change, evaluations stay while the weights are the same bytes; a file at DEST is never replaced."""
    from helpers import cli_error

    from mffzoo.cli.main import main
    from mffzoo.eval.results import update_zoo_metrics

    ckpts = {}
    for seed in (1, 2):
        src = tiny_backbone()
        src.load_state_dict(random_state_dict(src, seed))
        ckpts[seed] = tmp_path / f"ck{seed}.pth"
        torch.save({"model": src.state_dict(), "model_args": TINY}, ckpts[seed])
    dest = tmp_path / "zoo" / "mff_vit_small_patch16_224.mine"
    main(["convert", str(ckpts[1]), str(dest)])
    update_zoo_metrics(dest, {"task": "knn", "data": "/x/demo", "results": {"cls": {"top1": 50.0}}})
    (dest / "NOTES.md").write_text("mine\n")
    (dest / "exports").mkdir()
    (dest / "exports" / "m.onnx").write_bytes(b"an export of mine")
    capsys.readouterr()

    def state() -> dict[str, bytes]:
        return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}

    before = state()
    msg = cli_error(["convert", str(ckpts[2]), str(dest)], capsys)
    assert f"'{dest / 'model.safetensors'}' already exists; pass --overwrite to replace the model in" in msg
    assert state() == before

    main(["convert", str(ckpts[1]), str(dest), "--overwrite"])  # the same weights: their evaluation stays
    assert json.loads((dest / "mffzoo.json").read_text())["eval"]["knn:demo"]["results"]["cls"]["top1"] == 50.0
    assert {k: v for k, v in state().items() if k != "mffzoo.json"} == {
        k: v for k, v in before.items() if k != "mffzoo.json"}
    capsys.readouterr()

    main(["convert", str(ckpts[2]), str(dest), "--overwrite"])  # other weights: the evaluation goes, said so
    assert "new weights, so the evaluations recorded for the previous ones are dropped (knn:demo)" in (
        capsys.readouterr().err)
    assert "eval" not in json.loads((dest / "mffzoo.json").read_text())
    after = state()
    assert after["NOTES.md"] == b"mine\n" and after["exports/m.onnx"] == b"an export of mine"
    assert after["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp or old folder left

    taken = tmp_path / "model.txt"  # DEST a file (or inside one): refused, also with --overwrite
    taken.write_text("not a folder\n")
    for argv in ([str(taken)], [str(taken), "--overwrite"], [str(taken / "sub")]):
        assert "is a file, not a folder; choose another DEST" in cli_error(["convert", str(ckpts[1]), *argv], capsys)
    assert taken.read_text() == "not a folder\n"
