"""Shared test helpers: tiny configs (model, data, pretraining recipe) and an independent functional ViT forward.

``functional_vit`` recomputes a ViT forward from a raw state dict with plain torch ops, reading keys through a
naming scheme (timm or mmpretrain). It shares no code with timm or mffzoo, so agreement with a converted timm
model is real evidence that the conversion is right.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from mffzoo.data import write_demo_dataset
from mffzoo.train.checkpoint import CheckpointManager
from mffzoo.zoo import load_checkpoint_file

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)
TINY_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def write_train_data(root: Path, train_per_class: int = 8) -> Path:
    """The engine tests' data: the demo generator at 32 px, 4 classes, 2 validation images each."""
    return write_demo_dataset(root, num_classes=4, train_per_class=train_per_class, val_per_class=2, image_size=32)


def merge_sections(base: Mapping[str, Any], *layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` with each layer's sections merged key by key over it (later layers win)."""
    out = dict(base)
    for layer in layers:
        for key, value in layer.items():
            out[key] = {**out.get(key, {}), **value}
    return out


def tiny_recipe(root: Path, *layers: Mapping[str, Mapping[str, Any]], **sections: dict[str, Any]) -> dict[str, Any]:
    """img 32 / patch 8 / 64 wide / 4 blocks, three fused levels; fp32 on the CPU (also on a GPU machine) so runs
    are bit-exact. ``layers`` then ``sections`` override it section by section."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": dict(arch="mff_vit_small", **TINY, fusion_layers=[0, 1, 3], **TINY_DECODER),
        "data": dict(root=str(root), num_workers=0),
        "train": dict(epochs=3, batch_size=8, batch_per_device=4, precision="fp32", cpu_threads=1, device="cpu"),
        "optim": dict(lr=2e-3, warmup_epochs=0),
        "checkpoint": dict(every_steps=2, keep_last=20),
        "log": dict(every_steps=2, vis_every_epochs=1, vis_images=4),
        "publish": dict(tag="tinytest"),
    }
    return merge_sections(recipe, *layers, sections)


def write_yaml(recipe: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(recipe)))
    return path

TIMM_NAMES = {
    "patch_w": "patch_embed.proj.weight", "patch_b": "patch_embed.proj.bias",
    "cls": "cls_token", "pos": "pos_embed", "norm": "norm", "fc_norm": "fc_norm", "head": "head",
    "block": "blocks.{i}.", "n1": "norm1", "n2": "norm2", "qkv": "attn.qkv", "proj": "attn.proj",
    "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}
MM_NAMES = {
    "patch_w": "backbone.patch_embed.projection.weight", "patch_b": "backbone.patch_embed.projection.bias",
    "cls": "backbone.cls_token", "pos": "backbone.pos_embed", "norm": "backbone.ln1", "fc_norm": "backbone.ln2",
    "head": "head.fc", "block": "backbone.layers.{i}.", "n1": "ln1", "n2": "ln2", "qkv": "attn.qkv",
    "proj": "attn.proj", "fc1": "ffn.layers.0.0", "fc2": "ffn.layers.1",
}


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def functional_vit(sd: dict, x: torch.Tensor, names: dict, num_heads: int, pool: str = "token") -> torch.Tensor:
    """Pre-logits features (or logits if a head is present and pool == 'avg') from a raw state dict."""
    w = sd[names["patch_w"]]
    p = w.shape[-1]
    tok = F.conv2d(x, w, sd[names["patch_b"]], stride=p).flatten(2).transpose(1, 2)
    tok = torch.cat([sd[names["cls"]].expand(x.shape[0], -1, -1), tok], 1) + sd[names["pos"]]
    depth = 1 + max(int(k[len(names["block"].split("{")[0]):].split(".")[0])
                    for k in sd if k.startswith(names["block"].split("{")[0]))
    for i in range(depth):
        b = names["block"].format(i=i)
        h = _ln(sd, b + names["n1"], tok)
        qkv = _lin(sd, b + names["qkv"], h)
        n, t, c3 = qkv.shape
        c = c3 // 3
        q, k, v = qkv.view(n, t, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * (c // num_heads) ** -0.5).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(n, t, c)
        tok = tok + _lin(sd, b + names["proj"], h)
        h = _ln(sd, b + names["n2"], tok)
        tok = tok + _lin(sd, b + names["fc2"], F.gelu(_lin(sd, b + names["fc1"], h)))
    if pool == "avg":
        feat = _ln(sd, names["fc_norm"], tok[:, 1:].mean(1))
        return _lin(sd, names["head"], feat) if names["head"] + ".weight" in sd else feat
    return _ln(sd, names["norm"], tok)[:, 0]


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """Non-trivial values for every tensor (init leaves LayerNorms at 1/0, which hides mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in model.state_dict().items()}


def timm_to_mm(sd: dict, *, final_key: str = "ln1") -> dict:
    """Write a timm-keyed backbone in mmpretrain layout (test-side, by explicit table, not the converter)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for tk, mk in (("norm1", "ln1"), ("norm2", "ln2"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                           ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1")):
                if rest.startswith(tk + "."):
                    out[f"backbone.layers.{i}.{mk}{rest[len(tk):]}"] = v
        elif k.startswith("patch_embed.proj."):
            out["backbone.patch_embed.projection." + k.rsplit(".", 1)[1]] = v
        elif k in ("cls_token", "pos_embed"):
            out["backbone." + k] = v
        elif k.startswith("norm."):
            out[f"backbone.{final_key}." + k.split(".", 1)[1]] = v
        elif k.startswith("fc_norm."):
            out["backbone.ln2." + k.split(".", 1)[1]] = v
        elif k.startswith("head."):
            out["head.fc." + k.split(".", 1)[1]] = v
        else:
            raise KeyError(k)
    return out


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one ``error: ...`` line and no traceback."""
    import pytest

    from mffzoo.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def hf_cache_layout(repo_folder, cache, repo_id: str):
    """Lay a Hub repo folder out as ``hf_hub_download`` leaves it in the cache (blobs, a snapshot of links,
    refs/main), so ``hf-hub:ORG/NAME`` loads offline from ``cache`` (``HF_HUB_CACHE``)."""
    from pathlib import Path

    cache = Path(cache)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in Path(repo_folder).iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("../../blobs") / blob.name)
    return cache


# --------------------------------------------------------------------------------------------- training runs
# Shared by the engine tests (test_train*.py, test_corrupt_files.py, test_hostile_inputs_fs.py).
def final_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    last = CheckpointManager(run_dir / "checkpoints").list()[0]
    return load_checkpoint_file(last)["model"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# Interruptions are deterministic: the engine's test hook MFFZOO_TEST_SIGNAL_AT_STEP makes the run signal its own
# process group (started with start_new_session=True, as a scheduler's job) right after a given optimizer step.
def train_env(zoo: Path, signal_at: str | None = None) -> dict[str, str]:
    # One thread everywhere: identical float reduction order in every run compared bit for bit.
    env = {**os.environ, "MFFZOO_HOME": str(zoo), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MFFZOO_TEST_SIGNAL_AT_STEP", None)
    if signal_at:
        env["MFFZOO_TEST_SIGNAL_AT_STEP"] = signal_at
    return env


def train_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mffzoo", "train", str(recipe), "--output", str(out)]


def run_interrupted(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` as the leader of a new process group (its loader workers in it, as under a scheduler); the
    whole group is killed if it outlives ``timeout``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"timed out: {' '.join(cmd)}\n{err[-3000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of the group may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def checkpoint_steps(run: Path) -> list[int]:
    """The global steps of a run's checkpoints, newest first."""
    return [int(p.stem.split("-")[1]) for p in CheckpointManager(run / "checkpoints").list()]


def subprocess_recipe(data_root: Path, path: Path, **sections: dict[str, Any]) -> Path:
    """``finished``'s trajectory (same model, data, schedule, seed: 3 epochs x 4 steps), without figures/zoo."""
    base = {"log": {"vis_every_epochs": 0, "vis_images": 0}, "publish": {"tag": None}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_yaml(tiny_recipe(data_root, **base), path)
