"""Checkpoint conversion: every supported format -> a timm ``VisionTransformer`` state dict.

Formats:
- ``mmpretrain``: official MFF checkpoints (``state_dict`` with ``backbone.*``/``neck.*``; fine-tuned ones with
  ``backbone.ln2`` and ``head.fc``);
- ``mae``: the original MAE release (``model`` with timm names, optionally with decoder keys);
- ``mffzoo``: our training checkpoints (``model`` with ``encoder.*``, ``fusion.*`` and decoder keys);
- ``timm``: a plain backbone state dict (what the zoo stores).

Keys are mapped by anchored patterns, never by string replacement (``ln1`` means the per-block norm1 inside a
layer but the final norm at the top, and ``proj_layers`` must not become ``proj``). Every source key is mapped
or deliberately dropped; any leftover is an error that lists it, so a new format cannot half-load silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed

from ..archs import ARCHS, canonical_arch
from ..errors import CheckpointError, ConfigError
from .checkpoint_io import load_checkpoint_file
from .home import FUSION_LAYERS_KEY, MODEL_FILES, write_model_folder

_logger = logging.getLogger("mffzoo.zoo")

__all__ = ["Converted", "convert_state_dict", "convert_checkpoint", "check_destination", "unwrap_checkpoint",
           "detect_format", "pretraining_of"]

_WB = r"(weight|bias)"
# Block internals shared by mmpretrain encoder layers and decoder blocks (mmcv TransformerEncoderLayer -> timm Block).
_MM_BLOCK = [
    (rf"ln1\.{_WB}", r"norm1.\1"),
    (rf"ln2\.{_WB}", r"norm2.\1"),
    (rf"attn\.(qkv|proj)\.{_WB}", r"attn.\1.\2"),
    (rf"ffn\.layers\.0\.0\.{_WB}", r"mlp.fc1.\1"),
    (rf"ffn\.layers\.1\.{_WB}", r"mlp.fc2.\1"),
]

Rule = tuple[str, str, str]  # (pattern, replacement, destination: "backbone" | "extras")


def _mm_rules() -> list[Rule]:
    rules: list[Rule] = [
        (r"backbone\.cls_token", "cls_token", "backbone"),
        (r"backbone\.pos_embed", "pos_embed", "backbone"),
        (rf"backbone\.patch_embed\.projection\.{_WB}", r"patch_embed.proj.\1", "backbone"),
        (rf"backbone\.ln1\.{_WB}", r"norm.\1", "backbone"),  # final norm (pretraining checkpoints)
        (rf"backbone\.ln2\.{_WB}", r"fc_norm.\1", "backbone"),  # avg-pool norm (fine-tuned checkpoints)
        (rf"head\.fc\.{_WB}", r"head.\1", "backbone"),
        (rf"head\.layers\.head\.{_WB}", r"head.\1", "backbone"),
        (rf"backbone\.proj_layers\.(\d+)\.{_WB}", r"fusion.proj.\1.\2", "extras"),
        (r"backbone\.proj_weights", "fusion.weights", "extras"),
        (r"neck\.mask_token", "mask_token", "extras"),
        (r"neck\.decoder_pos_embed", "decoder_pos_embed", "extras"),
        (rf"neck\.decoder_embed\.{_WB}", r"decoder_embed.\1", "extras"),
        (rf"neck\.ln1\.{_WB}", r"decoder_norm.\1", "extras"),
        (rf"neck\.decoder_pred\.{_WB}", r"decoder_pred.\1", "extras"),
    ]
    for src, dst in _MM_BLOCK:
        rules.append((rf"backbone\.layers\.(\d+)\.{src}", "blocks.\\1." + _shift(dst), "backbone"))
        rules.append((rf"neck\.decoder_blocks\.(\d+)\.{src}", "decoder_blocks.\\1." + _shift(dst), "extras"))
    return rules


def _shift(repl: str) -> str:
    """Renumber groups by one: the block index takes group 1."""
    return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), repl)


_DECODER = r"(mask_token|decoder_pos_embed|decoder_embed\..+|decoder_blocks\..+|decoder_norm\..+|decoder_pred\..+)"
_BACKBONE = r"(cls_token|pos_embed|reg_token|patch_embed\..+|blocks\..+|norm\..+|fc_norm\..+|head\..+)"

RULES: dict[str, list[Rule]] = {
    "mmpretrain": _mm_rules(),
    "mae": [(_BACKBONE, r"\1", "backbone"), (_DECODER, r"\1", "extras")],
    "mffzoo": [(rf"encoder\.{_BACKBONE}", r"\1", "backbone"), (r"(fusion\..+)", r"\1", "extras"),
               (_DECODER, r"\1", "extras")],
    "timm": [(_BACKBONE, r"\1", "backbone")],
}
# Keys each format carries that are deliberately not part of any model.
DROPPED: dict[str, list[str]] = {
    "mmpretrain": [r"data_preprocessor\..+", r"target_generator\..+"],
    "mae": [],
    "mffzoo": [],
    "timm": [],
}

_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fusion.weights": lambda t: t.reshape(-1, 1, 1, 1),  # (K, 1, 1, 1) as mmpretrain; older files held (K,)
}


@dataclass
class Converted:
    """A checkpoint split into the timm backbone and the pretraining-only parts (fusion, decoder)."""

    backbone: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source_format: str = "timm"
    dropped: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return "head.weight" in self.backbone

    def arch_kwargs(self) -> dict[str, Any]:
        """timm kwargs this backbone needs, read from tensor shapes. The head count is not in the tensors: it
        comes from our checkpoints' metadata or a registered width, and is left out otherwise (callers ask)."""
        sd = self.backbone
        try:
            proj = sd["patch_embed.proj.weight"]
        except KeyError:
            raise CheckpointError("checkpoint has no patch_embed.proj.weight: not a ViT backbone") from None
        embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        n_prefix = 1 if "cls_token" in sd else 0
        grid = int(round((sd["pos_embed"].shape[1] - n_prefix) ** 0.5))
        known = {a["embed_dim"]: a["num_heads"] for a in ARCHS.values()}
        kwargs: dict[str, Any] = dict(
            patch_size=int(patch), embed_dim=int(embed_dim), depth=int(depth), img_size=int(grid * patch),
            in_chans=int(in_chans),
        )
        heads = self.meta.get("num_heads") or known.get(int(embed_dim))
        if heads:
            kwargs["num_heads"] = int(heads)
        if self.is_classifier:
            kwargs["num_classes"] = int(sd["head.weight"].shape[0])
            if "fc_norm.weight" in sd:
                kwargs.update(global_pool="avg", fc_norm=True)
        else:
            kwargs["num_classes"] = 0
        return kwargs

    def arch_name(self) -> str:
        """Registered architecture with the same width and depth (the closest for custom sizes)."""
        kw = self.arch_kwargs()
        for name, a in ARCHS.items():
            if (a["embed_dim"], a["depth"], a["patch_size"]) == (kw["embed_dim"], kw["depth"], kw["patch_size"]):
                return name
        return min(ARCHS, key=lambda n: abs(ARCHS[n]["embed_dim"] - kw["embed_dim"]))


