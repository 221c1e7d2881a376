"""The one table of export formats: ``FORMATS[name]`` is the :class:`ExportFormat` behind ``--format name``.

Export (:mod:`mffzoo.export.api`), its pipeline, the Triton writer and ``mffzoo bench infer`` all read this table
and keep none of their own. Adding a backend is one module defining an ``ExportFormat`` subclass plus one
``register(...)`` line (registration order is the bench's row order).
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import INPUT_NAME, BenchVariant, Built, ExportFormat, TritonFacts, fresh_path
from .onnx import OnnxFormat
from .openvino import OpenVinoFormat
from .tensorrt import TensorRtFormat

__all__ = ["FORMATS", "register", "get_format", "ExportFormat", "Built", "BenchVariant", "TritonFacts",
           "INPUT_NAME", "fresh_path"]

FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to :data:`FORMATS` under its ``--format`` name; a name is registered once."""
    if fmt.name in FORMATS and type(FORMATS[fmt.name]) is not type(fmt):
        raise ValueError(f"export format '{fmt.name}' is already registered ({type(FORMATS[fmt.name]).__name__})")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    """The registered format ``name``; a one-line error naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown export format '{name}'; choose from {', '.join(FORMATS)}") from None


register(OnnxFormat())
register(OpenVinoFormat())
register(TensorRtFormat())
