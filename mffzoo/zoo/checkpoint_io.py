"""Reading and writing checkpoints without trusting them.

Checkpoints are never unpickled: ``.pth`` files go through ``torch.load(weights_only=True)``, which refuses
to construct arbitrary classes; ``.safetensors`` hold nothing but tensors. mmengine checkpoints carry a
``meta`` dict of plain data (numpy scalars at most), which the allow-list below admits without running code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["load_checkpoint_file", "atomic_torch_save", "SAFE_EXTRA_GLOBALS"]


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar/dtype reconstructors: data, not code, and common in mmengine ``meta``."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return []
    out: list[Any] = [np.dtype, np.ndarray]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    out += [scalar, _reconstruct]
    out += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    return out


SAFE_EXTRA_GLOBALS = _numpy_safe_globals()


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``.pth``/``.pt``/``.bin``/``.safetensors`` file as plain data, or explain why not."""
    path = Path(path)
    if path.is_dir():
        from .home import WEIGHTS_NAME

        if (path / WEIGHTS_NAME).is_file():
            path = path / WEIGHTS_NAME
        else:
            raise CheckpointError(
                f"'{path}' is a folder without {WEIGHTS_NAME}; pass a checkpoint file or a model folder"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint '{path}' is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                "re-download or re-export it"
            ) from None
    try:
        with torch.serialization.safe_globals(SAFE_EXTRA_GLOBALS):
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or truncated ({msg[:160]}); re-download it or use an earlier copy"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead"
        )
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save via temp file + fsync + rename: a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
