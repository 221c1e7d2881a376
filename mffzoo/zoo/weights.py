"""The one place that decides where a model's weights come from.

``timm.create_model(name, pretrained=True)`` reaches :func:`resolve_pretrained` through the entrypoints in
:mod:`mffzoo.zoo.mff_vision_transformer`;
:func:`load_model` is the front door for the CLI and every other tool (export, eval, bench): it accepts a
registered name with or without tag, ``hf-hub:org/name``, ``local-dir:PATH``, a model folder, or a checkpoint
file of any supported format, as :func:`mffzoo.zoo.ref.parse_model_ref` reads them. What a registered tag is
(an official download, or a local tag a recipe produces) is the typed table :data:`mffzoo.archs.TAGS`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.models import PretrainedCfg

from ..archs import ARCHS, TAGS, LocalTag, ZooTag, local_tag
from ..config import check_path
from ..errors import CheckpointError, ConfigError, MffzooError, WeightsNotFoundError
from ..io import read_json_object
from .checkpoint_io import load_checkpoint_file, why_unreadable
from .convert import Converted, convert_state_dict
from .home import CONFIG_NAME, EXTRAS_NAME, WEIGHTS_NAME, entry_dir, list_local, zoo_home
from .ref import ModelRef, parse_model_name, parse_model_ref

_logger = logging.getLogger("mffzoo")

__all__ = ["resolve_pretrained", "load_model", "parse_model_spec", "local_weights", "weights_pretrained_cfg",
           "read_model_config", "folder_weights_file"]

_SOURCE_KEYS = ("file", "url", "hf_hub_id", "state_dict")


def _zoo_tags(arch: str) -> dict[str, ZooTag]:
    return TAGS.get(arch, {})


def _tag_listing(arch: str) -> str:
    """Every tag of ``arch`` with where its weights come from (what an unknown-tag error offers instead)."""
    tags = _zoo_tags(arch).values()
    official = [t.tag for t in tags if not isinstance(t, LocalTag)]
    recipes = [f"{t.tag} ({t.recipe})" for t in tags if isinstance(t, LocalTag)]
    local = sorted(e.tag for e in list_local(arch))
    return (f"official downloads: {', '.join(official) or 'none'}; produced by `mffzoo train RECIPE`: "
            f"{', '.join(recipes) or 'none'}; local folders in {zoo_home()}: {', '.join(local) or 'none'}")


def _missing(arch: str, tag: str | None) -> WeightsNotFoundError:
    tags = _zoo_tags(arch)
    if tag is not None and tag not in tags:
        return WeightsNotFoundError(
            f"{arch} has no tag '{tag}' (not registered, no folder {entry_dir(arch, tag)}); its tags: "
            f"{_tag_listing(arch)}; `mffzoo zoo` lists them all"
        )
    entry = local_tag(arch, tag)
    produce = entry.produce if entry is not None else None
    what = f"{arch}.{tag}" if tag else arch
    how = f"produce them with `{produce}` (or `mffzoo train recipes/demo.yaml` for a 5-minute demo), " * bool(produce)
    return WeightsNotFoundError(
        f"no local weights for {what} in {zoo_home()} (set MFFZOO_HOME to use another zoo); {how}"
        "or pass pretrained=False"
    )


_CONFIG_FIX = "re-download or re-export the model folder (`mffzoo convert CHECKPOINT DEST` writes a complete one)"


def read_model_config(folder: str | os.PathLike[str], *, need_arch: bool = True) -> dict[str, Any]:
    """A model folder's config.json, checked before timm parses it: a list, a number, non-UTF-8 bytes or a
    section of the wrong type reached timm's ``_parse_model_cfg``/``PretrainedCfg`` and failed there as a
    TypeError/KeyError traceback. ``need_arch``: the folder is loaded as ``local-dir:`` (timm needs the name)."""
    path = Path(folder) / CONFIG_NAME
    try:
        cfg = read_json_object(path, required=True)
    except ValueError as exc:
        raise CheckpointError(f"model config {exc}; {_CONFIG_FIX}") from None
    arch = cfg.get("architecture")
    if need_arch and (not isinstance(arch, str) or not arch):
        problem = ("has no 'architecture' (the timm model name)" if arch is None
                   else f"has 'architecture' {json.dumps(arch)}, not a model name")
        raise CheckpointError(f"model config '{path}' {problem}; {_CONFIG_FIX}")
    for key in ("model_args", "pretrained_cfg"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise CheckpointError(f"model config '{path}': '{key}' is {json.dumps(cfg[key])[:40]}, not a JSON object; "
                                  f"{_CONFIG_FIX}")
    # timm builds a PretrainedCfg from its pretrained_cfg (or, in timm's older single-dict format, from the rest)
    described = cfg["pretrained_cfg"] if "pretrained_cfg" in cfg else {
        k: v for k, v in cfg.items() if k not in ("architecture", "num_features", "labels")}
    unknown = sorted(set(described) - _CFG_FIELDS)
    if need_arch and unknown:
        where = "in 'pretrained_cfg'" if "pretrained_cfg" in cfg else "at the top level (no 'pretrained_cfg')"
        raise CheckpointError(f"model config '{path}' has keys {where} that timm's PretrainedCfg does not know: "
                              f"{', '.join(unknown[:5])}; {_CONFIG_FIX}")
    return cfg


def _folder_config(weights: Path) -> dict[str, Any]:
    """The timm config.json beside a weights file ({} when there is none; one that is there must be readable: its
    model_args decide the architecture, and ignoring a damaged one would rebuild the wrong model)."""
    if not (weights.parent / CONFIG_NAME).exists():
        return {}
    return read_model_config(weights.parent, need_arch=False)


# What timm's ``local-dir:`` loader (timm.models._hub.load_state_dict_from_path) picks in a folder: these names
# first, then the first file of each suffix in this order. pretrain_extras.safetensors holds no backbone.
_FOLDER_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_FOLDER_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin")


def folder_weights_file(folder: str | os.PathLike[str]) -> Path:
    """The weights file of a model folder, chosen as timm's ``local-dir:`` loader chooses it."""
    folder = Path(folder)
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    for suffix in _FOLDER_SUFFIXES:
        found = sorted(p for p in folder.glob(f"*{suffix}") if p.name != EXTRAS_NAME and p.is_file())
        if found:
            return found[0]
    raise WeightsNotFoundError(f"model folder '{folder}' has no weights ({', '.join(_FOLDER_WEIGHTS)} or any "
                               f"{'/'.join(_FOLDER_SUFFIXES)} file); {_CONFIG_FIX}")


