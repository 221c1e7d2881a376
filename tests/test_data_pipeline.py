"""The fast decoding path (``data.fast_decode``) against the plain torchvision path it replaces.

Same draws (crop boxes, flips) for the same sample seed, per-image pixels within resampling noise, the same
pixel statistics over a few hundred seeded samples, and the dataset's guarantees (bad files skipped, results a
function of the sample seed). Images are generated JPEGs with position-dependent content, so a different crop
or flip shows up as a large pixel difference.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_error
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from mffzoo.errors import ConfigError
from mffzoo.train.data import (
    FastPretrainTransform,
    build_dataset,
    derive_seed,
    plain_pretrain_transform,
    pretrain_transform,
)
from mffzoo.train.recipe import DataConfig, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """Photo-like: gradients that differ per channel and position, a disc, noise (JPEG's worst case)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 150 + 50], -1)
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.1, 0.3) * min(w, h)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _plain(tf, data: bytes, seed: int) -> torch.Tensor:
    """What SampleDataset does with the plain path: full decode, transform under the sample's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0))
        return tf(Image.open(io.BytesIO(data)).convert("RGB"))


def _torchvision_draws(cfg: DataConfig, size: int, wh: tuple[int, int], seed: int) -> tuple:
    """The draws torchvision's own classes make under the sample seed (the reference for the fast path)."""
    dummy = Image.new("RGB", wh)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0))
        if cfg.augment == "mae":
            i, j, h, w = T.RandomResizedCrop.get_params(dummy, list(cfg.crop_scale), [3 / 4, 4 / 3])
            box = (j, i, j + w, i + h)
        else:
            resized = T.Resize(size)(dummy)
            padded = T.Pad(cfg.crop_padding, padding_mode="reflect")(resized) if cfg.crop_padding else resized
            i, j, _, _ = T.RandomCrop.get_params(padded, (size, size))
            box = (i, j, resized.size)
        flip = bool(torch.rand(1) < cfg.hflip)
    return box, flip


# Sizes: ImageNet-like, portrait, extreme aspect (RandomResizedCrop's central-crop fallback), small.
SIZES = [(500, 375), (375, 500), (640, 90), (97, 130), (224, 224)]


@pytest.mark.parametrize("augment", ["mff", "mae"])
def test_fast_path_draws_exactly_what_torchvision_draws(augment: str) -> None:
    cfg = DataConfig(augment=augment)
    fast = FastPretrainTransform(cfg, 64)
    for wh in SIZES:
        for seed in range(60):
            p = fast.params(wh, seed)
            box, flip = _torchvision_draws(cfg, 64, wh, seed)
            ours = p.box if augment == "mae" else (*p.crop, p.resized)
            assert (ours, p.flip) == (box, flip), (wh, seed)


