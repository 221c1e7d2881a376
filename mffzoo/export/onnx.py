"""ONNX export (torch dynamo exporter) and the ONNX Runtime runner every ONNX check and benchmark uses."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError

__all__ = ["export_onnx", "check_onnx", "onnx_batch_dim", "OrtRunner", "ort_supports", "ort_providers",
           "write_metadata", "read_metadata"]

_logger = logging.getLogger("mffzoo")


def export_onnx(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    img_size: tuple[int, int],
    input_name: str,
    output_name: str | Sequence[str],
    batch_min: int = 1,
    batch_max: int = 32,
    opset: int = 20,
    slim: bool = True,
    size_range: tuple[int, int] | None = None,
    patch: int = 16,
) -> Path:
    """Export ``module`` with a dynamic batch dimension into one self-contained ``.onnx`` file and check it.

    The example batch is 2 because the exporter specialises a batch of 1; the batch ``Dim`` keeps the graph
    valid for ``batch_min..batch_max``. Weights stay inside the file (``external_data=False``; fine below 2 GB).
    ``size_range`` (min, max pixels) makes height and width dynamic too, each a multiple of ``patch``: the
    dimensions are ``patch * Dim`` (the model asserts whole patches), and the example input is non-square with at
    least two patches a side, so no size is specialised. ``output_name`` is one name or one per output.
    """
    path = Path(path)
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    example, dyn = _example_and_dims(img_size, batch_min, batch_max, size_range, patch)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                input_names=[input_name], output_names=names, dynamic_shapes=dyn, verbose=False,
            )
        except ImportError as exc:
            raise ExportError(f"ONNX export needs onnx + onnxscript ({exc}); pip install 'mffzoo[onnx]'") from None
    if slim:
        _slim(path)
    if size_range is not None:
        _name_patch_dims(path)
    check_onnx(path, dynamic_batch=batch_min != batch_max, dynamic_size=size_range is not None)
    return path


def _name_patch_dims(path: Path) -> None:
    """Give the outputs' grid dimensions of a dynamic-size export the input's names (``height_patches``,
    ``width_patches``; the exporter calls them ``s61``...), wherever the graph uses those symbols."""
    import onnx  # optional: mffzoo[onnx]

    model = onnx.load(str(path))
    names: dict[str, str] = {}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 4:  # NCHW maps (levels)
            for d, new in zip(dims[2:], ("height_patches", "width_patches")):
                if d.dim_param:
                    names.setdefault(d.dim_param, new)
    if not names:
        return
    for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]
    onnx.save(model, str(path))


def _example_and_dims(img_size: tuple[int, int], batch_min: int, batch_max: int,
                      size_range: tuple[int, int] | None, patch: int) -> tuple[torch.Tensor, Any]:
    """The example input and ``dynamic_shapes`` of :func:`export_onnx`."""
    axes: dict[int, Any] = {}
    batch = batch_min
    if batch_min != batch_max:  # a fixed batch: nothing dynamic to declare
        batch = min(max(2, batch_min), batch_max)
        axes[0] = torch.export.Dim("batch", min=batch_min, max=batch_max)
    h, w = img_size
    if size_range is not None:
        lo, hi = size_range[0] // patch, size_range[1] // patch
        h = max(lo, 2) * patch
        w = h + patch if h + patch <= hi * patch else h
        axes[2] = patch * torch.export.Dim("height_patches", min=lo, max=hi)
        axes[3] = patch * torch.export.Dim("width_patches", min=lo, max=hi)
    return torch.randn(batch, 3, h, w), ({"x": axes} if axes else None)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's passes log every rewrite at INFO; keep the user's console to our own progress lines."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if not _logger.isEnabledFor(logging.DEBUG):
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _slim(path: Path) -> None:
    """onnxslim folds constants and fuses leftovers of the exporter; skipped (logged) when not installed."""
    try:
        import onnxslim  # optional: mffzoo[onnx]
    except ImportError:
        _logger.info("onnxslim not installed: skipping the slim pass (pip install onnxslim)")
        return
    import onnx  # optional: mffzoo[onnx]

    slimmed = onnxslim.slim(onnx.load(str(path)))
    onnx.save(slimmed, str(path))


def onnx_batch_dim(path: str | os.PathLike[str]) -> str | int:
    """The first input's batch dimension: a symbol (dynamic) or a number (fixed)."""
    import onnx  # optional: mffzoo[onnx]

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def write_metadata(path: str | os.PathLike[str], meta: dict[str, str]) -> None:
    """Set ``meta`` in the file's ``metadata_props`` (other keys kept); the graph itself is not touched.

    Written after the parity check, so the file keeps the verdict; the graph bytes are compared before and after,
    so the served computation is the checked one.
    """
    import onnx  # optional: mffzoo[onnx]

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph.SerializeToString()
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    if model.graph.SerializeToString() != graph:  # cannot happen: only metadata_props was edited
        raise ExportError(f"writing metadata changed the graph of '{path}'")
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's ``metadata_props`` as a dict (what ONNX Runtime's ``custom_metadata_map`` returns)."""
    import onnx  # optional: mffzoo[onnx]

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError/OSError variants for a broken file
        raise ExportError(f"'{path}' is not a readable ONNX file ({exc}); re-export it") from None
    return {p.key: p.value for p in model.metadata_props}


def check_onnx(path: str | os.PathLike[str], *, dynamic_batch: bool = True, dynamic_size: bool = False) -> None:
    """``onnx.checker`` full check (with shape inference) plus: the batch (and, ``dynamic_size``, the height and
    width) dimensions are still symbolic."""
    import onnx  # optional: mffzoo[onnx]

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"exported ONNX '{path}' fails onnx.checker: {first}") from None
    if dynamic_batch and not isinstance(onnx_batch_dim(path), str):
        raise ExportError(f"exported ONNX '{path}' lost its dynamic batch dimension (try slim: false)")
    if dynamic_size:
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        if not all(d.dim_param for d in dims[2:4]):
            raise ExportError(f"exported ONNX '{path}' lost its dynamic height/width (try slim: false)")


def ort_supports(precision: str) -> tuple[bool, str]:
    """Whether this ONNX Runtime can run an artefact of ``precision``; else why not (for a one-line error)."""
    try:
        import onnxruntime as ort  # optional: mffzoo[onnx]
    except ImportError:
        return False, "onnxruntime is not installed: pip install 'mffzoo[onnx]'"
    if precision == "bf16" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, ("ONNX Runtime's CPU provider has no bf16 kernels (Conv, Expand, MatMul); check a bf16 ONNX "
                       "with onnxruntime-gpu or TensorRT on an NVIDIA GPU (--format trt), or use --precision fp16 "
                       "for ONNX Runtime on CPU, or --no-check to write the file unchecked")
    return True, ""


CUDA_EP = "CUDAExecutionProvider"
# ONNX Runtime's CUDA provider runs fp32 MatMul/Conv in TF32 by default (use_tf32=1): a "fp32" check would then
# measure TF32 error against the 1e-4 gate. Parity and serving numbers here are true fp32.
CUDA_EP_OPTIONS = {"use_tf32": "0"}


def ort_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[Any]:
    """The providers to ask for, CUDA first where present, each with our options (``InferenceSession`` form)."""
    names = list(requested) if requested is not None else [p for p in (CUDA_EP, "CPUExecutionProvider")
                                                            if p in available]
    return [(p, dict(CUDA_EP_OPTIONS)) if p == CUDA_EP else p for p in names]


class OrtRunner:
    """An ONNX Runtime session with full graph optimisation: fp32 numpy NCHW in, fp32 numpy out (one array per output).

    ``providers`` is what the session really runs on (``session.get_providers()``): ONNX Runtime falls back to
    the CPU in silence when the CUDA provider cannot load (e.g. an ``onnxruntime-gpu`` built for another CUDA
    major than the installed libraries); that is logged and kept in ``notes`` for the parity report."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort  # optional: mffzoo[onnx]

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        asked = ort_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), so, providers=asked)
        except Exception as exc:  # ORT raises its own exception types per failure
            first = str(exc).strip().splitlines()[0]
            raise ExportError(f"ONNX Runtime cannot load '{path}': {first}") from None
        self.providers: list[str] = list(self.session.get_providers())
        self.notes: list[str] = []
        if any(p == (CUDA_EP, CUDA_EP_OPTIONS) for p in asked) and CUDA_EP not in self.providers:
            self.notes.append(
                f"{CUDA_EP} was requested but the session runs on {', '.join(self.providers)}: ONNX Runtime could "
                f"not load its CUDA libraries (onnxruntime {ort.__version__}; its CUDA major must match the "
                "installed CUDA/cuDNN, see docs/export.md) and fell back silently")
            _logger.warning("warning: %s", self.notes[-1])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = self.output_names[0]
        self.path = Path(path)

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | list[np.ndarray]:
        """The output array; a list of them, in graph order, for an artefact with several (``levels``)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return outs[0] if len(outs) == 1 else list(outs)
