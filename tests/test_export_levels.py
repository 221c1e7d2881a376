"""Dense-task exports: ``--features levels`` (one NCHW map per chosen block) and ``--dynamic-size`` (any H and W in
one artefact), through ONNX Runtime, OpenVINO, the Triton writer, the sidecar and the bench, on a tiny ViT
(img 32, patch 8, 4 blocks, the shared ``tiny`` folder). TensorRT: the GPU test skips without TensorRT + CUDA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format

from mffzoo.archs import default_dense_levels
from mffzoo.cli.main import main
from mffzoo.errors import ConfigError
from mffzoo.export import check_artefact, export_model
from mffzoo.export.onnx import OrtRunner
from mffzoo.export.parity import run_parity
from mffzoo.export.posembed import resample_bicubic_aa
from mffzoo.export.profile import Gates, SizeRange
from mffzoo.export.triton import model_config_pb2
from mffzoo.export.wrappers import ExportModule, Features, feature_spec
from mffzoo.zoo import load_model

SIZES = {"min": 16, "opt": 32, "max": 64}  # tiny: patch 8, native 32
LEVELS = [1, 3]
# (H, W) beyond the parity check's own: shrunk, enlarged, non-square both ways, the extremes
RUN_SIZES = [(32, 32), (16, 16), (24, 40), (64, 48), (16, 64), (64, 64)]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("drop_stale_cli_handler")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mffzoo.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("img") / "demo", train_per_class=1, val_per_class=2,
                              image_size=32) / "val"


@pytest.fixture(scope="module")
def dyn_model(tiny: Path) -> torch.nn.Module:
    """The reference: the tiny weights in timm with dynamic_img_size (what the export loads)."""
    return load_model(str(tiny), pretrained=True, dynamic_img_size=True).eval()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("levels")


@pytest.fixture(scope="module")
def onnx_lv(tiny: Path, images: Path, out: Path):
    return export_model(str(tiny), features="levels", levels=LEVELS, dynamic_size=SIZES,
                        batch={"min": 1, "opt": 2, "max": 3}, check={"images": str(images)},
                        output=out / "lv.onnx", triton={"repo": str(out / "repo")})


@pytest.fixture(scope="module")
def ov_lv(tiny: Path, images: Path, out: Path):
    return export_model(str(tiny), format="openvino", features="levels", levels=LEVELS, dynamic_size=SIZES,
                        batch={"min": 1, "opt": 2, "max": 3}, check={"images": str(images)},
                        output=out / "lv-ov.xml", triton={"repo": str(out / "repo")})


def _intermediates(model: torch.nn.Module, x: np.ndarray, levels: list[int], norm: bool = False) -> list[np.ndarray]:
    with torch.no_grad():
        ys = model.forward_intermediates(torch.from_numpy(x), indices=levels, norm=norm, output_fmt="NCHW",
                                         intermediates_only=True)
    return [y.numpy() for y in ys]


def _assert_levels_match(runner, model: torch.nn.Module, levels: list[int]) -> None:
    for h, w in RUN_SIZES:
        x = np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype(np.float32)
        got, want = runner(x), _intermediates(model, x, levels)
        assert len(got) == len(want) == len(levels)
        for g, r in zip(got, want):
            assert g.shape == r.shape == (2, 64, h // 8, w // 8)
            assert np.abs(g - r).max() <= 1e-4, (h, w)


# ------------------------------------------------------------------------------------------ values
def test_onnx_levels_are_forward_intermediates_at_any_size(onnx_lv, dyn_model) -> None:
    _assert_levels_match(OrtRunner(onnx_lv.artefact), dyn_model, LEVELS)
    graph = onnx.load(str(onnx_lv.artefact)).graph
    assert [o.name for o in graph.output] == ["level0", "level1"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (graph.input[0],
                                                                                         graph.output[0])]
    assert dims == [["batch", 3, "8*height_patches", "8*width_patches"], ["batch", 64, "height_patches",
                                                                          "width_patches"]]


def test_openvino_levels_are_forward_intermediates_at_any_size(ov_lv, dyn_model) -> None:
    from mffzoo.export.openvino import OvRunner

    _assert_levels_match(OvRunner(ov_lv.artefact), dyn_model, LEVELS)


@pytest.mark.openvino
def test_parity_checks_each_output_at_min_native_and_non_square(onnx_lv, ov_lv) -> None:
    for res in (onnx_lv, ov_lv):
        rep = res.report
        assert rep.passed and rep.outputs == ["level0", "level1"]
        assert rep.sizes == ["32x32", "16x16", "16x32"]  # native (full check), min, non-square (min x opt)
        gated = [r for r in rep.rows if r.gated]
        assert [r.output for r in gated] == ["level0", "level1"]
        assert all(r.metrics.max_abs <= 1e-4 and r.metrics.cosine >= 0.99999 for r in gated)
        seen = {(r.output, r.inputs, r.size, r.batch) for r in rep.rows}
        assert ("level1", "random", "16x32", 2) in seen and ("level0", "images", "32x32", 3) in seen
        text = "\n".join(" ".join(row) for row in rep.table()[0])
        assert "[level1]" in text and "random 16x32" in text


def test_gates_apply_per_output(dyn_model) -> None:
    """One bad output fails the check, named; the good one passes."""
    ref = ExportModule(dyn_model, Features("levels", tuple(LEVELS)))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)

    def broken(a: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            ys = [y.numpy() for y in ref(torch.from_numpy(a))]
        return [ys[0], ys[1] + 1e-3]

    rep = run_parity(broken, {"torch fp32": ref}, {"random": x}, batches=[1, 2], gates=Gates(max_abs=1e-4),
                     outputs=["level0", "level1"])
    assert not rep.passed and len(rep.failures) == 1 and rep.failures[0].startswith("vs torch fp32 [level1]: max")


def test_default_levels_and_levels_norm_fixed_size(tiny: Path, images: Path, tmp_path: Path) -> None:
    res = export_model(str(tiny), features="levels", levels_norm=True, batch={"min": 1, "opt": 2, "max": 2},
                       check={"images": str(images)}, output=tmp_path / "n.onnx")
    model = load_model(str(tiny), pretrained=True).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    default = default_dense_levels("mff_vit_small_patch16_224", 4)
    for g, r in zip(OrtRunner(res.artefact)(x), _intermediates(model, x, default, norm=True), strict=True):
        assert np.abs(g - r).max() <= 1e-4
    side = json.loads(res.sidecar.read_text())
    assert [o["block"] for o in side["outputs"]] == default == [0, 1, 2, 3]
    assert all(o["norm"] for o in side["outputs"]) and "dynamic_size" not in side["input"]
    assert side["outputs"][0]["shape"] == ["batch", 64, 4, 4]


def test_default_levels_are_mmsegs() -> None:
    assert default_dense_levels("mff_vit_small", 12) == default_dense_levels("mff_vit_base", 12) == [3, 5, 7, 11]
    assert default_dense_levels("mff_vit_large", 24) == [7, 11, 15, 23]
    assert default_dense_levels(None, 24) == [7, 11, 15, 23] and default_dense_levels(None, 2) == [0, 1]


def test_a_classifier_has_levels_too(tiny: Path) -> None:
    """A classifier's blocks are an encoder like any other: levels ignore its head (documented)."""
    clf = load_model(str(tiny), pretrained=True, num_classes=5).eval()
    spec = feature_spec("levels", clf, [0, 2])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = ExportModule(clf, spec)(x)
    assert [tuple(y.shape) for y in got] == [(1, 64, 4, 4)] * 2
    want = _intermediates(clf, x.numpy(), [0, 2])
    assert all(np.array_equal(g.numpy(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("new", [(14, 14), (7, 7), (30, 40), (20, 13), (1, 1), (2, 29)])
def test_in_graph_pos_embed_resize_is_timms(new: tuple[int, int]) -> None:
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32) * 0.02
    want = resample_abs_pos_embed(pe, new_size=list(new), old_size=[14, 14], num_prefix_tokens=1)
    assert (resample_bicubic_aa(pe, new, (14, 14), 1) - want).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------ what describes it
def test_sidecar_and_onnx_metadata_describe_every_output(onnx_lv) -> None:
    side = json.loads(onnx_lv.sidecar.read_text())
    assert side["input"]["shape"] == ["batch", 3, "height", "width"]
    assert side["input"]["dynamic_size"] == {**SIZES, "multiple_of": 8}
    assert side["output"]["features"] == "levels" and side["output"]["name"] == "level0"
    outs = side["outputs"]
    assert [(o["name"], o["block"], o["stride"], o["channels"], o["layout"]) for o in outs] == [
        ("level0", 1, 8, 64, "NCHW"), ("level1", 3, 8, 64, "NCHW")]
    assert outs[1]["shape"] == ["batch", 64, "height/8", "width/8"]
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_lv.artefact)).metadata_props}
    assert [(o["name"], o["block"], o["stride"], o["channels"]) for o in meta["outputs"]] == [
        ("level0", 1, 8, 64), ("level1", 3, 8, 64)]
    assert meta["dynamic_size"] == {**SIZES, "multiple_of": 8} and meta["output_width"] == 64
    assert check_artefact(onnx_lv.artefact).passed  # re-checked from the sidecar: same levels, sizes, metadata


