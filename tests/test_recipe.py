"""Recipe schema: every shipped recipe validates, bad input fails in one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mffzoo.cli.main import main
from mffzoo.errors import ConfigError
from mffzoo.train.optim import accumulation_steps, fit_batch_per_device
from mffzoo.train.recipe import PretrainRecipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VITS = RECIPES / "vits.yaml"


def _err(overrides: list[str], recipe: Path = VITS) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


PRETRAIN_RECIPES = ["demo", "_in1k_pretrain"] + [
    f"vit{size}{method}{epochs}" for size in "sbl" for method in ("", "_mae") for epochs in ("", "_800e", "_1600e")
]


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_every_pretraining_recipe_validates(name: str) -> None:
    path = RECIPES / f"{name}.yaml"
    r = load_recipe(path)
    assert isinstance(r, PretrainRecipe)
    assert r.model.fusion_layers[-1] == r.model.depth - 1
    if not path.name.startswith("_"):
        assert r.name == path.stem and r.publish.tag


def test_official_values_and_variants() -> None:
    s = load_recipe(VITS)
    assert (s.train.epochs, s.train.batch_size, s.optim.warmup_epochs) == (300, 4096, 40)
    assert s.optim.resolved_lr(s.train.batch_size) == pytest.approx(2.4e-3)
    assert tuple(s.optim.betas) == (0.9, 0.95) and s.optim.weight_decay == 0.05
    assert (s.model.mask_ratio, s.model.norm_pix_loss, s.data.augment) == (0.75, True, "mff")
    assert s.model.fusion_layers == [0, 2, 4, 6, 8, 11]
    mae = load_recipe(RECIPES / "vits_mae.yaml")
    assert mae.model.fusion_layers == [11] and mae.model.is_mae
    assert (mae.train, mae.optim, mae.data) == (s.train, s.optim, s.data)  # one switch apart
    assert load_recipe(RECIPES / "vitb_800e.yaml").train.epochs == 800
    assert load_recipe(RECIPES / "vitl_mae_1600e.yaml").model.fusion_layers == [23]
    vitl = load_recipe(RECIPES / "vitl.yaml")
    assert vitl.model.fusion_layers == [0, 4, 8, 12, 16, 23] and vitl.model.grad_checkpointing
    assert vitl.model.depth == 24 and vitl.train.fsdp is False


def test_overrides_apply() -> None:
    r = load_recipe(VITS, ["optim.lr=1e-3", "data.root=/data/x", "train.epochs=800", "model.fusion_layers=[5, 11]"])
    assert r.optim.resolved_lr(4096) == 1e-3
    assert (r.data.root, r.train.epochs, r.model.fusion_layers) == ("/data/x", 800, [5, 11])


def test_bare_name_finds_the_recipe() -> None:
    assert load_recipe("demo").name == "demo"
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.blrr=1e-4", "unknown config key 'optim.blrr' (did you mean 'blr'?)"),
        ("modell.depth=3", "unknown config key 'modell'"),
        ("train.epochs=many", "'train.epochs': expected int"),
        ("model.mask_ratio=1.0", "'model.mask_ratio': must be in (0, 1)"),
        ("model.mask_ratio=0", "'model.mask_ratio': must be in (0, 1)"),
        ("model.mask_ratio=-0.5", "'model.mask_ratio': must be in (0, 1)"),
        ("model.fusion_layers=[0, 12]", "indices [12] are outside the encoder's blocks 0..11"),
        ("model.fusion_layers=[4, 2, 11]", "strictly increasing"),
        ("model.fusion_layers=[0, 2, 8]", "must end with the last block (11)"),
        ("model.fusion_layers=[]", "at least one block"),
        ("model.arch=vit_huge", "unknown architecture 'vit_huge'; allowed: mff_vit_small_patch16_224"),
        ("model.img_size=100", "not a multiple of model.patch_size=16"),
        ("train.batch_size=4000", "4000 is not divisible by train.batch_per_device=512"),
        ("train.epochs=0", "'train.epochs': must be >= 1"),
        ("data.augment=autoaugment", "expected one of 'mff', 'mae'"),
        ("train.precision=fp8", "expected one of 'bf16', 'fp16', 'fp32'"),
        ("train.attention=flash", "expected one of 'auto', 'sdpa', 'math'"),
        ("optim.opt=adamq", "unknown optimizer 'adamq'"),
        ("optim.warmup_epochs=400", "must not exceed train.epochs"),
        ("data.crop_scale=[0.9, 0.2]", "0 < min <= max <= 1"),
        ("data.max_bad_fraction=1.5", "must be in [0, 1)"),
        ("data.dataset=wds/imagenet", "streaming (iterable) dataset"),
        ("publish.tag=my tag", "must be letters, digits"),
    ],
)
def test_bad_values_name_key_and_allowed(override: str, expected: str) -> None:
    assert expected in _err([override])


def test_batch_must_divide_over_devices() -> None:
    assert accumulation_steps(4096, 512, 1) == 8
    assert accumulation_steps(4096, 512, 8) == 1
    assert accumulation_steps(4096, 256, 4) == 4
    with pytest.raises(ConfigError) as info:
        accumulation_steps(4096, 512, 3)
    msg = str(info.value)
    assert "train.batch_size=4096" in msg and "x 3 processes" in msg and "divides 4096" in msg
    with pytest.raises(ConfigError, match="x 16 processes") as info:
        accumulation_steps(4096, 512, 16)
    assert "--set train.batch_per_device=256" in str(info.value)


def test_batch_per_device_is_fitted_to_each_process_share_of_the_batch() -> None:
    """A recipe written for one process (the demo: 64 of 64) runs unchanged on 2 or 4 (torchrun)."""
    assert [fit_batch_per_device(64, 64, n) for n in (1, 2, 4)] == [64, 32, 16]
    assert fit_batch_per_device(4096, 512, 8) == 512 and fit_batch_per_device(4096, 512, 16) == 256
    assert fit_batch_per_device(64, 64, 3) == 64  # no even share: accumulation_steps then says what to do


def test_missing_imagenet_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if Path(load_recipe(VITS).data.root).exists():
        pytest.skip("this machine has data at the recipe's default root")
    with pytest.raises(SystemExit) as info:
        main(["train", str(VITS), "--output", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert "--set data.root=/path/to/imagenet" in err and "/data/imagenet" in err
    assert not (tmp_path / "run").exists()  # nothing written before the data check


def test_cli_bad_override_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "demo", "--set", "model.mask_ratio=1.5"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.mask_ratio" in err
