"""Self-describing ONNX (metadata_props) and Triton model repositories: real exports, Triton's own config schema.

No Triton server runs here: configs are parsed with Triton's ``ModelConfig`` protobuf (from tritonclient) and
checked against the ONNX graph; the generated Python-backend ``model.py`` runs with a ten-line stand-in for the
server-only ``triton_python_backend_utils`` module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from helpers import cli_error
from PIL import Image
from timm.data import create_transform

from mffzoo.cli.main import main
from mffzoo.errors import ExportError
from mffzoo.export import ExportModule, check_artefact, export_model
from mffzoo.export.onnx import read_metadata, write_metadata
from mffzoo.export.preprocess import preprocess_batch, preprocess_image
from mffzoo.export.sidecar import METADATA_KEYS, onnx_metadata
from mffzoo.export.triton import add_to_repository, check_request, read_signature
from mffzoo.zoo import load_model, write_model_folder

REPO = Path(__file__).resolve().parents[1]
ARCH = "mff_vit_small_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _model_config_pb2() -> types.ModuleType:
    """Triton's schema as tritonclient ships it (loaded from its file when the gRPC extra is not installed)."""
    try:
        from tritonclient.grpc import model_config_pb2
        return model_config_pb2
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("tritonclient")
        path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
        mspec = importlib.util.spec_from_file_location("tritonclient.grpc.model_config_pb2", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module


pb = _model_config_pb2()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse(path: Path):
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mffzoo.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("img") / "demo", train_per_class=1, val_per_class=2,
                              image_size=32) / "val"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = load_model("mff_vit_small", random_init=True, **TINY)
    return write_model_folder(tmp_path_factory.mktemp("zoo") / "tiny", ARCH, model, model_args=TINY)


@pytest.fixture(scope="module")
def exported(tiny: Path, images: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real export into a Triton repository with the preprocessing ensemble."""
    root = tmp_path_factory.mktemp("exp")
    res = export_model(str(tiny), output=root / "enc.onnx", batch={"min": 1, "opt": 2, "max": 4},
                       check={"images": str(images)}, triton={"repo": str(root / "repo"), "preprocess": True})
    return res, root / "repo"


# ---------------------------------------------------------------- preprocessing: one function, timm's numbers


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_preprocess_equals_timm_create_transform(interp: str) -> None:
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (64, 64), (100, 41), (33, 32), (300, 250)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size, crop_pct, mode in ((32, 0.875, "center"), (224, 0.9, "center"), (48, 1.0, "squash"),
                                     (32, 1.0, "center")):
            cfg = dict(input_size=(3, size, size), interpolation=interp, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25),
                       crop_pct=crop_pct, crop_mode=mode)
            want = create_transform(**cfg, is_training=False)(Image.fromarray(arr)).numpy()
            np.testing.assert_allclose(preprocess_image(arr, cfg), want, atol=1e-5)
            png = io.BytesIO()
            Image.fromarray(arr).save(png, format="PNG")  # encoded bytes, what a Triton client sends
            np.testing.assert_allclose(preprocess_image(png.getvalue(), cfg), want, atol=1e-5)


def test_parity_images_use_the_shared_preprocessing(tiny: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_image_batch (the parity check's real images) == timm's transform for that model's data config."""
    from mffzoo.export import inputs
    from mffzoo.export.inputs import image_files, load_image_batch, preprocessing

    model = load_model(str(tiny), pretrained=True)
    cfg = preprocessing(model)
    calls = []
    monkeypatch.setattr(inputs, "preprocess_image", lambda im, c: calls.append(c) or preprocess_image(im, c))
    tf = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
                             if k not in ("steps", "value_range")}, is_training=False)
    want = np.stack([tf(Image.open(p).convert("RGB")).numpy() for p in image_files(images, 5)])
    np.testing.assert_allclose(load_image_batch(images, 5, model), want, atol=1e-5)
    assert len(calls) == 5 and calls[0] == cfg  # the parity check runs the function Triton's model.py imports