@pytest.mark.openvino
def test_triton_config_lists_every_output_with_dynamic_dims(onnx_lv, ov_lv, out: Path) -> None:
    pb = model_config_pb2()
    for name, backend in (("lv", "onnxruntime"), ("lv-ov", "openvino")):
        cfg = text_format.Parse((out / "repo" / name / "config.pbtxt").read_text(), pb.ModelConfig())
        assert cfg.backend == backend and cfg.max_batch_size == 3
        assert [(t.name, list(t.dims)) for t in cfg.input] == [("pixel_values", [3, -1, -1])]
        assert [(t.name, list(t.dims)) for t in cfg.output] == [("level0", [64, -1, -1]), ("level1", [64, -1, -1])]


def test_dynamic_size_for_pooled_from_the_cli(tiny: Path, images: Path, dyn_model, tmp_path: Path,
                                              capsys) -> None:
    main(["export", str(tiny), "--features", "pooled", "--dynamic-size", "16:32:64", "--batch", "1:2:2",
          "--check-images", str(images), "-o", str(tmp_path / "p.onnx")])
    text = capsys.readouterr().out
    assert "random 16x32" in text and "wrote" in text
    runner = OrtRunner(tmp_path / "p.onnx")
    for h, w in RUN_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = dyn_model.forward_head(dyn_model.forward_features(x), pre_logits=True).numpy()
        assert np.abs(runner(x.numpy()) - want).max() <= 1e-4


