"""What the zoo offers: registered tags (official downloads and local recipes) plus whatever is in the home."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .home import entry_dir, list_local

__all__ = ["ZooRow", "zoo_rows"]


@dataclass(frozen=True)
class ZooRow:
    arch: str
    tag: str
    source: str  # "official", "local" or "local (unregistered)"
    present: bool
    location: str
    metric: str


def _download_cache_path(url: str) -> Path:
    """Where timm/torch.hub caches a URL download (what `pretrained=True` reuses)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def zoo_rows() -> list[ZooRow]:
    from ..models.mff_vision_transformer import ZOO_TAGS, is_local_cfg

    rows: list[ZooRow] = []
    seen: set[tuple[str, str]] = set()
    for arch, tags in ZOO_TAGS.items():
        for tag, cfg in tags.items():
            seen.add((arch, tag))
            metric = next((n.split(": ", 1)[1] for n in cfg.get("notes") or () if n.startswith("reported: ")), "")
            if is_local_cfg(cfg):
                folder = entry_dir(arch, tag)
                local = [e for e in list_local(arch) if e.tag == tag]
                if local and not metric:
                    m = local[0].meta
                    metric = f"final loss {m['final_loss']:.4f}" if isinstance(m.get("final_loss"), float) else ""
                rows.append(ZooRow(arch, tag, "local", bool(local), str(folder), metric))
            else:
                cached = _download_cache_path(cfg["url"])
                rows.append(ZooRow(arch, tag, "official", cached.is_file(), cfg["url"], metric))
    for e in list_local():
        if (e.arch, e.tag) not in seen:
            loss = e.meta.get("final_loss")
            rows.append(ZooRow(e.arch, e.tag, "local (unregistered)", True, str(e.path),
                               f"final loss {loss:.4f}" if isinstance(loss, float) else ""))
    return rows