def unwrap_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, meta) from a checkpoint dict of any of the supported wrappers."""
    meta: dict[str, Any] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        meta = dict(obj.get("meta") or {})
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        for k in ("model_args", "recipe", "arch", FUSION_LAYERS_KEY):
            if k in obj:
                meta[k] = obj[k]
        if isinstance(obj.get("model_args"), Mapping) and "num_heads" in obj["model_args"]:
            meta["num_heads"] = obj["model_args"]["num_heads"]
        obj = obj["model"]
    sd: dict[str, Any] = {}
    for k, v in obj.items():
        k = re.sub(r"(^|\.)_orig_mod\.", r"\1", k)  # torch.compile wrapper
        k = k[len("module."):] if k.startswith("module.") else k  # DDP wrapper
        sd[k] = v
    return sd, meta


def detect_format(sd: Mapping[str, Any]) -> str:
    keys = list(sd)
    if any(k.startswith(("backbone.", "neck.")) for k in keys):
        return "mmpretrain"
    if any(k.startswith("encoder.") for k in keys):
        return "mffzoo"
    if any(k.startswith(("decoder_", "mask_token")) for k in keys):
        return "mae"
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "timm"
    raise CheckpointError(
        f"unrecognised checkpoint format (first keys: {', '.join(keys[:4]) or 'none'}); supported: mmpretrain, "
        "MAE release, mffzoo training checkpoints and timm ViT state dicts"
    )


def convert_state_dict(
    checkpoint: Mapping[str, Any], target: torch.nn.Module | None = None, fmt: str | None = None
) -> Converted:
    """Map a loaded checkpoint (wrapped or not) to timm keys; check against ``target`` if given."""
    sd, meta = unwrap_checkpoint(checkpoint)
    fmt = fmt or detect_format(sd)
    rules = [(re.compile(p + r"\Z"), r, d) for p, r, d in RULES[fmt]]
    dropped_rx = [re.compile(p + r"\Z") for p in DROPPED[fmt]]
    out = Converted({}, {}, fmt, [], meta)
    leftovers: list[str] = []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            leftovers.append(f"{key} (not a tensor)")
            continue
        for rx, repl, dest in rules:
            m = rx.match(key)
            if m:
                new = m.expand(repl)
                value = _TRANSFORMS.get(new, lambda t: t)(value)
                getattr(out, dest)[new] = value
                break
        else:
            if any(rx.match(key) for rx in dropped_rx):
                out.dropped.append(key)
            else:
                leftovers.append(key)
    if leftovers:
        shown = ", ".join(leftovers[:8]) + (f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else "")
        raise CheckpointError(
            f"{fmt} checkpoint has keys with no mapping: {shown}; this is not a supported MFF/MAE ViT"
        )
    if not out.backbone:
        raise CheckpointError(f"{fmt} checkpoint holds no encoder weights; nothing to convert")
    if target is not None:
        _resample_pos_embed(out.backbone, target)
        _check_against(out.backbone, target)
    return out


def pretraining_of(conv: Converted) -> tuple[str, str]:
    """(method, what the source is) for the provenance: ``mff``, ``mae`` or ``unknown``, by what the file shows.
    Only fusion weights (or our own recipe's levels) show MFF; a plain timm state dict says nothing about how its
    weights were pretrained, so it is not labelled MFF for having been loaded into an mff_* architecture."""
    layers = conv.meta.get(FUSION_LAYERS_KEY)
    levels = len(layers) if isinstance(layers, (list, tuple)) and layers else (
        int(conv.extras["fusion.weights"].numel()) if "fusion.weights" in conv.extras else None)
    fmt = conv.source_format
    if fmt == "mffzoo" and levels is not None:
        method = "mae" if levels == 1 else "mff"
        return method, f"mffzoo training checkpoint ({method.upper()}, {levels} fused level{'s' * (levels != 1)})"
    if fmt == "mmpretrain":
        if levels is not None:
            return "mff", f"mmpretrain MFF checkpoint ({levels} fused levels)"
        return "unknown", "mmpretrain checkpoint without MFF fusion weights, pretraining method unknown"
    if fmt == "mae":
        return "mae", "MAE-format pretraining checkpoint (encoder + single-level MAE decoder)"
    return "unknown", f"{fmt} state dict, pretraining method unknown"


def key_groups(keys: list[str]) -> dict[str, int]:
    """``{"decoder_blocks.*": 12, "mask_token": 1}``: keys counted by their top-level module, in first-seen order."""
    out: dict[str, int] = {}
    for k in keys:
        group = k.split(".", 1)[0] + (".*" if "." in k else "")
        out[group] = out.get(group, 0) + 1
    return out


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Fit the position embedding to the model's grid (e.g. 224 weights into a 384 model), as timm does."""
    want = getattr(model, "pos_embed", None)
    have = sd.get("pos_embed")
    if want is None or have is None or have.shape == want.shape:
        return
    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    sd["pos_embed"] = resample_abs_pos_embed(
        have, new_size=model.patch_embed.grid_size, num_prefix_tokens=n_prefix, verbose=False
    )


def _check_against(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Shape check with a one-line error instead of torch's multi-page load_state_dict report."""
    expected = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape) and k != "pos_embed"
    ]
    head_only = [b for b in bad if b.startswith("head.")]
    if bad and len(head_only) != len(bad):
        raise CheckpointError(
            f"checkpoint does not match the model: {'; '.join(bad[:3])}; pick the architecture that produced it "
            "(`mffzoo convert` infers it from the weights)"
        )
    # A missing tensor was torch's multi-page RuntimeError; an integer tensor (int8, a bool mask) was cast into
    # the float weight by load_state_dict's copy_ and loaded silently wrong. A head may be absent (timm drops or
    # re-initialises it when the class count differs); half/bfloat16 weights are floats and load as such.
    missing = [k for k in expected if k not in sd and not k.startswith("head.")]
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:4])}"
                              f"{more}; it is incomplete or from another architecture: re-download or re-export it")
    wrong = [f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in sd.items()
             if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"checkpoint holds non-float tensors where the model has float weights: "
                              f"{', '.join(wrong[:3])}{more}; these are not loadable weights (a quantised or "
                              "damaged file): export float weights (fp32/fp16/bf16) and convert those")


