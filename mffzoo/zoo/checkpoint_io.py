"""Reading and writing checkpoints without trusting them.

Checkpoints are never unpickled: ``.pth`` files go through ``torch.load(weights_only=True)``, which refuses
to construct arbitrary classes; ``.safetensors`` hold nothing but tensors. mmengine checkpoints carry a
``meta`` dict of plain data (numpy scalars at most), which the allow-list below admits without running code.
"""

from __future__ import annotations

import os
import pickle
import warnings
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

__all__ = ["load_checkpoint_file", "atomic_torch_save", "SAFE_EXTRA_GLOBALS"]


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
    if verify_checksum(path) is False:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or truncated: its bytes do not match {path.name}.sha256, recorded when "
            "it was written; re-download it or use an earlier copy"
        )
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # SafetensorError, OSError, ValueError, ...: any failure means a bad file
            raise CheckpointError(
                f"checkpoint '{path}' is not a readable safetensors file ({_first_line(exc)}); "
                "re-download or re-export it"
            ) from None
    try:
        # weights_only never runs code, so any exception is the file's fault: the unpickler raises KeyError,
        # IndexError, struct.error ... on junk bytes, not only UnpicklingError. Its UserWarnings (unknown
        # pickle protocol, "weights_only" advice before a refusal) would precede our one line; they are muted.
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "global" in ln.lower()), None)
        if detail is None:  # not a pickled object at all: junk bytes or a foreign file
            why = next((ln for ln in lines if ln.startswith("Unsupported")), "unreadable pickle")
            raise CheckpointError(
                f"checkpoint '{path}' is corrupt or not a PyTorch checkpoint ({why[:80]}); "
                "re-download it or pass a .pth/.safetensors file"
            ) from None
        raise CheckpointError(
            f"refusing to load '{path}': it contains pickled objects that are not tensors ({detail[:160]}); "
            "only weights are loaded here, never code. Re-save its state_dict on a trusted machine "
            "(torch.save(ckpt['state_dict'], ...)) or convert it to safetensors"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or truncated, or not a PyTorch checkpoint ({_first_line(exc)}); "
            "re-download it or use an earlier copy"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead"
        )
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:160] if line else type(exc).__name__


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], *, checksum: bool = False) -> Path:
    """torch.save via temp file + fsync + rename: a crash mid-write never leaves a truncated checkpoint. With
    ``checksum``, ``<path>.sha256`` is written first and :func:`load_checkpoint_file` verifies it."""
    return atomic_write(path, lambda f: torch.save(obj, f), checksum=checksum)
