"""Analyses: frequency profiles on known spectra, ideal filters, fusion weights from real runs, valid plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY, cli_error
from PIL import Image

from mffzoo.analysis.filters import filter_accuracy, filter_images, filter_mask, plot_filters
from mffzoo.analysis.freq import (
    model_frequency_profile,
    normalized_frequencies,
    plot_frequency,
    relative_log_amplitude,
)
from mffzoo.analysis.fusion import fusion_weights, plot_fusion
from mffzoo.cli.main import main
from mffzoo.errors import CheckpointError, DataError
from mffzoo.zoo import atomic_torch_save, convert_checkpoint, write_model_folder


def _assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        im.verify()


# ---------------------------------------------------------------------------------------------- frequency
def _smooth_maps(n: int = 8, c: int = 16, h: int = 14) -> torch.Tensor:
    """Only the lowest non-DC frequency (plus a DC offset): all energy near the centre of the spectrum."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(h).float(), indexing="ij")
    phase = torch.rand(n, c, 1, 1, generator=g) * 2 * math.pi
    return 2.0 + torch.cos(2 * math.pi * (xx + yy) / h + phase) + 0.01 * torch.randn(n, c, h, h, generator=g)


def test_frequency_profile_orders_low_pass_below_white_noise() -> None:
    g = torch.Generator().manual_seed(1)
    white = torch.randn(8, 16, 14, 14, generator=g)
    smooth = _smooth_maps()
    # a blurred version of the noise sits in between
    kernel = torch.ones(16, 1, 3, 3) / 9
    blurred = torch.nn.functional.conv2d(white, kernel, padding=1, groups=16)
    curves = {name: relative_log_amplitude(x) for name, x in
              (("white", white), ("blurred", blurred), ("smooth", smooth))}
    for c in curves.values():
        assert c.shape == (7,) and c[0] == 0  # DC .. highest diagonal frequency; relative to DC
    assert curves["smooth"][-1] < curves["blurred"][-1] < curves["white"][-1]
    assert abs(float(curves["white"][-1])) < 1.0  # white noise: flat spectrum (log-amplitude ~ DC)
    assert float(curves["smooth"][-1]) < -5.0
    assert normalized_frequencies(14) == [2 * i / 14 for i in range(7)]


def test_block_profiles_of_a_real_vit_and_plot(tiny: Path, tmp_path: Path) -> None:
    from mffzoo.eval.features import load_eval_model

    net = load_eval_model(tiny)
    prof = model_frequency_profile(net, torch.randn(6, 3, 32, 32), batch_size=4)
    assert len(prof["blocks"]) == 4 and prof["grid"] == [4, 4] and prof["frequencies"] == [0.0, 0.5]
    assert all(c[0] == 0.0 for c in prof["blocks"]) and len(prof["high_freq"]) == 4
    png = plot_frequency({"models": {"a": prof, "b": prof}}, tmp_path / "f.png", title="t")
    _assert_png(png, (int(110 * (4.2 * 2 + 1.0)), int(110 * 3.8)))


def test_frequency_analysis_rejects_a_too_small_grid(demo: Path, tiny: Path) -> None:
    from mffzoo.analysis.freq import frequency_analysis

    with pytest.raises(DataError, match="too small"):
        frequency_analysis([tiny], demo, img_size=16, num_images=4)  # 2x2 tokens


