"""OpenVINO: the exported ONNX -> an IR (``.xml`` + ``.bin``), int8 through NNCF, and a CPU runner.

The IR is converted from the same fp32 ONNX file the ONNX path writes (one graph for every runtime). bf16 is not
a property of the IR but of compilation: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``bf16`` on CPUs with AMX or
AVX512-BF16, where it is also OpenVINO's default), so the runner always sets the hint explicitly: ``f32`` for
an fp32 artefact (else, on an AMX CPU, its parity would silently be bf16's). On a CPU without bf16 hardware
OpenVINO would silently run f32 instead; ``--precision bf16`` is refused there. int8 is NNCF post-training
quantisation (transformer preset) calibrated on real images; on x86 CPUs without VNNI its weights are 7-bit
(NNCF's ``overflow_fix``, the same saturation story and the same ``quantize.reduce_range`` switch as ONNX
Runtime's int8, see :mod:`mffzoo.export.quantize`).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError

__all__ = ["require_openvino", "cpu_has_bf16", "ov_supports", "compile_config", "convert_ir", "quantize_ir",
           "OvRunner", "keep_signal_stack", "INSTALL_HINT", "PRECISIONS"]

_logger = logging.getLogger("mffzoo")
INSTALL_HINT = "pip install 'mffzoo[openvino]'"
PRECISIONS = ("fp32", "bf16", "int8")


def require_openvino(precision: str = "fp32") -> None:
    """One-line error naming the extra when ``openvino`` (or, for int8, ``nncf``) does not import."""
    names = ["openvino"] + (["nncf"] if precision == "int8" else [])
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"--format openvino{' --precision int8' if name == 'nncf' else ''} needs the "
                              f"'{name}' package, which is not installed; {INSTALL_HINT}") from None


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give the calling thread its own alternate signal stack back after an OpenVINO call that replaces it.

    OpenVINO's CPU plugin installs a fresh alternate signal stack on the compiling thread for every compiled model
    and, when that model is destroyed, puts back the one it found (if its own is still current) and unmaps its
    own. Python destroys compiled models in any order, so the thread can be left pointing at an unmapped stack
    (e.g. a Core, then model A, then model B). Python installs every signal handler with ``SA_ONSTACK``
    (SIGINT's, torch DataLoader's SIGCHLD), so the next signal then kills the process with SIGSEGV, or the kernel
    writes the signal frame into memory mapped there since: the heap corruption that once forced OpenVINO's tests
    into their own process. With the caller's stack restored right after each call, every model saves and
    restores that one, which lives as long as its owner (faulthandler's lives as long as the process).
    """
    if not sys.platform.startswith("linux"):  # seen on Linux; elsewhere leave the platform's handling alone
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _StackT()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        now = _StackT()
        libc.sigaltstack(None, ctypes.byref(now))
        if (now.ss_sp, now.ss_size, now.ss_flags) != (saved.ss_sp, saved.ss_size, saved.ss_flags):
            if saved.ss_flags & 2:  # SS_DISABLE: there was none; the kernel wants ss_sp/ss_size ignored then
                saved.ss_flags = 2
            libc.sigaltstack(ctypes.byref(saved), None)