# ---------------------------------------------------------------- self-describing ONNX


def test_onnx_carries_the_sidecar_serving_facts(exported) -> None:
    import onnxruntime as ort

    res, _ = exported
    side = json.loads(res.sidecar.read_text())
    meta = ort.InferenceSession(str(res.artefact)).get_modelmeta().custom_metadata_map
    assert set(METADATA_KEYS) <= set(meta)
    m = {k: json.loads(meta[k]) for k in METADATA_KEYS}
    pre = side["preprocessing"]
    assert m["input_name"] == "pixel_values" and m["input_layout"] == "NCHW" and m["input_size"] == [3, 32, 32]
    assert m["mean"] == pre["mean"] and m["std"] == pre["std"] and m["value_range"] == [0.0, 1.0]
    assert m["interpolation"] == "bicubic" and m["crop_pct"] == 0.875 and m["crop_mode"] == "center"
    assert m["output_kind"] == "pooled" and m["output_name"] == "embedding" and m["output_width"] == 64
    assert m["architecture"] == ARCH and m["weights_sha256"] == side["weights"]["sha256"]
    assert m["mffzoo_version"] == side["tools"]["mffzoo"] and m["parity"] == "passed" and m["precision"] == "fp32"
    assert side["artefact_sha256"] == _sha(res.artefact)  # the hash is of the final file (metadata included)
    assert check_artefact(res.artefact).passed  # the file with metadata is the one that passes parity


def test_metadata_verdict_follows_the_sidecar() -> None:
    side = {"input": {"name": "x", "layout": "NCHW", "dtype": "float32", "batch": {"min": 1, "opt": 1, "max": 1}},
            "output": {"name": "y", "features": "tokens", "shape": ["batch", 5, 8]},
            "preprocessing": {"input_size": [3, 8, 8], "value_range": [0, 1], "mean": [0, 0, 0], "std": [1, 1, 1],
                              "interpolation": "bilinear", "crop_pct": 1.0},
            "model": {"architecture": "a", "tag": None}, "precision": "fp16", "weights": {"sha256": "0"},
            "tools": {"mffzoo": "9"}, "parity": {"skipped": "--no-check"}}
    assert json.loads(onnx_metadata(side)["parity"]) == "not checked"
    assert json.loads(onnx_metadata({**side, "parity": {"passed": False}})["parity"]) == "failed"
    assert json.loads(onnx_metadata(side)["output_width"]) == 8


def test_write_metadata_keeps_the_graph(exported, tmp_path: Path) -> None:
    res, _ = exported
    art = tmp_path / "m.onnx"
    shutil.copy(res.artefact, art)
    before = onnx.load(str(art)).graph.SerializeToString()
    write_metadata(art, {"mean": "[1, 2, 3]", "extra": "\"x\""})
    after = onnx.load(str(art))
    assert after.graph.SerializeToString() == before
    meta = read_metadata(art)
    assert meta["mean"] == "[1, 2, 3]" and meta["extra"] == "\"x\""
    assert meta["std"] == read_metadata(res.artefact)["std"]  # the other keys kept


def _snippet(doc: str, after: str) -> str:
    text = (REPO / doc).read_text()
    block = re.search(re.escape(after) + r".*?```python\n(.*?)```", text, re.S)
    assert block, f"serving snippet not found in {doc}"
    return block.group(1)


