"""Export MFF/timm ViTs to ONNX, OpenVINO IR or TensorRT (one registry: :mod:`.formats`), parity-checked against
PyTorch, optionally into a Triton model repository."""

from .api import ExportResult, check_artefact, export_model, load_export_model
from .onnx import OrtRunner, check_onnx, export_onnx
from .parity import Metrics, ParityFailed, ParityReport, compare, run_parity
from .profile import ExportProfile, load_profile
from .sidecar import SIDECAR_KEYS, read_sidecar
from .triton import add_to_repository
from .wrappers import ExportModule

__all__ = [
    "ExportResult", "check_artefact", "export_model", "load_export_model", "OrtRunner", "check_onnx", "export_onnx",
    "Metrics", "ParityFailed", "ParityReport", "compare", "run_parity", "ExportProfile", "load_profile",
    "SIDECAR_KEYS", "read_sidecar", "ExportModule", "add_to_repository",
]
