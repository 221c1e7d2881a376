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

from ..errors import ExportError
from ..io import file_sha256

__all__ = ["sidecar_path", "report_path", "read_sidecar", "state_dict_sha256", "file_sha256",
           "tool_versions", "SIDECAR_KEYS", "onnx_metadata", "METADATA_KEYS"]

# Keys every sidecar has (tests and serving code rely on them).
SIDECAR_KEYS = (
    "format", "artefact", "artefact_sha256", "model", "weights", "input", "output", "preprocessing", "precision",
    "opset", "tools", "profile", "parity",
)

# What an ONNX file carries in metadata_props (values are JSON): the serving half of its sidecar.
METADATA_KEYS = (
    "input_name", "input_layout", "input_dtype", "input_size", "batch", "value_range", "mean", "std",
    "interpolation", "crop_pct", "crop_mode", "output_name", "output_kind", "output_width", "architecture", "tag",
    "precision", "weights_sha256", "mffzoo_version", "parity",
)

_TOOLS = ("mffzoo", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxslim", "tensorrt")


def sidecar_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.json")


def report_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.parity.json")


def read_sidecar(artefact: str | os.PathLike[str]) -> dict[str, Any]:
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


def dist_version(module: str) -> str | None:
    """Version of the installed distribution that provides import name ``module``: ``onnxruntime`` may come
    from ``onnxruntime-gpu``, ``tensorrt`` from ``tensorrt-cu12``/``-cu13``."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    for dist in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def tool_versions() -> dict[str, str]:
    return {name: v for name in _TOOLS if (v := dist_version(name)) is not None}


def onnx_metadata(side: dict[str, Any]) -> dict[str, str]:
    """The ONNX ``metadata_props`` of an artefact, derived from its sidecar only (one source of truth).

    Every value is JSON, so a server reads them all with ``json.loads`` and needs no sidecar to preprocess.
    """
    inp, out, pre = side["input"], side["output"], side["preprocessing"]
    parity = side.get("parity") or {}
    verdict = "not checked" if "passed" not in parity else ("passed" if parity["passed"] else "failed")
    meta = {
        "input_name": inp["name"], "input_layout": inp["layout"], "input_dtype": inp["dtype"],
        "input_size": pre["input_size"], "batch": inp["batch"], "value_range": pre["value_range"],
        "mean": pre["mean"], "std": pre["std"], "interpolation": pre["interpolation"], "crop_pct": pre["crop_pct"],
        "crop_mode": pre.get("crop_mode") or "center", "output_name": out["name"], "output_kind": out["features"],
        "output_width": out["shape"][-1], "architecture": side["model"]["architecture"],
        "tag": side["model"]["tag"], "precision": side["precision"], "weights_sha256": side["weights"]["sha256"],
        "mffzoo_version": side["tools"].get("mffzoo"), "parity": verdict,
    }
    assert tuple(meta) == METADATA_KEYS
    return {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}  # one text per value, as the sidecar's