def check_destination(dst: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse, before any work, to replace a model folder silently (``mffzoo export``'s rule and wording for
    artefacts) or to put a folder where a file is."""
    dst = Path(dst)
    for p in (dst, *dst.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"DEST '{dst}': '{p}' is a file, not a folder; choose another DEST (convert "
                                  "writes a model folder)")
            break
    taken = [dst / name for name in MODEL_FILES if (dst / name).exists()]
    if taken and not overwrite:
        raise ConfigError(f"'{taken[0]}' already exists; pass --overwrite to replace the model in '{dst}' (its "
                          "other files stay), or choose another DEST")


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    arch: str | None = None,
    num_heads: int | None = None,
    keep_extras: bool = False,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint file into a zoo/timm model folder (``model.safetensors`` + ``config.json``).

    ``num_heads`` is only needed for non-standard widths from foreign formats: weights do not record it (ours do).
    A folder that already holds a model is refused unless ``overwrite``; then only the model's files are replaced.
    """
    check_destination(dst, overwrite)
    if arch is not None and canonical_arch(arch) not in ARCHS:
        raise ConfigError(f"unknown --arch '{arch}'; allowed: {', '.join(ARCHS)} (or omit it: it is inferred)")
    conv = convert_state_dict(load_checkpoint_file(src))
    if num_heads:
        conv.meta["num_heads"] = num_heads
    kwargs = conv.arch_kwargs()
    if "num_heads" not in kwargs:
        raise ConfigError(
            f"the weights do not say how many attention heads this {kwargs['embed_dim']}-wide ViT has; pass "
            f"--num-heads (e.g. {max(1, kwargs['embed_dim'] // 64)} for 64-dim heads)"
        )
    inferred = conv.arch_name()
    if arch is not None:
        arch = canonical_arch(arch)
        if arch != inferred and all(ARCHS[inferred][k] == kwargs[k] for k in ("embed_dim", "depth", "patch_size")):
            raise ConfigError(f"--arch {arch} does not match the weights, which are {inferred} "
                              f"({kwargs['embed_dim']} wide, {kwargs['depth']} blocks); omit --arch")
    arch = arch or inferred
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        _check_against(conv.backbone, model)
    except CheckpointError as exc:  # name the file: a missing tensor or an int8 one is the file's fault
        raise CheckpointError(f"'{src}': {exc}") from None
    try:
        model.load_state_dict(conv.backbone, strict=True)
    except RuntimeError:  # torch's first line is only "Error(s) in loading state_dict for ...:"; say which keys
        want, have = set(model.state_dict()), set(conv.backbone)
        missing, extra = sorted(want - have), sorted(have - want)
        keys = "; ".join(f"{what}: {', '.join(ks[:4])}{f' (+{len(ks) - 4} more)' if len(ks) > 4 else ''}"
                         for what, ks in (("missing", missing), ("unexpected", extra)) if ks)
        raise CheckpointError(f"converted weights do not load into {arch} ({keys or 'tensors do not fit'}); pass "
                              "the --arch that produced them, or convert the complete checkpoint") from None
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    dropped = conv.dropped + ([] if keep_extras else list(conv.extras))
    if dropped:
        _logger.info("dropped %d keys that the timm model does not use: %s%s", len(dropped),
                     ", ".join(f"{p} ({n})" for p, n in key_groups(dropped).items()),
                     "" if keep_extras or not conv.extras else " (--keep-extras saves the fusion and decoder ones)")
    method, source_kind = pretraining_of(conv)
    info = {"source": str(src), "source_format": conv.source_format, "source_kind": source_kind, "method": method,
            "dropped_keys": len(dropped),
            "dropped": key_groups(dropped),
            "fusion_levels": int(conv.extras["fusion.weights"].numel()) if "fusion.weights" in conv.extras else None,
            **({FUSION_LAYERS_KEY: conv.meta[FUSION_LAYERS_KEY]} if FUSION_LAYERS_KEY in conv.meta else {}),
            **dict(meta or {})}
    return write_model_folder(dst, arch, model, model_args=model_args, meta=info,
                              extras=conv.extras if keep_extras and conv.extras else None)
