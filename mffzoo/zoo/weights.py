"""The one place that decides where a model's weights come from.

``timm.create_model(name, pretrained=True)`` reaches :func:`resolve_pretrained` through our entrypoints;
:func:`load_model` is the front door for the CLI and every other tool (export, eval, bench): it accepts a
registered name with or without tag, ``hf-hub:org/name``, ``local-dir:PATH``, a model folder, or a checkpoint
file of any supported format.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import CheckpointError, WeightsNotFoundError
from .home import CONFIG_NAME, WEIGHTS_NAME, entry_dir, list_local, zoo_home

_logger = logging.getLogger("mffzoo")

__all__ = ["resolve_pretrained", "load_model", "parse_model_spec"]

_SOURCE_KEYS = ("file", "url", "hf_hub_id", "state_dict")


def _zoo_tags(arch: str) -> dict[str, dict[str, Any]]:
    from ..models.mff_vision_transformer import ZOO_TAGS

    return ZOO_TAGS.get(arch, {})


def _missing(arch: str, tag: str | None) -> WeightsNotFoundError:
    tags = _zoo_tags(arch)
    notes = tags.get(tag or "", {}).get("notes") or ()
    produce = next((n.split(": ", 1)[1] for n in notes if n.startswith("produce with: ")), None)
    if produce is None:
        short = arch.replace("mff_vit_", "vit").split("_")[0].replace("small", "s").replace("base", "b")
        produce = f"mffzoo train recipes/{short.replace('large', 'l')}.yaml"
    what = f"{arch}.{tag}" if tag else arch
    return WeightsNotFoundError(
        f"no local weights for {what} in {zoo_home()} (set MFFZOO_HOME to use another zoo); produce them with "
        f"`{produce}` (or `mffzoo train recipes/demo.yaml` for a 5-minute demo), or pass pretrained=False"
    )


def _saved_model_args(weights: Path) -> dict[str, Any]:
    """model_args recorded next to local weights (a demo-sized ViT-S differs from the registered one)."""
    cfg = weights.parent / CONFIG_NAME
    if not cfg.is_file():
        return {}
    try:
        return dict(json.loads(cfg.read_text()).get("model_args") or {})
    except (OSError, ValueError):
        return {}


def _preference(entry: Any) -> tuple[int, int]:
    """Best local weights first: MFF before MAE before anything else (demo), longer schedules first."""
    m = re.search(r"(\d+)e$", entry.tag)
    epochs = int(m.group(1)) if m else (300 if entry.tag.endswith("local") else 0)
    family = 0 if entry.tag.startswith("mff") else 1 if entry.tag.startswith("mae") else 2
    return family, -epochs


def _file_source(overlay: dict[str, Any], path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A weights file of any supported format, converted here rather than by timm's loader: its tensors (and
    the config.json beside ours) decide the architecture kwargs, including a classifier's head (num_classes,
    avg pool + fc_norm), which timm would otherwise drop against the tag's ``num_classes=0``."""
    from .checkpoint_io import load_checkpoint_file
    from .convert import convert_state_dict

    path = Path(path).expanduser()
    conv = convert_state_dict(load_checkpoint_file(path))
    args = {**conv.arch_kwargs(), **_saved_model_args(path)}
    # timm loads ``state_dict`` first; ``file`` stays as the record of where the weights came from
    overlay.update(file=str(path), state_dict=conv.backbone, num_classes=args["num_classes"])
    return overlay, args


