"""A Triton Inference Server model repository from an exported artefact: config.pbtxt written from the file itself.

``DIR/<name>/config.pbtxt`` + ``DIR/<name>/<version>/model.onnx|model.plan|model.xml`` (+ the sidecar next to
it). Input/output names, dims and data types are read from the artefact (the ONNX graph; an engine's I/O from the
ONNX it was built from; an OpenVINO IR's from its XML), never restated. ``preprocess=True`` adds
``<name>_preprocess`` (Python backend: encoded image bytes -> NCHW float, with the parity check's own
:mod:`.preprocess` copied next to its ``model.py``) and ``<name>_ensemble`` chaining it into the encoder.
Everything is built in a temporary folder and renamed into place, so a refused or failed write leaves the
repository as it was. The config schema is Triton's own ``ModelConfig`` (shipped by ``tritonclient``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ExportError
from ..io import exclusive, write_json
from . import preprocess as preprocess_module
from .formats import FORMATS, TritonFacts
from .sidecar import file_sha256, read_sidecar, sidecar_path

__all__ = ["TensorSpec", "Staged", "check_request", "stage", "add_to_repository",
           "read_signature", "model_config_pb2"]

_logger = logging.getLogger("mffzoo")


def _servable() -> dict[str, TritonFacts]:
    """The formats Triton can serve, with how (each format's ``triton`` facts; the one table is FORMATS)."""
    return {name: f.triton for name, f in FORMATS.items() if f.triton is not None}


IMAGE_INPUT = "IMAGE"  # the ensemble's input: one encoded image (JPEG/PNG/...) per batch item, TYPE_STRING
_PREPROCESS_MODULE = "mffzoo_preprocess.py"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # full shape, -1 where dynamic


def model_config_pb2() -> ModuleType:
    """Triton's ``model_config_pb2`` from ``tritonclient``, without needing its gRPC extra.

    ``tritonclient.grpc``'s ``__init__`` refuses to import without grpcio, although the schema module itself needs
    only protobuf: then load that file directly.
    """
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    try:
        from tritonclient.grpc import model_config_pb2 as pb  # optional dependency: pip install 'mffzoo[triton]'

        return pb
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "grpc":
            raise ExportError("a Triton model repository needs Triton's config schema from tritonclient; "
                              "pip install 'mffzoo[triton]'") from None
    except RuntimeError:  # tritonclient's own "no grpc support" error
        pass
    spec = importlib.util.find_spec("tritonclient")
    path = Path(next(iter(spec.submodule_search_locations or ()))) / "grpc" / "model_config_pb2.py"  # type: ignore
    mspec = importlib.util.spec_from_file_location(name, path)
    assert mspec is not None and mspec.loader is not None
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    sys.modules[name] = module
    return module


# ONNX TensorProto element types -> Triton data types (the ones an exported ViT can have)
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
               6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 8: "TYPE_STRING"}
_IR_TYPES = {"f32": "TYPE_FP32", "fp32": "TYPE_FP32", "f16": "TYPE_FP16", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16",
             "u8": "TYPE_UINT8", "i8": "TYPE_INT8", "i32": "TYPE_INT32", "i64": "TYPE_INT64", "boolean": "TYPE_BOOL"}


def _onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx  # optional dependency (mffzoo[onnx])

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_TYPES.get(t.elem_type, f"onnx elem_type {t.elem_type}"), dims)

    return [spec(v) for v in graph.input if v.name not in weights], [spec(v) for v in graph.output]


