"""Writing files so that they can be checked and shared: atomic, umask-respecting, byte-reproducible.

Everything the package writes (checkpoints, weights, sidecars, results) goes through :func:`atomic_write`: a
temporary file in the destination folder, fsync, then ``os.replace``, so a reader or a crash never sees half a
file. ``tempfile.mkstemp`` creates files with mode 0600; the result is re-moded to what ``open()`` would give
(0666 minus the umask), so a shared ``MFFZOO_HOME`` works. JSON is written with sorted keys and safetensors
headers in a canonical order, so identical content gives identical bytes (and the same ``sha256sum``).
A write the file system refuses (disk full, file-size limit, read-only, no permission) raises one
:class:`~mffzoo.errors.WriteFailed` line naming the path, the cause and the fix; the temporary file is removed
and the previous file stays. :func:`exclusive` locks an output (run directory, zoo entry, artefact, Triton
repository) against a second mffzoo process; :func:`check_output_folder` / :func:`check_output_file` refuse an
output path taken by the other kind of thing before any work is done.
Also the one place that says where caches live (:func:`cache_root`, :func:`default_demo_root`) and how a
figure reaches the disk (:func:`save_figure`). Standard library only (matplotlib only inside
:func:`save_figure`): this module sits below everything else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import InUseError, OutputPathError, WriteFailed

__all__ = ["atomic_write", "write_json", "read_json_object", "json_text", "file_sha256", "canonical_safetensors",
           "umask_mode", "CHECKSUM_SUFFIX", "write_checksum", "verify_checksum", "cache_root", "default_demo_root",
           "save_figure", "write_failed", "check_output_folder", "check_output_file", "PathLock", "exclusive",
           "lock_path", "os_fault"]

CHECKSUM_SUFFIX = ".sha256"


def umask_mode(base: int = 0o666) -> int:
    """The mode ``open()`` would give a new file under the current umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


class _HashingWriter:
    """A binary file wrapper that hashes what passes through it (no second read of a large file)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None  # the file system's refusal, also when a writer (torch.save) rewraps it

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_write(
    path: str | os.PathLike[str], content: bytes | str | Callable[[Any], object], *, checksum: bool = False
) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary file) to ``path`` atomically.

    With ``checksum``, ``<path>.sha256`` (``sha256sum -c`` format) is written before the file is renamed into
    place, so a file never appears without the checksum of its bytes.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    out: _HashingWriter | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            out = _HashingWriter(f)
            if callable(content):
                content(out)
            else:
                out.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        if checksum:
            write_checksum(path, out.sha256.hexdigest())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, WriteFailed):  # the checksum's own write, already told
            raise
        fault = exc if isinstance(exc, OSError) else (out.error if out is not None else None)
        if fault is not None:  # torch.save, e.g., rewraps a failed write in a RuntimeError
            raise write_failed(path, fault) from None
        raise
    return path


_REMEDIES = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space (the disk quota is used up)",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
    errno.EROFS: "make that file system writable (it is mounted read-only)",
    errno.EACCES: "make that folder writable",
    errno.EPERM: "make that folder writable (check its permissions and immutable flag: lsattr -d)",
    errno.ENOTDIR: "remove the file that is in the way",
    errno.EISDIR: "remove the folder that is in the way",
}


def write_failed(path: str | os.PathLike[str], exc: OSError, *, where: str = "write elsewhere",
                 then: str = "then rerun") -> WriteFailed:
    """The one line for a write the file system refused: path, cause (with the errno name) and fix."""
    code = exc.errno if isinstance(exc.errno, int) else None
    name = errno.errorcode.get(code, "") if code is not None else ""
    cause = f"{exc.strerror or exc}" + (f" ({name})" if name else "")
    remedy = _REMEDIES.get(code, "fix the cause") if code is not None else "fix the cause"
    return WriteFailed.compose(str(path), cause, remedy, where=where, then=then)


_WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def os_fault(exc: BaseException) -> OSError | None:
    """The file system's refusal of a write (full, file-size limit, read-only) behind ``exc``, also where a
    library rewrapped it (torch, onnx raise RuntimeErrors from a failed ``write``); None for anything else."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _WRITE_FAULTS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


# --------------------------------------------------------------------------------------------- output paths
def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (a file in the way), else None."""
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return None if p.is_dir() else p


def check_output_folder(path: str | os.PathLike[str], what: str, *, fix: str | None = None) -> Path:
    """Refuse, before any work, an output folder ``path`` that is a file or lies under one (``what`` names the
    option, e.g. ``--out-dir``)."""
    path = Path(path)
    fix = fix or f"pass another {what}"
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a file, not a folder; {fix} (or move the file away)")
    if (above := _file_above(path)) is not None:
        raise OutputPathError(f"{what} '{path}': '{above}' is a file, not a folder; {fix}")
    return path


def check_output_file(path: str | os.PathLike[str], what: str, *, fix: str | None = None) -> Path:
    """Refuse, before any work, an output file ``path`` that is a folder or lies under a file."""
    path = Path(path)
    fix = fix or f"pass another {what}"
    if path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a folder, not a file; pass a file path (e.g. "
                              f"{path / 'result.json'}) or another {what}")
    if (above := _file_above(path)) is not None:
        raise OutputPathError(f"{what} '{path}': '{above}' is a file, not a folder; {fix}")
    return path


# --------------------------------------------------------------------------------------------- locks
def lock_path(target: str | os.PathLike[str]) -> Path:
    """Where the lock of ``target`` (a file or folder) lives: ``.<name>.lock`` next to it, so renaming or
    replacing ``target`` itself never touches its lock."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


