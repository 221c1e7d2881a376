"""The timm zoo: registry, pretrained tags, local weights resolution, hub folder layout, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import timm
import torch
from helpers import MM_NAMES, TINY, functional_vit, random_state_dict, timm_to_mm

import mffzoo
from mffzoo.errors import WeightsNotFoundError
from mffzoo.zoo import entry_dir, load_model, write_model_folder


@pytest.fixture
def zoo_home(tmp_path, monkeypatch):
    home = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(home))
    return home


def test_registry_lists_models_and_pretrained_tags():
    names = timm.list_models("mff*")
    for n in ("mff_vit_small", "mff_vit_base", "mff_vit_large", "mff_vit_small_patch16_224",
              "mff_vit_base_patch16_224", "mff_vit_large_patch16_224"):
        assert n in names
    tags = timm.list_pretrained("mff*")
    assert "mff_vit_base_patch16_224.mff_in1k_800e" in tags
    assert "mff_vit_base_patch16_224.mff_ft_in1k_300e" in tags
    assert "mff_vit_small_patch16_224.mff_in1k_300e" in tags
    assert "mff_vit_large_patch16_224.mff_in1k_300e" in tags
    cfg = timm.get_pretrained_cfg("mff_vit_base_patch16_224.mff_in1k_300e")
    assert cfg.url.endswith("mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230801-3c1bcce4.pth")
    assert cfg.num_classes == 0 and cfg.license and cfg.paper_ids == "arXiv:2308.00261"
    ft = timm.get_pretrained_cfg("mff_vit_base_patch16_224.mff_ft_in1k_800e")
    assert ft.num_classes == 1000 and any("83.7" in n for n in ft.notes)
    # the first tag is the default: what `timm.create_model("mff_vit_base", pretrained=True)` downloads
    from timm.models import get_pretrained_cfg_value

    assert get_pretrained_cfg_value("mff_vit_base_patch16_224", "tag") == "mff_in1k_800e"
    assert get_pretrained_cfg_value("mff_vit_small_patch16_224", "tag") == "mff_in1k_300e"
    assert get_pretrained_cfg_value("mff_vit_base_patch16_224.mff_ft_in1k_300e", "license") == "apache-2.0"


def test_timm_lists_the_family_under_its_module_name():
    """The entrypoints' module is named for the family, as timm's own (vision_transformer, ...), not `registry`."""
    listed = timm.list_models(module="mff_vision_transformer")
    assert "mff_vit_small_patch16_224" in listed and "mff_vit_base" in listed
    assert not timm.list_models(module="registry")


@pytest.mark.slow
@pytest.mark.parametrize(
    "ours, theirs, millions",
    [("mff_vit_small", "vit_small_patch16_224", 22.05), ("mff_vit_base", "vit_base_patch16_224", 86.57),
     ("mff_vit_large", "vit_large_patch16_224", 304.33)],
)
def test_param_counts_match_timm(ours, theirs, millions):
    with torch.device("meta"):
        a = timm.create_model(ours, num_classes=1000)
        b = timm.create_model(theirs, num_classes=1000)
    na, nb = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    assert na == nb and round(na / 1e6, 2) == millions
    assert list(a.state_dict()) == list(b.state_dict())


def test_large_builds_for_real_and_encoder_loads_strict():
    """The real size is the point here: ViT-L with its pretraining head, encoder into the timm backbone."""
    pre = mffzoo.create_pretrain_model("mff_vit_large")
    assert pre.fusion.layers == [0, 4, 8, 12, 16, 23]
    backbone = timm.create_model("mff_vit_large_patch16_224", num_classes=0)
    backbone.load_state_dict(pre.encoder_state_dict(), strict=True)
    assert sum(p.numel() for p in backbone.parameters()) == 303301632


def test_timm_behaviours_short_and_long_names():
    a = timm.create_model("mff_vit_small", num_classes=7, **TINY)
    b = timm.create_model("mff_vit_small_patch16_224", num_classes=7, **TINY)
    assert type(a) is type(b) and a.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == (2, 7)
    a.reset_classifier(0, global_pool="avg")
    assert a(x).shape == (2, 64)
    feats = timm.create_model("mff_vit_small", features_only=True, out_indices=(1, 3), **TINY)
    outs = feats(x)
    assert [o.shape for o in outs] == [(2, 64, 4, 4)] * 2
    final, inter = b.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and inter[0].shape == (2, 64, 4, 4)


def test_local_weights_resolved_from_zoo_home(zoo_home, caplog):
    with pytest.raises(WeightsNotFoundError, match=r"mffzoo train recipes/vits\.yaml"):
        timm.create_model("mff_vit_small", pretrained=True)
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    src.load_state_dict(random_state_dict(src, 1))
    write_model_folder(entry_dir("mff_vit_small_patch16_224", "demo"), "mff_vit_small_patch16_224", src,
                       model_args=TINY, meta={"final_loss": 0.5})
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="mffzoo"):
        best = timm.create_model("mff_vit_small", pretrained=True)  # default tag missing -> best local
    assert "mff_vit_small_patch16_224.demo" in caplog.text
    tagged = timm.create_model("mff_vit_small.demo", pretrained=True)
    for m in (best, tagged):
        m.eval()
        torch.testing.assert_close(m(x), src.eval()(x))
    # a preferred tag wins over the demo once it exists
    write_model_folder(entry_dir("mff_vit_small_patch16_224", "mff_in1k_300e"), "mff_vit_small_patch16_224",
                       timm.create_model("mff_vit_small", num_classes=0, **TINY), model_args=TINY)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mffzoo"):
        timm.create_model("mff_vit_small", pretrained=True)
    assert "mff_in1k_300e" in caplog.text
    with pytest.raises(WeightsNotFoundError, match="mff_vit_large_patch16_224"):
        timm.create_model("mff_vit_large.mff_in1k_800e", pretrained=True)


def test_hub_folder_layout_loads_through_timm_local_dir(tmp_path):
    """A zoo folder is a timm hub repo: config.json + model.safetensors, loadable via `local-dir:`."""
    clf = timm.create_model("mff_vit_small", num_classes=5, global_pool="avg", fc_norm=True, **TINY)
    clf.load_state_dict(random_state_dict(clf, 2))
    folder = write_model_folder(tmp_path / "repo", "mff_vit_small_patch16_224", clf, model_args=TINY)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "mff_vit_small_patch16_224" and cfg["num_classes"] == 5
    assert cfg["model_args"]["global_pool"] == "avg" and cfg["model_args"]["fc_norm"] is True  # the head's layout
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), clf.eval()(x))
    # the same folder through the generic front door used by export/eval
    torch.testing.assert_close(load_model(folder, pretrained=True).eval()(x), clf(x))


def test_load_model_accepts_checkpoint_files(tmp_path):
    clf = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    sd = random_state_dict(clf, 4)
    mm = {"state_dict": timm_to_mm(sd), "meta": {}}
    torch.save(mm, tmp_path / "mm.pth")
    model = load_model(tmp_path / "mm.pth", num_heads=4, pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   functional_vit(mm["state_dict"], x, MM_NAMES, num_heads=4), rtol=1e-4, atol=1e-5)
    with pytest.raises(WeightsNotFoundError, match="unknown model 'nope_vit'"):
        load_model("nope_vit")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mffzoo", *args], capture_output=True, text=True, env=env)


def test_cli_zoo_and_convert(tmp_path, zoo_home):
    import os

    env = dict(os.environ, MFFZOO_HOME=str(zoo_home))
    r = _cli("zoo", env=env)
    assert r.returncode == 0, r.stderr
    assert "mff_vit_base_patch16_224.mff_in1k_800e" in r.stdout and "official" in r.stdout
    assert "83.7" in r.stdout
    clf = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    torch.save({"state_dict": timm_to_mm(random_state_dict(clf, 1)), "meta": {"epoch": 1}}, tmp_path / "m.pth")
    r = _cli("convert", str(tmp_path / "m.pth"), str(zoo_home / "mff_vit_small_patch16_224.conv"), "--num-heads",
             "4", env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("zoo", env=env)
    assert "mff_vit_small_patch16_224.conv" in r.stdout and "local (unregistered)" in r.stdout
    # bad input: one line, exit 2, no traceback
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    r = _cli("convert", str(tmp_path / "junk.pth"), str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "corrupt" in r.stderr
    assert not (tmp_path / "out").exists()


def test_convert_arch_and_heads_errors_are_one_line(tmp_path, zoo_home, monkeypatch, capsys):
    from mffzoo.cli.main import main

    monkeypatch.setenv("MFFZOO_HOME", str(zoo_home))
    clf = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    torch.save({"state_dict": timm_to_mm(random_state_dict(clf, 1)), "meta": {}}, tmp_path / "m.pth")
    vits = timm.create_model("mff_vit_small", num_classes=0)  # exactly ViT-S: labelling it ViT-B is an error
    torch.save({"state_dict": timm_to_mm(vits.state_dict()), "meta": {}}, tmp_path / "s.pth")
    for src, args, msg in (
        ("m.pth", ["--arch", "nope_vit"], "unknown --arch 'nope_vit'"),
        ("m.pth", [], "pass --num-heads (e.g. 1 for 64-dim heads)"),  # 64 wide: no registered width says
        ("s.pth", ["--arch", "mff_vit_base"], "does not match the weights, which are mff_vit_small_patch16_224"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["convert", str(tmp_path / src), str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and msg in err, err
        assert not (tmp_path / "bad").exists()
    # a custom width may carry any registered arch label (there is no better one), given its head count
    main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "ok"), "--arch", "mff_vit_base", "--num-heads", "4"])
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["model_args"]["num_heads"] == 4


def test_load_model_random_init_keeps_the_described_architecture(tmp_path):
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    folder = write_model_folder(tmp_path / "f", "mff_vit_small_patch16_224", src, model_args=TINY)
    torch.save({"model": {"encoder." + k: v for k, v in src.state_dict().items()}, "model_args": TINY},
               tmp_path / "c.pth")
    for spec in (folder, tmp_path / "c.pth"):
        fresh = load_model(spec, random_init=True)
        assert (len(fresh.blocks), fresh.embed_dim, fresh.patch_embed.img_size) == (4, 64, (32, 32))
        assert not torch.equal(fresh.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    loaded = load_model(tmp_path / "c.pth", pretrained=True)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_official_download_failure_is_one_line_with_the_way_out(tmp_path, monkeypatch):
    """Offline: the real download path (timm -> torch.hub -> urllib) fails; we say what, from where, and how."""
    import dataclasses

    from timm.models import _registry

    name = "mff_vit_base_patch16_224.mff_in1k_800e"  # the default tag of mff_vit_base
    url = "http://127.0.0.1:9/mff_vit-base-p16_800e.pth"  # discard port: connection refused, no network needed
    cfgs = _registry._model_pretrained_cfgs
    for key in (name, name.split(".")[0]):  # timm registers the default tag under the bare name too
        monkeypatch.setitem(cfgs, key, dataclasses.replace(cfgs[name], url=url))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    with pytest.raises(WeightsNotFoundError) as info:
        timm.create_model("mff_vit_base", pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg and f"could not download the weights of {name} from {url}" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "mff_vit-base-p16_800e.pth") in msg
    assert f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH'))" in msg


def test_unknown_tag_lists_the_tags_that_exist_and_where_they_come_from(zoo_home):
    write_model_folder(entry_dir("mff_vit_small_patch16_224", "conv"), "mff_vit_small_patch16_224",
                       timm.create_model("mff_vit_small", num_classes=0, **TINY), model_args=TINY)
    with pytest.raises(WeightsNotFoundError) as info:
        timm.create_model("mff_vit_small.nosuchtag", pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg and "mff_vit_small_patch16_224 has no tag 'nosuchtag'" in msg
    assert "produce them with" not in msg  # no recipe makes this tag: none is suggested
    assert "official downloads: none" in msg
    assert "mff_in1k_300e (recipes/vits.yaml)" in msg and "demo (recipes/demo.yaml)" in msg
    assert f"local folders in {zoo_home}: conv" in msg
    with pytest.raises(WeightsNotFoundError) as info:
        timm.create_model("mff_vit_base.nosuchtag", pretrained=True)
    msg = str(info.value)
    assert "official downloads: mff_in1k_800e, mff_in1k_300e, mff_ft_in1k_800e, mff_ft_in1k_300e;" in msg
    assert "mff_local (recipes/vitb.yaml)" in msg and "local folders in" in msg and msg.endswith("lists them all")
