"""Reading and writing checkpoints without trusting them.

Checkpoints are never unpickled: ``.pth`` files go through ``torch.load(weights_only=True)``, which refuses
to construct arbitrary classes; ``.safetensors`` hold nothing but tensors. mmengine checkpoints carry a
``meta`` dict of plain data (numpy scalars at most), which the allow-list below admits without running code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..io import atomic_write, verify_checksum
from .home import WEIGHTS_NAME

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]

__all__ = ["load_checkpoint_file", "atomic_torch_save", "why_unreadable", "SAFE_EXTRA_GLOBALS"]


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar/dtype reconstructors: data, not code, and common in mmengine ``meta``."""
    out: list[Any] = [np.dtype, np.ndarray, scalar, _reconstruct]
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    return out


SAFE_EXTRA_GLOBALS = _numpy_safe_globals()


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``.pth``/``.pt``/``.bin``/``.safetensors`` file as plain data, or explain why not."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            path = path / WEIGHTS_NAME
        else:
            raise CheckpointError(
                f"'{path}' is a folder without {WEIGHTS_NAME}; pass a checkpoint file or a model folder"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    checksum = verify_checksum(path)
    if checksum is False:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or truncated: its bytes do not match {path.name}.sha256, recorded when "
            "it was written; re-download it or use an earlier copy"
        )
    if checksum is None and path.suffix != ".safetensors":
        bad = _zip_crc_failure(path)
        if bad is not None:
            raise CheckpointError(
                f"checkpoint '{path}' is corrupt: '{bad}' inside its zip archive fails its CRC-32 check (bytes changed "
                "since it was written); re-download it or use an earlier copy"
            )
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception:  # SafetensorError, OSError, ValueError, ...: any failure means a bad file
            raise CheckpointError(f"checkpoint '{path}' {why_unreadable(path)}; re-download or re-export it") from None
    try:
        # weights_only never runs code, so any exception is the file's fault: the unpickler raises KeyError,
        # IndexError, struct.error ... on junk bytes, not only UnpicklingError. Its UserWarnings (unknown
        # pickle protocol, "weights_only" advice before a refusal) would precede our one line; they are muted.
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # a refused class names a Python module.attribute; junk text after a GLOBAL opcode names none
        blocked = re.search(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not|whose module)", str(exc))
        if blocked is None:  # not a pickled object at all: junk bytes, a cut file or a foreign one
            raise CheckpointError(_unreadable(path)) from None
        raise CheckpointError(
            f"refusing to load '{path}': it contains pickled objects that are not tensors (e.g. {blocked.group(1)}); "
            "only weights are loaded here, never code. Re-save its state_dict on a trusted machine "
            "(torch.save(ckpt['state_dict'], ...)) or convert it to safetensors"
        ) from None
    except Exception:
        raise CheckpointError(_unreadable(path)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead"
        )
    return obj


_ZIP_MAGIC = b"PK\x03\x04"


def _zip_crc_failure(path: Path) -> str | None:
    """The first member of a zip-format torch file whose bytes fail the CRC-32 its archive records, else None.

    torch's zip reader never checks those CRCs, so a flipped byte inside a tensor loaded as a silently wrong
    weight whenever no ``.sha256`` lies beside the file (downloads, other tools' files). Reading every member
    once costs one pass over the file, as the checksum does. A file that is not a complete zip gives None:
    ``torch.load`` then fails on it and :func:`why_unreadable` says why (truncated, not a checkpoint)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                return None
        with zipfile.ZipFile(path) as zf:
            return zf.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError):
        return None


def _unreadable(path: Path) -> str:
    why = why_unreadable(path)
    fix = ("pass a .pth/.safetensors checkpoint (or re-download it)" if why.startswith("is not")
           else "re-download it or use an earlier copy")
    return f"checkpoint '{path}' {why}; {fix}"


def why_unreadable(path: str | os.PathLike[str]) -> str:
    """What is wrong with a file that torch.load or safetensors refused, as the rest of a sentence
    (``is truncated: ...``), read from the file itself: their own messages run to paragraphs (miniz internals,
    weights_only advice) and cut to a line they stopped mid-sentence."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(8)
        if path.suffix == ".safetensors":
            return _safetensors_damage(path, head, size)
        if head.startswith(_ZIP_MAGIC):  # torch's format since 1.6: a zip archive
            try:
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
            except (zipfile.BadZipFile, EOFError, ValueError):
                return (f"is truncated: its zip archive ({size} bytes) ends without the central directory that "
                        "closes every complete one")
            if bad is not None:
                return f"is corrupt: '{bad}' inside its zip archive fails its CRC check"
            return "is corrupt: its zip archive is complete, but the checkpoint inside does not unpickle"
        if head[:1] == b"\x80":  # a pickle's protocol opcode: torch's legacy (pre-1.6) format
            return f"is truncated or corrupt: a legacy (non-zip) torch file of {size} bytes that breaks off mid-record"
        return ("is not a PyTorch checkpoint, or is corrupt from its first bytes: it starts with neither a zip nor a "
                "pickle header")
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _safetensors_damage(path: Path, head: bytes, size: int) -> str:
    """Why a safetensors file does not load: its 8-byte header length, JSON header and data offsets vs its size."""
    if len(head) < 8:
        return f"is truncated: {size} bytes, fewer than the 8 that give the header length"
    if size == 8:
        return "is truncated: it ends right after the 8 bytes that give the header length"
    n = int.from_bytes(head, "little")
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(min(n, size - 8))
    if not header.lstrip().startswith(b"{"):
        return "is not a safetensors file: no JSON header follows its first 8 bytes"
    if 8 + n > size:
        return f"is truncated: its header alone should be {n} bytes, but the file ends after {size - 8}"
    try:
        entries = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is corrupt: its JSON header does not parse as a safetensors header"
    if 8 + n + end > size:
        return f"is truncated: its header lists {8 + n + end} bytes of tensors and header, the file has {size}"
    return "is corrupt: its header and tensor data do not agree"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], *, checksum: bool = False) -> Path:
    """torch.save via temp file + fsync + rename: a crash mid-write never leaves a truncated checkpoint. With
    ``checksum``, ``<path>.sha256`` is written first and :func:`load_checkpoint_file` verifies it."""
    return atomic_write(path, lambda f: torch.save(obj, f), checksum=checksum)