def _saved_model_args(weights: Path) -> dict[str, Any]:
    """model_args recorded next to local weights (a demo-sized ViT-S differs from the registered one)."""
    return dict(_folder_config(weights).get("model_args") or {})


_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}
# Where the weights come from is decided by the loader; everything else a folder records describes the weights.
_SOURCE_FIELDS = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "custom_load"}
_TUPLE_FIELDS = {"input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size", "test_pool_size"}


def weights_pretrained_cfg(weights: Path, model_args: Mapping[str, Any]) -> dict[str, Any]:
    """pretrained_cfg entries that describe local weights, so timm's ``resolve_data_config`` feeds them right.

    The folder's config.json (preprocessing, license, tag) comes first; the tensors then fix what they decide
    (input size, classes); a zoo entry ``<arch>.<tag>/`` without a recorded tag (older mffzoo) names it.
    """
    saved = _folder_config(weights).get("pretrained_cfg") or {}
    out = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v) for k, v in saved.items()
           if k in _CFG_FIELDS and k not in _SOURCE_FIELDS}
    size = model_args.get("img_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        out["input_size"] = (int(model_args.get("in_chans", 3)), int(h), int(w))
    if "num_classes" in model_args:
        out["num_classes"] = int(model_args["num_classes"])
    folder = parse_model_name(weights.parent.name)
    if not out.get("tag") and folder.tag and folder.name in ARCHS:
        out["tag"] = folder.tag
    return out


def local_weights(path: str | os.PathLike[str], conv: Converted | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(pretrained_cfg overlay, model kwargs)`` for a weights file of any supported format, converted here rather
    than by timm's loader: its tensors (and the config.json beside ours) decide the architecture kwargs,
    including a classifier's head (num_classes, avg pool + fc_norm), and the data config the weights need."""
    path = Path(path).expanduser()
    if conv is None:
        conv = convert_state_dict(load_checkpoint_file(path))
    args = {**conv.arch_kwargs(), **_saved_model_args(path)}
    # timm loads ``state_dict`` first; ``file`` stays as the record of where the weights came from
    overlay = {**weights_pretrained_cfg(path, args), "file": str(path), "state_dict": conv.backbone}
    return overlay, args


def _preference(entry: Any) -> tuple[int, int]:
    """Best local weights first: MFF before MAE before anything else (demo), longer schedules first; runs that
    stopped short of their tag's schedule (``<tag>-partial``) last."""
    m = re.search(r"(\d+)e$", entry.tag)
    epochs = int(m.group(1)) if m else (300 if entry.tag.endswith("local") else 0)
    family = 0 if entry.tag.startswith("mff") else 1 if entry.tag.startswith("mae") else 2
    family += 3 * entry.tag.endswith("-partial")
    return family, -epochs


def _file_source(overlay: dict[str, Any], path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Local weights behind a tag or ``pretrained_cfg_overlay=dict(file=...)``; the caller's overlay keys win over
    what the weights' folder records, except the head size, which the tensors fix."""
    cfg, args = local_weights(path)
    return {**cfg, **{k: v for k, v in overlay.items() if k not in ("file", "state_dict")},
            "num_classes": cfg["num_classes"]}, args


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
    if explicit_cfg and _cfg_get(pretrained_cfg, "source") == "local-dir" and not any(
            overlay.get(k) for k in _SOURCE_KEYS):
        return pretrained_cfg, _local_dir_source(_cfg_get(pretrained_cfg, "file"), overlay), {}
    if any(overlay.get(k) for k in _SOURCE_KEYS) or explicit_cfg:
        return pretrained_cfg, overlay or None, {}  # explicit url/hub/state dict, or a cfg from hf-hub:
    tags = _zoo_tags(arch)
    tag = pretrained_cfg
    if tag is None:
        default = next(iter(tags), None)
        if default is not None and not isinstance(tags[default], LocalTag):
            return None, overlay or None, {}  # default is an official download
        entries = list_local(arch)
        if not entries:
            raise _missing(arch, default)
        entries.sort(key=_preference)
        best = entries[0]
        _logger.warning("mffzoo: %s pretrained=True -> local weights %s.%s (%s)", arch, arch, best.tag, best.path)
        return _entry_source(tags, best.tag, overlay, best.weights)
    if tag in tags and not isinstance(tags[tag], LocalTag):
        return tag, overlay or None, {}
    path = entry_dir(arch, tag) / WEIGHTS_NAME
    if not path.is_file():
        raise _missing(arch, tag)
    _logger.info("mffzoo: %s.%s -> %s", arch, tag, path)
    return _entry_source(tags, tag, overlay, path)


def _cfg_get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _local_dir_source(folder: Any, overlay: dict[str, Any]) -> dict[str, Any]:
    """``local-dir:FOLDER``: its weights read by :func:`load_checkpoint_file` (the one checkpoint reader: checksum,
    zip CRC, weights-only unpickling, one-line errors) rather than by timm's loader, whose refusal of a pickle
    carrying code or of a damaged file was a multi-line RuntimeError traceback. timm then loads the state dict
    (and still runs the checkpoint filter, which converts and checks it against the model)."""
    weights = folder_weights_file(folder)
    return {**overlay, "source": "", "file": str(weights), "state_dict": load_checkpoint_file(weights)}


def _entry_source(
    tags: Mapping[str, ZooTag], tag: str, overlay: dict[str, Any], path: Path
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """A zoo entry: its registered tag's cfg, or for an unregistered tag the default cfg without the default
    weights' description (timm's base for the preprocessing the entry does not record)."""
    if tag in tags:
        return (tag, *_file_source(overlay, path))
    cfg, args = _file_source(overlay, path)
    return None, {"description": None, "notes": None, "origin_url": None, **cfg}, args


def _unknown(spec: Any) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"unknown model '{spec}'; see `mffzoo zoo` for names, or pass a model folder / checkpoint file")


def _timm_args(ref: ModelRef, pretrained: bool) -> tuple[str, dict[str, Any]]:
    """``(timm name, create_model kwargs)`` for a parsed MODEL. A folder or weights file keeps the architecture it
    describes; ``pretrained`` adds its weights (timm's ``local-dir:`` loader, or the converted tensors)."""
    if ref.kind == "missing":
        raise _unknown(ref.spec)  # written as a path, and nothing is there: no timm name either
    if ref.kind == "folder":
        assert ref.path is not None
        if not (ref.path / CONFIG_NAME).is_file():
            raise WeightsNotFoundError(f"folder '{ref.path}' has no {CONFIG_NAME}; pass a zoo/model folder "
                                       "(mffzoo convert writes one) or a name")
        cfg = read_model_config(ref.path)  # timm parses it next, and fails on a damaged one with a traceback
        if pretrained:
            return ref.timm_name, {}
        return cfg["architecture"], {**(cfg.get("model_args") or {}), "num_classes": cfg.get("num_classes", 0)}
    if ref.kind == "file":
        assert ref.path is not None
        conv = convert_state_dict(load_checkpoint_file(ref.path))
        overlay, args = local_weights(ref.path, conv)
        return conv.arch_name(), ({"pretrained_cfg_overlay": overlay, **args} if pretrained else args)
    return ref.timm_name, {}  # a name (timm resolves its tag, the zoo its local weights) or an hf-hub: repo


def parse_model_spec(spec: str | os.PathLike[str] | ModelRef) -> tuple[str, dict[str, Any]]:
    """Map a user's MODEL argument to ``(timm name, create_model kwargs)`` that load its weights."""
    name, kwargs = _timm_args(parse_model_ref(spec), pretrained=True)
    return name, {"pretrained": True, **kwargs}


def _load_checkpoint(model: torch.nn.Module, checkpoint_path: str | os.PathLike[str]) -> None:
    """timm's ``checkpoint_path=``: weights of any supported format into the architecture already built (a head of
    another class count stays as initialised, as timm's loader leaves it)."""
    path = check_path(checkpoint_path, "checkpoint_path", existing=True)
    sd = convert_state_dict(load_checkpoint_file(path), target=model).backbone
    own = model.state_dict()
    extra = [k for k in sd if k not in own and not k.startswith("head.")]
    if extra:
        raise CheckpointError(f"checkpoint '{path}' has tensors the model lacks: {', '.join(extra[:4])}; pick the "
                              "architecture that produced it (or pass the checkpoint itself as the model)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}, strict=False)


def load_model(
    spec: str | os.PathLike[str] | ModelRef, *, pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None, random_init: bool = False, img_size: int | None = None,
    seed: int | None = None, **kwargs: Any
) -> torch.nn.Module:
    """Create a backbone from any MODEL spec (:func:`mffzoo.zoo.ref.parse_model_ref`): the one loader behind the
    CLI, eval and export (each adds its checks). timm's ``create_model`` conventions: without ``pretrained=True``
    the architecture the spec names (or a folder/checkpoint describes) is built without its weights;
    ``checkpoint_path`` then loads weights of any supported format into it.

    ``random_init`` is ``pretrained=False`` after ``torch.manual_seed(seed)`` when ``seed`` is given (a
    reproducible smoke run); ``img_size`` overrides the input size. (The mff_* names are registered: importing
    this package imports :mod:`mffzoo.zoo.mff_vision_transformer`.)
    """
    if random_init:
        if checkpoint_path is not None:
            raise ConfigError("random_init builds a model without weights, checkpoint_path loads some: pass one")
        pretrained = False
        if seed is not None:
            torch.manual_seed(seed)
    if img_size:
        kwargs["img_size"] = int(img_size)
    ref = parse_model_ref(spec)
    name, extra = _timm_args(ref, pretrained)
    model = _create(ref, name, {**extra, **kwargs, "pretrained": pretrained})
    if checkpoint_path is not None:
        _load_checkpoint(model, checkpoint_path)
    return model


def _create(ref: ModelRef, name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``timm.create_model`` with its failures told in one line naming the MODEL the user gave."""
    spec = ref.spec
    try:
        return timm.create_model(name, **kwargs)
    except MffzooError:
        raise
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith("Unknown model"):
            raise _unknown(spec) from None
        raise
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"model '{spec}': {exc}; check the path") from None
    except SafetensorError:  # timm's own loader reading a folder's model.safetensors
        file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        if file is None and ref.kind == "folder":
            file = Path(str(ref.path)) / WEIGHTS_NAME
        what = f"'{file}' {why_unreadable(file)}" if file else "their safetensors file is truncated or corrupt"
        raise CheckpointError(f"the weights of '{spec}' cannot be read: {what}; re-download or re-export them"
                              ) from None
    except json.JSONDecodeError as exc:  # timm reading a folder's config.json
        raise CheckpointError(f"the {CONFIG_NAME} of '{spec}' is not valid JSON ({exc}); re-download or re-export "
                              "the model folder") from None
