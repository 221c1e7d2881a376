"""``export_model``: plan -> build -> check -> commit, for any format of :data:`mffzoo.export.formats.FORMATS`.

Plan: profile, format, machine, model and output are checked; build: the format's artefact from the ONNX; check:
the one parity routine on the format's runner; commit: renames into place, the sidecar last.

Everything a user can get wrong is checked before the first file is written; files are built in a temporary
folder (in the nearest existing folder of the output) and moved into place at the end, so a failed, interrupted
(Ctrl-C) or terminated (SIGTERM) export leaves nothing half-written, not even an empty output folder. The build
itself is :func:`~mffzoo.export.pipeline.build_artefact`, shared with ``mffzoo bench infer``.
While it runs the artefact (and a ``--triton-repo``) is locked (:func:`mffzoo.io.exclusive`: a lock file next to
it, removed with any folder made for it); a second export to the same path is refused at once. A write the file
system refuses (disk full, file-size limit, read-only) is one error line naming the output; the previous artefact
stays. The sidecar moves in last (after the artefact, its companions and the parity report), so a sidecar
always describes a complete artefact. A missed
parity gate still moves the artefact and writes its report (to inspect), then raises
:class:`~mffzoo.export.parity.ParityFailed` (exit code 1).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from ..archs import ARCHS, canonical_arch
from ..config import MAX_NAME_BYTES, load_config, to_dict
from ..errors import ConfigError, ExportError, MffzooError, WeightsNotFoundError, WriteFailed
from ..io import PathLock, exclusive, os_fault, write_failed, write_json
from ..zoo import load_model, parse_model_ref
from . import triton
from .formats import ExportFormat, get_format
from .inputs import default_image_root, load_image_batch, model_img_size, preprocessing, random_inputs
from .onnx import read_metadata, write_metadata
from .parity import InputSet, ParityFailed, ParityReport, run_parity
from .pipeline import INPUT_NAME, Built, SigtermGuard, build_artefact
from .profile import ExportProfile, load_profile
from .sidecar import (
    LATER_METADATA_KEYS,
    file_sha256,
    onnx_metadata,
    read_sidecar,
    report_path,
    sidecar_path,
    state_dict_sha256,
    tool_versions,
)
from .wrappers import TORCH_DTYPES, ExportModule, Features, feature_spec, output_specs

__all__ = ["ExportResult", "export_model", "check_artefact", "load_export_model"]

_logger = logging.getLogger("mffzoo")


@dataclass
class ExportResult:
    artefact: Path
    sidecar: Path
    report: ParityReport | None
    files: list[Path]  # everything written (artefact, ONNX of an engine or .bin of an IR, sidecar, report)


def companion_files(fmt: str, artefact: Path) -> list[Path]:
    """Files that belong to an artefact besides itself: an engine's ONNX, an IR's weights (.bin)."""
    return [artefact.with_suffix(s) for s in get_format(fmt).companions]


def _model_spec(prof: ExportProfile) -> str:
    """``--weights`` is either a path (any format load_model reads) or a tag of ``model``."""
    w = prof.weights
    if not w:
        return prof.model
    if parse_model_ref(w, "--weights").kind != "name":
        return w
    return parse_model_ref(prof.model).with_tag(w).spec


def _missing_path(spec: str) -> bool:
    """A spec written as a path (a weights file or anything with a separator; not a name, not
    ``local-dir:``/``hf-hub:``) that is not there."""
    ref = parse_model_ref(spec)
    return ref.kind in ("file", "missing") and ref.path is not None and not ref.path.exists()


def _patch_size(model: torch.nn.Module) -> int:
    return int(model.patch_embed.patch_size[0])


def load_export_model(prof: ExportProfile) -> torch.nn.Module:
    """The fp32 eval model an export starts from, resolved only through :func:`mffzoo.zoo.load_model`."""
    kwargs = dict(prof.model_args)
    if prof.img_size:
        patch = kwargs.get("patch_size") or ARCHS.get(canonical_arch(prof.model), {}).get("patch_size")
        if patch and prof.img_size % patch:
            raise ExportError(f"--img-size {prof.img_size} is not divisible by the patch size {patch}; "
                              f"use a multiple of {patch} (e.g. {prof.img_size // patch * patch or patch})")
        kwargs["img_size"] = prof.img_size
    if prof.dynamic_size is not None:  # the position embedding is interpolated to the input's grid in the graph
        kwargs["dynamic_img_size"] = True
    spec = _model_spec(prof)
    if _missing_path(spec):
        raise WeightsNotFoundError(f"weights '{spec}' do not exist (no such file or folder); pass an existing model "
                                   "folder or checkpoint, or a model name such as mff_vit_small.demo")
    try:
        # seeded random weights: a random-init artefact can be re-checked
        model = load_model(spec, pretrained=True, random_init=prof.random_init, seed=prof.seed, **kwargs)
    except WeightsNotFoundError as exc:
        if prof.random_init or "--random-init" in str(exc):
            raise
        raise WeightsNotFoundError(f"{exc} (or add --random-init for a smoke export with random weights)") from None
    except TypeError as exc:  # model_args is a free dict handed to timm: an unknown key surfaces as a TypeError
        bad = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if not bad or bad.group(1) not in prof.model_args:
            raise
        raise ConfigError(_unknown_model_arg(bad.group(1))) from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "forward_head"):
        raise ExportError(f"model '{spec}' is not a ViT backbone (no patch_embed); export supports mff/timm ViTs")
    h, w = model_img_size(model)
    p = _patch_size(model)
    if h % p or w % p:
        raise ExportError(f"image size {h}x{w} is not divisible by the patch size {p}; pass --img-size a multiple "
                          f"of {p}")
    _check_dynamic_size(prof, (h, w), p)
    return model.eval().float()


def _check_dynamic_size(prof: ExportProfile, img: tuple[int, int], p: int) -> None:
    """``--dynamic-size`` in whole patches, around the model's own size (what its preprocessing and check use)."""
    d = prof.dynamic_size
    if d is None:
        return
    given = f"--dynamic-size {d.min}:{d.opt}:{d.max}"
    bad = [v for v in (d.min, d.opt, d.max) if v % p]
    if bad:
        fix = ":".join(str(max(v // p, 1) * p) for v in (d.min, d.opt, d.max))
        raise ExportError(f"{given}: {bad[0]} is not a multiple of the patch size {p}; use multiples of {p}, e.g. "
                          f"--dynamic-size {fix}")
    if not all(d.min <= v <= d.max for v in img):
        raise ExportError(f"{given} does not hold the model's input size {img[0]}x{img[1]} (its position-embedding "
                          f"grid, preprocessing and main parity check); pass --img-size within {d.min}..{d.max}")


def _unknown_model_arg(key: str) -> str:
    allowed = [n for n in inspect.signature(VisionTransformer.__init__).parameters if n != "self"]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"config key 'model_args.{key}': not an argument of the timm model{hint}; remove it or use one of "
            f"timm's VisionTransformer arguments, e.g. {', '.join(allowed[:8])}")


def _default_output(prof: ExportProfile, model: torch.nn.Module, features: Features) -> Path:
    arch = (getattr(model, "pretrained_cfg", {}) or {}).get("architecture") or prof.model.split(".")[0]
    tag = (getattr(model, "pretrained_cfg", {}) or {}).get("tag") if not prof.random_init else "random"
    stem = f"{arch}{'.' + str(tag) if tag else ''}-{features.kind}-{prof.precision}"
    # arch and tag come from the weights' config.json: a '/' or '..' there must not move the file out of exports/,
    # and a long tag must not make a name the file system refuses (after the export, at the rename)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[-(MAX_NAME_BYTES - 20):].lstrip(".")
    return Path("exports") / (stem + get_format(prof.format).suffix)


def _references(model: torch.nn.Module, features: Features, prof: ExportProfile) -> dict[str, torch.nn.Module]:
    """fp32 PyTorch (gated) and, for low precision, PyTorch in that precision (reported: the precision's own error)."""
    refs = {"torch fp32": ExportModule(model, features, torch.float32)}
    if prof.precision in ("fp16", "bf16"):
        refs[f"torch {prof.precision}"] = ExportModule(model, features, TORCH_DTYPES[prof.precision])
    elif prof.precision == "int8":
        q = _torch_int8(model, prof.quantize.per_channel)
        if q is not None:
            refs["torch int8"] = ExportModule(q, features)
    return refs


def _torch_int8(model: torch.nn.Module, per_channel: bool) -> torch.nn.Module | None:
    """PyTorch's own dynamic int8 (qint8 weights of every Linear, activations quantised per batch): int8's peer.

    Informational only; ``None`` (row left out, logged) where this torch has no eager dynamic quantisation.
    """
    try:
        # optional: not in every torch build
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:
        _logger.info("no 'torch int8' parity row: torch.ao.quantization is unavailable (%s)", exc)
        return None
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao on every call
        return quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)  # a copy: model stays fp32


def _check_inputs(prof: ExportProfile, model: torch.nn.Module) -> tuple[list[InputSet], dict[str, Any]]:
    """Random tensors and real images, ``sum(batches)`` of each (each batch size sees different samples), at the
    model's size; with ``dynamic_size`` also random tensors at :meth:`SizeRange.check_sizes` (the minimum and a
    non-square size), at the smallest batch and the next (both dynamic axes at once)."""
    batches = prof.batch.check_batches()
    n = sum(batches)
    root = prof.check.images or default_image_root()
    img = model_img_size(model)
    d = prof.dynamic_size
    label = f"{img[0]}x{img[1]}" if d is not None else None
    sets = [InputSet("random", random_inputs(n, img, prof.check.seed), batches, label),
            InputSet("images", load_image_batch(root, n, model), batches, label)]
    info: dict[str, Any] = {"random": f"{n} x N(0,1), seed {prof.check.seed}", "images": str(Path(root).resolve()),
                            "batches": batches}
    if d is not None:
        b = prof.batch
        few = sorted({b.min, min(b.min + 1, b.max)})
        for h, w in d.check_sizes(img, _patch_size(model)):
            sets.append(InputSet("random", random_inputs(sum(few), (h, w), prof.check.seed), few, f"{h}x{w}"))
        info["sizes"] = {s.size: list(s.batches) for s in sets if s.name == "random"}
    return sets, info


def _parity(path: Path, model: torch.nn.Module, prof: ExportProfile, features: Features,
            sets: list[InputSet], info: dict[str, Any]) -> ParityReport:
    """The one parity routine of every format: the format's runner on ``path`` against PyTorch."""
    fmt = get_format(prof.format)
    backend = fmt.backend
    runner = fmt.runner(path, prof.precision)
    _logger.info("checking parity: %s %s vs PyTorch at batches %s (random + images)%s", backend, prof.precision,
                 info["batches"], f", sizes (HxW) {', '.join(info['sizes'])}" if "sizes" in info else "")
    return run_parity(
        runner, _references(model, features, prof), sets, batches=info["batches"],
        gates=prof.check.gates.for_precision(prof.precision), classifier=features.kind == "logits",
        backend=backend, precision=prof.precision, inputs_info=info,
        outputs=features.names if len(features.names) > 1 else None,
    )


def _validate_machine(prof: ExportProfile) -> ExportFormat:
    """Options this machine cannot honour fail before any file is written."""
    fmt = get_format(prof.format)
    fmt.check_machine(prof.precision, checking=prof.check.enabled)
    return fmt


def export_model(
    model: str | None = None,
    *,
    profile: str | os.PathLike[str] | ExportProfile | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    **fields: Any,
) -> ExportResult:
    """Export ``model`` as described by ``profile`` (default ``profiles/default.yaml``) plus ``fields``/overrides.

    ``fields`` are profile keys, e.g. ``export_model("mff_vit_small", random_init=True, precision="fp16",
    batch={"min": 1, "opt": 8, "max": 16})``. An existing artefact is never replaced unless ``overwrite``.
    """
    prof = load_profile(profile, overrides, model=model, **fields)  # plan: everything is checked before any write
    fmt = _validate_machine(prof)
    tri = prof.triton
    if tri.repo is not None:
        triton.check_request(tri.repo, prof.format, preprocess=tri.preprocess, kind=tri.kind,
                             dynamic_batch=prof.batch.min != prof.batch.max)
    fp32 = load_export_model(prof)
    features = feature_spec(prof.features, fp32, prof.levels, prof.levels_norm)  # levels: blocks of this encoder
    ExportModule(fp32, features)  # raises for logits on a backbone
    out = Path(prof.output or _default_output(prof, fp32, features)).expanduser()
    fmt.check_output(out)
    if out.is_dir():
        raise ExportError(f"--output '{out}' is a folder; pass a file path (e.g. {out / 'model.onnx'})")
    base = _existing_folder(out)
    # One export per artefact and one per Triton repository at a time: a second is refused here, before any work
    # (two at once left one artefact silently replaced by the other).
    locks = [exclusive(out, fix="wait for it to finish or pass another -o/--output")]
    if tri.repo is not None:
        locks.append(exclusive(Path(tri.repo).expanduser(), fix="wait for it to finish or pass another --triton-repo"))
    with contextlib.ExitStack() as held:
        for lock in locks:
            try:
                held.enter_context(lock)
            except WriteFailed as exc:  # no lock file (or folder for it) can be made: nothing can be
                where, opt = ((base, "--output") if lock is locks[0]
                              else (_existing_folder(lock.target), "--triton-repo"))
                raise ExportError(f"cannot write in '{where}' ({exc.cause}); choose another {opt}") from None
        return _export_locked(prof, fp32, features, out, base, overwrite, locks)


def _export_locked(prof: ExportProfile, fp32: torch.nn.Module, features: Features, out: Path, base: Path,
                   overwrite: bool, locks: list[PathLock]) -> ExportResult:
    """:func:`export_model` once the inputs are checked and ``out`` (and the Triton repository) are locked."""
    tri = prof.triton
    if not overwrite:  # checked under the lock: an export that finished meanwhile is not replaced either
        _refuse_overwrite(out, prof.format)
    pools, info = _check_inputs(prof, fp32) if prof.check.enabled else ([], {})
    calib, calib_info = _calibration(prof, fp32)

    # Everything is written into a temp folder in the nearest existing folder (same file system: renames are
    # atomic); the output folder is created only when the finished files move in place, so a failed, interrupted
    # or terminated export leaves nothing behind.
    with SigtermGuard() as guard:
        for lock in locks:
            guard.call_on_term(lock.release)  # a terminated export leaves no lock file (or folder made for it)
        with guard.hold():  # no window between creating the folder and registering it for removal
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=base))
            except OSError as exc:
                raise ExportError(f"cannot write in '{base}' ({exc.strerror}); choose another --output") from None
            guard.remove_on_term(tmp)
        staged: triton.Staged | None = None
        try:
            if calib_info:  # logged once the export can write: bad input stays a single error line
                _logger.info("int8 calibration: %d images from %s (%s)", calib_info["count"], calib_info["images"],
                             calib_info["source"])
            # build, then check
            t0 = time.perf_counter()
            built = build_artefact(fp32, features, prof, tmp, calibration=calib)
            export_s = time.perf_counter() - t0
            report = _parity(built.artefact, fp32, prof, features, pools, info) if prof.check.enabled else None
            if calib_info:
                built.extra.setdefault("quantization", {})["calibration"] = calib_info
            moves, side = _finish(prof, fp32, features, out, built, report, export_s)
            if tri.repo is not None and (report is None or report.passed):  # a failed artefact is never served
                facts = get_format(prof.format).triton
                signature = built.onnx if facts is not None and facts.signature_from_onnx else None
                staged = triton.stage(tri.repo, built.artefact, side, name=tri.name, preprocess=tri.preprocess,
                                      kind=tri.kind, instances=tri.instances, signature_source=signature)
                guard.remove_on_term(staged.tmp)
            if report is not None:
                moves.append((write_json(tmp / "parity.json", report.to_dict()), report_path(out)))
            moves.append((write_json(tmp / "sidecar.json", side), sidecar_path(out)))  # last: see _commit
            with guard.hold():
                triton_files = _commit(out, moves, report, staged)
        except Exception as exc:
            fault = os_fault(exc)  # the file system refused a write (disk full, file-size limit, read-only)
            if fault is None or (isinstance(exc, MffzooError) and not isinstance(exc, WriteFailed)):
                raise  # (an error line of its own stays as it is)
            raise write_failed(out, fault, where="pass another -o/--output") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if staged:
                staged.discard()
    files = [dst for _, dst in moves] + triton_files
    _logger.debug("wrote %s", ", ".join(map(str, files)))
    result = ExportResult(out, sidecar_path(out), report, files)
    if report is not None and not report.passed:
        skipped = " (not added to the Triton repository)" if tri.repo is not None else ""
        raise ParityFailed(f"parity gate missed for {out}: {'; '.join(report.failures)}; artefact kept{skipped}, "
                           f"report in {report_path(out)} (do not serve it; see docs/export.md#gates)", report)
    return result