@pytest.mark.parametrize("doc, after, files, out", [
    ("README.md", "the preprocessing comes from the model file", ["image.jpg"], "emb"),
    ("docs/export.md", "the tests run both verbatim on a real export", ["a.png", "b.png"], "emb"),
])
def test_serving_snippets_run_without_torch(exported, tiny: Path, tmp_path: Path, doc: str, after: str,
                                            files: list[str], out: str) -> None:
    """The documented code, verbatim, on a real export and non-square images: equals PyTorch on timm's transform."""
    res, _ = exported
    code = _snippet(doc, after)
    assert "custom_metadata_map" in code and "json.load(open" not in code  # reads the model file, not the sidecar
    shutil.copy(res.artefact, tmp_path / "model.onnx")  # no sidecar next to it
    rng = np.random.default_rng(3)
    for i, name in enumerate(files):
        Image.fromarray(rng.integers(0, 256, (45 + 9 * i, 61 - 20 * i, 3), dtype=np.uint8)).save(tmp_path / name)
    check = f"\nimport sys\nassert 'torch' not in sys.modules, 'imported torch'\nnp.save('out.npy', {out})\n"
    p = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    model = load_model(str(tiny), pretrained=True)
    from timm.data import resolve_data_config

    tf = create_transform(**resolve_data_config({}, model=model), is_training=False)
    x = torch.stack([tf(Image.open(tmp_path / name).convert("RGB")) for name in files])
    with torch.no_grad():
        want = ExportModule(model, "pooled")(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-4)


def test_check_only_refuses_metadata_that_disagrees(exported, tmp_path: Path, capsys) -> None:
    res, _ = exported
    art = tmp_path / "m.onnx"
    shutil.copy(res.artefact, art)
    shutil.copy(res.sidecar, tmp_path / "m.onnx.json")
    write_metadata(art, {"mean": json.dumps([0.5, 0.5, 0.5])})  # e.g. a file re-tagged by hand
    err = cli_error(["export", "--check-only", str(art)], capsys)
    assert "disagrees with its sidecar" in err and "mean" in err
    shutil.copy(res.artefact, art)  # intact file, edited sidecar: refused as well
    side = json.loads(res.sidecar.read_text())
    side["preprocessing"]["interpolation"] = "bilinear"
    (tmp_path / "m.onnx.json").write_text(json.dumps(side))
    with pytest.raises(ExportError, match="interpolation"):
        check_artefact(art)


# ---------------------------------------------------------------- Triton repository


