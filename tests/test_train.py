"""Pretraining engine on a tiny model and the tiny demo dataset: loss goes down, every artefact is real and loads,
resume is exact, a corrupt checkpoint falls back, NaN stops cleanly, unreadable images are counted."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_same_state,
    checkpoint_steps,
    final_model_state,
    run_interrupted,
    subprocess_recipe,
    tiny_recipe,
    train_cmd,
    train_env,
)
from PIL import Image

from mffzoo.archs import describe_arch
from mffzoo.cli.main import main
from mffzoo.errors import CheckpointError, DataError
from mffzoo.train import PretrainTask, TrainingDiverged, train
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.train.data import GlobalBatchSampler
from mffzoo.train.metrics import read_metrics
from mffzoo.train.recipe import load_recipe
from mffzoo.zoo import atomic_torch_save, convert_checkpoint, load_checkpoint_file
from mffzoo.zoo.home import read_folder_meta, recorded_fusion_layers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def finished(data_root: Path, zoo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("MFFZOO_HOME", str(zoo_home))
    try:
        yield train(tiny_recipe(data_root), output_dir=tmp_path_factory.mktemp("runs") / "tiny")
    finally:
        mp.undo()


# --------------------------------------------------------------------------------------------- one run, checked
def test_training_reduces_loss(finished: Any) -> None:
    assert finished.completed and finished.stop_reason == "finished"
    assert (finished.epoch, finished.global_step, finished.total_steps) == (3, 12, 12)
    losses = [r["loss"] for r in read_metrics(finished.run_dir)]
    assert len(losses) == 6
    assert losses[-1] < 0.9 * losses[0], losses
    rec = read_metrics(finished.run_dir)[-1]
    assert len(rec["fusion_weights"]) == 3 and abs(sum(rec["fusion_weights"]) - 1) < 1e-4
    assert rec["img_s"] > 0 and rec["mem_mb"] > 0 and rec["lr"] > 0


def test_optimizer_is_fused_adamw_with_no_decay_groups() -> None:
    from mffzoo.models import create_pretrain_model
    from mffzoo.train.optim import build_optimizer
    from mffzoo.train.recipe import OptimConfig

    model = create_pretrain_model("mff_vit_small", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                  fusion_layers=[0, 1], decoder_dim=32, decoder_depth=1, decoder_heads=4)
    opt = build_optimizer(model, OptimConfig(), 4096)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert opt.defaults["lr"] == pytest.approx(1.5e-4 * 4096 / 256) and opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(decay) == {0.0, 0.05}
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.norm1.weight", "decoder_embed.bias",
            "fusion.proj.0.bias"} <= decay[0.0]
    # as mmpretrain's paramwise_cfg (no decay only for ln/bias/pos_embed/mask_token/cls_token): the fusion
    # logits are decayed
    assert {"encoder.blocks.0.attn.qkv.weight", "fusion.proj.0.weight", "fusion.weights",
            "decoder_pred.weight"} <= decay[0.05]
    assert not any("pos_embed" in n for group in decay.values() for n in group)  # fixed sin-cos, not trained
    sgd = build_optimizer(model, OptimConfig(opt="sgd"), 256)
    assert "fused" not in sgd.defaults or not sgd.defaults["fused"]


def test_bf16_run_on_cpu_logs_its_precision_and_attention(data_root: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from mffzoo.train.numerics import resolve_precision

    amp, _ = resolve_precision("bf16", torch.device("cpu"))
    with caplog.at_level("INFO", logger="mffzoo.train"):
        res = train(tiny_recipe(data_root, train={"epochs": 1, "precision": "bf16"}, publish={"tag": None},
                                log={"vis_images": 0}), output_dir=tmp_path / "bf16")
    assert res.completed and res.final_loss is not None and math.isfinite(res.final_loss)
    # The engine stops on a non-finite loss, so a completed run's losses are finite by construction; what it does
    # not check is the trained weights: under bf16 autocast they stay fp32 and finite, every one of them.
    state = final_model_state(res.run_dir)
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    assert floats and {v.dtype for v in floats.values()} == {torch.float32}, {v.dtype for v in floats.values()}
    assert not [k for k, v in floats.items() if not torch.isfinite(v).all()]
    # bf16 where the CPU has it natively: the attention kernel measured on this CPU; else fp32 and the rule
    want = ("fp32 on cpu, sdpa attention (auto: fused SDPA in fp32 on cpu)" if amp is None else
            "bf16 on cpu, ")
    header = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training "))
    assert want in header, header
    if amp is not None:
        assert re.search(r"(math|sdpa) attention \(auto: measured on this cpu under bf16", header), header
    # the logged kernel is the one the run used (and saved, for a resume to keep)
    saved = load_checkpoint_file(CheckpointManager(res.run_dir / "checkpoints").list()[0])["attention"]
    assert f"{saved['kernel']} attention ({saved['reason']})" in header, (saved, header)


def test_run_directory_holds_resolved_recipe_and_summary(finished: Any) -> None:
    r = load_recipe(finished.run_dir / "recipe.yaml")
    assert r.model.fusion_layers == [0, 1, 3] and r.model.depth == 4 and r.train.batch_size == 8
    summary = json.loads((finished.run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["global_step"] == 12 and summary["images_seen"] == 96


def test_checkpoints_are_safe_plain_data_and_convertible(finished: Any, tmp_path: Path) -> None:
    files = CheckpointManager(finished.run_dir / "checkpoints").list()
    assert [int(p.stem.split("-")[1]) for p in files] == [12, 10, 8, 6, 4, 2]
    ck = load_checkpoint_file(files[0])  # weights_only=True: no custom classes inside
    assert ck["arch"] == "mff_vit_small_patch16_224" and ck["model_args"]["num_heads"] == 4
    assert recorded_fusion_layers(ck) == [0, 1, 3]  # the fused-levels provenance, in its one written place
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (3, 0, 12)
    assert isinstance(ck["recipe"], dict) and ck["recipe"]["model"]["depth"] == 4
    assert any(k.startswith("fusion.proj.") for k in ck["model"]) and "decoder_pred.weight" in ck["model"]
    out = convert_checkpoint(files[0], tmp_path / "conv")
    assert recorded_fusion_layers(read_folder_meta(out)) == [0, 1, 3]  # convert carries it into mffzoo.json
    import timm

    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert_same_state({f"encoder.{k}": v for k, v in m.state_dict().items()},
                      {k: v for k, v in ck["model"].items() if k.startswith("encoder.")})


def test_figures_are_valid_pngs(finished: Any) -> None:
    pngs = sorted((finished.run_dir / "vis").glob("reconstruction_epoch*.png"))
    assert [p.name for p in pngs] == [f"reconstruction_epoch000{i}.png" for i in (1, 2, 3)]
    for p in [*pngs, finished.run_dir / "fusion_weights.png"]:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100  # not a blank canvas
    assert finished.extra["fusion_plot"] == finished.run_dir / "fusion_weights.png"


def test_tensorboard_events_when_installed(finished: Any) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert "train/fusion_weights/2" in events.Tags()["scalars"]


def test_published_to_zoo_and_loads_with_timm(finished: Any, zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    monkeypatch.setenv("MFFZOO_HOME", str(zoo_home))
    entry = zoo_home / "mff_vit_small_patch16_224.tinytest"
    assert finished.extra["zoo_entry"] == entry
    meta = json.loads((entry / "mffzoo.json").read_text())
    assert meta["recipe"]["model"]["depth"] == 4 and meta["epochs"] == 3 and meta["final_loss"] > 0
    assert "git_commit" in meta and meta["mffzoo_version"] and meta["data"]["num_images"] == 32
    m = timm.create_model("mff_vit_small.tinytest", pretrained=True)
    assert m.patch_embed.img_size == (32, 32) and len(m.blocks) == 4
    trained = {k[len("encoder."):]: v for k, v in final_model_state(finished.run_dir).items()
               if k.startswith("encoder.")}
    assert_same_state(m.state_dict(), trained)


def test_push_lays_out_a_timm_hub_repo(finished: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    out = tmp_path / "hub"
    main(["push", str(finished.run_dir), "--repo", "me/mff-tiny", "--local-dir", str(out)])
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "recipe.yaml", "reconstruction.png",
            "fusion_weights.png"} <= names
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and "hf-hub:me/mff-tiny" in card and "final loss" in card
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_small_patch16_224"
    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    ref = timm.create_model(f"local-dir:{finished.run_dir / 'model'}", pretrained=True)
    assert_same_state(m.state_dict(), ref.state_dict())
    with pytest.raises(SystemExit) as info:
        main(["push", str(finished.run_dir), "--repo", "not a repo", "--local-dir", str(tmp_path / "x")])
    assert info.value.code == 2

    # The same repo as a download in the Hugging Face cache (the layout hf_hub_download writes: blobs, a
    # snapshot of links, refs/main): timm loads it offline by its hub name and `mffzoo zoo` lists it.
    cache = tmp_path / "hf-cache"
    repo = cache / "models--me--mff-tiny"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in out.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("../../blobs") / blob.name)
    monkeypatch_env = pytest.MonkeyPatch()
    monkeypatch_env.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch_env.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        monkeypatch_env.setattr(hc, "HF_HUB_CACHE", str(cache))
        monkeypatch_env.setattr(hc, "HF_HUB_OFFLINE", True)
        hub = timm.create_model("hf-hub:me/mff-tiny", pretrained=True)
        assert_same_state(hub.state_dict(), ref.state_dict())
        main(["zoo"])
        listing = capsys.readouterr().out
        row = next(ln for ln in listing.splitlines() if ln.startswith("hf-hub:me/mff-tiny"))
        assert row.split()[1:4] == ["hub", "yes", "final"], row
    finally:
        monkeypatch_env.undo()


# --------------------------------------------------------------------------------------------- resume
def test_corrupt_newest_checkpoint_falls_back_and_resume_is_exact(
    finished: Any, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(finished.run_dir, run)
    newest = CheckpointManager(run / "checkpoints").list()[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    with caplog.at_level("WARNING", logger="mffzoo.train"):
        res = train(tiny_recipe(data_root, publish={"tag": None}), output_dir=run)
    assert "corrupt or truncated" in caplog.text and "falling back" in caplog.text
    assert res.completed and res.global_step == 12
    # trained steps 11-12 again from checkpoint 10: bit-identical to the uninterrupted run
    assert_same_state(final_model_state(run), final_model_state(finished.run_dir))


def test_checkpoint_of_an_older_layout_is_refused_in_one_line(finished: Any, data_root: Path, tmp_path: Path) -> None:
    """A checkpoint from before the fusion logits became (K, 1, 1, 1): a clear refusal, the run dir untouched."""
    from mffzoo.zoo import atomic_torch_save

    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = load_checkpoint_file(CheckpointManager(finished.run_dir / "checkpoints").list()[1])  # step 10
    ckpt["model"]["fusion.weights"] = ckpt["model"]["fusion.weights"].reshape(-1)
    path = run / "checkpoints" / "checkpoint-00000010.pth"
    atomic_torch_save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"does not fit this model \(fusion.weights \(3,\) there, "
                                              r"\(3, 1, 1, 1\) now\)"):
        train(tiny_recipe(data_root, publish={"tag": None}), output_dir=run)
    assert path.read_bytes() == before and len(list((run / "checkpoints").iterdir())) == 1


def test_sampler_resumes_mid_epoch_and_splits_global_batches() -> None:
    full = GlobalBatchSampler(32, 8, 4, seed=3)
    full.set_epoch(2)
    items = list(full)
    part = GlobalBatchSampler(32, 8, 4, seed=3)
    part.set_epoch(2, start_step=1)
    assert list(part) == items[8:]
    ranks = [GlobalBatchSampler(32, 8, 4, world_size=2, rank=r, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    for step in range(4):  # each optimizer step sees the same 8 samples on 1 or 2 processes
        assert sorted(r0[4 * step:4 * step + 4] + r1[4 * step:4 * step + 4]) == sorted(items[8 * step:8 * step + 8])


# --------------------------------------------------------------------------------------------- failures
class NaNAfter(PretrainTask):
    """Real training whose loss turns NaN from optimizer step ``bad_step`` on (micro-batches are counted)."""

    def __init__(self, recipe: Any, bad_step: int, accum: int) -> None:
        super().__init__(recipe)
        self.calls, self.first_bad_call = 0, (bad_step - 1) * accum

    def step(self, model: Any, batch: Any) -> Any:
        loss, metrics = super().step(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.first_bad_call else loss), metrics


def test_nan_loss_stops_naming_the_step(data_root: Path, tmp_path: Path) -> None:
    r = load_recipe(tiny_recipe(data_root, log={"every_steps": 3, "vis_images": 0}, checkpoint={"every_steps": 2}))
    with pytest.raises(TrainingDiverged) as info:
        train(r, output_dir=tmp_path / "run", task=NaNAfter(r, bad_step=5, accum=2))
    msg = str(info.value)
    assert "\n" not in msg and "loss is nan at step 5 (epoch 2)" in msg and "checkpoint-00000004.pth" in msg
    assert info.value.exit_code == 1
    ckpts = CheckpointManager(tmp_path / "run" / "checkpoints").list()
    assert [p.name for p in ckpts] == ["checkpoint-00000004.pth", "checkpoint-00000002.pth"]
    state = load_checkpoint_file(ckpts[0])["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "run" / "model").exists()


def test_unreadable_images_are_skipped_counted_or_fatal(data_root: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    victim = sorted((root / "train").rglob("*.png"))[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    recipe = tiny_recipe(root, train={"epochs": 1}, data={"max_bad_fraction": 0.05}, publish={"tag": None},
                         log={"vis_images": 0})
    with caplog.at_level("WARNING", logger="mffzoo.train"):
        res = train(recipe, output_dir=tmp_path / "ok")
    assert res.completed and victim.name in caplog.text
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["bad_images"] == 1
    recipe["data"]["max_bad_fraction"] = 0.0
    with pytest.raises(DataError) as info:
        train(recipe, output_dir=tmp_path / "strict")
    assert "\n" not in str(info.value) and victim.name in str(info.value) and "max_bad_fraction" in str(info.value)


def test_empty_or_missing_data_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    for root, match in ((tmp_path / "empty", "cannot read dataset"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(DataError, match=match):
            train(tiny_recipe(root), output_dir=tmp_path / "run")
    import importlib.util

    if importlib.util.find_spec("datasets") is None:  # a Hugging Face dataset without its package: say so
        with pytest.raises(DataError, match="pip install datasets"):
            train(tiny_recipe(tmp_path / "empty", data={"dataset": "hfds/x"}), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_published_weights_say_what_model_they_are(finished: Any, zoo_home: Path, tmp_path: Path) -> None:
    """The tiny run is built through the ViT-S entrypoint but is no ViT-S/16: its provenance and model card give
    the model's own numbers, from its model args (so does the 64-px demo recipe's model)."""
    label = "ViT (dim 64, depth 4, 4 heads, patch 8, 32 px; shrunk from ViT-S/16)"
    for folder in (finished.run_dir / "model", zoo_home / "mff_vit_small_patch16_224.tinytest"):
        assert read_folder_meta(folder)["model"] == label
    main(["push", str(finished.run_dir), "--repo", "me/mff-tiny", "--local-dir", str(tmp_path / "hub")])
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"| architecture | {label}: mff_vit_small_patch16_224 (timm: vit_small_patch16_224, " in card
    assert "ViT-S/16" not in card.replace(label, "")
    assert "| final loss (last-epoch mean; masked-patch MSE, norm-pix) |" in card
    demo = load_recipe(REPO / "recipes" / "demo.yaml").model
    assert describe_arch(demo.arch, demo.encoder_kwargs()) == (
        "ViT (dim 192, depth 6, 3 heads, patch 8, 64 px; shrunk from ViT-S/16)")
    assert describe_arch("mff_vit_small", {"img_size": 224}) == "ViT-S/16"
    assert describe_arch("mff_vit_base", {"img_size": 384}) == "ViT-B/16 at 384 px"


# --------------------------------------------------------------------------------------------- final loss
def _last_epoch_mean(run: Path, steps_per_epoch: int, last_step: int) -> float:
    """The last epoch's mean step loss, from metrics.jsonl's window means weighted by their steps."""
    recs = [r for r in read_metrics(run) if last_step - steps_per_epoch < r["step"] <= last_step]
    prev, total = last_step - steps_per_epoch, 0.0
    for r in recs:
        total += r["loss"] * (r["step"] - prev)
        prev = r["step"]
    assert prev == last_step
    return total / steps_per_epoch


def test_final_loss_is_the_last_epochs_mean_everywhere_it_is_shown(finished: Any, zoo_home: Path) -> None:
    """Not the last log window's 2 steps: all 4 optimizer steps of epoch 3, in the result, summary.json, the epoch
    record and the published provenance, each saying what it is."""
    want = _last_epoch_mean(finished.run_dir, 4, 12)
    window = read_metrics(finished.run_dir)[-1]["loss"]
    assert finished.final_loss == pytest.approx(want, rel=1e-6) and abs(want - window) > 1e-4
    summary = json.loads((finished.run_dir / "summary.json").read_text())
    assert summary["final_loss"] == finished.final_loss and summary["final_loss_kind"] == "last-epoch mean"
    assert read_metrics(finished.run_dir, "epoch")[-1]["loss"] == finished.final_loss
    meta = json.loads((zoo_home / "mff_vit_small_patch16_224.tinytest" / "mffzoo.json").read_text())
    assert meta["final_loss"] == finished.final_loss and meta["final_loss_kind"] == "last-epoch mean"


@pytest.mark.parametrize("checkpoint", ["this mffzoo", "older mffzoo"])
def test_final_loss_of_a_run_resumed_mid_last_epoch_covers_the_whole_epoch(
        finished: Any, data_root: Path, tmp_path: Path, checkpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """Resumed after step 10 of 12 (2 steps into epoch 3): the epoch's first 2 steps come from the checkpoint's
    running sum, or for a checkpoint without it (older mffzoo) from metrics.jsonl."""
    run = tmp_path / "resumed"
    shutil.copytree(finished.run_dir, run)
    ckpts = CheckpointManager(run / "checkpoints")
    ckpts.list()[0].unlink()  # step 12: as if killed after step 11
    state, path = ckpts.load_latest()
    assert path.name == "checkpoint-00000010.pth" and state["metrics"]["epoch_loss_steps"] == 2
    if checkpoint == "older mffzoo":
        state["metrics"] = {"loss": state["metrics"]["loss"]}
        atomic_torch_save(state, path, checksum=True)
    with caplog.at_level("INFO", logger="mffzoo.train"):
        res = train(tiny_recipe(data_root, publish={"tag": None}), output_dir=run)
    assert f"resuming from {path} in epoch 3/3 after step 2/4 of it (global step 10/12)" in caplog.text
    assert res.completed and res.final_loss == pytest.approx(finished.final_loss, rel=1e-6)
    assert res.final_loss == pytest.approx(_last_epoch_mean(run, 4, 12), rel=1e-6)  # not only steps 11-12


# --------------------------------------------------------------------------------------------- subprocess runs
# Interruptions are deterministic: the engine's test hook MFFZOO_TEST_SIGNAL_AT_STEP (helpers.train_env) makes the
# run signal its own process group right after a given optimizer step (helpers.run_interrupted).
def test_piped_output_shows_a_plain_line_per_log_window(data_root: Path, tmp_path: Path) -> None:
    """`mffzoo train ... 2>&1 | cat`, a batch job's log: no bar (no TTY), so a line per log window, 1-based epochs,
    no carriage returns; the epoch's own line closes each epoch (its last window is in it)."""
    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", train={"epochs": 2},
                                log={"every_steps": 1, "progress": "auto"})
    proc = subprocess.run(train_cmd(recipe, tmp_path / "run"), env=train_env(tmp_path / "zoo"),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "\r" not in proc.stdout
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    want = [("1/2", 1, ""), ("1/2", 2, ""), ("1/2", 3, ""), ("1/2", 4, " (epoch mean)"),
            ("2/2", 5, ""), ("2/2", 6, ""), ("2/2", 7, ""), ("2/2", 8, " (epoch mean)")]
    assert len(progress) == len(want), proc.stdout
    for line, (epoch, step, mean) in zip(progress, want):
        assert re.match(rf"epoch {epoch}  step {step}/8  loss \d\.\d{{4}}{re.escape(mean)}  lr \S+  \d+ img/s  "
                        r"elapsed \S+  eta \S+$", line), line
    assert "final loss (last-epoch mean) " in proc.stdout


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(finished: Any, data_root: Path, tmp_path: Path) -> None:
    # a checkpoint every 3 steps; SIGKILL right after step 7 (mid epoch 2): the resume starts from step 6
    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", checkpoint={"every_steps": 3, "keep_last": 3})
    run = tmp_path / "killed"
    killed = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo", "7:KILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint_steps(run) == [6, 4, 3] and not (run / "model").exists()

    res = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-00000006.pth'}" in res.stderr
    assert_same_state(final_model_state(run), final_model_state(finished.run_dir))
    ref_opt = load_checkpoint_file(CheckpointManager(finished.run_dir / "checkpoints").list()[0])["optimizer"]
    got_opt = load_checkpoint_file(CheckpointManager(run / "checkpoints").list()[0])["optimizer"]
    for k, v in ref_opt["state"].items():
        assert torch.equal(v["exp_avg_sq"], got_opt["state"][k]["exp_avg_sq"]), k
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # history has no repeated steps after the resume


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_resumes_exactly(
    finished: Any, data_root: Path, tmp_path: Path
) -> None:
    """SIGTERM reaches the loader worker too (as from a scheduler or `timeout`): the worker ignores it, the main
    process finishes the step, saves and exits 143; rerunning (with workers again) ends bit-identical."""
    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", data={"num_workers": 1},
                                checkpoint={"every_steps": 100})
    run = tmp_path / "run"
    res = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo", "6:TERM"))
    assert res.returncode == 143, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "killed by signal" not in res.stderr
    assert "SIGTERM received: checkpoint" in res.stderr and "saved at step 6" in res.stderr
    assert "preempted by SIGTERM at step 6/12" in res.stdout and "rerun the same command to resume" in res.stdout
    assert checkpoint_steps(run) == [6, 4]  # the stop checkpoint (mid-epoch), after the epoch-1 one
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "sigterm" and not summary["completed"]

    res = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "checkpoint-00000006.pth" in res.stderr
    assert_same_state(final_model_state(run), final_model_state(finished.run_dir))


