"""Long steps say what they do: a line per stage in logs, a bar on a terminal (demo data, k-NN features)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mffzoo.cli.main import main
from mffzoo.progress import Progress


def test_bar_mode_draws_a_bar_and_line_mode_logs_each_stage(capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with Progress("bar", total=3, desc="stage one", unit="img") as p:
        p.update(2)
        p.update(1)
    err = capsys.readouterr().err
    assert "stage one" in err and "3/3" in err
    with caplog.at_level("INFO", logger="mffzoo"), Progress("epoch", total=3, desc="stage two") as p:
        p.update(3)
        p.line("an epoch line")
    assert [r.getMessage().split(": done")[0] for r in caplog.records] == [
        "stage two ...", "an epoch line", "stage two"]
    caplog.clear()
    with caplog.at_level("INFO", logger="mffzoo"), Progress("epoch", enabled=False, total=3, desc="rank 1") as p:
        p.line("not shown")
    assert not caplog.records


def test_demo_data_and_knn_report_their_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFFZOO_FEATURE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "demo"
    main(["data", "demo", str(root), "--train-per-class", "2", "--val-per-class", "1", "--image-size", "32"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"writing the demo dataset (36 images, 32 px) to {root} ..."
    assert err[1].startswith(f"writing the demo dataset (36 images, 32 px) to {root}: done in ")
    main(["eval", "knn", "mff_vit_small", "--random-init", "--img-size", "32", "--data", str(root), "--device", "cpu",
          "-o", str(tmp_path / "knn.json")])
    err = capsys.readouterr().err
    for stage in ("features: train split, 24 images ...", "features: train split, 24 images: done in ",
                  "features: val split, 12 images ...", "k-NN (k=20, T=0.07): 12 validation images against 24"):
        assert stage in err, err
    main(["analyze", "filter", "mff_vit_small", "--random-init", "--img-size", "32", "--data", str(root), "--device",
          "cpu", "--radii", "0.25,0.5", "--label", "tiny", "--out-dir", str(tmp_path / "an")])
    err = capsys.readouterr().err
    assert "filtered inputs: tiny, 12 images x 5 passes (clean, low/high-pass at 2 radii) ..." in err, err