def _finish(prof: ExportProfile, fp32: torch.nn.Module, features: Features, out: Path, built: Built,
            report: ParityReport | None, export_s: float) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    """The checked artefact's moves (artefact, then its companions) and its sidecar, hashing the final bytes."""
    fmt = get_format(prof.format)
    sources = fmt.companion_sources(built)
    moves = [(built.artefact, out)] + [(sources[sfx], out.with_suffix(sfx)) for sfx in fmt.companions]
    fmt.record_companions(built, out)
    side = _sidecar(prof, fp32, features, out, built, report, export_s)
    for src, dst in moves:  # after parity (the verdict is in it), before hashing: the hash is of the final file
        if dst.suffix == ".onnx":
            write_metadata(src, onnx_metadata(side))
    side["artefact_sha256"] = file_sha256(built.artefact)
    return moves, side


def _commit(out: Path, moves: list[tuple[Path, Path]], report: ParityReport | None,
            staged: triton.Staged | None) -> list[Path]:
    """Rename the finished files into place (inside the SIGTERM guard's hold); the sidecar, last of ``moves``,
    moves in only when everything it describes is there. Then the Triton repository."""
    out.parent.mkdir(parents=True, exist_ok=True)
    *files, (side_src, side_dst) = moves
    for src, dst in files:
        os.replace(src, dst)
    if report is None:
        report_path(out).unlink(missing_ok=True)  # a stale report of an earlier export would mislead
    os.replace(side_src, side_dst)
    return staged.commit() if staged else []


