"""Hostile inputs: files that are not what they claim, and loops in the data folder.

A model folder whose config.json is no JSON object, an export sidecar with missing sections, a ``.tar`` data root
that is no tar, a ``.bin`` that carries code, safetensors with a missing or int8 tensor, a ``.pth`` with a flipped
byte and no ``.sha256``: each is one ``error:`` line naming the file (exit 2, no traceback, nothing written).
A symlink back to an ancestor folder is skipped, so each real image counts once and one warning line says so.
Related fuzzing of checkpoint bytes lives in test_corrupt_files.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from helpers import cli_error, tiny_recipe, write_yaml
from safetensors.torch import load_file, save_file

from mffzoo.cli.main import main
from mffzoo.errors import CheckpointError, ExportError
from mffzoo.eval.data import open_splits
from mffzoo.export.triton import add_to_repository
from mffzoo.train.data import ScannedImageFolder, build_dataset
from mffzoo.train.recipe import DataConfig
from mffzoo.zoo import load_checkpoint_file, load_model

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("drop_stale_cli_handler")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Feature caches, the zoo and default outputs land in tmp_path, so 'nothing written' can be checked."""
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("MFFZOO_HOME", str(cache / "zoo"))
    monkeypatch.chdir(tmp_path)
    return cache


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _copy_folder(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def _model_clis(folder: Path, demo: Path, tmp_path: Path) -> list[list[str]]:
    return [["eval", "knn", str(folder), "--data", str(demo), "-o", str(tmp_path / "knn.json")],
            ["export", str(folder), "-o", str(tmp_path / "e.onnx"), "--no-check"]]


# --------------------------------------------------------------------------------------------- 1. config.json
@pytest.mark.parametrize("content,problem", [
    (b"[1, 2]", "holds a list, not a JSON object"),
    (b"42", "holds a number, not a JSON object"),
    (b'{"architecture": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 21)"),
    (b"{}", "has no 'architecture'"),
    (b'{"architecture": 5}', "has 'architecture' 5, not a model name"),
    (b'{"architecture": "mff_vit_small_patch16_224", "model_args": [1]}', "'model_args' is [1], not a JSON object"),
    (b'{"architecture": "mff_vit_small_patch16_224", "pretrained_cfg": {"foo": 1}}',
     "has keys in 'pretrained_cfg' that timm's PretrainedCfg does not know: foo"),
])
def test_config_json_that_is_not_a_config_is_one_line(tiny: Path, demo: Path, tmp_path: Path, content: bytes,
                                                      problem: str, capsys: pytest.CaptureFixture) -> None:
    """A list/number reached timm's _parse_model_cfg (TypeError), non-UTF-8 a UnicodeDecodeError traceback."""
    folder = _copy_folder(tiny, tmp_path / "m")
    (folder / "config.json").write_bytes(content)
    before = _files(tmp_path)
    for argv in _model_clis(folder, demo, tmp_path):
        line = cli_error(argv, capsys)
        assert f"'{folder / 'config.json'}' {problem}" in line or f"'{folder / 'config.json'}': {problem}" in line, line
        assert "re-export the model folder" in line
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(folder, pretrained=True)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(f"local-dir:{folder}", random_init=True)
    assert _files(tmp_path) == before


def test_config_json_beside_a_weights_file_is_checked(tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Its model_args decide the architecture: `[]` there was a TypeError in dict(...)."""
    folder = _copy_folder(tiny, tmp_path / "m")
    (folder / "config.json").write_text("[]")
    line = cli_error(["export", str(folder / "model.safetensors"), "-o", str(tmp_path / "e.onnx"), "--no-check"],
                     capsys)
    assert f"'{folder / 'config.json'}' holds a list" in line
    assert not (tmp_path / "e.onnx").exists()


# --------------------------------------------------------------------------------------------- 2. sidecars
@pytest.fixture(scope="module")
def artefact(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    main(["export", str(tiny), "-o", str(out), "--no-check"])  # returns on success
    return out


def _edited(side: dict, edit: str) -> dict:
    section, _, key = edit.partition(".")
    if key:
        del side[section][key]
    else:
        del side[section]
    return side


@pytest.mark.parametrize("case,expected", [
    ("{}", "has no 'format' key (and 12 more: artefact, artefact_sha256, model)"),
    ("[]", "holds a list, not a JSON object"),
    ("7", "holds a number, not a JSON object"),
    ("del input", "has no 'input' key"),
    ("del profile", "has no 'profile' key"),
    ("del output.features", "has no 'output.features' key"),
    ("del weights.sha256", "has no 'weights.sha256' key"),
    ("del preprocessing.mean", "has no 'preprocessing.mean' key"),
    ("list input", "has 'input' [1], not a JSON object"),
])
def test_broken_sidecar_is_one_line_naming_it(artefact: Path, tmp_path: Path, case: str, expected: str,
                                              capsys: pytest.CaptureFixture) -> None:
    """`export --check-only` indexed the sidecar unchecked: `{}` was KeyError 'profile', `[]` a TypeError."""
    art = tmp_path / "a.onnx"
    shutil.copy(artefact, art)
    side = json.loads(Path(f"{artefact}.json").read_text())
    if case.startswith("del "):
        text = json.dumps(_edited(side, case[4:]))
    elif case == "list input":
        text = json.dumps({**side, "input": [1]})
    else:
        text = case
    sidecar = tmp_path / "a.onnx.json"
    sidecar.write_text(text)
    before = _files(tmp_path)
    line = cli_error(["export", "--check-only", str(art)], capsys)
    assert line.startswith(f"error: sidecar '{sidecar}' {expected};"), line
    assert "re-export the model" in line
    with pytest.raises(ExportError, match="sidecar"):  # the Triton repository reads it through the same function
        add_to_repository(tmp_path / "repo", art)
    assert _files(tmp_path) == before  # no parity report, no repository


# --------------------------------------------------------------------------------------------- 3. .tar data roots
def _tar_of(root: Path, names: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted((root / "train").rglob("*.png"))[:names]:
            tf.add(p, arcname=str(p.relative_to(root / "train")))
    return buf.getvalue()


def _member_cuts(data: bytes) -> tuple[int, int]:
    """A cut inside the 3rd member's data and one inside the 4th member's header."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    third, fourth = members[2], members[3]
    return third.offset_data + third.size // 2, fourth.offset + 100


@pytest.mark.parametrize("kind", ["random bytes", "cut in a member", "cut in a header", "no images", "empty"])
def test_garbage_tar_data_root_is_one_line(data_root: Path, tmp_path: Path, kind: str,
                                           capsys: pytest.CaptureFixture) -> None:
    """Random bytes were a tarfile.ReadError traceback; a cut archive trained on the members before the cut."""
    tar = tmp_path / "x.tar"
    data = _tar_of(data_root)
    in_member, in_header = _member_cuts(data)
    if kind == "random bytes":
        tar.write_bytes(os.urandom(5000))
    elif kind == "cut in a member":
        tar.write_bytes(data[:in_member])
    elif kind == "cut in a header":
        tar.write_bytes(data[:in_header])
    elif kind == "empty":
        tar.write_bytes(b"")
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("readme.txt")
            info.size = 5
            tf.addfile(info, io.BytesIO(b"hello"))
        tar.write_bytes(buf.getvalue())
    recipe = write_yaml(tiny_recipe(tar, train={"epochs": 1}, publish={"tag": None}), tmp_path / "r.yaml")
    line = cli_error(["train", str(recipe), "--output", str(tmp_path / "run")], capsys)
    assert line.startswith(f"error: data.root '{tar}' "), line
    want = {"random bytes": "is not a readable tar archive", "empty": "is not a readable tar archive (empty)",
            "no images": "holds no images (1 member, none ending in",
            "cut in a member": "is truncated: member", "cut in a header": "is truncated or corrupt after"}[kind]
    assert want in line, line
    assert not (tmp_path / "run").exists()


def test_good_tar_still_loads(data_root: Path, tmp_path: Path) -> None:
    tar = tmp_path / "ok.tar"
    tar.write_bytes(_tar_of(data_root))
    assert len(build_dataset(DataConfig(root=str(tar)), None)) == 32


# --------------------------------------------------------------------------------------------- 4. code in a .bin/.pth
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "weights.bin"])
def test_model_folder_with_a_code_pickle_is_one_line(tiny: Path, demo: Path, tmp_path: Path, name: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Only a .bin/.pth beside config.json: timm's local-dir loader refused it with a multi-line RuntimeError."""
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    marker = tmp_path / "code-ran"
    torch.save({**load_file(tiny / "model.safetensors"), "x": _Evil(marker)}, folder / name)
    before = _files(tmp_path)
    for argv in _model_clis(folder, demo, tmp_path):
        line = cli_error(argv, capsys)
        assert line.startswith(f"error: refusing to load '{folder / name}': it contains pickled objects"), line
        assert "system" in line
    with pytest.raises(CheckpointError, match="refusing to load"):  # Python API: raises, one line, no code run
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert not marker.exists()
    assert _files(tmp_path) == before


def test_code_pickle_folder_through_the_console_script(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    marker = tmp_path / "code-ran"
    torch.save({"x": _Evil(marker)}, folder / "pytorch_model.bin")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mffzoo", "export", str(folder), "-o", str(tmp_path / "e.onnx"),
                           "--no-check"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: refusing to load")
    assert not marker.exists() and not (tmp_path / "e.onnx").exists()


# ----------------------------------------------------------------------------------------- 5. missing / int8 tensors
@pytest.mark.parametrize("damage,expected", [
    ("missing", "lacks 1 tensor(s) the model needs: blocks.1.attn.qkv.weight"),
    ("int8", "non-float tensors where the model has float weights: blocks.0.mlp.fc1.weight int8"),
    ("bool", "non-float tensors where the model has float weights: cls_token bool"),
])
def test_safetensors_with_a_missing_or_integer_tensor(tiny: Path, demo: Path, tmp_path: Path, damage: str,
                                                      expected: str, capsys: pytest.CaptureFixture) -> None:
    """A missing key was torch's multi-page RuntimeError; an int8 tensor was cast into the float weight silently."""
    folder = _copy_folder(tiny, tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    if damage == "missing":
        del sd["blocks.1.attn.qkv.weight"]
    elif damage == "int8":
        sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"].to(torch.int8)
    else:
        sd["cls_token"] = sd["cls_token"] > 0
    save_file(sd, folder / "model.safetensors")
    weights = folder / "model.safetensors"
    before = _files(tmp_path)
    for argv in [*_model_clis(folder, demo, tmp_path), ["eval", "knn", str(weights), "--data", str(demo)],
                 ["convert", str(weights), str(tmp_path / "out"), "--num-heads", "4"]]:
        line = cli_error(argv, capsys)
        assert f"'{weights}'" in line and expected in line, (argv, line)
    with pytest.raises(CheckpointError, match=re.escape(expected.split(":")[0])):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert _files(tmp_path) == before


def test_half_precision_weights_still_load(tiny: Path, tmp_path: Path) -> None:
    """fp16/bf16 tensors are floats: they load (cast) as before; only integer/bool tensors are refused."""
    folder = _copy_folder(tiny, tmp_path / "m")
    sd = {k: v.half() for k, v in load_file(folder / "model.safetensors").items()}
    save_file(sd, folder / "model.safetensors")
    model = load_model(folder, pretrained=True)
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"].float())


# --------------------------------------------------------------------------------------------- 6. zip CRC of a .pth
def _flip_in_largest_member(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes (a stored, uncompressed zip member)."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
    data[h + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_byte_in_a_pth_without_checksum_is_caught_by_the_zip_crc(tiny: Path, demo: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """torch's zip reader never checks the CRC-32 it recorded: the flipped weight loaded silently."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    pth = folder / "model.pth"
    torch.save(load_file(tiny / "model.safetensors"), pth)
    assert load_checkpoint_file(pth)  # intact: loads
    member = _flip_in_largest_member(pth)
    assert not Path(f"{pth}.sha256").exists()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint_file(pth)
    assert str(exc.value) == (f"checkpoint '{pth}' is corrupt: '{member}' inside its zip archive fails its CRC-32 "
                              "check (bytes changed since it was written); re-download it or use an earlier copy")
    before = _files(tmp_path)
    for argv in [*_model_clis(folder, demo, tmp_path), ["convert", str(pth), str(tmp_path / "out")]]:
        assert cli_error(argv, capsys) == f"error: {exc.value}"
    assert _files(tmp_path) == before


# --------------------------------------------------------------------------------------------- 7. symlink loops
def _with_links(data_root: Path, dst: Path) -> Path:
    """The 32 + 8 image demo folder with a loop (a class folder linking back to train/), a second link to a class
    folder already scanned, and an image linked into another class."""
    root = shutil.copytree(data_root, dst, symlinks=True)
    classes = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    (classes[0] / "up").symlink_to("..")
    (classes[1] / "again").symlink_to(classes[2])
    first = sorted(classes[3].glob("*.png"))[0]
    (classes[1] / "linked.png").symlink_to(first)
    return root


def test_symlink_loop_is_not_followed_and_said_once(data_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """timm's os.walk(followlinks=True) went round the loop until ELOOP: 32 images counted as hundreds."""
    root = _with_links(data_root, tmp_path / "data")
    recipe = write_yaml(tiny_recipe(root, train={"epochs": 1}, publish={"tag": None}), tmp_path / "r.yaml")
    main(["train", str(recipe), "--output", str(tmp_path / "run")])  # returns on success
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "symlinked paths" in line]
    assert len(warned) == 1, err
    assert warned[0].startswith(f"data folder '{root / 'train'}': skipped 3 symlinked paths, 1 leading back to "
                                "their own ancestor folder (a loop, e.g. "), warned
    assert "each real image counts once (32 images)" in warned[0]
    assert any(line.startswith("training tiny: 32 images,") for line in err), err


def test_folder_scan_counts_each_real_image_once(data_root: Path, tmp_path: Path) -> None:
    root = _with_links(data_root, tmp_path / "data")
    reader = ScannedImageFolder(root / "train")
    real = [os.path.realpath(f) for f, _ in reader.samples]
    assert len(real) == len(set(real)) == 32
    assert all(os.path.realpath(f) == os.path.abspath(f) for f, _ in reader.samples)  # counted at its own path
    train, val = open_splits(root, None, None)  # eval's torchvision folders: the same rule
    assert len(train) == 32 and len(val) == 8
    assert len({os.path.realpath(p) for p, _ in train.samples}) == 32


def test_folder_scan_lists_what_timm_lists_without_loops(data_root: Path, tmp_path: Path) -> None:
    """Same files, labels and order as timm's find_images_and_targets, links to outside folders followed."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    root = shutil.copytree(data_root, tmp_path / "data")
    outside = tmp_path / "elsewhere" / "zebra"
    shutil.copytree(sorted((root / "val").iterdir())[0], outside)
    (root / "train" / "zebra").symlink_to(outside)
    reader = ScannedImageFolder(root / "train")
    samples, class_to_idx = find_images_and_targets(str(root / "train"))
    assert reader.samples == samples and reader.class_to_idx == class_to_idx and len(samples) == 34