# ------------------------------------------------------------------------------------------------ filters
def test_ideal_filters_keep_and_remove_the_expected_energy() -> None:
    h = 32
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(h).float(), indexing="ij")
    low = torch.cos(2 * math.pi * 2 * xx / h)  # 2 cycles: radius 2/16 = 0.125 of Nyquist
    high = 0.5 * torch.cos(2 * math.pi * 12 * yy / h)  # 12 cycles: radius 0.75
    img = (low + high).expand(2, 3, h, h)
    torch.testing.assert_close(filter_images(img, 0.3, "low"), low.expand_as(img), atol=1e-4, rtol=0)
    torch.testing.assert_close(filter_images(img, 0.3, "high"), high.expand_as(img), atol=1e-4, rtol=0)
    # complementary, energy-preserving split (Parseval) for arbitrary images
    x = torch.randn(4, 3, h, h, generator=torch.Generator().manual_seed(0))
    lo, hi = filter_images(x, 0.4, "low"), filter_images(x, 0.4, "high")
    torch.testing.assert_close(lo + hi, x, atol=1e-4, rtol=0)
    torch.testing.assert_close((lo**2).sum() + (hi**2).sum(), (x**2).sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(filter_images(x, 1.5, "low"), x, atol=1e-4, rtol=0)  # corners are at sqrt(2)
    dc_only = filter_images(x, 0.0, "low")
    torch.testing.assert_close(dc_only, x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-4, rtol=0)
    assert filter_mask(h, h, 0.0, "low").sum() == 1 and filter_mask(h, h, 0.0, "high").sum() == h * h - 1


def test_filter_accuracy_end_to_end(demo: Path, tiny: Path, tmp_path: Path) -> None:
    from mffzoo.eval.knn import knn_eval

    res = filter_accuracy([tiny], demo, radii=[0.0, 0.5, 2.0], head="knn", labels=["tiny"], cache=str(tmp_path))
    m = res["models"]["tiny"]
    # the clean score is the plain k-NN result; a low-pass that keeps everything changes nothing
    assert m["clean"] == knn_eval(tiny, demo, cache=str(tmp_path))["results"]["cls"]["top1"]
    assert m["low"][2] == m["clean"]
    assert len(m["low"]) == len(m["high"]) == 3 and all(0 <= v <= 100 for v in m["low"] + m["high"])
    png = plot_filters(res, tmp_path / "filter.png")
    _assert_png(png, (int(110 * 9.5), int(110 * 3.8)))


# ------------------------------------------------------------------------------------------------- fusion
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Path:
    """A real 5-step MFF pretraining run through the engine (checkpoints + metrics.jsonl)."""
    from mffzoo.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "mff"
    recipe = {
        "name": "fusion_test", "data": {"root": str(demo), "num_workers": 0, "persistent_workers": False},
        "train": {"epochs": 1, "batch_size": 8, "batch_per_device": 8, "precision": "fp32", "device": "cpu"},
        "optim": {"lr": 1e-2, "warmup_epochs": 0},
        "model": {"arch": "mff_vit_small", **TINY, "fusion_layers": [0, 1, 3], "decoder_dim": 32,
                  "decoder_depth": 1, "decoder_heads": 4},
        "log": {"every_steps": 1, "progress": "epoch", "tensorboard": False, "vis_images": 0},
        "checkpoint": {"every_steps": 0},
    }
    train(recipe, output_dir=run_dir)
    return run_dir


def test_fusion_weights_from_checkpoint_zoo_folder_and_run(pretrain_run: Path, tmp_path: Path) -> None:
    from mffzoo.models.mff import create_pretrain_model

    # a training checkpoint with known raw weights
    net = create_pretrain_model("mff_vit_small", fusion_layers=[0, 2, 3], decoder_dim=32, decoder_depth=1,
                                decoder_heads=4, **TINY)
    with torch.no_grad():
        net.fusion.weights.copy_(torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1))
    ckpt = atomic_torch_save({"model": net.state_dict(), "arch": "mff_vit_small_patch16_224", "model_args": TINY,
                              "fusion_layers": [0, 2, 3]}, tmp_path / "ckpt.pth")
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).tolist()
    r = fusion_weights(ckpt)
    assert r["fusion_layers"] == [0, 2, 3] and r["history"] is None
    assert r["weights"] == pytest.approx(expected)
    # a zoo folder published with extras (and the fusion layers in its metadata)
    folder = write_model_folder(tmp_path / "entry", "mff_vit_small_patch16_224", net.encoder, model_args=TINY,
                                meta={"fusion_layers": [0, 2, 3]}, extras=net.extras_state_dict())
    assert fusion_weights(folder)["weights"] == pytest.approx(expected)
    assert fusion_weights(folder)["fusion_layers"] == [0, 2, 3]
    # `mffzoo convert --keep-extras` of the checkpoint carries the fused levels into the folder's mffzoo.json
    conv = fusion_weights(convert_checkpoint(ckpt, tmp_path / "converted", keep_extras=True))
    assert conv["fusion_layers"] == [0, 2, 3] and conv["weights"] == pytest.approx(expected)
    # recorded layers that disagree with the tensor label by level instead of guessing
    odd = atomic_torch_save({"model": net.state_dict(), "model_args": TINY, "fusion_layers": [3]}, tmp_path / "o.pth")
    assert fusion_weights(odd)["fusion_layers"] is None
    bare = write_model_folder(tmp_path / "bare", "mff_vit_small_patch16_224", net.encoder, model_args=TINY)
    with pytest.raises(CheckpointError, match="pretrain_extras"):
        fusion_weights(bare)
    # a run directory: final weights from its newest checkpoint, evolution from metrics.jsonl
    run = fusion_weights(pretrain_run)
    assert run["fusion_layers"] == [0, 1, 3] and len(run["weights"]) == 3
    assert sum(run["weights"]) == pytest.approx(1.0)
    h = run["history"]
    assert h["step"] == [1, 2, 3, 4, 5] and all(len(w) == 3 for w in h["weights"])
    assert h["weights"][0] != h["weights"][-1]  # the weights are learned
    png = plot_fusion({"models": {"ckpt": r, "run": run}}, tmp_path / "fusion.png")
    _assert_png(png, (int(110 * (4.0 * 3 + 0.5)), int(110 * 3.6)))