class PathLock:
    """An exclusive, non-blocking ``fcntl.flock`` on :func:`lock_path` of ``target``, held until :meth:`release`.

    The lock file holds the owner's pid (for the refusal message) and is removed on release; the kernel drops
    the lock when the process dies, so a killed process never blocks the next one (its stale file is reused).
    A lock file removed and recreated between our open and our flock is detected (inode check) and retried.
    Folders created to hold the lock are removed again on release when they are still empty.
    """

    def __init__(self, target: str | os.PathLike[str], *, fix: str = "wait for it to finish or write elsewhere",
                 ) -> None:
        self.target = Path(target)
        self.path = lock_path(target)
        self.fix = fix
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> PathLock:
        self._created = self._make_parents(self.path.parent)
        try:
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, umask_mode())
                except OSError as exc:
                    raise write_failed(self.path, exc) from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    pid = f" (pid {owner})" if owner.isdigit() else ""
                    raise InUseError(f"'{self.target}' is in use by another mffzoo process{pid}; {self.fix}") from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the previous owner removed the file after we opened it: take the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self._remove_parents()
            raise
        self._fd = fd
        return self

    @staticmethod
    def _make_parents(folder: Path) -> list[Path]:
        missing = []
        p = folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(folder, exc) from None
        return missing  # deepest first

    def _remove_parents(self) -> None:
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)
        self._remove_parents()

    def __enter__(self) -> PathLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def exclusive(target: str | os.PathLike[str], *, fix: str = "wait for it to finish or write elsewhere") -> PathLock:
    """``with exclusive(path, fix=...):`` -- this process alone writes ``path``; a second one gets one
    :class:`~mffzoo.errors.InUseError` line at once, naming the path and the owner's pid, then ``fix``."""
    return PathLock(target, fix=fix)


def write_checksum(path: Path, digest: str) -> Path:
    return atomic_write(Path(f"{path}{CHECKSUM_SUFFIX}"), f"{digest}  {path.name}\n")


def verify_checksum(path: str | os.PathLike[str]) -> bool | None:
    """True/False if ``<path>.sha256`` exists and matches/does not; None when there is no checksum file."""
    side = Path(f"{path}{CHECKSUM_SUFFIX}")
    try:
        recorded = side.read_text().split()[0].lower()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, IndexError):
        return False
    return recorded == file_sha256(path)


def json_text(obj: Any) -> str:
    """Deterministic JSON: sorted keys (non-string keys as JSON writes them), 2-space indent, final newline."""
    plain = json.loads(json.dumps(obj, default=str))  # keys to strings first, so mixed keys sort too
    return json.dumps(plain, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as deterministic JSON."""
    return atomic_write(path, json_text(obj))


def read_json_object(path: str | os.PathLike[str], *, required: bool = False) -> dict[str, Any]:
    """A JSON object from a side file; {} when an optional one (provenance) is missing or unreadable.

    With ``required`` (a file whose content decides what is loaded: a model's config.json, an export sidecar),
    anything but UTF-8 text holding a JSON object raises :class:`ValueError` whose message is ``'PATH' <what is
    wrong>``, for the caller to wrap in its own error with the fix: a list or a number used to reach timm and
    fail there as a TypeError traceback.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        obj = json.loads(text)
    except FileNotFoundError:
        if required:
            raise ValueError(f"'{path}' does not exist") from None
        return {}
    except OSError as exc:
        if required:
            raise ValueError(f"'{path}' cannot be read ({exc.strerror or type(exc).__name__})") from None
        return {}
    except UnicodeDecodeError as exc:
        if required:
            raise ValueError(f"'{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                             f"{exc.start})") from None
        return {}
    except ValueError as exc:  # json.JSONDecodeError
        if required:
            raise ValueError(f"'{path}' is not valid JSON ({exc})") from None
        return {}
    if not isinstance(obj, dict):
        if required:
            kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
            raise ValueError(f"'{path}' holds {kind}, not a JSON object") from None
        return {}
    return obj


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_safetensors(data: bytes) -> Callable[[Any], None]:
    """A writer for serialized safetensors ``data`` with its header in one canonical byte order.

    safetensors serializes ``__metadata__`` from a Rust ``HashMap``, whose order changes from call to call, so
    identical tensors gave files with different hashes. The header is re-serialized with the metadata keys
    sorted (tensor entries keep their order, which follows the data offsets), padded to 8 bytes with spaces as
    the format requires; the tensor bytes are written unchanged, without a copy.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(memoryview(data)[8 + n:])

    return write


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mffzoo``, else ``~/.cache/mffzoo``: the parent of every cache (zoo home, demo data,
    features, TensorRT timing). As the XDG spec says, a relative ``XDG_CACHE_HOME`` is ignored."""
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "")
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "mffzoo"


def default_demo_root() -> Path:
    """Where the demo dataset is generated: ``$MFFZOO_DEMO_DATA``, else ``<cache root>/demo-data``, so every
    demo and CLI command reuses one copy."""
    override = os.environ.get("MFFZOO_DEMO_DATA")
    if override:
        return Path(override).expanduser()
    return cache_root() / "demo-data"


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int) -> Path:
    """Save a matplotlib figure through a temporary file in the same folder (the format follows the suffix),
    then close it: a reader never sees half an image and figures do not pile up in pyplot's registry."""
    import matplotlib.pyplot as plt  # optional heavy dependency: only figure-drawing callers pay for it

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
