"""Writing files so that they can be checked and shared: atomic, umask-respecting, byte-reproducible.

Everything the package writes (checkpoints, weights, sidecars, results) goes through :func:`atomic_write`: a
temporary file in the destination folder, fsync, then ``os.replace``, so a reader or a crash never sees half a
file. ``tempfile.mkstemp`` creates files with mode 0600; the result is re-moded to what ``open()`` would give
(0666 minus the umask), so a shared ``MFFZOO_HOME`` works. JSON is written with sorted keys and safetensors
headers in a canonical order, so identical content gives identical bytes (and the same ``sha256sum``).
Also the one place that says where caches live (:func:`cache_root`, :func:`default_demo_root`) and how a
figure reaches the disk (:func:`save_figure`). Standard library only (matplotlib only inside
:func:`save_figure`): this module sits below everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "read_json_object", "json_text", "file_sha256", "canonical_safetensors",
           "umask_mode", "CHECKSUM_SUFFIX", "write_checksum", "verify_checksum", "cache_root", "default_demo_root",
           "save_figure"]

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

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self._f.write(data)

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


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


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from an optional side file (provenance, config); {} when it is missing or unreadable."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