def _ir_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An OpenVINO IR's Parameter and Result tensors, read from its XML (no OpenVINO needed)."""
    root = ET.parse(path).getroot()
    layers = {lay.get("id"): lay for lay in root.iter("layer")}

    def port_spec(port: ET.Element, fallback: str) -> TensorSpec:
        name = (port.get("names") or fallback).split(",")[0].strip()
        dims = tuple(int(d.text or -1) for d in port.iter("dim"))
        prec = (port.get("precision") or "").lower()
        return TensorSpec(name, _IR_TYPES.get(prec, f"openvino precision {prec}"), dims)

    inputs = [port_spec(lay.find("output/port"), lay.get("name", "")) for lay in layers.values()  # type: ignore
              if lay.get("type") == "Parameter"]
    order = {lid: i for i, lid in enumerate(layers)}  # the model's outputs are its Result layers in file order
    outputs = []
    for edge in sorted(root.iter("edge"), key=lambda e: order.get(e.get("to-layer"), -1)):
        to = layers.get(edge.get("to-layer"))
        if to is not None and to.get("type") == "Result":
            src = layers[edge.get("from-layer")]
            port = next(p for p in src.iter("port") if p.get("id") == edge.get("from-port"))
            outputs.append(port_spec(port, to.get("name", "")))
    return inputs, outputs


