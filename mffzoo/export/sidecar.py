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
from ..io import file_sha256, read_json_object

__all__ = ["sidecar_path", "report_path", "read_sidecar", "state_dict_sha256", "file_sha256",
           "tool_versions", "SIDECAR_KEYS", "onnx_metadata", "METADATA_KEYS", "LATER_METADATA_KEYS",
           "sidecar_outputs"]

# Keys every sidecar has (tests and serving code rely on them).
SIDECAR_KEYS = (
    "format", "artefact", "artefact_sha256", "model", "weights", "input", "output", "preprocessing", "precision",
    "opset", "tools", "profile", "parity",
)

# What an ONNX file carries in metadata_props (values are JSON): the serving half of its sidecar.
METADATA_KEYS = (
    "input_name", "input_layout", "input_dtype", "input_size", "batch", "value_range", "mean", "std",
    "interpolation", "crop_pct", "crop_mode", "output_name", "output_kind", "output_width", "architecture", "tag",
    "precision", "weights_sha256", "mffzoo_version", "parity", "outputs", "dynamic_size",
)
# Keys added after the first release: an older artefact's file lacks them, which is not a disagreement.
LATER_METADATA_KEYS = ("outputs", "dynamic_size")

_TOOLS = ("mffzoo", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "onnxslim", "tensorrt")


def sidecar_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.json")


def report_path(artefact: str | os.PathLike[str]) -> Path:
    return Path(f"{artefact}.parity.json")


# What the readers of a sidecar index (``export --check-only``, the ONNX metadata check, the Triton repository):
# section -> keys it must hold. ``{}``, a list or a sidecar missing one of these was a KeyError/TypeError traceback.
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("architecture", "tag"),
    "weights": ("sha256",),
    "input": ("name", "dtype", "layout", "batch"),
    "output": ("name", "shape", "features"),
    "preprocessing": ("input_size", "value_range", "mean", "std", "interpolation", "crop_pct"),
    "tools": (),
    "profile": ("model",),
}


def read_sidecar(artefact: str | os.PathLike[str]) -> dict[str, Any]:
    """An artefact's sidecar, checked once here for everything its readers index, so that a damaged or hand-edited
    one is one line naming the file and the missing key, wherever it is read."""
    path = sidecar_path(artefact)
    if not Path(artefact).is_file():
        raise ExportError(f"artefact '{artefact}' does not exist; pass a file written by mffzoo export")
    if not path.exists():
        raise ExportError(f"'{path}' is missing: only artefacts written by mffzoo export (with their sidecar) "
                          "can be re-checked")
    fix = f"re-export the model (mffzoo export writes {path.name} with {Path(artefact).name})"
    try:
        side = read_json_object(path, required=True)
    except ValueError as exc:
        raise ExportError(f"sidecar {exc}; {fix}") from None
    problem = _missing_in(side)
    if problem:
        raise ExportError(f"sidecar '{path}' {problem}; {fix}")
    return side


def _missing_in(side: dict[str, Any]) -> str | None:
    """What a sidecar lacks (the first missing key, dotted), or None when every key its readers use is there."""
    missing = [k for k in SIDECAR_KEYS if k not in side]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        return f"has no '{missing[0]}' key{more}"
    for section, keys in _SECTION_KEYS.items():
        if not isinstance(side[section], dict):
            return f"has '{section}' {json.dumps(side[section])[:40]}, not a JSON object"
        for k in keys:
            if k not in side[section]:
                return f"has no '{section}.{k}' key"
    batch, shape = side["input"]["batch"], side["output"]["shape"]
    if not isinstance(batch, dict) or not {"min", "max"} <= set(batch):
        return "has no 'input.batch.min'/'input.batch.max' keys"
    if not isinstance(shape, list) or not shape:
        return f"has 'output.shape' {json.dumps(shape)[:40]}, not a list of dimensions"
    if side["format"] == "trt" and "onnx" not in side:  # a TensorRT plan's I/O is read from the ONNX it names
        return "has no 'onnx' key (the ONNX file a TensorRT engine was built from)"
    return None


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


def sidecar_outputs(side: dict[str, Any]) -> list[dict[str, Any]]:
    """Every output a sidecar describes (``outputs``; a sidecar older than that key has its one ``output``)."""
    outs = side.get("outputs")
    return outs if isinstance(outs, list) and outs else [side["output"]]


def onnx_metadata(side: dict[str, Any]) -> dict[str, str]:
    """The ONNX ``metadata_props`` of an artefact, derived from its sidecar only (one source of truth).

    Every value is JSON, so a server reads them all with ``json.loads`` and needs no sidecar to preprocess.
    ``outputs`` lists every output (name, shape; for levels block, stride, channels); ``dynamic_size`` is the
    height/width range in pixels (null: the one ``input_size``).
    """
    inp, out, pre = side["input"], side["output"], side["preprocessing"]
    outs = sidecar_outputs(side)
    keep = ("name", "shape", "layout", "block", "stride", "channels", "norm")
    parity = side.get("parity") or {}
    verdict = "not checked" if "passed" not in parity else ("passed" if parity["passed"] else "failed")
    meta = {
        "input_name": inp["name"], "input_layout": inp["layout"], "input_dtype": inp["dtype"],
        "input_size": pre["input_size"], "batch": inp["batch"], "value_range": pre["value_range"],
        "mean": pre["mean"], "std": pre["std"], "interpolation": pre["interpolation"], "crop_pct": pre["crop_pct"],
        "crop_mode": pre.get("crop_mode") or "center", "output_name": out["name"], "output_kind": out["features"],
        "output_width": outs[0].get("channels", out["shape"][-1]), "architecture": side["model"]["architecture"],
        "tag": side["model"]["tag"], "precision": side["precision"], "weights_sha256": side["weights"]["sha256"],
        "mffzoo_version": side["tools"].get("mffzoo"), "parity": verdict,
        "outputs": [{k: o[k] for k in keep if k in o} for o in outs], "dynamic_size": inp.get("dynamic_size"),
    }
    assert tuple(meta) == METADATA_KEYS
    return {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}  # one text per value, as the sidecar's
