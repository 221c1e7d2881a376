"""What training and conversion publish, and the load hints they print: a run that stopped short of a registered
tag's schedule does not take that tag, every printed ``timm.create_model(...)`` / ``mffzoo convert`` hint works
as printed, and rerunning or republishing keeps what the user made (evaluations of the same weights, own files)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import TINY, cli_error, random_state_dict, tiny_recipe, write_yaml
from safetensors.torch import load_file

from mffzoo.archs import ZOO_TAGS, canonical_arch, is_local_cfg, registered_schedule
from mffzoo.cli.main import main
from mffzoo.data import write_demo_dataset
from mffzoo.errors import WeightsNotFoundError
from mffzoo.train import train
from mffzoo.train.recipe import load_recipe
from mffzoo.zoo.catalog import zoo_rows

REPO = Path(__file__).resolve().parents[1]
ARCH = "mff_vit_small_patch16_224"
HINT = re.compile(r"timm\.create_model\(([^()]*)\)")


def _hinted_models(text: str) -> list[torch.nn.Module]:
    """Run every ``timm.create_model(...)`` the text shows, exactly as printed (after ``import mffzoo``)."""
    import mffzoo  # noqa: F401  (the hints say: after `import mffzoo`)

    calls = HINT.findall(text)
    assert calls and len(calls) == text.count("create_model("), text
    return [eval(f"timm.create_model({args})", {"timm": timm}) for args in calls]  # noqa: S307  (our own output)


def test_registered_local_tags_match_the_recipes_that_produce_them():
    """The schedule a tag promises is its recipe's: the partial-run rule below compares against it."""
    checked = 0
    for arch, tags in ZOO_TAGS.items():
        for tag, cfg in tags.items():
            if not is_local_cfg(cfg):
                assert registered_schedule(arch, tag) is None
                continue
            recipe = next(n.split(": ", 1)[1] for n in cfg["notes"] if n.startswith("recipe: "))
            r = load_recipe(REPO / recipe)
            assert (canonical_arch(r.model.arch), r.publish.tag) == (arch, tag), recipe
            assert r.train.epochs == registered_schedule(arch, tag), recipe
            checked += 1
    assert checked == 19  # 3 sizes x (MFF, MAE) x (300, 800, 1600) + demo


def test_short_run_of_a_registered_tag_publishes_as_partial_and_its_hints_load(tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(zoo))
    data = write_demo_dataset(tmp_path / "data", num_classes=4, train_per_class=4, val_per_class=1, image_size=32)
    recipe = {  # vits.yaml's tag (300 epochs promised), one tiny epoch
        "name": "smoke", "model": dict(arch="mff_vit_small", fusion_layers=[0, 1, 3], decoder_dim=32, decoder_depth=1,
                                       decoder_heads=4, **TINY),
        "data": dict(root=str(data), num_workers=0),
        "train": dict(epochs=1, batch_size=8, batch_per_device=8, precision="fp32", cpu_threads=1),
        "optim": dict(lr=1e-3, warmup_epochs=0), "checkpoint": dict(every_steps=0),
        "log": dict(vis_every_epochs=0, vis_images=0, progress="off"), "publish": dict(tag="mff_in1k_300e"),
    }
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(recipe))
    main(["train", str(tmp_path / "smoke.yaml"), "--output", str(tmp_path / "run")])  # the CLI logs to stderr
    out, err = capsys.readouterr()
    assert sorted(p.name for p in zoo.iterdir()) == [f"{ARCH}.mff_in1k_300e-partial"]
    assert f"published as {ARCH}.mff_in1k_300e-partial, not mff_in1k_300e: this run trained 1 of the 300" in err
    with pytest.raises(WeightsNotFoundError, match="no local weights"):  # the real tag is not shadowed
        timm.create_model("mff_vit_small.mff_in1k_300e", pretrained=True)
    row = next(r for r in zoo_rows() if (r.arch, r.tag) == (ARCH, "mff_in1k_300e"))
    assert not row.present
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    models = _hinted_models(out)  # `weights: RUN/model (...)` and `zoo: ...-partial -> ... (...)`
    assert len(models) == 2
    for m in models:
        assert m.pretrained_cfg["tag"] == "mff_in1k_300e-partial"
        for k, v in m.state_dict().items():
            assert torch.equal(v, trained[k]), k


