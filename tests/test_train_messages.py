"""What a training run tells its user: the signal that stopped it, distinct unreadable files with their whole error,
a warm-up that covers the whole schedule, third-party noise kept out of the terminal, one recipe error per torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_recipe, write_train_data, write_yaml

from mffzoo.cli.main import main
from mffzoo.train import PretrainTask

REPO = Path(__file__).resolve().parents[1]


# two blocks, 6 images per class, no checkpoints or figures: only what a run says matters here
QUIET: dict[str, dict[str, Any]] = {
    "model": dict(depth=2, fusion_layers=[0, 1]),
    "train": dict(epochs=2, batch_per_device=8, device="auto"),
    "optim": dict(lr=1e-3),
    "checkpoint": dict(every_steps=100, keep_last=3),
    "log": dict(every_steps=1, vis_every_epochs=0, vis_images=0, progress="epoch", tensorboard=False),
    "publish": dict(tag=None),
}


def tiny(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    return tiny_recipe(root, QUIET, **sections)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_train_data(tmp_path_factory.mktemp("data") / "tiny", train_per_class=6)


def test_sigint_is_named_as_sigint(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGINT, sent by the run to itself at its second step, is reported as SIGINT everywhere."""
    real_step = PretrainTask.step
    calls = []

    def step_then_interrupt(self: PretrainTask, model: Any, batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, model, batch)

    monkeypatch.setattr(PretrainTask, "step", step_then_interrupt)
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "zoo"))
    # compile off: under auto the engine's compile probe calls step twice before training (counted above)
    recipe = write_yaml(tiny(data_root, train={"epochs": 20, "compile": False}), tmp_path / "tiny.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(recipe), "--output", str(tmp_path / "run")])
    assert exc.value.code == 128 + signal.SIGINT  # as a shell reports a process ended by SIGINT
    out, err = capsys.readouterr()
    assert "SIGINT received: checkpoint" in err and "saved at step 2" in err, err
    assert "stopped by SIGINT at step 2" in out and "SIGTERM" not in out + err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stop_reason"] == "sigint"


def test_unreadable_files_are_counted_once_with_their_whole_error(data_root: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """3 bad files, two of them adjacent (a retry walks over the second), met in 2 epochs: 3, not 4 then 8."""
    from PIL import Image

    from mffzoo.train import train

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    files = sorted((root / "train").rglob("*.png"))
    victims = [files[5], files[6], files[13]]
    for v in victims:
        v.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(OSError) as pil, open(victims[0], "rb") as f:
        Image.open(f)  # as the reader opens it: PIL names the file object
    whole = f"{type(pil.value).__name__}: {pil.value}"
    assert len(whole) > 80 and str(victims[0]) in whole  # the old report cut it at 80 characters
    recipe = tiny(root, data={"max_bad_fraction": 0.2})
    with caplog.at_level("WARNING", logger="mffzoo.train"):
        res = train(recipe, output_dir=tmp_path / "run")
    assert res.completed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_images"] == 3
    assert f"{victims[0]} ({whole})" in caplog.text
    assert "skipped 3 unreadable image(s) so far" in caplog.text and "skipped 4" not in caplog.text


def test_whole_run_warmup_is_named_and_timm_noise_stays_out(data_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """epochs=1, warmup_epochs=1: one warning of ours; timm's "Cosine annealing ... no effect" only with -v."""
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "zoo"))
    recipe = write_yaml(tiny(data_root, train={"epochs": 1}, optim={"warmup_epochs": 1}), tmp_path / "tiny.yaml")
    main(["train", str(recipe), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "the warm-up (optim.warmup_epochs=1) covers the whole run (train.epochs=1)" in err, err
    assert err.count("covers the whole run") == 1 and "Cosine annealing" not in err
    main(["-v", "train", str(recipe), "--output", str(tmp_path / "run-v"), "--set", "train.epochs=2"])
    assert "Cosine annealing" not in capsys.readouterr().err  # no whole-run warm-up: timm has nothing to say
    main(["-v", "train", str(recipe), "--output", str(tmp_path / "run-v1")])
    err = capsys.readouterr().err
    assert "Cosine annealing" in err and "covers the whole run" in err  # -v shows third-party lines


@pytest.mark.parametrize("publish, why", [({"tag": "msg", "zoo": False}, "publish.zoo is false"),
                                          ({"tag": None}, "publish.tag is null")])
def test_not_published_says_which_setting_kept_it_out_of_the_zoo(data_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  publish: dict[str, Any], why: str) -> None:
    """Defect: with publish.zoo=false (and a tag) the log blamed a null publish.tag."""
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(zoo))
    recipe = write_yaml(tiny(data_root, train={"epochs": 1}, publish=publish), tmp_path / "tiny.yaml")
    main(["train", str(recipe), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"not published to the zoo ({why}); weights in {tmp_path / 'run' / 'model'}" in err, err
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not zoo.exists() or not any(zoo.iterdir())


def test_third_party_warnings_need_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    for argv, shown in ((["zoo"], False), (["-v", "zoo"], True)):
        main(argv)
        capsys.readouterr()
        logging.getLogger("matplotlib.font_manager").warning("Matplotlib is building the font cache")
        logging.getLogger("mffzoo.train").warning("a warning of ours")
        logging.getLogger("timm.models").error("a third-party error")
        err = capsys.readouterr().err
        assert ("building the font cache" in err) == shown
        assert "a warning of ours" in err and "a third-party error" in err


def test_torchrun_prints_a_recipe_error_once(tmp_path: Path) -> None:
    """Both ranks meet the bad key; the user reads it once (rank 0), and the run fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MFFZOO_HOME": str(tmp_path / "zoo")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mffzoo", "train", "demo", "--set", "optim.bogus=1", "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "unknown config key 'optim.bogus'" in ln]
    assert lines == [lines[0]] and lines[0].startswith("error: "), proc.stderr


@pytest.mark.slow
def test_unreadable_files_are_counted_once_over_two_ranks(data_root: Path, tmp_path: Path) -> None:
    """Under torchrun each rank meets other bad files each epoch; the run still reports each file once."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    files = sorted((root / "train").rglob("*.png"))
    for v in (files[2], files[3], files[17]):
        v.write_bytes(b"not an image at all")
    recipe = write_yaml(tiny(root, train={"epochs": 3, "batch_per_device": 4}, data={"max_bad_fraction": 0.2}),
                   tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MFFZOO_HOME": str(tmp_path / "zoo")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mffzoo", "train", str(recipe), "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_images"] == 3
    assert "skipped 3 unreadable image(s) so far" in proc.stderr and "skipped 4" not in proc.stderr
