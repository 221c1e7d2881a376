"""``mffzoo`` command line: a thin layer over the Python API.

Each sub-command lives in its own module under ``mffzoo.cli`` and is registered in :data:`COMMANDS`. Errors a
user can fix (:class:`mffzoo.errors.MffzooError`) print one line and exit with their code (2 for bad input,
1 for a failed check); nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ..errors import MffzooError

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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    if not verbose:  # timm narrates every weight load at INFO; our own messages say what matters
        logging.getLogger("timm").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and an exit code, never a traceback."""
    try:
        rc = cli.main(args=argv, prog_name="mffzoo", standalone_mode=False)
    except MffzooError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