def _refuse_overwrite(out: Path, fmt: str) -> None:
    """Never replace an artefact silently: two option sets may map to one default name (issue 9)."""
    taken = [p for p in (out, *companion_files(fmt, out), sidecar_path(out)) if p.exists()]
    if taken:
        raise ExportError(f"'{taken[0]}' already exists; pass --overwrite to replace it, or choose another --output")


def _calibration(prof: ExportProfile, fp32: torch.nn.Module) -> tuple[np.ndarray | None, dict[str, Any]]:
    """int8 calibration images, loaded (and checked) before anything is written; and what the sidecar says of them.

    ONNX static: ``--calib-images``, else the parity images, else the demo data; OpenVINO (NNCF always
    calibrates): ``--calib-images``, else the built-in demo data.
    """
    q, fmt = prof.quantize, get_format(prof.format)
    if not fmt.needs_calibration(prof):
        return None, {}
    given = q.calibration_images or fmt.calibration_fallback(prof)
    root = Path(given) if given else default_image_root()
    source = ("--calib-images" if q.calibration_images else "--check-images") if given else "built-in demo data"
    return load_image_batch(root, q.num_calibration, fp32), {"images": str(root.resolve()), "source": source,
                                                        "count": q.num_calibration}


def _existing_folder(out: Path) -> Path:
    """The nearest existing folder above ``out`` (where the temp folder goes); a file in the way is bad input."""
    p = out.absolute().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ExportError(f"--output '{out}': '{p}' is a file, not a folder; choose another --output")
    return p


