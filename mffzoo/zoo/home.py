"""The zoo home: where weights produced by ``mffzoo train`` (or ``mffzoo convert``) live.

Layout, one folder per ``<arch>.<tag>``, each a timm-compatible model folder (the same layout a Hugging Face
Hub repo uses, so ``local-dir:``/``hf-hub:`` loading and publishing need no conversion)::

    $MFFZOO_HOME/mff_vit_small_patch16_224.mff_in1k_300e/
        config.json          # timm: architecture, num_classes, model_args, pretrained_cfg
        model.safetensors    # backbone weights (timm VisionTransformer keys)
        mffzoo.json          # provenance: what the model is ("model"), how it was pretrained ("method": mff, mae
                             # or unknown), recipe, epochs, data, final loss, fusion_layers, mffzoo version, git commit
        pretrain_extras.safetensors   # optional: fusion + decoder weights, to resume or visualise
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..archs import describe_arch
from ..config import check_name
from ..errors import ConfigError, WriteFailed
from ..io import (
    atomic_write,
    cache_root,
    canonical_safetensors,
    check_output_folder,
    exclusive,
    file_sha256,
    read_json_object,
    umask_mode,
    write_failed,
    write_json,
)
from ..version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
META_NAME = "mffzoo.json"
EXTRAS_NAME = "pretrain_extras.safetensors"
# The fused-levels provenance: the 0-based encoder blocks whose outputs MFF fused, written under this top-level key
# in a training checkpoint (``PretrainTask.checkpoint_meta``) and in a model folder's mffzoo.json (the run's
# provenance, or ``convert_checkpoint`` copying it from the checkpoint); read back by :func:`recorded_fusion_layers`.
FUSION_LAYERS_KEY = "fusion_layers"
# What :func:`write_model_folder` writes; anything else in a model folder is the user's and survives a rewrite.
MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME, META_NAME, EXTRAS_NAME)

_logger = logging.getLogger("mffzoo.zoo")

__all__ = ["zoo_home", "entry_dir", "ZooEntry", "list_local", "read_folder_meta", "recorded_fusion_layers",
           "write_model_folder", "write_safetensors", "git_commit", "MODEL_FILES"]


def zoo_home() -> Path:
    """``$MFFZOO_HOME``, else ``<cache root>/zoo`` (``~/.cache/mffzoo/zoo``, see :func:`mffzoo.io.cache_root`)."""
    env = os.environ.get("MFFZOO_HOME")
    if env:
        return Path(env).expanduser()
    return cache_root() / "zoo"


def entry_dir(arch: str, tag: str, home: Path | None = None) -> Path:
    """``<home>/<arch>.<tag>``; a tag that is not a plain folder name (``../x``, 300 bytes) never leaves the home."""
    return (home or zoo_home()) / check_name(f"{arch}.{tag}", "tag")


@dataclass(frozen=True)
class ZooEntry:
    arch: str
    tag: str
    path: Path
    meta: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME


def list_local(arch: str | None = None, home: Path | None = None) -> list[ZooEntry]:
    """Complete local entries (weights present), newest first."""
    root = home or zoo_home()
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not d.is_dir() or "." not in d.name or not (d / WEIGHTS_NAME).is_file():
            continue
        a, t = d.name.split(".", 1)
        if arch and a != arch:
            continue
        out.append(ZooEntry(a, t, d, read_folder_meta(d)))
    out.sort(key=lambda e: e.weights.stat().st_mtime, reverse=True)
    return out


def read_folder_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A model folder's mffzoo.json; {} when there is none or it is unreadable (provenance is optional)."""
    return read_json_object(Path(folder) / META_NAME)


def recorded_fusion_layers(meta: Mapping[str, Any] | None) -> list[int] | None:
    """The fused blocks recorded under :data:`FUSION_LAYERS_KEY` of a checkpoint, an mffzoo.json or a recipe's
    ``model`` section; None when not recorded (weights from elsewhere), so callers label levels by position."""
    layers = (meta or {}).get(FUSION_LAYERS_KEY)
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) for i in layers):
        return [int(i) for i in layers]
    return None


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """Commit of the code that produced weights, for provenance; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def timm_config(
    arch: str, model: torch.nn.Module, model_args: Mapping[str, Any] | None = None, *, tag: str | None = None,
    data: Mapping[str, Any] | None = None, mff_paper: bool = True,
) -> dict[str, Any]:
    """timm's ``config.json`` for a backbone (what ``hf-hub:``/``local-dir:`` loading reads): its pretrained_cfg
    describes these weights (input size, the ``data`` mean/std they were trained with, tag), so timm's
    ``resolve_data_config`` feeds them right."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    # Drop the source and the registry's description of some *other* weights; keep preprocessing and paper ids.
    for k in ("file", "url", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
              "description", "notes", "origin_url"):
        cfg.pop(k, None)
    if not mff_paper:  # weights not pretrained with MFF (MAE, or unknown: a plain timm file) do not cite its paper
        cfg.pop("paper_name", None)
        cfg.pop("paper_ids", None)
    cfg["num_classes"] = getattr(model, "num_classes", 0)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        cfg["input_size"] = [3, int(img[0]), int(img[1])]
    for k in ("mean", "std"):
        if (data or {}).get(k):
            cfg[k] = [float(v) for v in data[k]]
    if tag:
        cfg["tag"] = tag
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if v is not None}
    args = dict(model_args or {})
    # The head's structure is part of the architecture: without these a classifier folder (avg pool + fc_norm)
    # would be rebuilt with a cls-token head and fail to load.
    args.setdefault("global_pool", getattr(model, "global_pool", "token"))
    if not isinstance(getattr(model, "fc_norm", None), torch.nn.Identity) and hasattr(model, "fc_norm"):
        args.setdefault("fc_norm", True)
    return {
        "architecture": arch,
        "num_classes": getattr(model, "num_classes", 0),
        "num_features": getattr(model, "num_features", None),
        "global_pool": getattr(model, "global_pool", "token"),
        "model_args": args,
        "pretrained_cfg": cfg,
    }


