"""Export MFF/timm ViTs to ONNX (fp32/fp16/bf16/int8) and TensorRT, with a parity check against PyTorch."""

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
