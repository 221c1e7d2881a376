"""One parser for MODEL (issue 21): every accepted form becomes a ModelRef; local tags are typed data."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from mffzoo import archs
from mffzoo.errors import CheckpointError, ConfigError
from mffzoo.zoo import load_model, parse_model_ref, write_model_folder

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def test_every_form_has_one_kind(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "w").write_bytes(b"")
    cases = {
        "mff_vit_small": ("name", "mff_vit_small_patch16_224", None),
        "mff_vit_base.mff_in1k_800e": ("name", "mff_vit_base_patch16_224", "mff_in1k_800e"),
        "vit_base_patch16_224.mae": ("name", "vit_base_patch16_224", "mae"),
        "hf-hub:me/mff-tiny": ("hub", None, None),
        f"local-dir:{folder}": ("folder", None, None),
        str(folder): ("folder", None, None),
        str(tmp_path / "w"): ("file", None, None),  # any existing file
        "nowhere.safetensors": ("file", None, None),  # a weights suffix, there or not
        str(tmp_path / "nothing"): ("missing", None, None),
    }
    for spec, (kind, arch, tag) in cases.items():
        ref = parse_model_ref(spec)
        assert (ref.kind, ref.arch, ref.tag) == (kind, arch, tag), spec
    assert parse_model_ref("hf-hub:me/mff-tiny").hub_id == "me/mff-tiny"
    assert parse_model_ref(f"local-dir:{folder}").timm_name == f"local-dir:{folder}"
    assert parse_model_ref("mff_vit_small.demo").with_tag("mff_in1k_300e").spec == "mff_vit_small.mff_in1k_300e"
    with pytest.raises(ConfigError, match="not a model name"):
        parse_model_ref(str(folder)).with_tag("demo")
    with pytest.raises(ConfigError, match="MODEL"):
        parse_model_ref("x" * 300)


def test_local_tags_are_a_typed_table() -> None:
    demo = archs.local_tag("mff_vit_small", "demo")
    assert demo is not None and (demo.recipe, demo.schedule_epochs) == ("recipes/demo.yaml", 6)
    assert demo.produce == "mffzoo train recipes/demo.yaml"
    assert archs.registered_schedule("mff_vit_base", "mff_local_800e") == 800
    assert archs.local_tag("mff_vit_base", "mff_in1k_800e") is None  # an official download
    official = archs.zoo_tag("mff_vit_base", "mff_ft_in1k_800e")
    assert isinstance(official, archs.OfficialTag) and official.num_classes == 1000
    for arch, tags in archs.TAGS.items():
        assert list(tags) == list(archs.ZOO_TAGS[arch])
        for tag, entry in tags.items():
            assert (entry.arch, entry.tag) == (arch, tag)
            assert archs.is_local_cfg(archs.ZOO_TAGS[arch][tag]) == isinstance(entry, archs.LocalTag)


def test_load_model_follows_timm_defaults(tmp_path: Path) -> None:
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    folder = write_model_folder(tmp_path / "f", "mff_vit_small_patch16_224", src, model_args=TINY)
    bare = load_model(folder)  # timm's default: the architecture, not its weights
    assert bare.embed_dim == 64 and not torch.equal(bare.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    loaded = load_model(folder, pretrained=True)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.save({"model": {"encoder." + k: v for k, v in src.state_dict().items()}}, tmp_path / "c.pth")
    named = load_model("mff_vit_small", checkpoint_path=tmp_path / "c.pth", num_classes=0, **TINY)
    assert torch.equal(named.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model("mff_vit_small", checkpoint_path=tmp_path / "c.pth")  # the registered ViT-S is not this one
    with pytest.raises(ConfigError, match="pass one"):
        load_model("mff_vit_small", checkpoint_path=tmp_path / "c.pth", random_init=True)