def _folder_tag(folder: Path, arch: str, meta: Mapping[str, Any] | None) -> str | None:
    """The tag the weights are published under: the run's (meta) or the zoo entry's name ``<arch>.<tag>``."""
    if (meta or {}).get("tag"):
        return str(meta["tag"])
    return folder.name.split(".", 1)[1] if folder.name.startswith(f"{arch}.") else None


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """safetensors, written atomically with the umask's mode and a canonical header: same tensors, same bytes."""
    return atomic_write(path, canonical_safetensors(save(dict(tensors), metadata=dict(metadata or {}) or None)))


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """A hard link (no copy of a large file; the original stays until the old folder goes), else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _same_weights(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)


def _carry_over(old: Path, new: Path) -> None:
    """Into the freshly written ``new``, what the folder ``old`` it replaces must keep: every file it did not
    write (the user's: notes, exports), and when the weights are the same bytes, their recorded evaluations and
    a pretrain_extras file the new write has none of. Evaluations of other weights are dropped, and said so."""
    for item in old.iterdir():
        if item.name in MODEL_FILES or (new / item.name).exists():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, new / item.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, new / item.name)
    old_eval = read_folder_meta(old).get("eval")
    old_eval = old_eval if isinstance(old_eval, dict) else {}
    if not _same_weights(old / WEIGHTS_NAME, new / WEIGHTS_NAME):
        if old_eval:
            _logger.warning("%s: new weights, so the evaluations recorded for the previous ones are dropped (%s); "
                            "measure them again with `mffzoo eval ... --update-zoo`", old, ", ".join(sorted(old_eval)))
        return
    if (old / EXTRAS_NAME).is_file() and not (new / EXTRAS_NAME).exists():
        _link_or_copy(old / EXTRAS_NAME, new / EXTRAS_NAME)
    if old_eval:
        meta = read_folder_meta(new)
        meta["eval"] = {**old_eval, **(meta.get("eval") or {})}  # a result the new write carries is newer
        write_json(new / META_NAME, meta)
        _logger.info("%s: same weights as before; kept their recorded evaluations (%s)", old,
                     ", ".join(sorted(old_eval)))


def write_model_folder(
    folder: str | os.PathLike[str],
    arch: str,
    model: torch.nn.Module,
    *,
    model_args: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a timm-compatible model folder atomically (a reader never sees a half-written entry).

    Rewriting an existing folder replaces only :data:`MODEL_FILES`: the user's other files stay, and so do the
    evaluations recorded for the weights (``eval`` in mffzoo.json) when the new weights are the same bytes.
    The folder is locked while it is written (a second process writing it, e.g. publishing the same zoo tag, is
    refused in one line); a write the file system refuses leaves the previous folder as it was."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"'{folder}' is a file, not a model folder; move it away or write the model elsewhere")
    check_output_folder(folder, "model folder", fix="write the model elsewhere")
    with exclusive(folder, fix="wait for it to finish, then rerun"):
        return _write_model_folder(folder, arch, model, model_args, meta, extras)


def _write_model_folder(folder: Path, arch: str, model: torch.nn.Module, model_args: Mapping[str, Any] | None,
                        meta: Mapping[str, Any] | None, extras: Mapping[str, torch.Tensor] | None) -> Path:
    """:func:`write_model_folder` once the folder is checked and locked: built in a temp folder, renamed in."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        raise write_failed(folder, exc) from None
    tmp.chmod(umask_mode(0o777))  # mkdtemp makes 0700; a zoo folder should be as readable as any other
    try:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_safetensors(tmp / WEIGHTS_NAME, sd, {"format": "pt", "architecture": arch})
        write_json(tmp / CONFIG_NAME, timm_config(arch, model, model_args, tag=_folder_tag(folder, arch, meta),
                                                  data=((meta or {}).get("recipe") or {}).get("data"),
                                                  mff_paper=(meta or {}).get("method", "mff") == "mff"))
        # "model": what the backbone is (e.g. a ViT-S entrypoint shrunk to 64 px), which the arch name does not say
        write_json(tmp / META_NAME, {"arch": arch, "model": describe_arch(arch, model_args),
                                     "mffzoo_version": __version__, **dict(meta or {})})
        if extras:
            write_safetensors(tmp / EXTRAS_NAME, {k: v.detach().cpu().contiguous() for k, v in extras.items()})
        if folder.exists():
            _carry_over(folder, tmp)
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            try:
                tmp.rename(folder)
            except OSError:
                old.rename(folder)  # the previous entry back in place, whole
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WriteFailed):  # named by the final path, not the temp folder's
            raise exc.retold(path=(exc.path or str(folder)).replace(str(tmp), str(folder))) from None
        if isinstance(exc, OSError):
            raise write_failed(folder, exc) from None
        raise
    return folder