def _sidecar(prof: ExportProfile, fp32: torch.nn.Module, features: Features, out: Path, built: Built,
             report: ParityReport | None, export_s: float) -> dict[str, Any]:
    """What a serving process needs (input, preprocessing, outputs) and where the artefact came from."""
    img = model_img_size(fp32)
    d = prof.dynamic_size
    outs = output_specs(fp32, features, img, dynamic=d is not None)
    cfg = getattr(fp32, "pretrained_cfg", {}) or {}
    return {
        "format": prof.format,
        "artefact": out.name,
        "artefact_sha256": None,  # set by export_model once the file is final (metadata written)
        "onnx": get_format(prof.format).sidecar_onnx(out),
        "model": {
            "spec": _model_spec(prof), "architecture": cfg.get("architecture"),
            "tag": None if prof.random_init else cfg.get("tag"), "random_init": prof.random_init,
            "seed": prof.seed if prof.random_init else None, "model_args": prof.model_args,
            "num_classes": int(getattr(fp32, "num_classes", 0)), "num_features": int(fp32.num_features),
            "patch_size": _patch_size(fp32), "img_size": list(img), "depth": len(fp32.blocks),
        },
        "weights": {"sha256": state_dict_sha256(fp32), "hashed": "state dict (names, dtypes, shapes, bytes)",
                    "file": None if prof.random_init else cfg.get("file")},
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
                  "shape": ["batch", 3, *(("height", "width") if d else img)], "batch": to_dict(prof.batch),
                  **({"dynamic_size": {**to_dict(d), "multiple_of": _patch_size(fp32)}} if d else {})},
        "output": {"name": outs[0]["name"], "dtype": "float32", "shape": outs[0]["shape"], "features": features.kind,
                   "meaning": outs[0]["meaning"]},
        "outputs": outs,
        "preprocessing": preprocessing(fp32),
        "precision": prof.precision,
        "compute_dtype": get_format(prof.format).compute_dtype(prof.precision, built),
        "opset": prof.opset,
        **built.extra,
        "tools": tool_versions(),
        "export_seconds": round(export_s, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "profile": to_dict(prof),
        "parity": report.to_dict() if report else {"skipped": "--no-check: parity was not verified"},
    }


