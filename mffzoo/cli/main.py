"""``mffzoo`` command line: a thin layer over the Python API.

Each sub-command lives in its own module under ``mffzoo.cli`` and is registered in :data:`COMMANDS`. Errors a
user can fix (:class:`mffzoo.errors.MffzooError`) print one line and exit with their code (2 for bad input,
1 for a failed check); so do click's usage errors (a bad option value, a missing argument: exit 2, with a pointer
to ``--help`` instead of the usage block). Nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable

import click

from ..errors import MffzooError
from ..progress import configure_console_logging

# (module, attribute) of each sub-command; imported lazily so `mffzoo --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "zoo": ("mffzoo.cli.zoo", "zoo"),
    "convert": ("mffzoo.cli.zoo", "convert"),
    "data": ("mffzoo.cli.zoo", "data"),
    "export": ("mffzoo.cli.export", "export"),
    "bench": ("mffzoo.cli.bench", "bench"),
    "train": ("mffzoo.cli.train", "train"),
    "push": ("mffzoo.cli.train", "push"),
    "eval": ("mffzoo.cli.evaluate", "eval_group"),
    "analyze": ("mffzoo.cli.evaluate", "analyze"),
    "reproduce": ("mffzoo.cli.evaluate", "reproduce"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mffzoo")
@click.option("-v", "--verbose", is_flag=True, help="Log debug information.")
def cli(verbose: bool) -> None:
    """mffzoo: MFF-pretrained ViT backbones for timm — train, convert, export, evaluate."""
    configure_console_logging(verbose)


_OTHER_RANKS_WAIT_S = 15.0


def _say_once(show: Callable[[], None]) -> None:
    """Show an input error once under torchrun, where every rank meets the same bad recipe or data.

    Rank 0 (or a plain process) shows it at once. Other ranks wait: when rank 0 fails too, torchrun stops them
    meanwhile and the message appears once; an error only this rank met still shows, late, with its rank.
    """
    rank = os.environ.get("RANK", "0").strip() or "0"
    if rank != "0":
        time.sleep(_OTHER_RANKS_WAIT_S)
        click.echo(f"[rank {rank}] ", err=True, nl=False)
    show()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and an exit code, never a traceback."""
    try:
        rc = cli.main(args=argv, prog_name="mffzoo", standalone_mode=False)
    except MffzooError as exc:
        message = f"error: {exc}"
        _say_once(lambda: click.echo(message, err=True))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option or argument is bad input too: one line, not click's usage block
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        usage = f"error: {' '.join(exc.format_message().split())}{where}"
        _say_once(lambda: click.echo(usage, err=True))
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _say_once(exc.show)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
