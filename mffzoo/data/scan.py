"""Scanning image datasets on disk without trusting them: folders with link loops, tar files that are not tars.

``os.walk(followlinks=True)`` (timm's folder reader, torchvision's ``ImageFolder``) follows a symlink to a folder's
own ancestor until the kernel's ELOOP limit: 32 images were counted as 14,432, and two such links make the walk
exponential. :func:`walk_images` follows links as they do (a class folder linked in from elsewhere is the usual
way to assemble a dataset) but never into a folder that is its own ancestor, never twice into the same folder
through links, and counts each real image once; what it skipped is said in one warning line. A ``.tar`` given as
a data root is checked by :func:`check_tar` before timm streams it: random bytes, a cut-off archive or one
without images are one :class:`~mffzoo.errors.DataError` line instead of a ``tarfile.ReadError`` traceback or a
silently shorter dataset.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

__all__ = ["FolderScan", "walk_images", "check_tar"]

_logger = logging.getLogger("mffzoo.data")


@dataclass
class FolderScan:
    """What :func:`walk_images` skipped, and the bookkeeping that makes each real folder and image count once."""

    top: str
    loops: list[tuple[str, str]] = field(default_factory=list)  # (link, the ancestor folder it leads back to)
    repeats: list[tuple[str, str]] = field(default_factory=list)  # (path through a link, the real path counted)
    images: int = 0
    _seen: set[tuple[int, int]] = field(default_factory=set)  # folders entered, as (device, inode)
    _direct: set[str] = field(default_factory=set)  # real paths of images reached without a link
    _linked: set[str] = field(default_factory=set)  # real paths of images reached through a link

    def report(self, logger: logging.Logger = _logger) -> None:
        """One warning line when links were skipped (nothing when there were none)."""
        if not self.loops and not self.repeats:
            return
        parts = []
        if self.loops:
            link, target = self.loops[0]
            parts.append(f"{len(self.loops)} leading back to their own ancestor folder (a loop, e.g. '{link}' -> "
                         f"'{target}')")
        if self.repeats:
            path, real = self.repeats[0]
            parts.append(f"{len(self.repeats)} reaching folders or images already counted (e.g. '{path}' = "
                         f"'{real}')")
        logger.warning("data folder '%s': skipped %d symlinked paths, %s; each real image counts once (%d images)",
                       self.top, len(self.loops) + len(self.repeats), " and ".join(parts), self.images)

    def _enter(self, path: str, real: str, ident: tuple[int, int] | None,
               chain: tuple[tuple[int, int], ...]) -> bool:
        """Whether to walk into a folder: not when it is its own ancestor (a loop) or was walked already."""
        if ident is None:
            return False
        if ident in chain:
            self.loops.append((path, real))
            return False
        if ident in self._seen:
            self.repeats.append((path, real))
            return False
        self._seen.add(ident)
        return True

    def _count(self, path: str, real: str, linked: bool) -> bool:
        """Whether an image counts: always when reached directly (those are all met first), through a link only
        the first time its real file is met."""
        if not linked:
            self._direct.add(real)
        elif real in self._direct or real in self._linked:
            self.repeats.append((path, real))
            return False
        else:
            self._linked.add(real)
        self.images += 1
        return True


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _entries(path: str) -> list[tuple[os.DirEntry[str], bool, bool]]:
    """``(entry, is a folder (links followed), is a link)``, sorted by name; [] for an unreadable folder."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            out.append((e, e.is_dir(), e.is_symlink()))
        except OSError:
            continue
    return out


def walk_images(top: str | os.PathLike[str], is_image: Callable[[str], bool]) -> tuple[
        FolderScan, Iterator[tuple[str, list[str]]]]:
    """``(scan, walk)``: ``walk`` yields ``(folder, names of the files is_image(path) accepts)`` under ``top`` as
    ``os.walk(followlinks=True)`` reaches them (a folder may come twice: its own images, later the ones linked
    into it), but never into a folder that is its own ancestor, never twice into one folder, and each real image
    once (see the module docstring); ``scan`` holds what was skipped once the walk is done
    (:meth:`FolderScan.report` says it).

    The real tree comes first and links after it, so an image reached both directly and through a link is
    counted at its own path. Folders are identified by (device, inode): a bind mount of an ancestor is a loop
    too. Unreadable folders are skipped, as ``os.walk`` skips them.
    """
    scan = FolderScan(os.fspath(top))
    return scan, _walk(scan, os.fspath(top), is_image)


