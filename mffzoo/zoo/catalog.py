"""What the zoo offers: registered tags (official downloads and local recipes), whatever is in the home, and
mffzoo models in the local Hugging Face Hub cache."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch.hub
from huggingface_hub import constants as hf_constants
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from ..archs import TAGS, LocalTag
from .home import CONFIG_NAME, META_NAME, entry_dir, list_local

__all__ = ["ZooRow", "zoo_rows", "hub_rows", "download_cache_path", "schedule_mark"]


@dataclass(frozen=True)
class ZooRow:
    arch: str
    tag: str
    source: str  # "official", "local", "local (unregistered)" or "hub"
    present: bool
    location: str
    metric: str

    @property
    def name(self) -> str:
        """What to pass to ``timm.create_model``."""
        return self.location if self.source == "hub" else f"{self.arch}.{self.tag}"


def download_cache_path(url: str) -> Path:
    """Where timm/torch.hub caches a URL download (what `pretrained=True` reuses)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _first_top1(obj: object) -> float | None:
    """The first top-1 number in an eval record, whatever its nesting (knn: per read-out; linear: flat)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("top1"), (int, float)):
            return float(obj["top1"])
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    return next((v for v in map(_first_top1, children) if v is not None), None)


def schedule_mark(schedule: object) -> str:
    """`` (shortened: 1 of 5 epochs)`` for a result whose schedule was cut below its recipe's (a fine-tune run
    with ``--set train.epochs=1``), else '': such a number is no evidence next to full-schedule ones."""
    if not isinstance(schedule, dict) or not schedule.get("shortened"):
        return ""
    return f" (shortened: {schedule.get('epochs')} of {schedule.get('recipe_epochs')} epochs)"


def _top1s(rec: object) -> str | None:
    """``39.6 (cls token) / 45.2 (avg-pooled patch tokens)``: each read-out's top-1 with what it read out (the
    result's ``readout``; records of older evaluations have only the key, ``cls`` / ``avg``); None for a record
    of another shape."""
    results = rec.get("results") if isinstance(rec, dict) else None
    if not isinstance(results, dict) or not results or not all(
            isinstance(v, dict) and isinstance(v.get("top1"), (int, float)) for v in results.values()):
        return None
    out = []
    order = {"cls": 0, "avg": 1}  # as eval reports them (mffzoo.json keeps its keys sorted)
    for key, v in sorted(results.items(), key=lambda kv: order.get(kv[0], 2)):
        label = v.get("readout") or (key if key in order else None)
        out.append(f"{float(v['top1']):.1f}" + (f" ({label})" if label else ""))
    return " / ".join(out)


def _measured(meta: dict) -> str:
    """Metrics measured by `mffzoo eval --update-zoo` (evidence next to the weights), each with its read-out, else
    the final loss with what it averages (``final_loss_kind``; older runs recorded a last log window's mean)."""
    parts = []
    for key, rec in (meta.get("eval") or {}).items():
        top1 = _top1s(rec)
        if top1 is None and (first := _first_top1(rec)) is not None:
            top1 = f"{first:.1f}"
        if top1 is not None:
            parts.append(f"{key} top-1 {top1}" + schedule_mark(rec.get("schedule")))
    if not parts and isinstance(meta.get("final_loss"), float):
        parts.append(f"final loss ({meta.get('final_loss_kind') or 'last log window'}) {meta['final_loss']:.4f}")
    return ", ".join(parts)


def zoo_rows() -> list[ZooRow]:
    rows: list[ZooRow] = []
    seen: set[tuple[str, str]] = set()
    for arch, tags in TAGS.items():
        for tag, entry in tags.items():
            seen.add((arch, tag))
            if isinstance(entry, LocalTag):
                local = [e for e in list_local(arch) if e.tag == tag]
                metric = _measured(local[0].meta) if local else ""
                rows.append(ZooRow(arch, tag, "local", bool(local), str(entry_dir(arch, tag)), metric))
            else:
                cached = download_cache_path(entry.url)
                rows.append(ZooRow(arch, tag, "official", cached.is_file(), entry.url, entry.reported))
    for e in list_local():
        if (e.arch, e.tag) not in seen:
            rows.append(ZooRow(e.arch, e.tag, "local (unregistered)", True, str(e.path), _measured(e.meta)))
    return rows + hub_rows()


def hub_rows() -> list[ZooRow]:
    """mffzoo models in the local Hugging Face Hub cache (repos made by ``mffzoo push`` and downloaded once):
    they load offline as ``hf-hub:org/name``. Repos we never downloaded are not known here."""
    try:
        cache = scan_cache_dir(hf_constants.HF_HUB_CACHE)  # read now: scan_cache_dir's default is frozen at import
    except (CacheNotFound, OSError):
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revs = sorted(repo.revisions, key=lambda r: ("main" not in r.refs, -r.last_modified))
        snap = next((r.snapshot_path for r in revs if (r.snapshot_path / META_NAME).is_file()), None)
        if snap is None:
            continue  # not an mffzoo model
        try:
            meta = json.loads((snap / META_NAME).read_text())
            arch = meta.get("arch") or json.loads((snap / CONFIG_NAME).read_text()).get("architecture", "?")
        except (OSError, ValueError):
            continue
        rows.append(ZooRow(arch, meta.get("tag") or "", "hub", True, f"hf-hub:{repo.repo_id}", _measured(meta)))
    return rows