def _core() -> Any:
    import openvino as ov  # optional heavy dependency: imported only when OpenVINO is used

    return ov.Core()


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 here (AMX or AVX512-BF16); else it would fall back to f32."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ov_supports(precision: str) -> tuple[bool, str]:
    """Whether this machine can build and run an OpenVINO artefact of ``precision``; else why not (one line)."""
    try:
        require_openvino(precision)
    except ExportError as exc:
        return False, str(exc)
    if precision not in PRECISIONS:
        return False, f"--format openvino has no precision '{precision}'; use {', '.join(PRECISIONS)}"
    if precision == "bf16" and not cpu_has_bf16():
        caps = ", ".join(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return False, (f"--precision bf16 needs a CPU with bf16 hardware (AMX or AVX512-BF16); this CPU has none "
                       f"(OpenVINO CPU capabilities: {caps}), and OpenVINO would silently run fp32 instead (emulated "
                       "bf16 is many times slower than fp32): use --precision fp32 or int8 here")
    return True, ""


def compile_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The CPU compile settings of an artefact: what parity, the benchmark and serving (via the sidecar) all use.

    One stream and ``threads`` inference threads: one synchronous request at a time uses every core, which is how
    the other backends are measured. int8 keeps the non-quantised ops in bf16 where the CPU has it (OpenVINO's own
    default there), in f32 elsewhere.
    """
    hint = {"fp32": "f32", "bf16": "bf16"}.get(precision) or ("bf16" if cpu_has_bf16() else "f32")
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def convert_ir(onnx_path: str | os.PathLike[str], xml_path: str | os.PathLike[str], *,
               calibration: np.ndarray | None = None, int8: bool = False, reduce_range: bool = True,
               subset_size: int = 64) -> dict[str, Any]:
    """ONNX -> IR at ``xml_path`` (weights in fp32: ``save_model`` would compress them to fp16 by default).

    With ``int8``, NNCF quantises the converted model on ``calibration`` first; returns what the sidecar records.
    """
    import openvino as ov  # optional heavy dependency

    with keep_signal_stack():
        model = ov.convert_model(str(onnx_path))
    facts: dict[str, Any] = {"openvino": ov.__version__, "weights_compressed_to_fp16": False}
    if int8:
        model, facts["nncf"] = quantize_ir(model, calibration, reduce_range=reduce_range, subset_size=subset_size)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return facts


def quantize_ir(model: Any, calibration: np.ndarray | None, *, reduce_range: bool,
                subset_size: int) -> tuple[Any, str]:
    """NNCF post-training int8 (``ModelType.TRANSFORMER``) on preprocessed images, one image per calibration item."""
    if calibration is None or not len(calibration):
        raise ExportError("OpenVINO int8 needs calibration images; pass --calib-images DIR (a folder of images)")
    with _quiet_nncf():
        # optional heavy dependency (and it imports torch's extension machinery: quietened)
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        items = [np.ascontiguousarray(calibration[i:i + 1], dtype=np.float32) for i in range(len(calibration))]
        # reduce_range: 7-bit weights in every layer, so u8 x s8 int16 pair sums cannot saturate (CPUs without VNNI)
        adv = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE)
        try:
            with keep_signal_stack():  # NNCF compiles the model to collect statistics
                q = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=min(subset_size, len(items)), advanced_parameters=adv)
        except Exception as exc:  # NNCF raises its own exception types per failure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"NNCF could not quantise the model: {first}") from None
    return q, nncf.__version__


@contextlib.contextmanager
def _quiet_nncf():  # type: ignore[no-untyped-def]
    """NNCF logs to stdout and draws progress bars per stage; keep the console to our own lines unless -v."""
    if _logger.isEnabledFor(logging.DEBUG):
        yield
        return
    noisy = [logging.getLogger(n) for n in ("nncf", "torch.utils.cpp_extension")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)


class OvRunner:
    """An OpenVINO CPU compiled model with the artefact's settings: fp32 numpy NCHW in, fp32 numpy out."""

    def __init__(self, path: str | os.PathLike[str], precision: str = "fp32", *, threads: int | None = None) -> None:
        require_openvino()
        path = Path(path)
        weights = path.with_suffix(".bin")
        if not path.is_file() or not weights.is_file():
            missing = path if not path.is_file() else weights
            raise ExportError(f"OpenVINO IR file '{missing}' is missing (an IR is the .xml and the .bin next to it); "
                              "re-export the model or restore the file")
        self.config = compile_config(precision, threads)
        core = _core()
        try:
            with keep_signal_stack():
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU", self.config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"OpenVINO cannot load '{path}': {first}") from None
        self.request = self.compiled.create_infer_request()
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.output_name = self.output_names[0]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin really uses (an ov.Type)
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.path = path

    def __call__(self, x: Any) -> np.ndarray | list[np.ndarray]:
        """The output array; a list of them, in model order, for an IR with several outputs (``levels``)."""
        if not isinstance(x, np.ndarray):  # a torch tensor (the parity routine feeds numpy)
            x = x.detach().cpu().numpy()
        out = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        # copies: the request reuses its output buffers on the next call
        outs = [np.array(out[i], copy=True) for i in range(len(self.output_names))]
        return outs[0] if len(outs) == 1 else outs
