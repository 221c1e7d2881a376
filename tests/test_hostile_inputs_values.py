"""Hostile inputs, the "bad files and bad values" classes: each is refused at load, before any work, with one
``error:`` line naming the key (or file, or option) and exit 2, and leaves the file system as it was.

1. recipes, ``_base_`` files and export profiles not in UTF-8 (UTF-16 with a byte-order mark is decoded);
2. YAML alias bombs and 10,000-deep nesting, in a file or a ``--set`` value;
3. values that cannot work: NaN/inf in any float field, negative ``optim.eps``, ``min_lr`` above the peak lr, ...;
4. CLI options that cannot work (``--threads -3``, ``--batch-size 0``, ``--img-size 100000``, ...);
5. names that become path components: ``../x`` / absolute / 300-byte run names, zoo tags, Triton names, paths.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli_error, tiny_recipe, write_yaml

from mffzoo.cli.main import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LONG = "a" * 300  # over every file system's 255-byte name limit (ENAMETOOLONG)


def _snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size, to prove a refused command changed nothing (``root/in`` holds the
    tests' own input files, written as a test needs them)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
            if p.relative_to(root).parts[0] != "in"}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working folder two levels inside ``tmp_path`` (so ``../../x`` stays inside it and shows up in the
    snapshot), an own zoo home and cache; the test body runs there and nothing under ``tmp_path`` may change."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "zoo"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = _snapshot(tmp_path)
    yield cwd
    assert _snapshot(tmp_path) == before, "a refused command created or changed files"


@pytest.fixture
def recipe_file(tmp_path: Path, data_root: Path) -> Path:
    """A valid tiny recipe outside the snapshot's folder."""
    (tmp_path / "in").mkdir(exist_ok=True)
    return write_yaml(tiny_recipe(data_root), tmp_path / "in" / "tiny.yaml")


# ------------------------------------------------------------------------------------------- 1. encodings
LATIN1 = "description: caf\xe9 cr\xe8me\n".encode("latin-1")


