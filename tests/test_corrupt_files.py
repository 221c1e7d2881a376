"""Corrupt files and shareable artefacts (issue 9, sections 2-3 and the convert "dropped" report).

Every loader turns any non-checkpoint input into one line (fuzzed: every first byte, random bytes, truncations
of a real checkpoint); checkpoints carry a sha256 checked on load; a run with no usable checkpoint stops with
exit 2 and deletes nothing; files follow the umask; identical weights give identical bytes, also after a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import TINY, TINY_DECODER, assert_same_state, cli_error, final_model_state, tiny_recipe

from mffzoo.errors import CheckpointError
from mffzoo.io import json_text, write_json
from mffzoo.models import create_pretrain_model
from mffzoo.train import train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import atomic_torch_save, convert_checkpoint, load_checkpoint_file, write_model_folder

REPO = Path(__file__).resolve().parents[1]
TEXT = b"this is a plain text file, not a checkpoint\n" * 8


pytestmark = pytest.mark.usefixtures("drop_stale_cli_handler")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real mffzoo training checkpoint (encoder + fusion + decoder + mask_token) of the tiny model."""
    torch.manual_seed(0)
    model = create_pretrain_model("mff_vit_small", fusion_layers=[0, 1, 3], **TINY, **TINY_DECODER)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-00000004.pth"
    atomic_torch_save({"model": model.state_dict(), "arch": "mff_vit_small_patch16_224",
                       "model_args": dict(TINY), "global_step": 4}, path)
    return path


def _fuzz_cases() -> list[tuple[str, bytes]]:
    rnd = random.Random(9)
    cases = [(f"byte{b:03d}", bytes([b]) + TEXT) for b in range(256)]  # every first byte, then text
    cases += [(f"rand{i:02d}", rnd.randbytes(rnd.randrange(1, 400))) for i in range(48)]
    return cases + [("empty", b"")]


# --------------------------------------------------------------------------------------------- fuzzing the loaders
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_fuzzed_files_raise_checkpoint_error_only(tmp_path: Path, suffix: str) -> None:
    """Python API: the unpickler's KeyError/IndexError/struct.error on junk become CheckpointError, always."""
    for name, data in _fuzz_cases():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        try:
            obj = load_checkpoint_file(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (name, str(exc))
        else:  # a few bytes can spell a valid pickle of an empty dict; that is data, not a crash
            assert isinstance(obj, dict), name


def test_fuzzed_files_through_convert_cli_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`mffzoo convert` on text starting with any byte (h, t, a, ( ... crashed with KeyError/IndexError)."""
    for name, data in _fuzz_cases():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        line = cli_error(["convert", str(path), str(tmp_path / "out")], capsys)
        assert "checkpoint" in line, (name, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["training checkpoint", "model.safetensors"])
def test_truncations_of_a_real_checkpoint(training_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          kind: str) -> None:
    src = training_ckpt
    if kind == "model.safetensors":
        src = convert_checkpoint(training_ckpt, tmp_path / "folder") / "model.safetensors"
    data = src.read_bytes()
    n = len(data)
    cuts = sorted(set(range(0, 64)) | set(range(0, n, max(1, n // 97))) | set(range(n - 64, n)))
    for i, cut in enumerate(cuts):
        path = tmp_path / f"cut{cut}{src.suffix}"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint_file(path)
        if i % 4 == 0:
            cli_error(["convert", str(path), str(tmp_path / "out")], capsys)
        path.unlink()
    assert load_checkpoint_file(src)  # the intact file loads


def test_every_cli_loader_gives_one_line(training_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """export --weights, export/eval on a file, a model folder and a zoo tag whose weights are junk."""
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(zoo))
    convert_checkpoint(training_ckpt, zoo / "mff_vit_small_patch16_224.junk")
    folder = tmp_path / "folder"
    shutil.copytree(zoo / "mff_vit_small_patch16_224.junk", folder)
    for name, data in _fuzz_cases()[::23]:
        junk = tmp_path / f"{name}.pth"
        junk.write_bytes(data)
        for target in (zoo / "mff_vit_small_patch16_224.junk" / "model.safetensors", folder / "model.safetensors"):
            target.write_bytes(data)
        for argv in (["export", "mff_vit_small", "--weights", str(junk), "-o", str(tmp_path / "e.onnx")],
                     ["export", str(junk), "-o", str(tmp_path / "e.onnx")],
                     ["export", str(folder), "-o", str(tmp_path / "e.onnx")],
                     ["eval", "knn", str(junk)],
                     ["eval", "knn", str(folder)],
                     ["eval", "knn", "mff_vit_small.junk"]):
            line = _error_line(argv, capsys)
            assert "safetensors" in line or "checkpoint" in line, (name, argv, line)
    (folder / "config.json").write_text("{not json")
    assert "config.json" in cli_error(["eval", "knn", str(folder)], capsys)
    assert not (tmp_path / "e.onnx").exists()


def _error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Like helpers.cli_error, but a zoo tag may first log which file it resolved to (an info line)."""
    from mffzoo.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err and err[-1].startswith("error: "), err
    assert len(err) == 1 or (len(err) == 2 and err[0].startswith("mffzoo: ") and " -> " in err[0]), err
    return err[-1]


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("where", ["middle", "last bytes"])
def test_truncated_pth_is_one_complete_sentence(training_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                where: str) -> None:
    """A cut .pth names the file, says it is truncated and what to do, in our words: torch's miniz paragraph cut
    at 160 characters ended the line mid-word ("... If you are seeing this error, t)")."""
    data = training_ckpt.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2] if where == "middle" else data[:-3])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint_file(path)
    msg = str(exc.value)
    assert msg == (f"checkpoint '{path}' is truncated: its zip archive ({path.stat().st_size} bytes) ends without "
                   "the central directory that closes every complete one; re-download it or use an earlier copy")
    line = cli_error(["convert", str(path), str(tmp_path / "out")], capsys)
    assert line == f"error: {msg}"
    for cut in ("miniz", "PytorchStreamReader", "RuntimeError"):
        assert cut not in line


