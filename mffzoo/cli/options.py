"""Option types every command shares, so an option that cannot work stops in one line before any work starts.

Counts use :func:`count` (``click.IntRange``: ``--threads -3`` is refused by click, which ``mffzoo.cli.main``
prints as one ``error:`` line, exit 2), image sizes :data:`IMG_SIZE`, floats :class:`FiniteFloat` (click's
FloatRange lets NaN through), and every path an option or argument names :data:`OUT_PATH` / :data:`IN_PATH`
(:func:`mffzoo.config.check_path`: a 300-byte name fails here, not as ENAMETOOLONG after the work). Standard
library and click only: ``mffzoo --help`` stays free of torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from ..config import MAX_BATCH, MAX_IMG_SIZE, check_path

__all__ = [
    "count", "BATCH", "IMG_SIZE", "FiniteFloat", "CheckedPath", "OUT_PATH", "IN_PATH", "ModelSpec", "MODEL",
    "recipe_run", "LEVELS", "FEATURES",
]


def count(minimum: int = 1, maximum: int | None = None) -> click.IntRange:
    """An integer option of at least ``minimum`` (workers: 0, threads, iterations, batches: 1)."""
    return click.IntRange(min=minimum, max=maximum)


BATCH = count(1, MAX_BATCH)
# Lower bound 8 (the smallest patch grid anyone runs); a multiple of the model's patch is checked where the model
# is known (it loads after the options are read).
IMG_SIZE = count(8, MAX_IMG_SIZE)


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and inf (NaN passes every range comparison)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class CheckedPath(click.Path):
    """``click.Path`` (as :class:`pathlib.Path`) whose components fit the file system (:func:`check_path`):
    ``existing`` for a file or folder that is read (255 bytes per name), else one mffzoo writes, whose last name
    leaves room for the sidecars and temporary files written next to it."""

    def __init__(self, *, existing: bool = False) -> None:
        super().__init__(path_type=Path)
        self.existing = existing

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        label = (param.opts[0] if param is not None and param.opts and param.opts[0].startswith("-")
                 else (param.human_readable_name if param is not None else "path"))
        check_path(value, label.upper() if not label.startswith("-") else label, existing=self.existing)
        return super().convert(value, param, ctx)


OUT_PATH = CheckedPath()
IN_PATH = CheckedPath(existing=True)


class ModelSpec(click.ParamType):
    """A MODEL (name[.tag], folder, checkpoint, hf-hub:/local-dir:), kept as a string; checked like a path to read
    before the command starts (an eval would otherwise write its demo data first, then fail on the name)."""

    name = "model"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        check_path(str(value), "MODEL", existing=True)
        return str(value)


MODEL = ModelSpec()


class BlockList(click.ParamType):
    """``--levels 3,5,7,11`` -> [3, 5, 7, 11]: 0-based encoder blocks (the profile checks order and repeats, the
    model the range, once they are known)."""

    name = "I,J,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of block indices; write e.g. 3,5,7,11", param, ctx)


LEVELS = BlockList()
FEATURES = click.Choice(["auto", "pooled", "tokens", "logits", "levels"])


def recipe_run(example: str) -> Any:
    """The arguments every recipe-driven command takes (``train``, ``eval finetune``): RECIPE, ``--set`` overrides
    (``example`` shows one) and the run directory ``--output``."""

    def wrap(fn: Any) -> Any:
        fn = click.option("--output", "-o", type=OUT_PATH, default=None,
                          help="Run directory (default: the recipe's output_dir, else runs/<recipe name>).")(fn)
        fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help=f"Override a recipe key (repeatable), e.g. {example}")(fn)
        return click.argument("recipe")(fn)

    return wrap
