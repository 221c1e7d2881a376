"""``mffzoo eval seg``: the procedural segmentation demo, the linear segmentation probe, its results and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from helpers import cli_error
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from mffzoo.cli.main import main
from mffzoo.cli.options import LEVELS
from mffzoo.data.seg_demo import read_seg_demo_meta, write_seg_demo_dataset
from mffzoo.errors import ConfigError
from mffzoo.eval.seg import (
    SegProbeConfig,
    check_levels,
    default_levels,
    evaluate_seg_head,
    seg_probe,
)
from mffzoo.eval.seg_data import IGNORE_INDEX, SegDataset, check_seg_folder

pytestmark = pytest.mark.usefixtures("drop_stale_cli_handler")

SPLITS = ("training", "validation")


@pytest.fixture(scope="module")
def seg_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 object classes + background (9 classes), 64 training / 16 validation images of 48..96 px."""
    return write_seg_demo_dataset(tmp_path_factory.mktemp("segdemo") / "seg", train=64, val=16)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ demo data
def test_seg_demo_is_deterministic_a_prefix_and_in_the_ade_layout(tmp_path: Path) -> None:
    a = write_seg_demo_dataset(tmp_path / "a", train=6, val=3)
    b = write_seg_demo_dataset(tmp_path / "b", train=6, val=3)
    assert _files(a) == _files(b)
    c = write_seg_demo_dataset(tmp_path / "c", train=8, val=3, seed=0)
    assert all(_files(c)[k] == v for k, v in _files(a).items() if k.startswith(("images", "annotations")))
    assert _files(write_seg_demo_dataset(tmp_path / "d", train=6, val=3, seed=1)) != _files(a)
    assert write_seg_demo_dataset(a, train=6, val=3) == a  # a matching copy is reused
    with pytest.raises(ValueError, match="other parameters"):
        write_seg_demo_dataset(a, train=7, val=3)
    pairs = check_seg_folder(a)
    assert [len(pairs[s]) for s in SPLITS] == [6, 3]
    sizes = {Image.open(p.image).size for s in SPLITS for p in pairs[s]}
    assert len(sizes) >= 4 and all(48 <= w <= 96 and 48 <= h <= 96 for w, h in sizes)  # varied sizes
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically: no temporary tree left


def _local(o: dict, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a shape's normalised frame (independent of the generator's code)."""
    ca, sa = math.cos(o["angle"]), math.sin(o["angle"])
    u = (x - o["cx"]) * ca + (y - o["cy"]) * sa
    v = (y - o["cy"]) * ca - (x - o["cx"]) * sa
    return u / (o["radius"] * o["stretch"]), v * o["stretch"] / o["radius"]


_CONVEX = {0: lambda u, v: u * u + v * v <= 1.0, 1: lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8}


def _reach(o: dict) -> float:
    """Pixels from its centre beyond which a shape paints nothing (every shape fits in 1.2 normalised units)."""
    return 1.2 * o["radius"] * max(o["stretch"], 1 / o["stretch"]) + 1.0


def test_seg_demo_masks_are_exact(seg_demo: Path) -> None:
    """A pixel wholly inside a circle/square (all four corners) has its label unless a later shape may cover it;
    a pixel out of every shape's reach is background; a partly covered pixel (ignore, 0) is rare."""
    objects = json.loads((seg_demo / "objects.json").read_text())
    meta = read_seg_demo_meta(seg_demo)
    assert meta["num_classes"] == 9 and meta["classes"][0] == "background"
    checked_in = checked_out = 0
    for split in SPLITS:
        for pair in check_seg_folder(seg_demo)[split]:
            label = np.asarray(Image.open(pair.mask))
            assert label.dtype == np.uint8 and label.shape == np.asarray(Image.open(pair.image)).shape[:2]
            assert set(np.unique(label)) <= set(range(10)) and (label == 0).mean() < 0.1
            objs = objects[f"{split}/{pair.mask.stem}"]
            h, w = label.shape
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
            near = [np.hypot(yy + 0.5 - o["cy"], xx + 0.5 - o["cx"]) <= _reach(o) for o in objs]
            for j, o in enumerate(objs):
                if o["shape"] not in _CONVEX:
                    continue
                inside = np.ones((h, w), bool)
                for dy in (0, 1):
                    for dx in (0, 1):
                        inside &= _CONVEX[o["shape"]](*_local(o, yy + dy, xx + dx))
                for later in near[j + 1:]:
                    inside &= ~later
                assert (label[inside] == o["label"]).all()
                checked_in += int(inside.sum())
            far = ~np.any(near, axis=0)
            assert (label[far] == 1).all()
            checked_out += int(far.sum())
    assert checked_in > 1000 and checked_out > 10000


