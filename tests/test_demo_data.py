"""The procedural demo dataset must be reproducible, loadable and actually learnable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mffzoo.data import demo
from mffzoo.data.demo import DEMO_CLASSES, default_demo_root, write_demo_dataset

SMALL = dict(num_classes=12, train_per_class=24, val_per_class=8, image_size=32)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in (root / split).iterdir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / split / name).glob("*.png")):
            with Image.open(f) as im:
                xs.append(np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32).ravel() / 255)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_layout_counts_and_metadata(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir()) == ["demo_dataset.json", "train", "val"]
    meta = json.loads((small_root / "demo_dataset.json").read_text())
    assert meta["classes"] == list(DEMO_CLASSES)
    assert meta["seed"] == 0 and meta["image_size"] == 32 and meta["version"] == demo.DEMO_DATASET_VERSION
    assert meta["counts"] == {"train_per_class": 24, "val_per_class": 8, "train": 288, "val": 96}
    for split, n in (("train", 24), ("val", 8)):
        assert sorted(p.name for p in (small_root / split).iterdir()) == list(DEMO_CLASSES)
        for name in DEMO_CLASSES:
            assert sorted(p.name for p in (small_root / split / name).iterdir()) == [f"{i:05d}.png" for i in range(n)]
    assert not list(small_root.parent.glob("data.tmp-*"))


def test_images_are_rgb_pngs_of_the_requested_size(small_root: Path) -> None:
    files = sorted(small_root.rglob("*.png"))
    assert len(files) == 12 * (24 + 8)
    for f in files:
        with Image.open(f) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
            im.verify()


def test_class_names_need_both_shape_and_appearance() -> None:
    assert len(DEMO_CLASSES) == len(set(DEMO_CLASSES)) == 12 and list(DEMO_CLASSES) == sorted(DEMO_CLASSES)
    shapes = [name.rsplit("_", 1)[1] for name in DEMO_CLASSES]
    looks = [name.rsplit("_", 1)[0] for name in DEMO_CLASSES]
    # every shape and every colour/texture is shared by >= 2 classes: neither cue alone suffices
    assert all(shapes.count(s) >= 2 for s in shapes) and all(looks.count(a) >= 2 for a in looks)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path, small_root: Path) -> None:
    again = write_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    assert _files(again) == _files(small_root)
    first, other = _files(small_root), _files(write_demo_dataset(tmp_path / "other", seed=1, **SMALL))
    pngs = [k for k in other if k.endswith(".png")]
    assert all(other[k] != first[k] for k in pngs)


def test_per_image_seeding_makes_smaller_datasets_a_prefix(tmp_path: Path, small_root: Path) -> None:
    tiny = write_demo_dataset(tmp_path / "tiny", num_classes=3, train_per_class=2, val_per_class=1, image_size=32)
    big = _files(small_root)
    for rel, data in _files(tiny).items():
        if rel.endswith(".png"):
            assert data == big[rel], rel


def test_classes_are_distinguishable_by_nearest_class_mean(small_root: Path) -> None:
    x_train, y_train = _load(small_root, "train")
    x_val, y_val = _load(small_root, "val")
    means = np.stack([x_train[y_train == c].mean(0) for c in range(12)])
    pred = ((x_val[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == y_val).mean()
    assert accuracy > 3 / 12, f"nearest-class-mean accuracy {accuracy:.2f} is too close to chance (0.08)"


def test_images_have_low_and_high_frequency_content(small_root: Path) -> None:
    x = np.stack([np.asarray(Image.open(f), dtype=np.float32).mean(-1) / 255 for f in small_root.rglob("*.png")])
    power = (np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True))) ** 2).mean(0)
    f = np.fft.fftfreq(x.shape[-1])
    radius = np.hypot(f[:, None], f[None, :])
    total = power.sum()
    assert power[(radius > 0) & (radius < 1 / 8)].sum() / total > 0.3  # large-scale structure
    assert power[radius > 1 / 4].sum() / total > 0.03  # edges, texture, noise


def test_matching_dir_is_reused_without_regenerating(small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(demo, "_generate", boom)
    assert write_demo_dataset(small_root, seed=0, **SMALL) == small_root
    assert write_demo_dataset(small_root, seed=0, overwrite=True, **SMALL) == small_root


def test_mismatched_or_foreign_dir_raises_and_overwrite_replaces(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "d", seed=0, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    with pytest.raises(ValueError, match=r"different parameters: seed=0 \(wanted 1\).*--overwrite") as err:
        write_demo_dataset(root, seed=1, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    assert "\n" not in str(err.value)

    write_demo_dataset(root, seed=1, num_classes=2, train_per_class=2, val_per_class=1, image_size=16, overwrite=True)
    assert json.loads((root / "demo_dataset.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no .tmp-/.old- leftovers

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an mffzoo demo dataset.*another directory"):
        write_demo_dataset(foreign, train_per_class=1, val_per_class=1)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_incomplete_dataset_is_not_trusted(tmp_path: Path) -> None:
    kw = dict(num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    root = write_demo_dataset(tmp_path / "d", **kw)
    next((root / "train").rglob("*.png")).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        write_demo_dataset(root, **kw)
    write_demo_dataset(root, overwrite=True, **kw)
    assert len(list(root.rglob("*.png"))) == 2 * (2 + 1)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = demo._render_batch

    def flaky(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "_render_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path / "d", num_classes=4, train_per_class=2, val_per_class=1, image_size=16)
    assert list(tmp_path.iterdir()) == []


def test_empty_existing_dir_is_filled(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    root = write_demo_dataset(tmp_path / "d", num_classes=2, train_per_class=1, val_per_class=1, image_size=16)
    assert (root / "demo_dataset.json").is_file()


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        write_demo_dataset(tmp_path, num_classes=demo.MAX_DEMO_CLASSES + 1)
    with pytest.raises(ValueError, match="per_class"):
        write_demo_dataset(tmp_path, val_per_class=0)


def test_default_demo_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MFFZOO_DEMO_DATA", str(tmp_path / "explicit"))
    assert default_demo_root() == tmp_path / "explicit"
    monkeypatch.delenv("MFFZOO_DEMO_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_root() == tmp_path / "xdg" / "mffzoo" / "demo-data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == tmp_path / "home" / ".cache" / "mffzoo" / "demo-data"


def test_loads_with_torchvision_image_folder(small_root: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    ds = datasets.ImageFolder(str(small_root / "train"))
    assert ds.classes == list(DEMO_CLASSES) and len(ds) == 12 * 24
    img, label = ds[len(ds) - 1]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 11


def test_loads_with_timm_create_dataset(small_root: Path) -> None:
    timm_data = pytest.importorskip("timm.data")
    train = timm_data.create_dataset("", root=str(small_root), split="train")
    val = timm_data.create_dataset("", root=str(small_root), split="validation")  # timm maps it to val/
    direct = timm_data.create_dataset("", root=str(small_root / "train"))
    assert (len(train), len(val), len(direct)) == (12 * 24, 12 * 8, 12 * 24)
    img, label = val[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 0
