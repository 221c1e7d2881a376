"""What a user sees while work runs: progress, and a console free of other libraries' chatter.

:class:`Progress`: anything that takes more than a few seconds shows a tqdm bar on a terminal, else one log line
per stage. Low in the layers (no torch) so the demo-data writer, feature extraction and the training engine share
it. Lines go to the ``mffzoo`` logger at INFO, which the CLI prints on stderr (:func:`configure_console_logging`);
library users see them once they configure logging.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

__all__ = ["Progress", "format_duration", "interactive", "ThirdPartyAtDebug", "configure_console_logging"]

_logger = logging.getLogger("mffzoo")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def interactive() -> bool:
    """A person watches stderr (a TTY, and not CI): a bar helps there; in logs it is noise."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """A bar over ``total`` units (``mode`` ``bar``, or ``auto`` on a TTY); otherwise :meth:`line` logs.

    ``desc`` names the stage: without a bar it is logged once when the stage starts, and :meth:`close` logs
    ``desc: done in 12s``, so a log shows every stage that ran and how long it took. ``mode`` ``epoch`` keeps
    only the lines, ``off`` (or ``enabled=False``, e.g. ranks other than 0) shows nothing.
    """

    def __init__(self, mode: str | bool = "auto", enabled: bool = True, total: int | None = None, initial: int = 0,
                 *, desc: str | None = None, unit: str = "step", logger: logging.Logger | None = None) -> None:
        self.bar: Any = None
        self.desc = desc
        self.logger = logger or _logger
        self.lines = enabled and mode in ("auto", "epoch")
        self.t0 = time.time()
        if enabled and (mode == "bar" or (mode == "auto" and interactive())):
            from tqdm.auto import tqdm  # comes with huggingface-hub; only a terminal needs it

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.05)
            self.lines = False
        elif self.lines and desc:
            self.logger.info("%s ...", desc)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(done=exc[0] is None)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def line(self, text: str) -> None:
        """A line that stays (above the bar on a terminal; logged otherwise)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.lines:
            self.logger.info(text)

    def close(self, done: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.desc and done:
            self.logger.info("%s: done in %s", self.desc, format_duration(time.time() - self.t0))
            self.lines = False


class ThirdPartyAtDebug(logging.Filter):
    """Other libraries' log lines below ERROR count as debug output: shown when verbose only.

    timm's "Cosine annealing scheduler will have no effect" or matplotlib's "building the font cache" land in the
    middle of the progress output and name nothing the user can act on; our own messages say what matters.
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "mffzoo" or record.name.startswith("mffzoo.")
        return ours or record.levelno >= logging.ERROR or self.verbose


def configure_console_logging(verbose: bool = False, level: int = logging.INFO) -> None:
    """The CLI's console (also in its worker processes): bare messages on stderr from ``level`` up (DEBUG when
    ``verbose``); other libraries' lines below ERROR only when ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format="%(message)s", stream=sys.stderr,
                        force=True)
    if not verbose:  # timm narrates every weight load at INFO; our own messages say what matters
        logging.getLogger("timm").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ThirdPartyAtDebug(verbose))