# ------------------------------------------------------------------------------------------------ levels
def test_default_levels_and_their_checks() -> None:
    assert default_levels(12) == [3, 5, 7, 11] and default_levels(24) == [7, 11, 15, 23]
    assert default_levels(4) == [0, 1, 2, 3] and default_levels(6) == [1, 2, 3, 5]
    assert check_levels(None, 12) == [3, 5, 7, 11] and check_levels([0, 2], 4) == [0, 2]
    with pytest.raises(ConfigError, match="out of range"):
        check_levels([1, 4], 4)
    with pytest.raises(ConfigError, match="increasing"):
        check_levels([2, 1], 4)
    with pytest.raises(click.BadParameter, match="comma-separated"):
        LEVELS.convert("3;5", None, None)  # the CLI's --levels type


# ------------------------------------------------------------------------------------------------ the probe
class _Fixed(torch.nn.Module):
    """A "head" whose features are already its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x


def test_scores_skip_ignored_pixels_and_absent_classes() -> None:
    """Targets 0, 0, 1, ignore predicted 0, 1, 1, 3: IoU 1/2 for classes 0 and 1; class 2 is nowhere (left out
    of the mean, None), class 3 is predicted only on an ignored pixel (also nowhere); pixel accuracy 2/3."""
    pred = torch.tensor([0, 1, 1, 3])
    logits = torch.nn.functional.one_hot(pred, 4).T.float().reshape(1, 4, 1, 4)
    t = torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])
    r = evaluate_seg_head(_Fixed(), [(logits, t)], 4)
    assert r == {"miou": 50.0, "pixel_acc": 66.6667, "per_class_iou": [50.0, 50.0, None, None]}


def _majority_miou(root: Path, size: int, num_classes: int) -> float:
    """mIoU of predicting the most frequent validation class everywhere, on the probe's own crops."""
    ds = SegDataset(check_seg_folder(root)["validation"], size, (0.5,) * 3, (0.5,) * 3)
    t = torch.stack([ds[i][1] for i in range(len(ds))]) - 1
    majority = int(torch.bincount(t[t != IGNORE_INDEX].flatten()).argmax())
    m = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE_INDEX)
    m.update(torch.full_like(t, majority), t)
    return 100.0 * float(m.compute())


def test_probe_learns_on_the_demo_and_caches_features(seg_demo: Path, tiny: Path, tmp_path: Path) -> None:
    cfg = SegProbeConfig(epochs=40, lr=3e-3, eval_every=10)
    r = seg_probe(tiny, seg_demo, cfg, img_size=48, cache=str(tmp_path), device="cpu")
    res = r.results["linear"]
    baseline = _majority_miou(seg_demo, 48, 9)
    assert r.levels == [0, 1, 2, 3] and r.num_classes == 9 and r.img_size == 48 and r.features_cached
    assert r.feature_dim == 4 * 64 and r.num_train == 64 and r.num_val == 16
    assert res["miou"] > baseline + 10, (res["miou"], baseline)
    assert res["pixel_acc"] > 80 and len(res["per_class_iou"]) == 9 and res["best_miou"] >= res["miou"]
    assert r.history[-1]["loss"] < r.history[0]["loss"] and "miou" in r.history[9] and "miou" not in r.history[0]
    assert len(list(tmp_path.glob("seg-*.pt"))) == 2  # training + validation features
    again = seg_probe(tiny, seg_demo, cfg, img_size=48, cache=str(tmp_path), device="cpu")
    assert again.results == r.results and len(list(tmp_path.glob("seg-*.pt"))) == 2
    # features too large for max_cache_gb: the encoder runs every epoch, nothing is cached, and it still learns
    cfg = SegProbeConfig(epochs=20, lr=3e-3, eval_every=20, max_cache_gb=0)
    streamed = seg_probe(tiny, seg_demo, cfg, img_size=32, cache=str(tmp_path / "none"), device="cpu")
    assert not streamed.features_cached and not (tmp_path / "none").exists()
    assert streamed.results["linear"]["miou"] > _majority_miou(seg_demo, 32, 9) + 10


