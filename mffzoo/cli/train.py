"""``mffzoo train`` and ``mffzoo push``: thin click layers over :mod:`mffzoo.train`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .options import IN_PATH, OUT_PATH, recipe_run


@click.command("train")
@recipe_run("--set data.root=/data/imagenet --set optim.blr=1e-4")
def train(recipe: str, overrides: tuple[str, ...], output: Path | None) -> None:
    """Pretrain with MFF (or MAE) from RECIPE: a YAML file, or a name in recipes/ (demo, vits, vitb_mae, ...).

    \b
    One process:         mffzoo train recipes/demo.yaml
    GPUs of one machine: torchrun --nproc_per_node=8 -m mffzoo train recipes/vitb.yaml
    Resume:              rerun the same command (newest valid checkpoint in the run directory)
    """
    from ..train import train as run_train
    from ..train.engine import FINAL_LOSS_LABEL

    result = run_train(recipe, list(overrides), output_dir=output)
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(result.exit_code)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    if not result.completed:  # exit 128 + signal number: not finished, and not an error either
        click.echo(result.stop_message)
        raise SystemExit(result.exit_code)
    if not result.already_finished:  # else the engine's log line says it was finished before and nothing changed
        click.echo(f"done: {result.epoch} epochs, {result.global_step} steps, {FINAL_LOSS_LABEL} {loss}, "
                   f"{result.wall_s:.0f} s -> {result.run_dir}")
    extra = result.extra
    if extra.get("model_dir"):
        md = extra["model_dir"]
        click.echo(f"weights: {md} (timm.create_model('local-dir:{md}', pretrained=True) after `import mffzoo`)")
    if extra.get("zoo_entry"):
        arch, tag = Path(extra["zoo_entry"]).name.split(".", 1)
        click.echo(f"zoo: {arch}.{tag} -> {extra['zoo_entry']} "
                   f"(timm.create_model('{arch}.{tag}', pretrained=True) after `import mffzoo`)")
    for key, label in (("reconstruction_png", "reconstructions"), ("fusion_plot", "fusion weights")):
        if extra.get(key):
            click.echo(f"{label}: {extra[key]}")


@click.command("push")
@click.argument("run_dir", type=IN_PATH)
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hugging Face Hub model repo to create/update.")
@click.option("--local-dir", type=OUT_PATH, default=None,
              help="Only lay the repo out in this folder (no upload, no network).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
def push(run_dir: Path, repo: str, local_dir: Path | None, private: bool) -> None:
    """Publish a finished run as a timm-compatible Hub repo (model.safetensors, config.json, model card).

    Authenticate with `huggingface-cli login` or HF_TOKEN. The repo then loads with
    timm.create_model("hf-hub:ORG/NAME", pretrained=True).
    """
    from ..train.publish import push_to_hub

    where = push_to_hub(run_dir, repo, local_dir=local_dir, private=private)
    if local_dir is not None:
        click.echo(f"wrote {where} (load with timm.create_model('local-dir:{where}', pretrained=True))")
    else:
        click.echo(f"pushed {run_dir} -> {where}")
