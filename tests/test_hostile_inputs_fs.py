"""Hostile file systems and outputs: locks, full disks, read-only folders, output paths that are taken.

Every fault is real: two real processes for concurrency (the first one frozen with SIGSTOP once it holds its lock,
so the second provably runs while the first is at work), a real file-size limit (RLIMIT_FSIZE with SIGXFSZ
ignored, so writes fail with EFBIG, the stand-in for a full disk), a real full tmpfs (ENOSPC) and a real
immutable folder (``chattr +i``: we are root, so chmod would not stop a write). Each test checks what is on disk
afterwards: nothing lost, nothing written elsewhere, and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import cli_error, run_interrupted, tiny_recipe, train_cmd, train_env, write_yaml

from mffzoo.errors import ExportError, InUseError, WriteFailed
from mffzoo.export import export_model
from mffzoo.export.triton import add_to_repository
from mffzoo.io import atomic_write, exclusive, lock_path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included: temp files and locks) with its sha256."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _limit_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn: files may grow to ``limit`` bytes; beyond, write() fails with EFBIG (SIGXFSZ ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _mffzoo(*args: str, env: dict[str, str], preexec: Callable[[], None] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``mffzoo ARGS`` in a process of its own; one that hangs is aborted with its Python stacks in the failure."""
    cmd = [sys.executable, "-m", "mffzoo", *args]
    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"hung: {' '.join(cmd)}\n{err[-6000:]}") from None
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and exactly one ``error:`` line, no traceback."""
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


@contextlib.contextmanager
def _frozen_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool],
                 timeout: float = 240) -> Iterator[subprocess.Popen]:
    """Start ``cmd``; once ``ready()`` (it holds its lock) freeze it with SIGSTOP and yield it; on exit let it go on
    (SIGCONT). The caller waits for it; a failure kills it."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"finished before taking its lock: {proc.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "never took its lock"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield proc
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _can_chattr(folder: Path) -> bool:
    """``chattr +i`` works here (ext4 and friends, as root); false on tmpfs/overlay without it."""
    probe = folder / "chattr-probe"
    probe.mkdir()
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.rmdir()
    return ok


# --------------------------------------------------------------------------------------------- fixtures
def _recipe(data_root: Path, path: Path, **sections: dict) -> Path:
    """1 epoch x 4 steps, checkpoints at steps 2 and 4, no figures, no zoo: the smallest run with a resume."""
    return write_yaml(tiny_recipe(data_root, {"train": {"epochs": 1}, "log": {"vis_every_epochs": 0, "vis_images": 0},
                                              "publish": {"tag": None}}, **sections), path)


@pytest.fixture(scope="module")
def interrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(recipe, run directory stopped by SIGTERM after step 2 with checkpoint 2 saved, zoo home)."""
    root = tmp_path_factory.mktemp("interrupted")
    recipe = _recipe(data_root, root / "r.yaml")
    run = root / "run"
    p = run_interrupted(train_cmd(recipe, run), train_env(root / "zoo", "2:TERM"))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert [c.name for c in sorted((run / "checkpoints").glob("*.pth"))] == ["checkpoint-00000002.pth"]
    return recipe, run, root / "zoo"


@pytest.fixture(scope="module")
def artefact(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real ONNX export of the tiny model (unchecked: these tests are about files, not numbers)."""
    root = tmp_path_factory.mktemp("artefact")
    return export_model(str(tiny), output=root / "enc.onnx", batch={"min": 1, "opt": 2, "max": 4},
                        check={"enabled": False}).artefact


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def _locked_by_another_process(path: Path) -> Iterator[subprocess.Popen]:
    """A real second process holding ``path``'s lock (``mffzoo.io.exclusive``) until the block ends; killed then."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from mffzoo.io import exclusive\n"
        f"lock = exclusive({str(path)!r}).acquire(); print('locked', flush=True); time.sleep(300)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_refused_to_a_second_process_and_released_by_a_killed_one(tmp_path: Path) -> None:
    """The primitive: another process's lock is refused with its pid; a SIGKILLed holder blocks nobody."""
    target = tmp_path / "out" / "thing"
    with _locked_by_another_process(target) as holder:
        with pytest.raises(InUseError, match=re.escape(f"'{target}' is in use by another mffzoo process "
                                                         f"(pid {holder.pid})")):
            exclusive(target, fix="wait").acquire()
        holder.kill()
        holder.wait()
    assert lock_path(target).is_file()  # a killed holder leaves its file, but not its lock
    with exclusive(target):
        assert lock_path(target).read_text().strip() == str(os.getpid())
    assert not list((tmp_path / "out").iterdir())  # the lock file is gone (the folder was the killed one's)
    with exclusive(tmp_path / "new" / "deep" / "thing"):
        pass
    assert not (tmp_path / "new").exists()  # folders made only to hold a lock go with it


def test_second_train_into_a_run_in_use_is_refused_at_once(data_root: Path, tmp_path: Path) -> None:
    """Two `mffzoo train` into one run directory: the second stops in one line (naming the first's pid) and
    touches nothing; the first, meanwhile frozen, then finishes its run intact."""
    recipe = _recipe(data_root, tmp_path / "r.yaml")
    run = tmp_path / "run"
    env = train_env(tmp_path / "zoo")
    with _frozen_when(train_cmd(recipe, run), env, lambda: lock_path(run).is_file()) as first:
        before = _tree(tmp_path)
        line = _one_error_line(_mffzoo("train", str(recipe), "--output", str(run), env=env))
        assert f"'{run}' is in use by another mffzoo process (pid {first.pid})" in line and "--output" in line
        assert _tree(tmp_path) == before  # the second run wrote nothing, not even recipe.yaml
    done = _finish(first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pth")) == ["checkpoint-00000002.pth",
                                                                         "checkpoint-00000004.pth"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "summary.json").is_file()
    assert not lock_path(run).exists() and not list(run.rglob("*.lock")) and not list(run.rglob("*.tmp"))


def test_two_exports_to_one_output_and_one_triton_repository(tiny: Path, tmp_path: Path) -> None:
    """While one export writes `-o e/a.onnx` into `--triton-repo repo`, a second export to the same `-o` and a
    third to another `-o` in the same repository are each refused in one line; they leave no file; the first
    then completes (artefact, sidecar, repository) and leaves no lock behind."""
    out, repo = tmp_path / "e" / "a.onnx", tmp_path / "repo"
    env = {**os.environ, "MFFZOO_HOME": str(tmp_path / "zoo")}
    base = ["export", str(tiny), "--no-check", "--batch", "1:2:4"]
    first_cmd = [sys.executable, "-m", "mffzoo", *base, "-o", str(out), "--triton-repo", str(repo)]
    with _frozen_when(first_cmd, env, lambda: lock_path(repo).is_file()) as first:
        before = _tree(tmp_path)
        procs = [subprocess.Popen([sys.executable, "-m", "mffzoo", *base, *extra], env=env, cwd=REPO, text=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for extra in (["-o", str(out)], ["-o", str(tmp_path / "e2" / "b.onnx"), "--triton-repo", str(repo)])]
        same_out, same_repo = (_finish(p) for p in procs)
        assert f"'{out}' is in use by another mffzoo process (pid {first.pid})" in _one_error_line(same_out)
        line = _one_error_line(same_repo)
        assert f"'{repo}' is in use by another mffzoo process (pid {first.pid})" in line and "--triton-repo" in line
        assert _tree(tmp_path) == before and not (tmp_path / "e2").exists()  # the refused ones left nothing
    done = _finish(first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and Path(f"{out}.json").is_file() and (repo / "a" / "1" / "model.onnx").is_file()
    assert _sha(repo / "a" / "1" / "model.onnx") == _sha(out)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".lock") or ".tmp" in p.name]


def test_publishing_into_a_zoo_entry_in_use_is_refused(interrupted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`mffzoo convert` into a zoo tag folder another process is writing: refused in one line, entry untouched."""
    _, run, _ = interrupted
    entry = tmp_path / "zoo" / "mff_vit_small_patch16_224.x"
    with _locked_by_another_process(entry) as holder:
        line = _one_error_line(_mffzoo("convert", str(run / "checkpoints" / "checkpoint-00000002.pth"), str(entry),
                                       env=train_env(tmp_path / "zoo")))
        assert f"'{entry}' is in use by another mffzoo process (pid {holder.pid})" in line
        assert not entry.exists() and [p.name for p in entry.parent.iterdir()] == [lock_path(entry).name]


# --------------------------------------------------------------------------------------------- recipe.yaml
def test_refused_recipe_keeps_the_runs_recipe_yaml(interrupted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A run refused for holding another recipe's checkpoints keeps its own recipe.yaml (and everything else)."""
    recipe, run0, zoo = interrupted
    run = _copy_run(run0, tmp_path / "run")
    before = _tree(run)
    line = _one_error_line(_mffzoo("train", str(recipe), "--output", str(run), "--set", "optim.lr=0.001",
                                   env=train_env(zoo)))
    assert "holds checkpoints of a different recipe" in line and "optim.lr" in line
    assert _tree(run) == before


# --------------------------------------------------------------------------------------------- faults
def test_checkpoint_save_past_the_file_size_limit_keeps_the_last_one_and_resumes(
        interrupted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """EFBIG at the step-4 checkpoint (3 MB, limit 1 MB): one line naming the file, the cause and the kept
    checkpoint; no temp file; checkpoint 2 byte-identical; a rerun without the limit resumes from it."""
    recipe, run0, zoo = interrupted
    run = _copy_run(run0, tmp_path / "run")
    ckpt2 = run / "checkpoints" / "checkpoint-00000002.pth"
    kept = _sha(ckpt2)
    line = _one_error_line(_mffzoo("train", str(recipe), "--output", str(run), env=train_env(zoo),
                                   preexec=_limit_file_size(1_000_000)))
    assert f"could not write '{run / 'checkpoints' / 'checkpoint-00000004.pth'}'" in line
    assert "(EFBIG)" in line and f"last good checkpoint '{ckpt2}' is kept" in line and "rerun" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000002.pth",
                                                                     "checkpoint-00000002.pth.sha256"]
    assert _sha(ckpt2) == kept and not lock_path(run).exists()
    p = _mffzoo("train", str(recipe), "--output", str(run), env=train_env(zoo))
    assert p.returncode == 0 and f"resuming from {ckpt2}" in p.stderr, p.stderr[-3000:]
    assert (run / "checkpoints" / "checkpoint-00000004.pth").is_file()


def test_checkpoint_into_a_read_only_folder_keeps_the_last_one_and_resumes(
        interrupted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """An immutable checkpoints folder (EPERM, like a read-only mount): one line, checkpoint 2 kept, resumable."""
    if not _can_chattr(tmp_path):
        pytest.skip("chattr +i does not work on this file system (a read-only folder cannot be made as root)")
    recipe, run0, zoo = interrupted
    run = _copy_run(run0, tmp_path / "run")
    folder = run / "checkpoints"
    before = _tree(folder)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        line = _one_error_line(_mffzoo("train", str(recipe), "--output", str(run), env=train_env(zoo)))
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert f"could not write '{folder / 'checkpoint-00000004.pth'}'" in line and "(EPERM)" in line
    assert f"'{folder / 'checkpoint-00000002.pth'}' is kept" in line
    assert _tree(folder) == before
    p = _mffzoo("train", str(recipe), "--output", str(run), env=train_env(zoo))
    assert p.returncode == 0 and "resuming from" in p.stderr, p.stderr[-3000:]


def test_zoo_publish_past_the_file_size_limit_keeps_the_previous_entry(
        interrupted: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`mffzoo convert --overwrite` into an existing zoo entry, EFBIG on model.safetensors: one line naming the
    entry's file (not a temp path), the entry byte-identical, no temp folder left."""
    _, run, _ = interrupted
    ckpt = run / "checkpoints" / "checkpoint-00000002.pth"
    entry = tmp_path / "zoo" / "mff_vit_small_patch16_224.x"
    env = train_env(tmp_path / "zoo")
    assert _mffzoo("convert", str(ckpt), str(entry), env=env).returncode == 0
    (entry / "notes.txt").write_text("mine")
    before = _tree(entry.parent)
    line = _one_error_line(_mffzoo("convert", str(ckpt), str(entry), "--overwrite", env=env,
                                   preexec=_limit_file_size(300_000)))
    assert f"could not write '{entry / 'model.safetensors'}'" in line and "(EFBIG)" in line
    assert _tree(entry.parent) == before  # the entry as it was, and nothing else in the zoo home


def test_export_past_the_file_size_limit_keeps_the_previous_artefact(artefact: Path, tiny: Path,
                                                                     tmp_path: Path) -> None:
    """`mffzoo export --overwrite` with EFBIG while the ONNX is written: one line naming -o; the previous
    artefact and its sidecar byte-identical; no temp folder or lock left."""
    out = tmp_path / "e" / "enc.onnx"
    out.parent.mkdir()
    shutil.copy(artefact, out)
    shutil.copy(f"{artefact}.json", f"{out}.json")
    before = _tree(tmp_path)
    line = _one_error_line(_mffzoo("export", str(tiny), "--no-check", "--batch", "1:2:4", "-o", str(out),
                                   "--overwrite", env=dict(os.environ), preexec=_limit_file_size(300_000)))
    assert f"could not write '{out}'" in line and "(EFBIG)" in line and "-o/--output" in line
    assert _tree(tmp_path) == before


def test_atomic_write_on_a_full_file_system_keeps_the_previous_file(tmp_path: Path) -> None:
    """A real full disk (a 64 KiB tmpfs): ENOSPC in one WriteFailed line; the previous file intact, no temp."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission) to fill a disk for real")
    try:
        atomic_write(mnt / "f.bin", b"previous")
        with pytest.raises(WriteFailed, match=r"could not write '.*f\.bin': No space left on device \(ENOSPC\); "
                                              r"free space"):
            atomic_write(mnt / "f.bin", b"x" * (1 << 20))
        assert sorted(p.name for p in mnt.iterdir()) == ["f.bin"] and (mnt / "f.bin").read_bytes() == b"previous"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --------------------------------------------------------------------------------------------- triton
def test_triton_version_folder_that_is_a_file_is_refused(artefact: Path, tmp_path: Path) -> None:
    """`repo/enc/1` is a file: refused in one line, the repository untouched (not a report of a file written
    nowhere); a normal add reports only files that exist."""
    repo = tmp_path / "repo"
    assert all(f.is_file() for f in add_to_repository(repo, artefact))  # enc/config.pbtxt, enc/1/model.onnx
    shutil.rmtree(repo / "enc" / "1")
    (repo / "enc" / "1").write_text("not a version folder")
    before = _tree(tmp_path)
    with pytest.raises(ExportError, match=r"'.*enc/1' is a file where Triton expects a version folder"):
        add_to_repository(repo, artefact)
    assert _tree(tmp_path) == before


# --------------------------------------------------------------------------------------------- taken paths
def test_output_paths_taken_by_the_other_kind(interrupted: tuple[Path, Path, Path], data_root: Path, tiny: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file where a folder is wanted (train --output, analyze --out-dir, reproduce -o, push --local-dir, one
    under a file) or a folder where a file is wanted (eval -o): one line, exit 2, before any work, nothing made."""
    recipe, run, _ = interrupted
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("mine")
    adir.mkdir()
    cases = [
        (["train", str(recipe), "--output", str(afile)], f"run directory '{afile}' is a file, not a folder"),
        (["train", str(recipe), "--output", str(afile / "run")], f"'{afile}' is a file, not a folder"),
        (["eval", "knn", str(tiny), "--data", str(data_root), "-o", str(adir)], f"'{adir}' is a folder, not a file"),
        (["analyze", "freq", str(tiny), "--data", str(data_root), "--out-dir", str(afile)], "is a file, not a folder"),
        (["reproduce", "--quick", "-o", str(afile)], f"-o/--output '{afile}' is a file, not a folder"),
        (["push", str(run), "--repo", "me/x", "--local-dir", str(afile)], f"--local-dir '{afile}' is a file"),
    ]
    for argv, match in cases:
        assert match in cli_error(argv, capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not list(adir.iterdir())
    assert afile.read_text() == "mine"
