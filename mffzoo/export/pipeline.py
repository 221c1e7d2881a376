"""One artefact pipeline for ``mffzoo export`` and ``mffzoo bench infer``: ONNX -> the format's artefact.

Both build through :func:`build_artefact`, so what the benchmark measures is built exactly like what the export
writes (same wrapper, I/O names, dtypes, quantiser settings, checker, engine profile): the two cannot drift.
What each format adds to the ONNX is its :class:`~mffzoo.export.formats.ExportFormat`'s ``build``.
:class:`SigtermGuard` turns SIGTERM into ``SystemExit`` so the callers' ``finally`` removes their temp folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from .formats import INPUT_NAME, Built, get_format
from .formats.base import fresh_path
from .inputs import model_img_size
from .onnx import export_onnx
from .posembed import traceable_pos_embed
from .profile import ExportProfile
from .wrappers import TORCH_DTYPES, ExportModule, Features, feature_spec

__all__ = ["INPUT_NAME", "Built", "build_artefact", "onnx_precision", "SigtermGuard"]

_logger = logging.getLogger("mffzoo")


def onnx_precision(precision: str, fmt: str = "onnx") -> str:
    """The precision of the ONNX an artefact of ``fmt`` is made from (int8 and OpenVINO start from fp32)."""
    return get_format(fmt).onnx_precision(precision)


def build_artefact(
    fp32: torch.nn.Module,
    features: str | Features,
    prof: ExportProfile,
    workdir: Path,
    *,
    calibration: np.ndarray | None = None,
    onnx_cache: dict[tuple[Any, ...], Path] | None = None,
) -> Built:
    """Build ``prof``'s artefact from the fp32 model into ``workdir``; ``onnx_cache`` reuses identical ONNX exports.

    The ONNX export is shared by every format; the format's :meth:`~mffzoo.export.formats.ExportFormat.build`
    makes the artefact from it. ``features`` names the output(s) (:class:`~mffzoo.export.wrappers.Features`:
    levels are several); ``prof.dynamic_size`` makes height and width dynamic (``fp32`` must then have been
    created with ``dynamic_img_size=True``, as :func:`~mffzoo.export.api.load_export_model` does).
    """
    fmt = get_format(prof.format)
    img = model_img_size(fp32)
    spec = feature_spec(features, fp32)
    b, d = prof.batch, prof.dynamic_size
    sizes = (d.min, d.opt, d.max) if d is not None else None
    src = fmt.onnx_precision(prof.precision)
    key = (spec, src, b.min, b.max, prof.opset, prof.slim, img, sizes)
    onnx_path = (onnx_cache or {}).get(key)
    if onnx_path is None:
        onnx_path = fresh_path(workdir, f"model-{src}", ".onnx")
        _logger.info("exporting %s (%s, %s) to ONNX opset %d, batch %d..%d%s", prof.model, spec.kind, src,
                     prof.opset, b.min, b.max, f", height and width {d.min}..{d.max} px" if d else "")
        # dynamic size: the position-embedding resize as matrix products every runtime computes alike
        with traceable_pos_embed(fp32) if d else contextlib.nullcontext():
            export_onnx(ExportModule(fp32, spec, TORCH_DTYPES[src]), onnx_path, img_size=img,
                        input_name=INPUT_NAME, output_name=spec.names, batch_min=b.min, batch_max=b.max,
                        opset=prof.opset, slim=prof.slim, size_range=(d.min, d.max) if d else None,
                        patch=int(fp32.patch_embed.patch_size[0]))
        if onnx_cache is not None:
            onnx_cache[key] = onnx_path
    built = Built(onnx_path, onnx_path, outputs=spec.names, dynamic_size=sizes)
    return fmt.build(built, prof, workdir, calibration=calibration, img_size=img)


class SigtermGuard:
    """While active, SIGTERM removes the registered temp folders and raises ``SystemExit(143)``.

    Python's default SIGTERM action ends the process without unwinding, which left ``.X.onnx.tmp-*`` folders
    behind. The handler removes the folders itself (a ``SystemExit`` raised inside some C callbacks exits at once,
    skipping ``finally``); inside :meth:`hold` (creating the folder, moving finished files in place) it waits until
    the block is done. A no-op outside the main thread or when a non-Python handler is installed; the previous
    handler is restored on exit.
    """

    def __init__(self) -> None:
        self._prev: Any = None
        self._held = False
        self._pending = False
        self._remove: list[Path] = []
        self._calls: list[Callable[[], None]] = []

    def remove_on_term(self, path: str | Path) -> None:
        self._remove.append(Path(path))

    def call_on_term(self, fn: Callable[[], None]) -> None:
        """Also run ``fn`` on SIGTERM (after the folders are removed), e.g. to release a lock and its file."""
        self._calls.append(fn)

    def _terminate(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        _logger.warning("terminated (SIGTERM): removing temporary files")
        for path in self._remove:
            shutil.rmtree(path, ignore_errors=True)
        for fn in self._calls:
            with contextlib.suppress(OSError):
                fn()
        raise SystemExit(128 + signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._held:
            self._pending = True
        else:
            self._terminate()

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not None:  # None: installed outside Python, cannot be restored
                self._prev = prev
                signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self._pending:
            self._terminate()