def check_artefact(
    artefact: str | os.PathLike[str], *, images: str | os.PathLike[str] | None = None
) -> ParityReport:
    """Re-run the parity check of an existing artefact against the weights its sidecar names.

    Writes ``<artefact>.parity.json``; raises :class:`ParityFailed` (exit code 1) when a gate is missed.
    """
    artefact = Path(artefact)
    side = read_sidecar(artefact)
    if artefact.suffix == ".onnx":
        _check_metadata(artefact, side)
    data = dict(side["profile"])
    data["check"] = {**data.get("check", {}), "enabled": True, **({"images": str(images)} if images else {})}
    prof = load_config(ExportProfile, data)
    _validate_machine(prof)
    if _missing_path(_model_spec(prof)):
        raise ExportError(f"the weights '{_model_spec(prof)}' named by the sidecar of '{artefact}' no longer exist; "
                          "restore them, or re-export from the weights you have")
    fp32 = load_export_model(prof)
    if state_dict_sha256(fp32) != side["weights"]["sha256"]:
        raise ExportError(f"the weights of '{_model_spec(prof)}' changed since '{artefact}' was exported "
                          "(sha256 differs from the sidecar); re-export, or restore those weights")
    changed = file_sha256(artefact) != side.get("artefact_sha256")
    facts = get_format(prof.format).triton
    if facts is not None and facts.companions and facts.companion_sha256:  # an IR is two files: its weights can
        companion = artefact.with_suffix(facts.companions[0])  # change alone
        if companion.is_file():
            changed |= file_sha256(companion) != triton.sidecar_lookup(side, facts.companion_sha256)
    if changed:
        _logger.warning("'%s' differs from the file that was exported (sha256 mismatch with its sidecar)", artefact)
    sets, info = _check_inputs(prof, fp32)
    info["artefact_changed_since_export"] = changed
    features = feature_spec(side["output"]["features"], fp32, prof.levels, prof.levels_norm)
    report = _parity(artefact, fp32, prof, features, sets, info)
    write_json(report_path(artefact), report.to_dict())
    if not report.passed:
        raise ParityFailed(f"parity gate missed for {artefact}: {'; '.join(report.failures)}; report in "
                           f"{report_path(artefact)}", report)
    return report


def _check_metadata(artefact: Path, side: dict[str, Any]) -> None:
    """The ONNX file's embedded serving facts must be its sidecar's: a server reads the file, not the sidecar."""
    have = read_metadata(artefact)
    want = onnx_metadata(side)
    if not set(want) & set(have):
        _logger.warning("'%s' carries no mffzoo metadata (exported by an older mffzoo); re-export to embed it",
                        artefact)
        return
    bad = [k for k in want if have.get(k) != want[k] and (k in have or k not in LATER_METADATA_KEYS)]
    if bad:
        k = bad[0]
        raise ExportError(f"'{artefact}' embeds metadata that disagrees with its sidecar ({len(bad)} key(s), e.g. "
                          f"{k}: file {have.get(k, 'missing')} vs sidecar {want[k]}); the file or "
                          f"{sidecar_path(artefact).name} was replaced or edited: re-export the model")
