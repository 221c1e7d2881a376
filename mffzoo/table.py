"""Plain aligned text tables: what every mffzoo listing and report prints (the CLI and library reports alike),
so it sits low, beside :mod:`mffzoo.io`."""

from __future__ import annotations

from collections.abc import Sequence

import click

__all__ = ["print_table"]


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Columns padded to their widest cell, a dashed rule under the header, trailing spaces stripped."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    click.echo(line.rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