def test_convert_hints_load_the_weights(tmp_path, capsys):
    src = timm.create_model("mff_vit_small", num_classes=0, **TINY)
    src.load_state_dict(random_state_dict(src, 5))
    torch.save({"model": src.state_dict(), "model_args": TINY}, tmp_path / "ck.pth")
    main(["convert", str(tmp_path / "ck.pth"), str(tmp_path / "out")])
    (model,) = _hinted_models(capsys.readouterr().out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    try:
        main(["convert", "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert 'timm.create_model("local-dir:DST", pretrained=True)' in " ".join(capsys.readouterr().out.split())


# two epochs of two steps, no figures: what a rerun does to the run and its zoo entry is what matters here
QUICK = {"train": dict(epochs=2, batch_per_device=8), "checkpoint": dict(every_steps=0),
         "log": dict(vis_every_epochs=0, vis_images=0, progress="off", tensorboard=False)}


def test_rerun_of_a_finished_run_changes_nothing_and_republishing_keeps_the_same_weights_evaluations(
        tmp_path, monkeypatch, capsys):
    """Defect: rerunning a finished `mffzoo train` re-published the entry and wiped its `--update-zoo` results."""
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(zoo))
    data = write_demo_dataset(tmp_path / "data", num_classes=4, train_per_class=4, val_per_class=2, image_size=32)
    recipe, run = write_yaml(tiny_recipe(data, QUICK), tmp_path / "tiny.yaml"), tmp_path / "run"
    entry = zoo / f"{ARCH}.tinytest"
    main(["train", str(recipe), "--output", str(run)])
    main(["eval", "knn", f"{ARCH}.tinytest", "--data", str(data), "--k", "3", "--no-cache", "--device", "cpu",
          "-o", str(tmp_path / "knn.json"), "--update-zoo"])
    (entry / "NOTES.md").write_text("my notes on these weights\n")
    capsys.readouterr()
    files = {p: p.read_bytes() for p in (entry / "mffzoo.json", entry / "model.safetensors", run / "summary.json",
                                         run / "model" / "mffzoo.json")}
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert "knn:data" in json.loads(files[entry / "mffzoo.json"])["eval"]

    # the same command again: nothing to do, said once; exit 0; not a file rewritten
    main(["train", str(recipe), "--output", str(run)])
    out, err = capsys.readouterr()
    assert f"{run} is already finished (2 epochs, 4 steps, final loss " in err and "; nothing to do: " in err, err
    assert "done:" not in out and f"zoo: {ARCH}.tinytest -> {entry}" in out
    assert {p: p.read_bytes() for p in files} == files and {p: p.stat().st_mtime_ns for p in files} == stamps
    res = train(recipe, output_dir=run)  # the Python API says so in its result
    assert res.already_finished and res.completed and res.exit_code == 0 and res.extra["zoo_entry"] == entry

    # an output lost: the rerun writes the outputs again from the final checkpoint, the same weights: the
    # evaluations recorded for them and the user's file stay
    shutil.rmtree(run / "model")
    main(["train", str(recipe), "--output", str(run)])
    err = capsys.readouterr().err
    assert "is already finished (2 epochs, 4 steps" in err and "outputs are not all in place" in err, err
    assert (run / "model" / "model.safetensors").read_bytes() == files[entry / "model.safetensors"]
    assert (entry / "model.safetensors").read_bytes() == files[entry / "model.safetensors"]
    assert json.loads((entry / "mffzoo.json").read_text())["eval"] == json.loads(files[entry / "mffzoo.json"])["eval"]
    assert (entry / "NOTES.md").read_text() == "my notes on these weights\n"

    # another run publishing other weights under the tag: the old evaluations go, said so; the user's file stays
    main(["train", str(recipe), "--output", str(tmp_path / "run2"), "--set", "train.seed=1"])
    err = capsys.readouterr().err
    assert f"{entry}: new weights, so the evaluations recorded for the previous ones are dropped (knn:data)" in err
    assert (entry / "model.safetensors").read_bytes() != files[entry / "model.safetensors"]
    assert "eval" not in json.loads((entry / "mffzoo.json").read_text())
    assert (entry / "NOTES.md").read_text() == "my notes on these weights\n"
    assert sorted(p.name for p in zoo.iterdir()) == [entry.name]  # no temp or old folders left behind


def _convert_hint(err: str) -> list[str]:
    m = re.search(r"to publish it as mff_in1k_300e anyway: (.+?)(?: \(|$)", err, re.M)
    assert m, err
    return shlex.split(m.group(1))


def test_partial_publish_hint_is_a_convert_command_that_works_and_replaces_nothing(tmp_path, monkeypatch, capsys):
    """Defect: the hint printed `<file>.pth` (not runnable); now that convert refuses an existing folder, the hint
    must say when the tag's folder is taken, and never carry --overwrite itself."""
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("MFFZOO_HOME", str(zoo))
    data = write_demo_dataset(tmp_path / "data", num_classes=4, train_per_class=4, val_per_class=1, image_size=32)
    recipe = write_yaml(tiny_recipe(data, QUICK, train={"epochs": 1}, publish={"tag": "mff_in1k_300e"}),
                        tmp_path / "smoke.yaml")
    main(["train", str(recipe), "--output", str(tmp_path / "run")])
    argv = _convert_hint(capsys.readouterr().err)
    dest = zoo / f"{ARCH}.mff_in1k_300e"
    assert argv[:2] == ["mffzoo", "convert"] and "--overwrite" not in argv and argv[-1] == str(dest)
    main(argv[1:])  # exactly as printed
    capsys.readouterr()
    trained = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == trained
    # printed again for another short run: the folder is taken now, and the hint says so
    main(["train", str(recipe), "--output", str(tmp_path / "run2"), "--set", "train.seed=1"])
    err = capsys.readouterr().err
    again = _convert_hint(err)
    assert "--overwrite" not in again and again[-1] == str(dest)
    assert f"({dest} already holds weights: convert refuses to replace them unless you add --overwrite)" in err
    assert "already exists; pass --overwrite" in cli_error(again[1:], capsys)
    assert (dest / "model.safetensors").read_bytes() == trained  # the first weights are still there