def resolve_pretrained(
    arch: str, pretrained_cfg: Any = None, overlay: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
    """Point a local tag at its folder in the *current* zoo home; leave downloads and hub/folder cfgs to timm.

    Returns ``(pretrained_cfg, pretrained_cfg_overlay, model_args)`` where ``model_args`` are the architecture
    kwargs the weights need (read from local weights and their config.json; empty for downloads).
    """
    overlay = dict(overlay or {})
    explicit_cfg = pretrained_cfg is not None and not isinstance(pretrained_cfg, str)
    if overlay.get("file") and not explicit_cfg and not any(overlay.get(k) for k in _SOURCE_KEYS if k != "file"):
        return (pretrained_cfg, *_file_source(overlay, overlay["file"]))  # pretrained_cfg_overlay=dict(file=...)
    if any(overlay.get(k) for k in _SOURCE_KEYS) or explicit_cfg:
        return pretrained_cfg, overlay or None, {}  # explicit url/hub/state dict, or a cfg from hf-hub:/local-dir:
    from ..models.mff_vision_transformer import is_local_cfg

    tags = _zoo_tags(arch)
    tag = pretrained_cfg
    if tag is None:
        default = next(iter(tags), None)
        if default is not None and not is_local_cfg(tags[default]):
            return None, overlay or None, {}  # default is an official download
        entries = list_local(arch)
        if not entries:
            raise _missing(arch, default)
        entries.sort(key=_preference)
        best = entries[0]
        _logger.warning("mffzoo: %s pretrained=True -> local weights %s.%s (%s)", arch, arch, best.tag, best.path)
        return ((best.tag if best.tag in tags else None), *_file_source(overlay, best.weights))
    if tag in tags and not is_local_cfg(tags[tag]):
        return tag, overlay or None, {}
    path = entry_dir(arch, tag) / WEIGHTS_NAME
    if not path.is_file():
        raise _missing(arch, tag)
    _logger.info("mffzoo: %s.%s -> %s", arch, tag, path)
    return ((tag if tag in tags else None), *_file_source(overlay, path))


def parse_model_spec(spec: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Map a user's MODEL argument to ``(timm name, create_model kwargs)``."""
    s = str(spec)
    if s.startswith(("hf-hub:", "local-dir:")):
        return s, {"pretrained": True}
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / CONFIG_NAME).is_file():
            raise WeightsNotFoundError(
                f"folder '{p}' has no {CONFIG_NAME}; pass a zoo/model folder (mffzoo convert writes one) or a name"
            )
        return f"local-dir:{p}", {"pretrained": True}
    if p.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or p.is_file():
        from .checkpoint_io import load_checkpoint_file
        from .convert import convert_state_dict

        conv = convert_state_dict(load_checkpoint_file(p))
        return conv.arch_name(), {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": conv.backbone},
                                   **conv.arch_kwargs()}
    return s, {"pretrained": True}


def load_model(
    spec: str | os.PathLike[str], *, pretrained: bool = True, random_init: bool = False, **kwargs: Any
) -> torch.nn.Module:
    """Create a backbone from any MODEL spec; ``random_init`` builds the architecture without weights."""
    import timm

    from .. import models  # noqa: F401  (registers the mff_* architectures)
    from ..errors import MffzooError

    if random_init:
        pretrained = False
    name, extra = parse_model_spec(spec) if (pretrained or Path(str(spec)).expanduser().exists()) else (str(spec), {})
    if not pretrained:  # keep the architecture a folder/checkpoint describes, drop its weights
        if name.startswith("local-dir:"):
            cfg = json.loads((Path(name[len("local-dir:"):]) / CONFIG_NAME).read_text())
            name = cfg["architecture"]
            extra = {**(cfg.get("model_args") or {}), "num_classes": cfg.get("num_classes", 0)}
        extra.pop("pretrained_cfg_overlay", None)
    extra.update(kwargs)
    extra["pretrained"] = pretrained
    try:
        return timm.create_model(name, **extra)
    except MffzooError:
        raise
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith("Unknown model"):
            raise WeightsNotFoundError(
                f"unknown model '{spec}'; see `mffzoo zoo` for names, or pass a model folder / checkpoint file"
            ) from None
        raise
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"model '{spec}': {exc}; check the path") from None
    except SafetensorError as exc:  # timm's own loader reading a folder's model.safetensors
        raise CheckpointError(f"the weights of '{spec}' are not a readable safetensors file "
                              f"({str(exc).splitlines()[0][:120]}); re-download or re-export them") from None
    except json.JSONDecodeError as exc:  # timm reading a folder's config.json
        raise CheckpointError(f"the {CONFIG_NAME} of '{spec}' is not valid JSON ({exc}); re-download or re-export "
                              "the model folder") from None