def test_bench_infer_levels_compares_every_output(tiny: Path) -> None:
    from mffzoo.bench.infer import run_infer_bench

    res = run_infer_bench(str(tiny), batch=2, backends=["ort-fp32"], rounds=1, iters=1, threads=1,
                          features="levels", levels=LEVELS, dynamic_size=SizeRange(16, 32, 64))
    ort = next(r for r in res.results if r.name == "ort-fp32")
    assert not ort.parity["failures"] and ort.parity["max_abs"] <= 1e-4
    assert res.meta["outputs"] == ["level0", "level1"] and res.meta["levels"] == LEVELS


@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_trt_levels_dynamic_size(tiny: Path, images: Path, tmp_path: Path) -> None:
    res = export_model(str(tiny), format="trt", features="levels", levels=LEVELS, dynamic_size=SIZES,
                       batch={"min": 1, "opt": 2, "max": 3}, check={"images": str(images)},
                       output=tmp_path / "lv.engine", trt={"timing_cache": str(tmp_path)})
    assert res.report.passed and res.report.outputs == ["level0", "level1"]
    side = json.loads(res.sidecar.read_text())
    assert side["tensorrt"]["profile"]["shapes"] == {"min": [1, 3, 16, 16], "opt": [2, 3, 32, 32],
                                                     "max": [3, 3, 64, 64]}


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,match", [
    (["--levels", "1,3"], "config key 'levels': applies to features: levels only"),
    (["--levels-norm"], "config key 'levels_norm': applies to features: levels only"),
    (["--features", "levels", "--levels", "3,1"], "increasing and without repeats"),
    (["--features", "levels", "--levels", "1,1"], "increasing and without repeats"),
    (["--features", "levels", "--levels", "-1,2"], "block indices >= 0"),
    (["--features", "levels", "--levels", "0,9"], "block 9 is not a block of this 4-block encoder (0..3)"),
    (["--features", "levels", "--levels", "a,b"], "'a,b' is not a comma-separated list of block indices"),
    (["--dynamic-size", "16:32:60"], "60 is not a multiple of the patch size 8"),
    (["--dynamic-size", "32:16:64"], "needs 1 <= min <= opt <= max"),
    (["--dynamic-size", "16:64"], "--dynamic-size '16:64' is not MIN:OPT:MAX"),
    (["--dynamic-size", "32:32:32"], "for one fixed size use --img-size 32"),
    (["--dynamic-size", "16:32:64", "--img-size", "128"], "config key 'img_size': 128 lies outside dynamic_size"),
    (["--dynamic-size", "48:48:64"], "does not hold the model's input size 32x32"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args: list[str], match: str, tiny: Path, tmp_path: Path,
                                                         capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny), "-o", str(tmp_path / "o" / "m.onnx"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_bad_levels_from_python_are_config_errors(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a block of this 4-block encoder"):
        export_model(str(tiny), features="levels", levels=[0, 4], output=tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="dynamic_size"):
        export_model(str(tiny), dynamic_size={"min": 64, "opt": 32, "max": 128}, output=tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