def test_cli_analyze_fusion_and_freq(pretrain_run: Path, tiny: Path, demo: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    main(["analyze", "fusion", str(pretrain_run), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "b0=" in out and "b3=" in out and (tmp_path / "fusion.png").is_file()
    assert json.loads((tmp_path / "fusion.json").read_text())["models"][str(pretrain_run)]["fusion_layers"] == [0, 1, 3]
    main(["analyze", "freq", str(tiny), str(pretrain_run / "model"), "--label", "random", "--label", "mff",
          "--data", str(demo), "--num-images", "8", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "random" in out and "mff" in out
    res = json.loads((tmp_path / "freq.json").read_text())
    assert set(res["models"]) == {"random", "mff"} and res["num_images"] == 8
    _assert_png(tmp_path / "freq.png", (int(110 * (4.2 * 2 + 1.0)), int(110 * 3.8)))


def test_cli_fusion_of_a_missing_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "fusion", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "check the path" in err[0]


def test_frequency_axis_stops_below_nyquist_on_even_grids() -> None:
    """fftshift puts the Nyquist bin at index 0, off the DC-to-edge diagonal: the curve ends at (h - 2) / h."""
    assert normalized_frequencies(8)[-1] == 0.75 and len(normalized_frequencies(8)) == 4
    assert normalized_frequencies(14)[-1] == pytest.approx(12 / 14)
    assert normalized_frequencies(7)[-1] == pytest.approx(6 / 7)  # odd grid: no Nyquist bin at all
    assert relative_log_amplitude(torch.randn(2, 3, 8, 8)).shape == (4,)


def test_cli_analyze_freq_and_filter_bad_inputs_are_one_line(demo: Path, tiny: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    only_val = tmp_path / "only_val"
    (only_val / "val" / "a").mkdir(parents=True)
    out = ["--out-dir", str(tmp_path / "out")]
    assert "no val/ folder" in cli_error(["analyze", "freq", str(tiny), "--data", str(only_train), *out], capsys)
    assert "no train/ folder" in cli_error(["analyze", "filter", str(tiny), "--data", str(only_val), *out],
                                                 capsys)
    assert "does not exist" in cli_error(["analyze", "filter", str(tiny), "--data", str(tmp_path / "no"), *out],
                                               capsys)
    assert "one label per model" in cli_error(["analyze", "freq", str(tiny), "--label", "a", "--label", "b",
                                                     "--data", str(demo), *out], capsys)
    assert "--radii 'x,0.5'" in cli_error(["analyze", "filter", str(tiny), "--radii", "x,0.5", "--data",
                                                 str(demo), *out], capsys)
    assert "unknown model 'no_such_model_xyz'" in cli_error(["analyze", "freq", "no_such_model_xyz", "--data",
                                                                   str(demo), *out], capsys)
    if not torch.cuda.is_available():
        assert "use --device cpu" in cli_error(["analyze", "freq", str(tiny), "--device", "cuda", "--data",
                                                      str(demo), *out], capsys)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_analyze_marks_random_init_runs(demo: Path, tiny: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    main(["analyze", "freq", str(tiny), "--label", "net", "--random-init", "--num-images", "4", "--device", "cpu",
          "--data", str(demo), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "net (random init)" in out
    res = json.loads((tmp_path / "freq.json").read_text())
    assert res["random_init"] is True and res["device"] == "cpu"
    main(["analyze", "freq", str(tiny), "--label", "net", "--num-images", "4", "--data", str(demo), "--out-dir",
          str(tmp_path)])
    assert "random init" not in capsys.readouterr().out
    assert json.loads((tmp_path / "freq.json").read_text())["random_init"] is False
