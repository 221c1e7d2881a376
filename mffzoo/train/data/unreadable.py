"""Unreadable files: a run skips them (the dataset reads the next readable image, so batch shapes stay fixed),
counts each file once however often it meets it, and reports their paths and whole errors; the engine stops when
more than ``data.max_bad_fraction`` of the dataset fails."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["UnreadableFiles", "describe_unreadable"]


def describe_unreadable(path: str, error: str) -> str:
    """One unreadable file as a report names it: ``path (error)``."""
    return f"{path} ({error})"


class UnreadableFiles:
    """The distinct unreadable files of a run, over all ranks, epochs and resumes.

    A bad file is met again every epoch, and also by each position whose retry walks over it, so counting
    meetings overstates the damage (3 bad files read as "4", then "8" after two epochs). Each rank records the
    files new to it (:meth:`add`); :meth:`sync` merges them across ranks at the engine's log window.
    """

    def __init__(self, files: dict[str, str] | None = None) -> None:
        self.files: dict[str, str] = dict(files or {})  # path -> error, in the order first met
        self._pending: dict[str, str] = {}

    @classmethod
    def from_state(cls, stats: dict[str, Any] | None) -> UnreadableFiles:
        return cls((stats or {}).get("bad_files"))

    def add(self, bad: Iterable[tuple[str, str]]) -> int:
        """Record a batch's skipped files; returns how many this rank had not seen yet."""
        new = 0
        for path, error in bad:
            if path not in self.files and path not in self._pending:
                self._pending[path] = error
                new += 1
        return new

    def sync(self, gather: Callable[[Any], list[Any]]) -> int:
        """Merge every rank's new files (``gather``: an all-gather of one object per rank, called on every rank);
        returns how many files the run had not seen before."""
        before = len(self.files)
        for pending in gather(self._pending):
            for path, error in pending.items():
                self.files.setdefault(path, error)
        self._pending = {}
        return len(self.files) - before

    @property
    def count(self) -> int:
        return len(self.files)

    def examples(self, n: int) -> str:
        return "; ".join(describe_unreadable(p, e) for p, e in list(self.files.items())[:n])

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (``bad_images``/``bad_examples`` for readers, ``bad_files`` for resume)."""
        return {"bad_images": self.count,
                "bad_examples": [describe_unreadable(p, e) for p, e in list(self.files.items())[:10]],
                "bad_files": dict(self.files)}
