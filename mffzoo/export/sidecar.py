"""The JSON written next to every artefact: what it is, how to feed it, where it came from, how well it matches.

A serving process needs the sidecar and the artefact only: input name and shape range, preprocessing, output
meaning. Provenance (weights hash, tool versions, TensorRT version + GPU) says when an artefact is stale.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..io import file_sha256

__all__ = ["sidecar_path", "report_path", "write_json", "read_sidecar", "state_dict_sha256", "file_sha256",
           "tool_versions", "SIDECAR_KEYS"]

# Keys every sidecar has (tests and serving code rely on them).
SIDECAR_KEYS = (
    "format", "artefact", "artefact_sha256", "model", "weights", "input", "output", "preprocessing", "precision",
    "opset", "tools", "profile", "parity",
)

_TOOLS = ("mffzoo", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxslim", "tensorrt")


def sidecar_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.json")


def report_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.parity.json")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomic write (temp + rename): a reader never sees half a sidecar; sorted keys, mode from the umask."""
    return io.write_json(path, data)


def read_sidecar(artefact: str | os.PathLike[str]) -> dict[str, Any]:
    from ..errors import ExportError

    path = sidecar_path(artefact)
    if not Path(artefact).is_file():
        raise ExportError(f"artefact '{artefact}' does not exist; pass a file written by mffzoo export")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"'{path}' is missing: only artefacts written by mffzoo export (with their sidecar) "
                          "can be re-checked") from None
    except ValueError:
        raise ExportError(f"sidecar '{path}' is not valid JSON; re-export the model") from None


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes): identical weights, identical hash."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    out = {}
    for name in _TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