@pytest.mark.parametrize("which", ["recipe", "base", "profile"])
def test_files_not_in_utf8_are_one_line_naming_the_file(which: str, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Latin-1 bytes used to raise UnicodeDecodeError with a traceback; the line must name the very file."""
    src = tmp_path / "in"
    src.mkdir()
    bad = src / ("p.yaml" if which == "profile" else "base.yaml" if which == "base" else "r.yaml")
    bad.write_bytes(LATIN1)
    if which == "base":
        (src / "r.yaml").write_text("_base_: base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    argv = ["export", "--profile", str(bad)] if which == "profile" else ["train", str(src / "r.yaml")]
    err = cli_error(argv, capsys)
    assert str(bad) in err and "UTF-8" in err, err
    assert _snapshot(tmp_path) == before


@pytest.fixture
def utf16_recipe(tmp_path: Path, data_root: Path) -> Path:
    """A recipe as Windows editors and PowerShell's ``>`` save it: UTF-16 with a byte-order mark."""
    (tmp_path / "in").mkdir(exist_ok=True)
    text = write_yaml(tiny_recipe(data_root, optim={"eps": -1.0}), tmp_path / "in" / "plain.yaml").read_text()
    path = tmp_path / "in" / "u16.yaml"
    path.write_bytes(text.encode("utf-16"))
    return path


def test_utf16_recipe_reaches_validation(utf16_recipe: Path, work: Path, capsys) -> None:
    """Decoded, not refused (YAML allows UTF-16 with a BOM, which makes it unambiguous): the error is about the
    value inside, not about the encoding."""
    err = cli_error(["train", str(utf16_recipe)], capsys)
    assert "config key 'optim.eps'" in err, err


# ---------------------------------------------------------------------------------------- 2. YAML limits
def _bomb(levels: int = 6, width: int = 10) -> str:
    """Nested aliases in flow style: ``width ** levels`` values from a line of text (10^6 here: big enough to be
    refused, small enough that the unfixed code, which expands it, survives to show it was not)."""
    parts = [f"&l0 [{', '.join(['lol'] * width)}]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


DEEP_LIST = "[" * 10_000 + "]" * 10_000
DEEP_MAP = "{a: " * 10_000 + "1" + "}" * 10_000


@pytest.mark.parametrize("value,problem", [
    (_bomb(), "aliases"),
    (DEEP_LIST, "deeper than"),
    (DEEP_MAP, "deeper than"),
    ("&a [*a]", "refers to itself"),
], ids=["alias-bomb", "deep-list", "deep-mapping", "recursive-alias"])
@pytest.mark.parametrize("where", ["file", "set"])
def test_yaml_bombs_and_deep_nesting_are_refused(value: str, problem: str, where: str, work: Path,
                                                  recipe_file: Path, capsys) -> None:
    """MemoryError / RecursionError before; now one line naming the file or the override, and the limit."""
    if where == "file":
        path = recipe_file.with_name("bomb.yaml")
        path.write_text(recipe_file.read_text() + f"description: {value}\n")
        err = cli_error(["train", str(path)], capsys)
        assert f"config file '{path}'" in err, err
    else:
        err = cli_error(["train", str(recipe_file), "--set", f"description={value}"], capsys)
        assert "override 'description'" in err, err
    assert problem in err, err


# --------------------------------------------------------------------------------------- 3. bad values
@pytest.mark.parametrize("override,key", [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=1e999", "optim.lr"),
    ("optim.min_lr=.inf", "optim.min_lr"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("optim.clip_grad=.inf", "optim.clip_grad"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean[0]"),
    ("data.std=[0.2, .inf, 0.2]", "data.std[1]"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.eps=0", "optim.eps"),
    ("optim.min_lr=0.01", "optim.min_lr"),  # above the tiny recipe's lr 2e-3: the cosine would rise
    ("model.img_size=100000", "model.img_size"),
], ids=lambda v: v)
def test_pretrain_values_that_cannot_work(override: str, key: str, recipe_file: Path, work: Path, capsys) -> None:
    err = cli_error(["train", str(recipe_file), "--set", override], capsys)
    assert f"config key '{key}'" in err, err


@pytest.mark.parametrize("override,key", [
    ("model.head_init_std=.inf", "model.head_init_std"),
    ("aug.color_jitter=-1", "aug.color_jitter"),
    ("optim.lr=1e-7", "optim.min_lr"),  # the fine-tune min_lr (1e-6) would exceed the peak
    ("mixup.mixup=.inf", "mixup.mixup"),
    ("model.img_size=100000", "model.img_size"),
], ids=lambda v: v)
def test_finetune_values_that_cannot_work(override: str, key: str, tiny: Path, data_root: Path, work: Path,
                                          capsys) -> None:
    err = cli_error(["eval", "finetune", str(RECIPES / "finetune_demo.yaml"), "--set", f"model.pretrained={tiny}",
                     "--set", f"data.root={data_root}", "--set", override], capsys)
    assert f"config key '{key}'" in err, err


@pytest.mark.parametrize("args,key", [
    (["--set", "check.gates.fp32.max_abs=.inf"], "config key 'check.gates.fp32.max_abs'"),
    (["--set", "trt.workspace_gb=.inf"], "config key 'trt.workspace_gb'"),
    (["--batch", "1:8:100000000"], "config key 'batch.max'"),
    (["--set", "batch.max=1000000"], "config key 'batch.max'"),
    (["--set", "img_size=100000"], "config key 'img_size'"),
], ids=lambda v: str(v))
def test_export_profile_values_that_cannot_work(args: list[str], key: str, tiny: Path, work: Path, capsys) -> None:
    err = cli_error(["export", str(tiny), *args], capsys)
    assert key in err, err


def test_export_profile_file_values_are_checked_too(tmp_path: Path, tiny: Path, work: Path, capsys) -> None:
    """The same rules hold for a profile file (the one loader), here an absurd batch maximum."""
    (tmp_path / "in").mkdir(exist_ok=True)
    prof = write_yaml({"model": str(tiny), "batch": {"min": 1, "opt": 8, "max": 10**9}}, tmp_path / "in" / "p.yaml")
    err = cli_error(["export", "--profile", str(prof)], capsys)
    assert "config key 'batch.max'" in err, err


# -------------------------------------------------------------------------------------- 4. CLI options
@pytest.mark.parametrize("argv,option", [
    (["bench", "infer", "m", "--threads", "-3"], "--threads"),
    (["bench", "infer", "m", "--img-size", "100000"], "--img-size"),
    (["bench", "train", "--batch-size", "0"], "--batch-size"),
    (["bench", "train", "--steps", "0"], "--steps"),
    (["bench", "data", "demo", "--target-img-s", "nan"], "--target-img-s"),
    (["eval", "knn", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "knn", "m", "--workers", "-1"], "--workers"),
    (["eval", "knn", "m", "--k", "0"], "--k"),
    (["eval", "knn", "m", "--temperature", "nan"], "--temperature"),
    (["eval", "knn", "m", "--img-size", "-1"], "--img-size"),
    (["eval", "linear", "m", "--probe-batch", "0"], "--probe-batch"),
    (["eval", "linear", "m", "--blr", "nan"], "--blr"),
    (["eval", "linear", "m", "--weight-decay", "-1"], "--weight-decay"),
    (["analyze", "freq", "m", "--num-images", "0"], "--num-images"),
    (["export", "m", "--img-size", "100000"], "--img-size"),
    (["export", "m", "--img-size", "-5"], "--img-size"),
    (["reproduce", "--seeds", "0"], "--seeds"),
    (["reproduce", "--workers", "0"], "--workers"),
    (["data", "demo", "d", "--image-size", "100000"], "--image-size"),
    (["data", "demo", "d", "--train-per-class", "0"], "--train-per-class"),
    (["convert", "TINY/model.safetensors", "dst", "--num-heads", "0"], "--num-heads"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_cli_options_that_cannot_work(argv: list[str], option: str, tiny: Path, work: Path, capsys) -> None:
    """One ``error:`` line naming the option (click's range error, without its usage block), exit 2."""
    err = cli_error([a.replace("TINY", str(tiny)) for a in argv], capsys)
    assert option in err, err


# ----------------------------------------------------------------------------------------------- 5. names
@pytest.mark.parametrize("name", ["../../x", "ABS", "a/b", "..", LONG, "bell\x07"], ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("where", ["file", "set"])
def test_run_names_must_be_plain_folder_names(name: str, where: str, tmp_path: Path, data_root: Path,
                                              recipe_file: Path, work: Path, capsys) -> None:
    """``runs/<name>`` must stay in runs/: no separator, no '..', not absolute, printable, short enough."""
    name = str(tmp_path / "abs-run") if name == "ABS" else name
    if where == "file":
        path = write_yaml({**tiny_recipe(data_root), "name": name}, recipe_file.with_name("named.yaml"))
        err = cli_error(["train", str(path)], capsys)
    else:
        err = cli_error(["train", str(recipe_file), "--set", f"name={name}"], capsys)
    assert "config key 'name'" in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs-run").exists()


@pytest.mark.parametrize("argv_tail,key", [
    (["--set", f"publish.tag={LONG}"], "config key 'publish.tag'"),
    (["--set", f"output_dir=out/{LONG}"], "config key 'output_dir'"),
    (["--output", f"out/{LONG}"], "--output"),
], ids=["tag", "output_dir", "--output"])
def test_long_tags_and_run_paths_name_the_limit(argv_tail: list[str], key: str, recipe_file: Path, work: Path,
                                                capsys) -> None:
    """ENAMETOOLONG (after training, for the tag) before; now one line naming the key and the byte limit."""
    err = cli_error(["train", str(recipe_file), *argv_tail], capsys)
    assert key in err and "bytes" in err, err


@pytest.mark.parametrize("argv,key", [
    (["train", f"{LONG}.yaml"], "RECIPE"),
    (["eval", "knn", LONG, "--random-init"], "MODEL"),
    (["export", LONG], "MODEL"),
    (["export", "--set", f"model={LONG}"], "config key 'model'"),
    (["export", "TINY", "--output", f"{LONG}.onnx"], "--output"),
    (["export", "TINY", "--set", "triton.name=../x", "--triton-repo", "tr"], "config key 'triton.name'"),
    (["export", "TINY", "--set", f"triton.name={LONG}", "--triton-repo", "tr"], "config key 'triton.name'"),
    (["eval", "knn", "m", "--output", f"{LONG}.json"], "--output"),
    (["bench", "infer", "m", "--json", f"{LONG}.json"], "--json"),
    (["convert", "src.pth", LONG], "DST"),
], ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else v)
def test_names_that_become_path_components(argv: list[str], key: str, tiny: Path, work: Path, capsys) -> None:
    argv = [str(tiny) if a == "TINY" else a for a in argv]
    err = cli_error(argv, capsys)
    assert key in err, err


def test_entry_dir_keeps_tags_inside_the_zoo_home(tmp_path: Path) -> None:
    """Every zoo path goes through entry_dir: a tag with '..' or '/' never leaves the home."""
    from mffzoo.errors import ConfigError
    from mffzoo.zoo.home import entry_dir

    with pytest.raises(ConfigError, match="config key 'tag'"):
        entry_dir("mff_vit_small_patch16_224", "x/../../../evil", tmp_path)
    assert entry_dir("mff_vit_small_patch16_224", "demo", tmp_path) == tmp_path / "mff_vit_small_patch16_224.demo"


def test_default_export_name_from_a_hostile_tag_stays_in_exports(tiny: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The default output is named after the weights' recorded tag; a '../' there must not move it out."""
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"]["tag"] = "../../evil"
    (folder / "config.json").write_text(json.dumps(cfg))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    main(["export", str(folder), "--no-check"])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.onnx"))
    assert written and all(p.parts[:3] == ("a", "b", "exports") for p in written), written
