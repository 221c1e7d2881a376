"""Local weights describe themselves: every way of loading them gives timm the pretrained_cfg of those weights,
so timm's own ``resolve_data_config`` + ``create_transform`` feed a non-224 model, and the export sidecar agrees.
Also the Hub layout loading with plain timm in a fresh process (no mffzoo import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import TINY, hf_cache_layout, random_state_dict
from PIL import Image
from timm.data import create_transform, resolve_data_config

from mffzoo.export.inputs import preprocessing
from mffzoo.train.publish import build_hub_folder
from mffzoo.zoo import entry_dir, load_model, write_model_folder

ARCH = "mff_vit_small_patch16_224"
# the recipe a run was trained with decides mean/std; deliberately not ImageNet's
DATA = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture
def demo_entry(tmp_path, monkeypatch):
    """A 32 px ViT written to the zoo home as ``demo`` the way a training run publishes it."""
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "zoo"))
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    src.load_state_dict(random_state_dict(src, 3))
    folder = write_model_folder(entry_dir(ARCH, "demo"), ARCH, src, model_args=TINY,
                                meta={"tag": "demo", "recipe": {"name": "demo", "data": DATA}})
    return src.eval(), folder


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))  # not square, not 32 px


def _check_feeds(model: torch.nn.Module, src: torch.nn.Module, tag: str | None = "demo") -> dict:
    """timm's standard preprocessing feeds the model and matches the weights (and the sidecar's record)."""
    model.eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32)
    assert tuple(cfg["mean"]) == tuple(DATA["mean"]) and tuple(cfg["std"]) == tuple(DATA["std"])
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 0.875)
    pc = model.pretrained_cfg
    assert (pc["num_classes"], pc["license"], pc["tag"]) == (0, "apache-2.0", tag)
    x = create_transform(**cfg)(_image()).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    side = {k: v for k, v in preprocessing(model).items() if k not in ("steps", "value_range")}  # sidecar-only keys
    assert side == {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return cfg


def test_every_local_load_carries_the_weights_data_config(demo_entry):
    src, folder = demo_entry
    weights = folder / "model.safetensors"
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["tag"] == "demo"
    for model in (
        timm.create_model("mff_vit_small.demo", pretrained=True),  # zoo tag
        timm.create_model("mff_vit_small", pretrained=True),  # best local entry (the default tag is missing)
        timm.create_model(f"local-dir:{folder}", pretrained=True),
        timm.create_model("mff_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))),
        load_model(folder, pretrained=True),
        load_model(weights, pretrained=True),  # a weights file given as MODEL (CLI, export, eval)
        load_model(f"{ARCH}.demo", pretrained=True),
    ):
        _check_feeds(model, src)


def test_file_overlay_without_a_folder_config_takes_size_and_classes_from_the_tensors(tmp_path):
    clf = timm.create_model("mff_vit_small", num_classes=5, global_pool="avg", fc_norm=True, **TINY)
    clf.load_state_dict(random_state_dict(clf, 4))
    torch.save({"model": clf.state_dict(), "model_args": TINY}, tmp_path / "clf.pth")  # no config.json beside it
    m = timm.create_model("mff_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "clf.pth")))
    cfg = resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 32, 32) and m.pretrained_cfg["num_classes"] == 5
    x = create_transform(**cfg)(_image(1)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), clf.eval()(x))


def test_unregistered_local_tag_is_named_and_not_described_as_another(tmp_path, monkeypatch):
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "zoo"))
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    folder = write_model_folder(entry_dir(ARCH, "conv"), ARCH, src, model_args=TINY)  # e.g. `mffzoo convert`
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["pretrained_cfg"].pop("tag") == "conv"  # as written by mffzoo before tags were recorded:
    (folder / "config.json").write_text(json.dumps(cfg))  # the entry's folder name still names it
    for name in ("mff_vit_small.conv", "mff_vit_small"):
        m = timm.create_model(name, pretrained=True)
        assert m.pretrained_cfg["tag"] == "conv" and m.pretrained_cfg["input_size"] == (3, 32, 32)
        assert m.pretrained_cfg.get("description") is None  # not the registered default tag's "300 ep ImageNet-1k"


@pytest.mark.slow
def test_hub_repo_loads_in_a_fresh_process_with_plain_timm(demo_entry, tmp_path):
    """What `mffzoo push` uploads, downloaded once into the HF cache, loads offline with timm alone."""
    src, folder = demo_entry
    run = tmp_path / "run"
    write_model_folder(run / "model", ARCH, src, model_args=TINY,
                       meta={"tag": "demo", "recipe": {"name": "demo", "data": DATA}})
    hub = build_hub_folder(run, tmp_path / "hub", "me/mff-tiny")
    cache = hf_cache_layout(hub, tmp_path / "hf-cache", "me/mff-tiny")
    model = load_model(run / "model", pretrained=True)
    x = create_transform(**resolve_data_config({}, model=model))(_image(2)).unsqueeze(0)
    with torch.no_grad():
        torch.save({"x": x, "y": src(x)}, tmp_path / "ref.pt")
    child = textwrap.dedent(f"""
        import sys, numpy as np, timm, torch
        from PIL import Image
        from timm.data import create_transform, resolve_data_config
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8))
        for name in ("hf-hub:me/mff-tiny", {f'local-dir:{hub}'!r}):
            m = timm.create_model(name, pretrained=True).eval()
            cfg = resolve_data_config({{}}, model=m)
            assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == (0.5, 0.4, 0.3), cfg
            assert m.pretrained_cfg["tag"] == "demo", m.pretrained_cfg
            x = create_transform(**cfg)(img).unsqueeze(0)
            assert torch.equal(x, ref["x"])
            with torch.no_grad():
                torch.testing.assert_close(m(x), ref["y"])
        assert not any(k.split(".")[0] == "mffzoo" for k in sys.modules), "mffzoo was imported"
        print("ok", type(m).__module__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MFFZOO_HOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "timm.models.vision_transformer"]
    assert json.loads((hub / "config.json").read_text())["architecture"] == "vit_small_patch16_224"
    assert Path(folder).is_dir()