def _walk(scan: FolderScan, top: str, is_image: Callable[[str], bool]) -> Iterator[tuple[str, list[str]]]:
    start = _identity(top)
    if start is None:
        return
    scan._seen.add(start)
    links: list[tuple[str, tuple[tuple[int, int], ...]]] = []  # links to folders, walked after the real tree
    linked_files: list[tuple[str, list[tuple[str, str]]]] = []  # (folder, [(name, real path)]) of image links
    # the folders above ``top`` are ancestors too: a link to the dataset's parent (or to /) is a loop as well
    above = tuple(i for p in Path(os.path.realpath(top)).parents if (i := _identity(str(p))) is not None)
    stack = [(top, os.path.realpath(top), (*above, start))]
    while stack:
        path, real, chain = stack.pop()
        names, subdirs, files = [], [], []
        for e, is_dir, is_link in _entries(path):
            if is_link:
                if is_dir:
                    links.append((e.path, chain))
                elif is_image(e.path):
                    files.append((e.name, os.path.realpath(e.path)))
            elif is_dir:
                sub_real = os.path.join(real, e.name)
                ident = _identity(e.path)
                if scan._enter(e.path, sub_real, ident, chain):
                    subdirs.append((e.path, sub_real, (*chain, ident)))
            elif is_image(e.path) and scan._count(e.path, os.path.join(real, e.name), linked=False):
                names.append(e.name)
        if files:
            linked_files.append((path, files))
        yield path, names
        stack.extend(reversed(subdirs))
    for path, files in linked_files:
        yield path, [n for n, r in files if scan._count(os.path.join(path, n), r, linked=True)]
    for link, chain in links:  # inside a linked folder everything is reached through a link
        ident, real = _identity(link), os.path.realpath(link)
        if not scan._enter(link, real, ident, chain):
            continue
        inner = [(link, real, (*chain, ident))]
        while inner:
            path, real, chain = inner.pop()
            names = []
            for e, is_dir, is_link in _entries(path):
                e_real = os.path.realpath(e.path) if is_link else os.path.join(real, e.name)
                if is_dir:
                    ident = _identity(e.path)
                    if scan._enter(e.path, e_real, ident, chain):
                        inner.append((e.path, e_real, (*chain, ident)))
                elif is_image(e.path) and scan._count(e.path, e_real, linked=True):
                    names.append(e.name)
            yield path, names


def check_tar(path: str | os.PathLike[str], extensions: Collection[str]) -> int:
    """The number of images in a ``.tar`` data root (nested ``.tar`` members count as holding some), or a one-line
    :class:`DataError` naming the file: not a tar archive, cut off, or holding no images. Reads the member headers
    only (random access), not the image bytes."""
    path = Path(path)
    fix = "pass a tar of images (tar -cf data.tar -C train .) or an image folder as data.root"
    size = path.stat().st_size
    images = members = 0
    try:
        with tarfile.open(path, mode="r:") as tf:
            for ti in tf:
                members += 1
                if ti.isfile() and ti.offset_data + ti.size > size:
                    raise DataError(f"data.root '{path}' is truncated: member '{ti.name}' needs bytes up to "
                                    f"{ti.offset_data + ti.size}, the file ends at {size}; re-copy or re-create it")
                ext = os.path.splitext(ti.name)[1].lower()
                images += ti.isfile() and (ext in extensions or ext == ".tar")
            end = tf.offset  # where the member headers stop
    except (tarfile.TarError, EOFError, OSError) as exc:
        why = "empty" if size == 0 else f"{' '.join(str(exc).split()) or type(exc).__name__}"
        if members or "truncated" in why or "end of data" in why:
            raise DataError(f"data.root '{path}' is truncated or corrupt after {members} complete "
                            f"member{'s' * (members != 1)} ({why}); re-copy or re-create it") from None
        raise DataError(f"data.root '{path}' is not a readable tar archive ({why}); {fix}") from None
    if _junk_after(path, end, size):  # a header cut in half ends tarfile's scan silently: the rest is lost
        raise DataError(f"data.root '{path}' is truncated or corrupt after byte {end} ({members} complete "
                        f"member{'s' * (members != 1)} before it); re-copy or re-create it")
    if images == 0:
        raise DataError(f"data.root '{path}' holds no images ({members} member{'s' * (members != 1)}, none ending in "
                        f"{', '.join(sorted(extensions))}); {fix}")
    return images


def _junk_after(path: Path, end: int, size: int) -> bool:
    """Whether anything but the zero blocks that close a tar archive follows its last member."""
    with open(path, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return True
    return False