def test_every_config_parses_with_tritons_schema_and_matches_the_graph(exported) -> None:
    res, repo = exported
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == ["enc", "enc_ensemble", "enc_preprocess"]
    cfg = {c.parent.name: _parse(c) for c in configs}
    enc = cfg["enc"]
    graph = onnx.load(str(repo / "enc" / "1" / "model.onnx")).graph

    def tensors(ts):
        return [(t.name, ONNX_TO_TRITON[t.type.tensor_type.elem_type],
                 [d.dim_value for d in t.type.tensor_type.shape.dim][1:]) for t in ts]

    assert tensors(graph.input) == [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in enc.input]
    assert tensors(graph.output) == [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in enc.output]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert enc.backend == "onnxruntime" and enc.max_batch_size == 4
    assert list(enc.dynamic_batching.preferred_batch_size) == [2, 4]
    assert [(g.kind, g.count) for g in enc.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    pre, ens = cfg["enc_preprocess"], cfg["enc_ensemble"]
    assert pre.backend == "python" and pre.output[0].name == "pixel_values" and list(pre.output[0].dims) == [3, 32, 32]
    assert pb.DataType.Name(pre.input[0].data_type) == "TYPE_STRING"
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == \
        ["enc_preprocess", "enc"]
    assert [(t.name, list(t.dims)) for t in ens.output] == [(t.name, list(t.dims)) for t in enc.output]
    s1, s2 = ens.ensemble_scheduling.step
    assert s1.output_map["pixel_values"] == s2.input_map["pixel_values"]
    assert (repo / "enc_ensemble" / "1").is_dir()
    # the served file is byte-identical to the parity-checked artefact, and its sidecar travels with it
    side = json.loads(res.sidecar.read_text())
    assert _sha(repo / "enc" / "1" / "model.onnx") == _sha(res.artefact) == side["artefact_sha256"]
    assert json.loads((repo / "enc" / "1" / "model.onnx.json").read_text()) == side
    assert not list(repo.glob(".*")), "temporary folder left in the repository"


def test_generated_preprocess_model_runs_and_matches_timm(exported) -> None:
    """The generated model.py on encoded images (stand-in for the server-only triton_python_backend_utils)."""
    res, repo = exported
    vdir = repo / "enc_preprocess" / "1"
    assert (vdir / "mffzoo_preprocess.py").read_bytes() == \
        (REPO / "mffzoo" / "export" / "preprocess.py").read_bytes()  # the parity check's own code, unchanged
    stub = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, data):
            self.name, self.data = name, data

        def as_numpy(self):
            return self.data

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    stub.Tensor, stub.InferenceResponse, stub.TritonError = Tensor, InferenceResponse, str
    stub.get_input_tensor_by_name = lambda req, name: req[name]
    sys.modules["triton_python_backend_utils"] = stub
    try:
        spec = importlib.util.spec_from_file_location("generated_model", vdir / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TritonPythonModel()
        model.initialize({})
        rng = np.random.default_rng(1)
        arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 52), (70, 33), (32, 32))]
        encoded = []
        for a in arrays:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            encoded.append(buf.getvalue())
        batch = np.array(encoded, dtype=object).reshape(-1, 1)  # what a TYPE_STRING [1] input arrives as
        good, bad = model.execute([{"IMAGE": Tensor("IMAGE", batch)},
                                   {"IMAGE": Tensor("IMAGE", np.array([[b"not an image"]], dtype=object))}])
    finally:
        del sys.modules["triton_python_backend_utils"]
        sys.modules.pop("mffzoo_preprocess", None)
        sys.path.remove(str(vdir))
    (out,) = good.output_tensors
    assert out.name == "pixel_values" and out.data.dtype == np.float32 and out.data.shape == (3, 3, 32, 32)
    side = json.loads(res.sidecar.read_text())
    tf = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in side["preprocessing"].items()
                             if k not in ("steps", "value_range")}, is_training=False)
    want = np.stack([tf(Image.fromarray(a)).numpy() for a in arrays])
    np.testing.assert_allclose(out.data, want, atol=1e-5)
    assert bad.error and "cannot preprocess" in bad.error and not bad.output_tensors
    np.testing.assert_allclose(preprocess_batch(batch, side["preprocessing"]), want, atol=1e-5)


def test_second_version_keeps_the_first(exported, tmp_path: Path) -> None:
    res, repo0 = exported
    repo = tmp_path / "repo"
    shutil.copytree(repo0, repo)
    before = _tree(repo)
    files = add_to_repository(repo, res.artefact)  # keeps the ensemble in step: preprocess v2 as well
    assert sorted(p.name for p in (repo / "enc").iterdir()) == ["1", "2", "config.pbtxt"]
    assert sorted(p.name for p in (repo / "enc_preprocess").iterdir()) == ["1", "2", "config.pbtxt"]
    after = _tree(repo)
    assert {k: v for k, v in after.items() if k in before} == before  # version 1 and the configs untouched
    assert after["enc/2/model.onnx"] == _sha(res.artefact) and repo / "enc" / "2" / "model.onnx" in files
    assert repo / "enc" / "config.pbtxt" not in files  # kept, not rewritten
    add_to_repository(repo, res.artefact)
    assert (repo / "enc" / "3" / "model.onnx").is_file()