@pytest.mark.slow
def test_sigint_at_an_epochs_last_step_saves_at_the_epoch_end_and_exits_130(data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground group: the loader worker ignores it; a request at the last step of an
    epoch is saved as that epoch's end (epoch record written, next run starts at the next epoch)."""
    recipe = subprocess_recipe(data_root, tmp_path / "tiny.yaml", data={"num_workers": 1},
                                checkpoint={"every_steps": 100})
    run = tmp_path / "run"
    res = run_interrupted(train_cmd(recipe, run), train_env(tmp_path / "zoo", "4:INT"))
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "saved at the end of epoch 1" in res.stderr
    assert "stopped by SIGINT at step 4/12" in res.stdout and "preempted" not in res.stdout
    state = load_checkpoint_file(CheckpointManager(run / "checkpoints").list()[0])
    assert checkpoint_steps(run) == [4] and (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert [r["epoch"] for r in read_metrics(run, "epoch")] == [1]


# --------------------------------------------------------------------------------------------- more promises
def test_resume_refuses_a_run_directory_of_another_recipe(finished: Any, data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(finished.run_dir, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(CheckpointError) as info:
        train(tiny_recipe(data_root, optim={"lr": 1e-3}, publish={"tag": None}), output_dir=run)
    msg = str(info.value)
    assert "\n" not in msg and "different recipe (optim.lr: 0.002 there, 0.001 now)" in msg
    assert "--set optim.lr=0.002" in msg
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_fp16_grad_scaler_training_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """fp16 autocast + GradScaler (on the CPU, where torch supports both): the loss scale is part of the
    checkpoint, and a resume from the middle ends with the uninterrupted run's weights and scale."""
    recipe = tiny_recipe(data_root, train={"epochs": 2, "precision": "fp16"}, publish={"tag": None},
                         log={"vis_images": 0})
    ref = train(recipe, output_dir=tmp_path / "ref")
    assert ref.completed and ref.final_loss is not None and math.isfinite(ref.final_loss)
    last = load_checkpoint_file(CheckpointManager(tmp_path / "ref" / "checkpoints").list()[0])
    assert last["scaler"]["scale"] > 0 and last["scaler"]["_growth_tracker"] >= 0  # a live scaler was saved
    run = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", run)
    for p in CheckpointManager(run / "checkpoints").list()[:2]:  # as if killed after step 4
        p.unlink()
    (run / "model").rename(tmp_path / "old-model")
    res = train(recipe, output_dir=run)
    assert res.completed and res.global_step == 8
    again = load_checkpoint_file(CheckpointManager(run / "checkpoints").list()[0])
    assert_same_state(again["model"], last["model"])
    assert again["scaler"] == last["scaler"]


class _BigFirstWindow(PretrainTask):
    """Pretraining that holds 256 MiB extra during the first log window only."""

    calls = 0

    def step(self, model: Any, batch: Any) -> Any:
        type(self).calls += 1
        if type(self).calls <= 4:  # 2 steps x 2 micro-batches = the first window
            big = torch.ones(64 * 2**20)
            del big
        return super().step(model, batch)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux procfs")
def test_mem_mb_is_the_peak_of_each_log_window(data_root: Path, tmp_path: Path) -> None:
    r = load_recipe(tiny_recipe(data_root, train={"epochs": 1}, publish={"tag": None}, log={"vis_images": 0}))
    train(r, output_dir=tmp_path / "run", task=_BigFirstWindow(r))
    first, second = (rec["mem_mb"] for rec in read_metrics(tmp_path / "run")[:2])
    assert first > second + 200, (first, second)  # the window after the spike does not repeat its peak


def test_global_numeric_flags_are_restored(data_root: Path, tmp_path: Path) -> None:
    """Defect: resolve_precision switched TF32 on for the whole process (the benchmark's fp32 peer then ran in
    TF32). Now TF32 and train.deterministic hold only while a run (or a benchmark step) is active."""
    from mffzoo.train.numerics import Tf32, numerics, resolve_precision
    from mffzoo.train.recipe import TrainConfig

    cuda = torch.device("cuda")
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    assert resolve_precision("fp16", cuda) == (torch.float16, True)  # no CUDA call needed for fp16
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags[:2]
    tf32 = Tf32.for_run(cuda, torch.float16)
    for _ in range(2):  # reusable, as the benchmark enters it every step
        with tf32:
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == flags
    with Tf32.for_run(torch.device("cpu"), torch.bfloat16), Tf32.for_run(cuda, None):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags[:2]
    with numerics(TrainConfig(precision="fp16", deterministic=True), cuda):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.allow_tf32 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.allow_tf32 == flags[0]
    with numerics(TrainConfig(precision="fp32"), cuda):  # a fp32 run stays true fp32
        assert torch.backends.cuda.matmul.allow_tf32 == flags[0] and not torch.are_deterministic_algorithms_enabled()
    # a real run with the switch on trains, and leaves the process as it found it
    res = train(tiny_recipe(data_root, train={"epochs": 1, "deterministic": True}, publish={"tag": None},
                            log={"vis_images": 0}), output_dir=tmp_path / "det")
    assert res.completed and not torch.are_deterministic_algorithms_enabled()


def test_finetune_refuses_unlabelled_data_when_it_is_opened(data_root: Path) -> None:
    """Labels are checked where the data is read (once, on the CPU), not per step on the device."""
    from mffzoo.eval.finetune import FinetuneTask, load_finetune_recipe
    from mffzoo.train.data import SampleDataset

    recipe = load_finetune_recipe(REPO / "recipes" / "finetune_demo.yaml",
                                  [f"data.root={data_root}", "model.random_init=true"])
    task = FinetuneTask(recipe)

    class Unlabelled:  # a reader without targets (e.g. a Hugging Face dataset without a label column)
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[Image.Image, None]:
            return Image.new("RGB", (32, 32)), None

    with pytest.raises(DataError, match="no labels"):
        task.on_dataset(SampleDataset(Unlabelled(), None, "unlabelled"))
