"""Where evaluation results go: a JSON file, a printed table, and optionally the zoo entry's own metadata.

Writing measured metrics into ``mffzoo.json`` keeps the evidence for a set of weights next to the weights.
Writes are atomic (temp file + fsync + rename) so an interrupted run never corrupts an entry's metadata.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import io
from ..errors import WeightsNotFoundError
from ..zoo.catalog import schedule_mark
from ..zoo.home import CONFIG_NAME, META_NAME, entry_dir
from ..zoo.ref import parse_model_ref

__all__ = ["result_rows", "resolve_zoo_entry", "update_zoo_metrics"]


def result_rows(result: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """Table rows (model, task, read-out, top-1, top-5) for :func:`mffzoo.table.print_table`; the read-out is the
    result's own label (``cls token``, ``avg-pooled patch tokens``), else its key."""
    rows = []
    for pool, m in result["results"].items():
        rows.append([result["model"] + (" (random init)" if result.get("random_init") else ""), result["task"]
                     + schedule_mark(result.get("schedule")), m.get("readout", pool), f"{m['top1']:.2f}",
                     f"{m['top5']:.2f}" if "top5" in m else "-"])
    return rows, ["model", "task", "features", "top-1 %", "top-5 %"]


def resolve_zoo_entry(spec: str | os.PathLike[str]) -> Path:
    """The local model folder a MODEL spec names (a folder, ``local-dir:PATH`` or ``<arch>.<tag>`` in the zoo home)."""
    ref = parse_model_ref(spec)
    if ref.kind == "folder" and ref.path is not None and (ref.path / CONFIG_NAME).is_file():
        return ref.path
    if ref.kind == "name" and ref.arch and ref.tag:
        d = entry_dir(ref.arch, ref.tag)
        if (d / CONFIG_NAME).is_file():
            return d
    raise WeightsNotFoundError(
        f"--update-zoo needs a local zoo entry, but '{spec}' is not one; pass a model folder or an <arch>.<tag> "
        "that `mffzoo zoo` lists as local"
    )


def update_zoo_metrics(spec: str | os.PathLike[str], result: Mapping[str, Any]) -> Path:
    """Record ``result`` under ``eval["<task>:<dataset>"]`` in the entry's ``mffzoo.json`` (atomic)."""
    if result.get("random_init"):
        raise WeightsNotFoundError("refusing --update-zoo for a --random-init run: the metrics are not the weights'")
    folder = resolve_zoo_entry(spec)
    meta_path = folder / META_NAME
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    key = f"{result['task']}:{Path(str(result.get('data', 'data'))).name}"
    summary = {k: result[k] for k in ("data", "num_classes", "num_train", "num_val", "img_size", "k", "temperature",
                                      "config") if k in result}
    if result.get("schedule"):  # a fine-tune's: recipe vs run epochs, and whether it was cut short
        summary["schedule"] = result["schedule"]
    meta.setdefault("eval", {})[key] = {**summary, "results": result["results"],
                                        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return io.write_json(meta_path, meta).parent