def test_same_name_other_signature_is_refused(exported, tiny: Path, images: Path, tmp_path: Path, capsys) -> None:
    res, repo0 = exported
    repo = tmp_path / "repo"
    shutil.copytree(repo0, repo)
    before = _tree(repo)
    out = tmp_path / "o" / "enc.onnx"
    with pytest.raises(SystemExit) as exc:  # refused once the artefact exists: its signature is read from it
        main(["export", str(tiny), "--features", "tokens", "--batch", "1:2:4", "-o", str(out),
              "--check-images", str(images), "--triton-repo", str(repo)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and "another signature" in last
    assert "embedding" in last and "tokens" in last
    assert _tree(repo) == before and not (tmp_path / "o").exists()  # nothing half-written, anywhere


def test_triton_bad_input_is_one_line_and_writes_nothing(tiny: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["export", str(tiny), "--no-check", "-o", str(tmp_path / "o" / "m.onnx")]
    assert "is a file" in cli_error([*base, "--triton-repo", str(afile)], capsys)
    assert "is a file" in cli_error([*base, "--triton-repo", str(afile / "sub")], capsys)
    err = cli_error([*base, "--batch", "4", "--triton-repo", str(tmp_path / "r"), "--triton-preprocess"], capsys)
    assert "needs an artefact with a dynamic batch" in err
    assert "needs a repository" in cli_error([*base, "--triton-preprocess"], capsys)
    assert "--check-only re-checks" in cli_error(["export", "--check-only", "x.onnx", "--triton-repo", "r"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    with pytest.raises(ExportError, match="cannot be served by Triton"):
        check_request(tmp_path / "r", "tflite", preprocess=False, dynamic_batch=True)


def _fake_artefact(src_onnx: Path, root: Path, fmt: str, suffix: str, side: dict) -> Path:
    """A file of another format with a sidecar naming it (content is copied, not interpreted, by the writer)."""
    root.mkdir(parents=True, exist_ok=True)
    art = root / f"enc{suffix}"
    art.write_bytes(b"opaque engine bytes " + src_onnx.read_bytes()[:64])
    shutil.copy(src_onnx, root / "enc.onnx")
    (root / f"{art.name}.json").write_text(json.dumps({**side, "format": fmt, "artefact": art.name,
                                                       "onnx": "enc.onnx", "artefact_sha256": _sha(art)}))
    return art


def test_tensorrt_plan_row(exported, tmp_path: Path) -> None:
    """A TensorRT engine: platform tensorrt_plan, GPU instances, I/O from the ONNX it was built from."""
    res, _ = exported
    side = json.loads(res.sidecar.read_text())
    art = _fake_artefact(res.artefact, tmp_path / "e", "trt", ".engine", side)
    add_to_repository(tmp_path / "repo", art)
    cfg = _parse(tmp_path / "repo" / "enc" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and not cfg.backend
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("pixel_values", [3, 32, 32])]
    assert _sha(tmp_path / "repo" / "enc" / "1" / "model.plan") == _sha(art)
    with pytest.raises(ExportError, match="runs on a GPU only"):
        add_to_repository(tmp_path / "repo2", art, kind="cpu")
    assert not (tmp_path / "repo2").exists()


def test_openvino_row(exported, tmp_path: Path) -> None:
    """An OpenVINO IR: model.xml + model.bin, I/O read from the XML, equal to what OpenVINO itself reads."""
    ov = pytest.importorskip("openvino")
    res, _ = exported
    root = tmp_path / "ov"
    root.mkdir()
    ov.save_model(ov.convert_model(str(res.artefact)), str(root / "enc.xml"), compress_to_fp16=False)
    model = ov.Core().read_model(str(root / "enc.xml"))
    ins, outs = read_signature(root / "enc.xml")
    assert [(t.name, t.dims) for t in ins] == [(p.get_any_name(), tuple(-1 if d.is_dynamic else d.get_length()
                                                                          for d in p.get_partial_shape()))
                                              for p in model.inputs]
    assert [t.name for t in outs] == [p.get_any_name() for p in model.outputs] == ["embedding"]
    assert outs[0].dims == (-1, 64) and ins[0].dtype == outs[0].dtype == "TYPE_FP32"
    side = json.loads(res.sidecar.read_text())
    (root / "enc.xml.json").write_text(json.dumps({**side, "format": "openvino", "artefact": "enc.xml",
                                                   "artefact_sha256": _sha(root / "enc.xml")}))
    add_to_repository(tmp_path / "repo", root / "enc.xml")
    cfg = _parse(tmp_path / "repo" / "enc" / "config.pbtxt")
    assert cfg.backend == "openvino" and [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert _sha(tmp_path / "repo" / "enc" / "1" / "model.bin") == _sha(root / "enc.bin")
    served = ov.Core().read_model(str(tmp_path / "repo" / "enc" / "1" / "model.xml"))  # finds model.bin by name
    assert [p.get_any_name() for p in served.outputs] == ["embedding"]
    side["openvino"] = {"weights_sha256": "0" * 64}  # a .bin that is not the checked one is refused
    (root / "enc.xml.json").write_text(json.dumps({**side, "format": "openvino", "artefact": "enc.xml",
                                                   "artefact_sha256": _sha(root / "enc.xml")}))
    with pytest.raises(ExportError, match="differs from the file its sidecar describes"):
        add_to_repository(tmp_path / "repo", root / "enc.xml")
    assert sorted(p.name for p in (tmp_path / "repo" / "enc").iterdir()) == ["1", "config.pbtxt"]


def test_schema_without_grpc_extra_and_without_tritonclient(monkeypatch: pytest.MonkeyPatch) -> None:
    from mffzoo.export import triton

    for name in ("tritonclient.grpc", "tritonclient.grpc.model_config_pb2"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "grpc", None)  # tritonclient installed without its [grpc] extra
    module = triton.model_config_pb2()
    assert text_format.Parse('name: "m" max_batch_size: 2', module.ModelConfig()).max_batch_size == 2
    monkeypatch.delitem(sys.modules, "tritonclient.grpc.model_config_pb2")
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # not installed at all
    with pytest.raises(ExportError, match=r"pip install 'mffzoo\[triton\]'"):
        triton.model_config_pb2()


def test_fixed_batch_unchecked_export(tiny: Path, tmp_path: Path) -> None:
    """A fixed batch: max_batch_size 0 and full dims; --no-check: the file says so, in metadata and repository."""
    res = export_model(str(tiny), output=tmp_path / "fix.onnx", batch={"min": 2, "opt": 2, "max": 2},
                       check={"enabled": False}, triton={"repo": str(tmp_path / "repo")})
    cfg = _parse(tmp_path / "repo" / "fix" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("pixel_values", [2, 3, 32, 32])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("embedding", [2, 64])]
    assert json.loads(read_metadata(tmp_path / "repo" / "fix" / "1" / "model.onnx")["parity"]) == "not checked"
    assert _sha(tmp_path / "repo" / "fix" / "1" / "model.onnx") == _sha(res.artefact)


def test_failed_parity_never_reaches_the_repository(tiny: Path, images: Path, tmp_path: Path) -> None:
    from mffzoo.errors import CheckFailed

    with pytest.raises(CheckFailed, match="not added to the Triton repository"):
        export_model(str(tiny), output=tmp_path / "bad.onnx", batch={"min": 1, "opt": 1, "max": 2},
                     check={"images": str(images), "gates": {"fp32": {"max_abs": 0.0}}},
                     triton={"repo": str(tmp_path / "repo")})
    assert json.loads(read_metadata(tmp_path / "bad.onnx")["parity"]) == "failed"  # the kept file says so too
    assert not (tmp_path / "repo").exists()


def test_foreign_model_folders_are_refused(exported, tmp_path: Path) -> None:
    res, _ = exported
    (tmp_path / "r1" / "enc" / "1").mkdir(parents=True)  # a folder of that name without a config
    with pytest.raises(ExportError, match="holds no config.pbtxt"):
        add_to_repository(tmp_path / "r1", res.artefact)
    (tmp_path / "r2" / "enc").mkdir(parents=True)
    (tmp_path / "r2" / "enc" / "config.pbtxt").write_text("name: \"enc\"\nmax_batch_size: lots\n")
    with pytest.raises(ExportError, match="not a valid Triton config"):
        add_to_repository(tmp_path / "r2", res.artefact)
    assert _tree(tmp_path) == {"r1": "dir", "r1/enc": "dir", "r1/enc/1": "dir", "r2": "dir", "r2/enc": "dir",
                               "r2/enc/config.pbtxt": _sha(tmp_path / "r2" / "enc" / "config.pbtxt")}