def test_truncated_safetensors_says_how_much_is_missing(tmp_path: Path) -> None:
    m = timm.create_model("mff_vit_small", pretrained=False, num_classes=0, **TINY)
    folder = write_model_folder(tmp_path / "m", "mff_vit_small_patch16_224", m, model_args=TINY)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint_file(folder)
    assert str(exc.value) == (f"checkpoint '{folder / 'model.safetensors'}' is truncated: its header lists "
                              f"{len(data)} bytes of tensors and header, the file has {len(data) - 100}; "
                              "re-download or re-export it")


def test_code_pickle_is_refused_with_our_line_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:  # a plain pickle (protocol 3): torch warned about the protocol, then refused
        pickle.dump({"state_dict": {"backbone.cls_token": torch.zeros(1)}, "meta": _Evil()}, f, protocol=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_checkpoint_file(path)
    assert not caught, [str(w.message) for w in caught]  # torch's 2-line UserWarning used to come first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mffzoo", "convert", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "code ran" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: refusing to load")


# --------------------------------------------------------------------------------------------- checksums
def test_checksum_catches_flipped_bytes(training_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    atomic_torch_save(load_checkpoint_file(training_ckpt), path, checksum=True)
    side = Path(f"{path}.sha256")
    assert side.read_text() == f"{sha256(path)}  c.pth\n"
    if shutil.which("sha256sum"):  # the standard tool verifies it too
        assert subprocess.run(["sha256sum", "-c", side.name], cwd=tmp_path, capture_output=True,
                              timeout=60).returncode == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor bytes: the zip and the unpickler do not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt or truncated: its bytes do not match c\.pth\.sha256"):
        load_checkpoint_file(path)
    side.unlink()  # without the checksum the zip's own CRC-32 of the member still catches it
    with pytest.raises(CheckpointError, match=r"is corrupt: '.*' inside its zip archive fails its CRC-32 check"):
        load_checkpoint_file(path)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "global_step": step, "epoch": 0,
            "step_in_epoch": step}


def test_rotation_keeps_what_the_run_did_not_supersede(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in (2, 4, 6):
        mgr.save(_state(step), step)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["checkpoint-00000004.pth", "checkpoint-00000004.pth.sha256",
                     "checkpoint-00000006.pth", "checkpoint-00000006.pth.sha256"]
    bad = mgr.path(7)  # e.g. a SIGTERM checkpoint whose write was damaged
    bad.write_bytes(b"(" + TEXT)
    resumer = CheckpointManager(tmp_path / "ck", keep_last=2)
    with caplog.at_level("WARNING", logger="mffzoo.train"):
        state, path = resumer.load_latest()
    assert path == mgr.path(6) and state["global_step"] == 6
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "checkpoint-00000007.pth" in warned[0] and "falling back" in warned[0]
    for step in (8, 10, 12):
        resumer.save(_state(step), step)
    assert bad.read_bytes() == b"(" + TEXT  # unusable, never superseded by this run: kept
    assert [p.name for p in resumer.list()] == ["checkpoint-00000012.pth", "checkpoint-00000010.pth",
                                                "checkpoint-00000007.pth"]
    assert not list((tmp_path / "ck").glob("checkpoint-0000000[2468].pth*"))  # superseded: gone with checksums


def test_no_usable_checkpoint_is_an_error_not_a_restart(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ck")
    assert mgr.load_latest() is None  # an empty run directory starts from step 0
    for step in (2, 4):
        mgr.save(_state(step), step)
    mgr.path(4).write_bytes(TEXT)
    data = bytearray(mgr.path(2).read_bytes())
    data[len(data) // 2] ^= 1
    mgr.path(2).write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*checkpoint-00000004\.pth, "
                                              r"checkpoint-00000002\.pth.*move them away.*checkpoint\.restart"):
        mgr.load_latest()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


# --------------------------------------------------------------------------------------------- modes (umask)
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(training_ckpt: Path, tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "c.pth", checksum=True)
        conv = tmp_path / "zoo" / "mff_vit_small_patch16_224.t"
        convert_checkpoint(training_ckpt, conv, keep_extras=True)
        write_json(tmp_path / "r.json", {"a": 1})  # results, sidecars: every JSON goes through mffzoo.io
        write_json(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    files = [tmp_path / "c.pth", tmp_path / "c.pth.sha256", tmp_path / "r.json", tmp_path / "s.json",
             *sorted(conv.iterdir())]
    assert {p.name for p in conv.iterdir()} == {"model.safetensors", "config.json", "mffzoo.json",
                                                "pretrain_extras.safetensors"}
    for p in files:
        assert p.stat().st_mode & 0o777 == mode, (p.name, oct(p.stat().st_mode))
    assert conv.stat().st_mode & 0o777 == mode | ((mode & 0o444) >> 2)  # folders: x where r


# --------------------------------------------------------------------------------------------- byte-identical files
def test_same_weights_same_bytes(tmp_path: Path) -> None:
    """safetensors wrote its metadata in a random (Rust HashMap) order: equal weights, different sha256."""
    model = timm.create_model("mff_vit_small", pretrained=False, num_classes=0, **TINY)
    hashes = set()
    for i in range(8):
        folder = write_model_folder(tmp_path / f"m{i}", "mff_vit_small_patch16_224", model,
                                    meta={"z": 1, "a": {"y": 2, "b": 3}})
        hashes.add(tuple(sha256(folder / n) for n in ("model.safetensors", "config.json", "mffzoo.json")))
    assert len(hashes) == 1
    raw = (tmp_path / "m0" / "model.safetensors").read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")]
    assert header.startswith(b'{"__metadata__":{"architecture":"mff_vit_small_patch16_224","format":"pt"}')
    assert len(header) % 8 == 0
    assert json_text({"b": 1, "a": {2: "x", "c": None}}) == (
        '{\n  "a": {\n    "2": "x",\n    "c": null\n  },\n  "b": 1\n}\n')
    text = (tmp_path / "m0" / "mffzoo.json").read_text()
    assert text == json_text(json.loads(text))  # sorted keys on disk


def test_convert_reports_what_it_dropped(training_ckpt: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    state = load_checkpoint_file(training_ckpt)["model"]
    extras = [k for k in state if not k.startswith("encoder.")]
    with caplog.at_level("INFO", logger="mffzoo"):
        out = convert_checkpoint(training_ckpt, tmp_path / "out")
    meta = json.loads((out / "mffzoo.json").read_text())
    decoder_blocks = sum(k.startswith("decoder_blocks.") for k in state)
    assert meta["dropped_keys"] == len(extras) > decoder_blocks > 0
    assert meta["dropped"]["mask_token"] == 1 and meta["dropped"]["decoder_blocks.*"] == decoder_blocks
    assert meta["dropped"]["fusion.*"] == sum(k.startswith("fusion.") for k in state)
    assert f"dropped {len(extras)} keys" in caplog.text and "--keep-extras" in caplog.text
    kept = convert_checkpoint(training_ckpt, tmp_path / "kept", keep_extras=True)
    assert json.loads((kept / "mffzoo.json").read_text())["dropped_keys"] == 0


# --------------------------------------------------------------------------------------------- resume, end to end
@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs x 4 steps, a checkpoint every 2 steps, not published to the zoo."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    return train(tiny_recipe(data_root, publish={"tag": None}), output_dir=out).run_dir


def _cut_back(src: Path, dst: Path, last_step: int) -> Path:
    """The run directory as a SIGKILL right after checkpoint ``last_step`` would have left it."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "model")
    for p in (dst / "checkpoints").iterdir():
        if int(p.name.split("-")[1].split(".")[0]) > last_step:
            p.unlink()
    return dst


def test_resumed_run_writes_byte_identical_weights(uninterrupted: Path, data_root: Path, tmp_path: Path) -> None:
    run = _cut_back(uninterrupted, tmp_path / "resumed", last_step=6)
    res = train(tiny_recipe(data_root, publish={"tag": None}), output_dir=run)
    assert res.completed and res.global_step == 12
    for name in ("model.safetensors", "config.json", "pretrain_extras.safetensors"):
        assert sha256(run / "model" / name) == sha256(uninterrupted / "model" / name), name
    for p in (run / "checkpoints").glob("*.pth"):  # every checkpoint of both runs matches its checksum
        assert Path(f"{p}.sha256").read_text().split()[0] == sha256(p)


@pytest.mark.parametrize("damage", ["garbled", "flipped"])
def test_damaged_newest_checkpoint_falls_back(uninterrupted: Path, data_root: Path, tmp_path: Path, damage: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    run = _cut_back(uninterrupted, tmp_path / "run", last_step=8)
    newest = CheckpointManager(run / "checkpoints").list()[0]
    if damage == "garbled":  # bytes replaced by text (crashed with IndexError: pop from empty list)
        newest.write_bytes(TEXT * 50)
        Path(f"{newest}.sha256").unlink()  # as a checkpoint of an older mffzoo: the unpickler sees the text
    else:  # one flipped bit in the tensor bytes: loads without error, only the checksum sees it
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0x01
        newest.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="mffzoo.train"):
        res = train(tiny_recipe(data_root, publish={"tag": None}), output_dir=run)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and newest.name in warned[0] and "falling back" in warned[0], warned
    assert res.completed and res.global_step == 12
    assert_same_state(final_model_state(run), final_model_state(uninterrupted))


def test_no_usable_checkpoint_stops_with_exit_2_then_restart(uninterrupted: Path, data_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    run = _cut_back(uninterrupted, tmp_path / "run", last_step=4)
    for p in (run / "checkpoints").glob("*.pth"):
        p.write_bytes(TEXT)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data_root, publish={"tag": None})))
    line = cli_error(["train", str(recipe), "--output", str(run)], capsys)
    assert "no usable checkpoint" in line and "checkpoint-00000004.pth, checkpoint-00000002.pth" in line
    assert "move them away" in line and "--set checkpoint.restart=true" in line
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing deleted
    assert not (run / "model").exists()

    res = train(tiny_recipe(data_root, publish={"tag": None}, checkpoint={"restart": True}), output_dir=run)
    assert res.completed and res.global_step == 12
    aside = run / "checkpoints.discarded-1"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before  # moved, not deleted
    assert sha256(run / "model" / "model.safetensors") == sha256(uninterrupted / "model" / "model.safetensors")
