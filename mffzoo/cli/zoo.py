"""``mffzoo zoo``, ``mffzoo convert``, ``mffzoo data demo``."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DataError
from ..table import print_table  # `mffzoo bench` imports it from here too
from .options import IN_PATH, OUT_PATH, count


@click.command("zoo")
@click.option("--all", "show_all", is_flag=True, help="Also show each download URL / local folder.")
def zoo(show_all: bool) -> None:
    """List every architecture/tag (and cached hub models): source, whether it is present locally, metric."""
    from ..zoo.catalog import zoo_rows
    from ..zoo.home import zoo_home

    header = ["model", "source", "local", "metric"] + (["location"] if show_all else [])
    rows = [[r.name, r.source, "yes" if r.present else "no", r.metric]
            + ([r.location] if show_all else []) for r in zoo_rows()]
    print_table(rows, header)
    click.echo(f"\nzoo home: {zoo_home()} (set MFFZOO_HOME to change; --all shows URLs and folders)")


@click.command("convert")
@click.argument("src", type=IN_PATH)
@click.argument("dst", type=OUT_PATH)
@click.option("--arch", default=None, help="Target architecture (default: inferred from the weights).")
@click.option("--num-heads", type=count(1), default=None,
              help="Attention heads, for non-standard widths from foreign formats (default: 6/12/16 for S/B/L).")
@click.option("--keep-extras", is_flag=True, help="Also save fusion + decoder weights (pretrain_extras.safetensors).")
@click.option("--overwrite", is_flag=True,
              help="Replace the model in a DST that already holds one (refused otherwise; its other files stay).")
def convert(src: Path, dst: Path, arch: str | None, num_heads: int | None, keep_extras: bool, overwrite: bool) -> None:
    """Convert an mmpretrain / MAE / mffzoo checkpoint into a timm model folder.

    DST gets model.safetensors + config.json (+ mffzoo.json); load it with
    timm.create_model("local-dir:DST", pretrained=True) after `import mffzoo`, or copy it into the zoo home
    as <arch>.<tag>/. A DST that already holds a model is replaced only with --overwrite.
    """
    from ..zoo.convert import convert_checkpoint
    from ..zoo.home import read_folder_meta

    out = convert_checkpoint(src, dst, arch=arch, num_heads=num_heads, keep_extras=keep_extras, overwrite=overwrite)
    meta = read_folder_meta(out)
    click.echo(f"wrote {out}: {meta.get('model')}, from a {meta.get('source_kind')} (load with "
               f"timm.create_model('local-dir:{out}', pretrained=True) after `import mffzoo`)")


@click.group("data")
def data() -> None:
    """Datasets that need no download."""


@data.command("demo")
@click.argument("root", type=OUT_PATH, required=False)
@click.option("--seed", type=count(0), default=0, show_default=True)
@click.option("--image-size", type=count(8, 1024), default=64, show_default=True)
@click.option("--train-per-class", type=count(1), default=200, show_default=True)
@click.option("--val-per-class", type=count(1), default=40, show_default=True)
@click.option("--overwrite", is_flag=True)
def demo(root: Path | None, seed: int, image_size: int, train_per_class: int, val_per_class: int,
         overwrite: bool) -> None:
    """Write the procedural demo dataset as an ImageNet-style folder (ROOT/train, ROOT/val)."""
    from ..data.demo import default_demo_root, write_demo_dataset

    try:
        out = write_demo_dataset(root or default_demo_root(), seed=seed, image_size=image_size,
                                 train_per_class=train_per_class, val_per_class=val_per_class, overwrite=overwrite)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    click.echo(str(out))