def read_signature(path: str | os.PathLike[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file or an OpenVINO IR, from the file itself."""
    path = Path(path)
    if path.suffix == ".xml":
        return _ir_signature(path)
    return _onnx_signature(path)


def _model_name(side: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(side["artefact"]).stem)


def _existing_folder(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_request(repo: str | os.PathLike[str], fmt: str, *, preprocess: bool, dynamic_batch: bool,
                  kind: str = "auto") -> None:
    """What can be refused before an export starts (nothing is written yet)."""
    repo = Path(repo).expanduser()
    servable = _servable()
    if fmt not in servable:
        raise ExportError(f"--format {fmt} cannot be served by Triton from this tool; use --format "
                          f"{' or '.join(servable)} with --triton-repo")
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"--triton-repo '{repo}' is a file; pass a folder (a Triton model repository, "
                          "created if missing)")
    base = _existing_folder(repo)
    if not base.is_dir():
        raise ExportError(f"--triton-repo '{repo}': '{base}' is a file, not a folder; choose another --triton-repo")
    if preprocess and not dynamic_batch:
        raise ExportError("--triton-preprocess needs an artefact with a dynamic batch (Triton batches the images "
                          "of many requests); export with --batch MIN:OPT:MAX, e.g. --batch 1:8:32")
    if kind == "cpu" and servable[fmt].gpu_only:
        raise ExportError(f"triton.kind cpu: --format {fmt} runs on a GPU only; use triton.kind gpu or auto")
    model_config_pb2()  # tritonclient missing: say so now, not after the export


@dataclass
class Staged:
    """A repository update built in ``tmp``, applied by :meth:`commit` (renames only)."""

    repo: Path
    tmp: Path
    models: list[str]
    version: int
    files: list[Path] = field(default_factory=list)  # final paths, for the caller's report

    def commit(self) -> list[Path]:
        if not self.repo.exists():  # a new repository appears whole
            self.repo.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.tmp, 0o777 & ~_umask())
            os.replace(self.tmp, self.repo)
            return _verified(self.files)
        kept = set()
        for name in self.models:  # encoder first: an ensemble never points at a missing model
            src, dst = self.tmp / name, self.repo / name
            if not dst.exists():
                os.replace(src, dst)
                continue
            for version in sorted(p for p in src.iterdir() if p.is_dir() and not (dst / p.name).exists()):
                os.replace(version, dst / version.name)
            if (dst / "config.pbtxt").exists():  # same signature (checked): the user's edits stay
                kept.add(dst / "config.pbtxt")
            else:
                os.replace(src / "config.pbtxt", dst / "config.pbtxt")
        self.discard()
        written = [f for f in self.files if f not in kept]
        return _verified(written)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _verified(files: list[Path]) -> list[Path]:
    """The files a report names, each checked to be there after the commit (never a path written nowhere)."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"the Triton repository update did not produce '{missing[0]}' (was the repository changed "
                          "meanwhile?); check that model folder, then rerun")
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _config_text(cfg: Any, what: str) -> str:
    from google.protobuf import text_format  # comes with tritonclient's schema (protobuf)

    return f"# {what}; written by mffzoo export\n" + text_format.MessageToString(cfg)


def _read_config(path: Path) -> Any:
    from google.protobuf import text_format  # optional: comes with mffzoo[triton]

    pb = model_config_pb2()
    try:
        return text_format.Parse(path.read_text(), pb.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ExportError(f"'{path}' is not a valid Triton config ({exc}); fix or remove that model "
                          "folder") from None


def _add_tensors(dst: Any, tensors: list[TensorSpec], batched: bool) -> None:
    pb = model_config_pb2()
    for t in tensors:
        if not t.dtype.startswith("TYPE_"):
            raise ExportError(f"tensor '{t.name}' has a type Triton cannot serve ({t.dtype})")
        dst.add(name=t.name, data_type=pb.DataType.Value(t.dtype), dims=list(t.dims[1:] if batched else t.dims))


def _io(cfg: Any) -> tuple[Any, ...]:
    """What must not change between versions of one Triton model."""
    def tensors(ts: Any) -> tuple[Any, ...]:
        return tuple((t.name, t.data_type, tuple(t.dims)) for t in ts)
    return cfg.platform, cfg.backend, tensors(cfg.input), tensors(cfg.output)


def _describe(cfg: Any) -> str:
    pb = model_config_pb2()
    rt = cfg.backend or cfg.platform
    ins = ", ".join(f"{t.name} {pb.DataType.Name(t.data_type)} {list(t.dims)}" for t in cfg.input)
    outs = ", ".join(f"{t.name} {pb.DataType.Name(t.data_type)} {list(t.dims)}" for t in cfg.output)
    return f"{rt}: {ins} -> {outs}"


def _preferred(batch: dict[str, int]) -> list[int]:
    """TensorRT tunes for ``opt``; ``max`` fills the GPU: Triton waits briefly to form either."""
    return sorted({int(batch["opt"]), int(batch["max"])})


def stage(
    repo: str | os.PathLike[str],
    artefact: str | os.PathLike[str],
    side: dict[str, Any],
    *,
    name: str | None = None,
    preprocess: bool = False,
    kind: str = "auto",
    instances: int = 1,
    signature_source: str | os.PathLike[str] | None = None,
) -> Staged:
    """Build the repository update for ``artefact`` (described by ``side``) in a temp folder; refuse conflicts.

    ``signature_source`` is the file whose graph gives the I/O (default: the artefact, or the ONNX named in the
    sidecar for a TensorRT plan). The repository is untouched until :meth:`Staged.commit`.
    """
    pb = model_config_pb2()
    repo = Path(repo).expanduser()
    artefact = Path(artefact)
    backend = _servable().get(side["format"])
    batch = side["input"]["batch"]
    check_request(repo, side["format"], preprocess=preprocess, dynamic_batch=batch["min"] != batch["max"], kind=kind)
    assert backend is not None
    name = name or _model_name(side)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ExportError(f"Triton model name '{name}' must be letters, digits, '_', '-', '.'; pass another name")
    src = Path(signature_source) if signature_source else (
        artefact.parent / side["onnx"] if backend.signature_from_onnx else artefact)
    inputs, outputs = read_signature(src)
    batched = batch["min"] != batch["max"]
    if batched and any(t.dims[:1] != (-1,) for t in inputs + outputs):
        raise ExportError(f"'{src}' has a fixed first dimension although its sidecar says batch "
                          f"{batch['min']}..{batch['max']}; re-export it")
    max_batch = int(batch["max"]) if batched else 0
    group = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}.get(kind, backend.kind)

    cfg = pb.ModelConfig(name=name, max_batch_size=max_batch)
    setattr(cfg, backend.key, backend.value)
    _add_tensors(cfg.input, inputs, batched)
    _add_tensors(cfg.output, outputs, batched)
    if batched:
        cfg.dynamic_batching.preferred_batch_size.extend(_preferred(batch))
        cfg.dynamic_batching.max_queue_delay_microseconds = 100
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(group), count=instances)

    models = [name]
    if preprocess or (repo / f"{name}_ensemble").exists():  # an existing ensemble is kept in step
        models += [f"{name}_preprocess", f"{name}_ensemble"]
    version = _next_version(repo / name)
    for m in models:  # a file where a version folder goes would swallow this version (commit skips taken names)
        _refuse_version_files(repo / m, version if m != f"{name}_ensemble" else 1)
    _refuse_conflict(repo / name, cfg)  # the preprocessing and ensemble configs are checked as they are built

    base = repo if repo.is_dir() else _existing_folder(repo)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.triton-tmp-", dir=base))
    except OSError as exc:
        raise ExportError(f"cannot write in '{base}' ({exc.strerror}); choose another --triton-repo") from None
    staged = Staged(repo, tmp, models, version)
    try:
        vdir = tmp / name / str(version)
        vdir.mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(_config_text(cfg, f"{side['artefact']} ({side['precision']})"))
        _copy_checked(artefact, vdir / backend.file, side.get("artefact_sha256"))
        for i, suffix in enumerate(backend.companions):
            want = sidecar_lookup(side, backend.companion_sha256) if i == 0 else None
            _copy_checked(artefact.with_suffix(suffix), (vdir / backend.file).with_suffix(suffix), want)
        write_json(sidecar_path(vdir / backend.file), side)
        staged.files += [repo / name / "config.pbtxt", repo / name / str(version) / backend.file]
        if len(models) > 1:
            _stage_preprocess(staged, name, version, side, inputs[0], outputs, max_batch)
    except BaseException:
        staged.discard()
        raise
    return staged


def _refuse_version_files(model_dir: Path, version: int) -> None:
    """A numbered entry of a model folder that is not a folder (e.g. a file ``1``): Triton reads versions from
    folders only, and this version's would land nowhere."""
    if not model_dir.is_dir():
        return
    for entry in sorted(model_dir.iterdir()):
        if entry.name.isdigit() and not entry.is_dir():
            raise ExportError(f"'{entry}' is a file where Triton expects a version folder (this export adds "
                              f"version {version}); move it away, or pass another triton name or --triton-repo")


def _next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def _refuse_conflict(model_dir: Path, want: Any) -> None:
    """A new version must keep the model's runtime and I/O: clients and ensembles depend on them."""
    if not model_dir.exists():
        return
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        raise ExportError(f"'{model_dir}' exists but holds no config.pbtxt; pass another triton name or remove it")
    have = _read_config(cfg_path)
    if _io(have) != _io(want):
        raise ExportError(f"Triton model '{model_dir.name}' in '{model_dir.parent}' has another signature "
                          f"({_describe(have)}) than this artefact ({_describe(want)}); pass another triton "
                          "name (--set triton.name=...) or another --triton-repo")
    if have.max_batch_size > want.max_batch_size:
        raise ExportError(f"Triton model '{model_dir.name}' sends batches up to {have.max_batch_size}, this "
                          f"artefact takes at most {want.max_batch_size}; export with --batch up to "
                          f"{have.max_batch_size} or lower max_batch_size in {model_dir / 'config.pbtxt'}")


def sidecar_lookup(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data if keys else None


def _copy_checked(src: Path, dst: Path, sha256: str | None) -> None:
    """The served file is byte-identical to the parity-checked artefact (the sha256 its sidecar records)."""
    if not src.is_file():
        raise ExportError(f"'{src}' is missing; re-export the model")
    shutil.copyfile(src, dst)
    if sha256 and file_sha256(dst) != sha256:
        raise ExportError(f"'{src}' differs from the file its sidecar describes (sha256); re-export it")


def _stage_preprocess(staged: Staged, name: str, version: int, side: dict[str, Any], pixel: TensorSpec,
                      outputs: list[TensorSpec], max_batch: int) -> None:
    """``<name>_preprocess`` (Python backend) + ``<name>_ensemble``: images in, the encoder's output out."""
    pb = model_config_pb2()
    image = TensorSpec(IMAGE_INPUT, "TYPE_STRING", (-1, 1))
    pre_name, ens_name = f"{name}_preprocess", f"{name}_ensemble"

    pre = pb.ModelConfig(name=pre_name, backend="python", max_batch_size=max_batch)
    _add_tensors(pre.input, [image], True)
    _add_tensors(pre.output, [pixel], True)
    pre.dynamic_batching.max_queue_delay_microseconds = 100
    pre.instance_group.add(kind=pb.ModelInstanceGroup.Kind.KIND_CPU, count=1)

    ens = pb.ModelConfig(name=ens_name, platform="ensemble", max_batch_size=max_batch)
    _add_tensors(ens.input, [image], True)
    _add_tensors(ens.output, outputs, True)
    step = ens.ensemble_scheduling.step.add(model_name=pre_name, model_version=-1)
    step.input_map[IMAGE_INPUT] = IMAGE_INPUT
    step.output_map[pixel.name] = "preprocessed"
    step = ens.ensemble_scheduling.step.add(model_name=name, model_version=-1)
    step.input_map[pixel.name] = "preprocessed"
    for t in outputs:
        step.output_map[t.name] = t.name
    for m, want in ((pre_name, pre), (ens_name, ens)):
        _refuse_conflict(staged.repo / m, want)

    tmp = staged.tmp
    pdir = tmp / pre_name / str(version)  # preprocess versions follow the encoder's: same sidecar, same number
    pdir.mkdir(parents=True)
    (tmp / pre_name / "config.pbtxt").write_text(_config_text(pre, "encoded images -> " + pixel.name))
    shutil.copyfile(preprocess_module.__file__, pdir / _PREPROCESS_MODULE)
    (pdir / "preprocessing.json").write_text(json.dumps(side["preprocessing"], indent=2) + "\n")
    (pdir / "model.py").write_text(MODEL_PY.format(encoder=name, output=pixel.name, image=IMAGE_INPUT))
    (tmp / ens_name / "1").mkdir(parents=True)  # an ensemble needs one (empty) version folder
    (tmp / ens_name / "config.pbtxt").write_text(_config_text(ens, f"images -> {pre_name} -> {name}"))
    staged.files += [staged.repo / pre_name / str(version) / "model.py", staged.repo / ens_name / "config.pbtxt"]


MODEL_PY = '''"""Triton Python backend written by mffzoo export: encoded images -> '{output}' for model '{encoder}'.

The preprocessing is mffzoo_preprocess.py (a copy of mffzoo/export/preprocess.py, the code mffzoo's parity check
runs) with preprocessing.json (the sidecar's preprocessing section), both next to this file. The Python backend's
environment needs numpy and pillow (pip install pillow).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mffzoo_preprocess import preprocess_batch  # noqa: E402

INPUT, OUTPUT = "{image}", "{output}"


class TritonPythonModel:
    def initialize(self, args):
        with open(os.path.join(HERE, "preprocessing.json")) as f:
            self.cfg = json.load(f)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # provided by the Triton server

        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy()
            try:
                pixels = preprocess_batch(images, self.cfg)
            except Exception as exc:  # an undecodable image fails its own request only
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"cannot preprocess the image: {{exc}}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, pixels)]))
        return responses
'''


def add_to_repository(
    repo: str | os.PathLike[str], artefact: str | os.PathLike[str], *, name: str | None = None,
    preprocess: bool = False, kind: str = "auto", instances: int = 1,
) -> list[Path]:
    """Add an exported artefact (with its sidecar) to a Triton model repository as the model's next version."""
    side = read_sidecar(artefact)
    parity = side.get("parity") or {}
    if parity.get("passed") is False:
        raise ExportError(f"'{artefact}' missed its parity gate (see its sidecar); do not serve it: re-export")
    with exclusive(Path(repo).expanduser(), fix="wait for it to finish or pass another repository"):
        staged = stage(repo, artefact, side, name=name, preprocess=preprocess, kind=kind, instances=instances)
        try:
            return staged.commit()
        finally:
            staged.discard()