@pytest.fixture
def one_thread():
    """One intra-op thread, as in a loader worker (and OpenMP threads on a shared 2-core box spin for nothing)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("augment,size", [("mff", 64), ("mff", 224), ("mae", 64), ("mae", 224)])
def test_fast_path_matches_plain_path_statistically(augment: str, size: int) -> None:
    cfg = DataConfig(augment=augment)
    fast, plain = FastPretrainTransform(cfg, size), plain_pretrain_transform(cfg, size)
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255
    images = [_jpeg(500, 375, k) for k in range(4)] + [_jpeg(333, 500, 10 + k) for k in range(2)]
    diffs, reduced, a_means, b_means, a_px, b_px = [], 0, [], [], [], []
    for n in range(200):
        data, seed = images[n % len(images)], 1000 + n
        im = Image.open(io.BytesIO(data))
        full_width = im.size[0]
        a = fast(im, seed)
        b = _plain(plain, data, seed)
        assert a.shape == b.shape == (3, size, size) and a.dtype == b.dtype == torch.float32
        d = float(((a - b).abs() * std).mean())  # in 0..255 pixel levels
        diffs.append(d)
        reduced += im.size[0] < full_width  # draft mode shrank it
        a_means.append(a.mean((1, 2)))
        b_means.append(b.mean((1, 2)))
        a_px.append(a[:, ::16, ::16].flatten())
        b_px.append(b[:, ::16, ::16].flatten())
        # A different crop or flip of these gradients differs by tens of levels; resampling by ~1.
        assert d < 2.0, (n, d)
    if size == 64:  # 500x375 at 64 px: draft mode decodes at 1/2 or 1/4 for (nearly) every sample
        assert reduced > 0.5 * len(diffs)
    else:  # at 224 px nothing can be reduced: the full-decode path, which matches up to rounding
        assert reduced == 0 and max(diffs) < 0.3
    a_m, b_m = torch.stack(a_means), torch.stack(b_means)
    assert torch.allclose(a_m.mean(0), b_m.mean(0), atol=0.01) and torch.allclose(a_m.std(0), b_m.std(0), rtol=0.02)
    ks = stats.ks_2samp(torch.cat(a_px).numpy(), torch.cat(b_px).numpy())
    assert ks.pvalue > 0.01, ks


def test_same_seed_same_sample_and_flip_is_a_mirror() -> None:
    cfg = DataConfig(augment="mae", hflip=0.5)
    fast = FastPretrainTransform(cfg, 64)
    data = _jpeg(500, 375, 3)
    x1, x2 = fast(Image.open(io.BytesIO(data)), 7), fast(Image.open(io.BytesIO(data)), 7)
    assert torch.equal(x1, x2)
    seeds = [s for s in range(40) if fast.params((500, 375), s).box == fast.params((500, 375), 7).box]
    assert seeds == [7]  # the box is a function of the seed, not shared
    never = FastPretrainTransform(DataConfig(augment="mae", hflip=0.0), 64)
    always = FastPretrainTransform(DataConfig(augment="mae", hflip=1.0), 64)
    assert torch.equal(always(Image.open(io.BytesIO(data)), 7), never(Image.open(io.BytesIO(data)), 7).flip(-1))


def _folder(root: Path, n: int = 6) -> Path:
    for k in range(n):
        d = root / "train" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k}.JPEG").write_bytes(_jpeg(300 + 10 * k, 200, k))
    return root


def test_dataset_fast_path_skips_bad_files_and_is_deterministic(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    victim = root / "train" / "c0" / "2.JPEG"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    cfg = DataConfig(root=str(root), augment="mae")
    assert cfg.fast_decode  # the default
    fast = build_dataset(cfg, pretrain_transform(cfg, 32))
    plain = build_dataset(cfg, pretrain_transform(DataConfig(augment="mae", fast_decode=False), 32))
    assert isinstance(fast.transform, FastPretrainTransform) and not isinstance(plain.transform, FastPretrainTransform)
    bad_index = [i for i in range(len(fast)) if fast.filename(i) == str(victim)][0]
    xs, target, seed, bad = fast[(bad_index, 5)]
    xp, target_p, _, bad_p = plain[(bad_index, 5)]
    assert len(bad) == len(bad_p) == 1 and victim.name in bad[0][0] and target == target_p
    assert float((xs - xp).abs().mean()) < 0.05
    items = [(i, 100 + i) for i in range(len(fast))]
    first = [fast[it][0] for it in items]
    assert all(torch.equal(a, fast[it][0]) for a, it in zip(first, items, strict=True))


def test_fast_decode_in_the_recipe_schema(capsys) -> None:
    assert load_recipe(RECIPES / "demo.yaml").data.fast_decode is True
    assert load_recipe(RECIPES / "vits.yaml", ["data.fast_decode=false"]).data.fast_decode is False
    with pytest.raises(ConfigError) as info:
        load_recipe(RECIPES / "vits.yaml", ["data.fast_decode=sometimes"])
    assert "data.fast_decode" in str(info.value) and "\n" not in str(info.value)
    err = cli_error(["train", str(RECIPES / "demo.yaml"), "--set", "data.fast_decode=3"], capsys)
    assert "data.fast_decode" in err


def test_bench_jpegs_are_deterministic_imagenet_sized(tmp_path: Path) -> None:
    from mffzoo.bench.data import bench_jpegs

    a, b = bench_jpegs(4, root=tmp_path / "a"), bench_jpegs(4, root=tmp_path / "b")
    files = sorted(a.glob("train/*/*.JPEG"))
    assert len(files) == 4 and bench_jpegs(4, root=tmp_path / "a") == a
    for f in files:
        with Image.open(f) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (500, 375), "RGB")
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
        assert 20_000 < f.stat().st_size < 250_000  # photo-like entropy, not a flat image


def test_bench_data_prints_ratio_against_plain_and_workers_needed(tmp_path: Path, capsys) -> None:
    from mffzoo.bench.data import bench_jpegs
    from mffzoo.cli.main import main

    root = bench_jpegs(8, root=tmp_path)
    out = tmp_path / "r.json"
    main(["bench", "data", str(RECIPES / "demo.yaml"), "--data", str(root), "--images", "8", "--rounds", "1",
          "--workers", "1", "--batch", "4", "--target-img-s", "1000", "--json", str(out)])
    text = capsys.readouterr().out
    assert "vs plain" in text and "1.00 (peer)" in text and "fast decode vs plain" in text
    assert "to feed 1000 img/s per training process" in text
    import json

    res = json.loads(out.read_text())
    assert res["num_images"] == 8 and len(res["ratio_in_process"]) == len(res["ratio_workers"]) == 1
    assert all(v > 0 for p in res["paths"].values() for v in p["in_process"] + p["workers"])
    err = cli_error(["bench", "data", str(RECIPES / "demo.yaml"), "--data", str(root), "--target-img-s", "-5"],
                    capsys)
    assert "--target-img-s" in err