def test_cli_writes_results_json_and_the_zoo_entry(seg_demo: Path, tiny: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    entry = _copy(tiny, tmp_path / tiny.name)
    out = tmp_path / "seg.json"
    main(["eval", "seg", str(entry), "--data", str(seg_demo), "--epochs", "3", "--levels", "1,3", "--no-cache",
          "--device", "cpu", "-o", str(out), "--update-zoo"])
    printed = capsys.readouterr()
    assert "mIoU %" in printed.out and "blocks 1,3" in printed.out and "epoch 3/3" in printed.err
    r = json.loads(out.read_text())
    assert r["task"] == "seg" and r["levels"] == [1, 3] and r["config"]["levels"] == [1, 3]
    assert r["num_classes"] == 9 and r["classes"][0] == "background" and len(r["history"]) == 3
    assert set(r["results"]["linear"]) >= {"miou", "pixel_acc", "per_class_iou", "best_miou", "readout"}
    meta = json.loads((entry / "mffzoo.json").read_text())
    assert meta["eval"]["seg:seg"]["results"]["linear"]["miou"] == r["results"]["linear"]["miou"]


def test_cli_data_demo_is_generated_once_under_the_cache(tiny: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MFFZOO_SEG_DEMO_DATA", str(tmp_path / "segdemo"))
    out = tmp_path / "r.json"
    main(["eval", "seg", str(tiny), "--epochs", "1", "--no-cache", "--device", "cpu", "-o", str(out)])
    capsys.readouterr()
    assert read_seg_demo_meta(tmp_path / "segdemo")["counts"] == {"training": 240, "validation": 60}
    assert json.loads(out.read_text())["num_train"] == 240


# ------------------------------------------------------------------------------------------------ bad input
def _bad(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    msg = cli_error([*argv, "-o", str(out)], capsys)
    assert not out.exists()
    return msg


def test_bad_folders_are_one_line_errors(seg_demo: Path, tiny: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.json"
    run = ["eval", "seg", str(tiny), "--device", "cpu", "--data"]
    for sub in ("images", "annotations"):
        d = _copy(seg_demo, tmp_path / f"no-{sub}")
        shutil.rmtree(d / sub)
        assert f"no {sub}/ folder" in _bad([*run, str(d)], capsys, out)
    d = _copy(seg_demo, tmp_path / "no-mask")
    (d / "annotations" / "training" / "demo_train_00003.png").unlink()
    msg = _bad([*run, str(d)], capsys, out)
    assert "demo_train_00003.png' has no mask" in msg and "annotations/training/demo_train_00003.png" in msg
    d = _copy(seg_demo, tmp_path / "no-image")
    (d / "images" / "validation" / "demo_val_00002.png").unlink()
    assert "mask '" in (msg := _bad([*run, str(d)], capsys, out)) and "demo_val_00002" in msg and "has no image" in msg
    d = _copy(seg_demo, tmp_path / "size")
    mask = d / "annotations" / "validation" / "demo_val_00001.png"
    Image.open(mask).resize((20, 10), Image.NEAREST).save(mask)
    msg = _bad([*run, str(d)], capsys, out)
    assert "demo_val_00001.png' is 20x10 but its image" in msg and "must be the size of its image" in msg
    d = _copy(seg_demo, tmp_path / "rgb")
    mask = d / "annotations" / "training" / "demo_train_00000.png"
    Image.open(mask).convert("RGB").save(mask)
    assert "single-channel" in _bad([*run, str(d)], capsys, out)


def test_bad_labels_and_levels_are_one_line_errors(seg_demo: Path, tiny: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MFFZOO_FEATURE_CACHE", str(cache))
    out = tmp_path / "never.json"
    run = ["eval", "seg", str(tiny), "--device", "cpu", "--data", str(seg_demo)]
    msg = _bad([*run, "--num-classes", "3"], capsys, out)
    assert "has label" in msg and "but there are 3 classes" in msg and "annotations/" in msg
    assert not cache.exists()  # nothing cached either
    d = _copy(seg_demo, tmp_path / "label")
    mask = d / "annotations" / "validation" / "demo_val_00004.png"
    a = np.asarray(Image.open(mask)).copy()
    a[0, 0] = 200
    Image.fromarray(a).save(mask)
    msg = _bad(["eval", "seg", str(tiny), "--device", "cpu", "--data", str(d)], capsys, out)
    assert "demo_val_00004.png' has label 200 but there are 9 classes" in msg
    assert "out of range" in _bad([*run, "--levels", "0,4"], capsys, out)
    assert "increasing" in _bad([*run, "--levels", "3,1"], capsys, out)
    assert "comma-separated" in _bad([*run, "--levels", "a,b"], capsys, out)
    assert not cache.exists()
