"""The export-format registry: a fourth backend is one module plus one registration line (issue 21)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mffzoo.bench import infer
from mffzoo.errors import ConfigError, ExportError
from mffzoo.export import export_model
from mffzoo.export.formats import FORMATS, register
from mffzoo.export.sidecar import sidecar_path
from mffzoo.export.triton import check_request
from tests.toy_formats.onnx_copy import OnnxCopyFormat


@pytest.fixture
def toy() -> Iterator[OnnxCopyFormat]:
    fmt = register(OnnxCopyFormat())  # the one registration line
    try:
        yield fmt
    finally:
        FORMATS.pop(fmt.name)


def test_builtin_formats_declare_everything() -> None:
    assert list(FORMATS) == ["onnx", "openvino", "trt"]
    assert {n: (f.suffix, f.companions) for n, f in FORMATS.items()} == {
        "onnx": (".onnx", ()), "openvino": (".xml", (".bin",)), "trt": (".engine", (".onnx",))}
    assert {n: f.triton.value for n, f in FORMATS.items() if f.triton} == {
        "onnx": "onnxruntime", "openvino": "openvino", "trt": "tensorrt_plan"}
    # the bench rows are derived from the registry: format x precision x device
    assert [b.name for b in infer.exported_rows()] == [
        "ort-fp32", "ort-fp16", "ort-int8", "ort-int8-static", "ov-fp32", "ov-bf16", "ov-int8", "trt-fp16",
        "trt-fp32"]


def test_a_toy_fourth_format_is_picked_up_everywhere(toy: OnnxCopyFormat, tiny: Path, tmp_path: Path) -> None:
    assert FORMATS["onnx-copy"] is toy
    out = tmp_path / "m.onnxc"
    res = export_model(str(tiny), format="onnx-copy", output=out, batch={"min": 1, "opt": 2, "max": 3})
    assert res.report is not None and res.report.passed  # through the one parity routine
    side = json.loads(sidecar_path(out).read_text())
    assert side["format"] == "onnx-copy" and side["parity"]["passed"]
    assert json.loads((tmp_path / "m.onnxc.parity.json").read_text())["backend"] == "onnxruntime"
    with pytest.raises(ExportError, match="must end in .onnxc for --format onnx-copy"):
        export_model(str(tiny), format="onnx-copy", output=tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="not a precision of --format onnx-copy"):
        export_model(str(tiny), format="onnx-copy", precision="int8", output=tmp_path / "q.onnxc")
    # Triton refuses it cleanly, before anything is written
    with pytest.raises(ExportError, match="--format onnx-copy cannot be served by Triton"):
        check_request(tmp_path / "repo", "onnx-copy", preprocess=False, dynamic_batch=True)
    with pytest.raises(ExportError, match="cannot be served by Triton"):
        export_model(str(tiny), format="onnx-copy", output=tmp_path / "t.onnxc", triton={"repo": tmp_path / "r"})
    assert not (tmp_path / "t.onnxc").exists() and not (tmp_path / "r").exists()
    # the bench derives its row from the registry and builds it through the export pipeline
    rows = {b.name: b for b in infer.exported_rows()}
    assert rows["copy-fp32"].format == "onnx-copy" and rows["copy-fp32"].kind == "onnxruntime"
    assert infer.backends()["copy-fp32"] == rows["copy-fp32"]  # `mffzoo bench infer --backends copy-fp32`
    prof = infer._bench_profile(rows["copy-fp32"], 4)
    assert (prof.format, prof.precision) == ("onnx-copy", "fp32")


def test_unknown_format_is_one_config_error(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'format': expected one of 'onnx', 'openvino', 'trt'"):
        export_model(str(tiny), format="tflite", output=tmp_path / "m.tflite")
