"""OpenVINO export: real IR files, the real OpenVINO CPU runtime, real NNCF int8, the shared parity routine."""
# ruff: noqa: F811  (the tiny model and image fixtures are shared with test_export.py by import)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

openvino = pytest.importorskip("openvino", reason="the [openvino] extra is not installed")

from mffzoo.cli.main import main  # noqa: E402
from mffzoo.export import SIDECAR_KEYS, ExportModule, check_artefact, export_model  # noqa: E402
from mffzoo.export.openvino import OvRunner, compile_config, cpu_has_bf16  # noqa: E402
from mffzoo.zoo import load_model  # noqa: E402
from tests.helpers import cli_error  # noqa: E402
from tests.test_export import _folder, images, tiny  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp32(tiny: Path, images: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ov") / "tiny.xml"
    return export_model(str(tiny), format="openvino", output=out, batch={"min": 1, "opt": 2, "max": 9},
                        check={"images": str(images)})


@pytest.fixture(scope="module")
def int8(tiny: Path, images: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ov8") / "tiny-int8.xml"
    return export_model(str(tiny), format="openvino", precision="int8", output=out,
                        batch={"min": 1, "opt": 2, "max": 4}, check={"images": str(images)},
                        quantize={"calibration_images": str(images), "num_calibration": 16})


def test_fp32_ir_checked_at_min_odd_max(fp32, tiny: Path) -> None:
    rep = fp32.report
    assert rep.passed and rep.backend == "openvino" and rep.batches == [1, 5, 9]
    assert {(r.inputs, r.batch) for r in rep.rows} >= {("random", 1), ("random", 5), ("images", 9), ("all", None)}
    total = next(r for r in rep.rows if r.inputs == "all")
    assert total.gated and total.metrics.max_abs <= 1e-4
    art = fp32.artefact
    assert art.suffix == ".xml" and art.with_suffix(".bin").is_file()
    assert sorted(p.name for p in art.parent.iterdir()) == ["tiny.bin", "tiny.xml", "tiny.xml.json",
                                                            "tiny.xml.parity.json"]  # nothing else left behind
    assert art.with_suffix(".bin") in fp32.files
    side = json.loads(fp32.sidecar.read_text())
    assert set(SIDECAR_KEYS) <= set(side) and side["format"] == "openvino" and side["onnx"] is None
    ov = side["openvino"]
    # fp32 sets the f32 hint explicitly (an AMX CPU would otherwise infer in bf16) and keeps fp32 weights
    assert ov["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32" and ov["weights_compressed_to_fp16"] is False
    assert ov["weights_file"] == "tiny.bin" and ov["openvino"] == openvino.__version__
    # the IR has a dynamic batch: sizes never seen at export time match PyTorch
    runner = OvRunner(art, "fp32")
    assert runner.inference_precision == "f32"
    ref = ExportModule(load_model(str(tiny), pretrained=True), "pooled")
    for b in (2, 7):
        x = np.random.default_rng(b).standard_normal((b, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(runner(x), ref(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_ir_weights_are_fp32_not_compressed(fp32) -> None:
    """save_model compresses to fp16 by default; the IR must hold fp32 constants (fp32 parity depends on it)."""
    xml = fp32.artefact.read_text()
    assert 'element_type="f32"' in xml and 'element_type="f16"' not in xml


def test_int8_nncf_passes_its_gate_and_says_what_calibrated_it(int8, images: Path) -> None:
    assert int8.report.passed, int8.report.failures
    totals = {r.reference: r for r in int8.report.rows if r.inputs == "all"}
    assert totals["torch fp32"].gated and totals["torch fp32"].metrics.cosine >= 0.99
    assert 0 < totals["torch fp32"].metrics.max_abs  # really quantised, not a copy of fp32
    assert "FakeQuantize" in int8.artefact.read_text()  # NNCF's int8 ops are in the IR
    side = json.loads(int8.sidecar.read_text())
    q = side["quantization"]
    assert q["tool"] == "nncf" and q["model_type"] == "transformer" and q["calibration_images"] == 16
    assert q["calibration"] == {"images": str(images.resolve()), "source": "--calib-images", "count": 16}
    assert side["precision"] == "int8" and side["openvino"]["nncf"]


def test_int8_default_calibration_is_the_demo_data(tiny: Path, images: Path, tmp_path: Path, capsys) -> None:
    from mffzoo.export.inputs import default_image_root

    main(["export", str(tiny), "--format", "openvino", "--precision", "int8", "-o", str(tmp_path / "d.xml"),
          "--batch", "1:2:2", "--check-images", str(images), "--set", "quantize.num_calibration=8"])
    side = json.loads((tmp_path / "d.xml.json").read_text())
    assert side["quantization"]["calibration"]["source"] == "built-in demo data"
    assert side["quantization"]["calibration"]["images"] == str(default_image_root().resolve())
    assert "wrote" in capsys.readouterr().out


def test_check_only_on_an_ir_and_a_changed_bin_fails_with_exit_1(fp32, images: Path, tmp_path: Path,
                                                                 capsys) -> None:
    for p in (fp32.artefact, fp32.artefact.with_suffix(".bin"), fp32.sidecar):
        shutil.copy(p, tmp_path / p.name)
    art = tmp_path / fp32.artefact.name
    main(["export", "--check-only", str(art), "--check-images", str(images)])
    assert "parity passed" in capsys.readouterr().out
    assert json.loads((tmp_path / "tiny.xml.parity.json").read_text())["passed"] is True
    _scale_largest_constant(art, 1.05)
    with pytest.raises(SystemExit) as exc:
        main(["export", "--check-only", str(art), "--check-images", str(images)])
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and err.strip().splitlines()[-1].startswith("error: parity gate missed")
    report = json.loads((tmp_path / "tiny.xml.parity.json").read_text())
    assert report["passed"] is False and report["inputs"]["artefact_changed_since_export"] is True


def _scale_largest_constant(xml: Path, factor: float) -> None:
    """Scale the largest fp32 weight tensor inside the IR's .bin in place (found through the .xml's Const layers)."""
    import xml.etree.ElementTree as ET

    consts = [d.attrib for d in ET.parse(xml).iter("data") if d.attrib.get("element_type") == "f32"
              and "offset" in d.attrib]
    c = max(consts, key=lambda a: int(a["size"]))
    blob = bytearray(xml.with_suffix(".bin").read_bytes())
    lo, n = int(c["offset"]), int(c["size"])
    blob[lo:lo + n] = (np.frombuffer(bytes(blob[lo:lo + n]), np.float32) * factor).tobytes()
    xml.with_suffix(".bin").write_bytes(bytes(blob))


def test_int8_from_other_weights_fails_its_gate_with_exit_1(int8, images: Path, tmp_path: Path, capsys) -> None:
    """An artefact built from different weights than its sidecar names: exit 1, report kept."""
    other = export_model(str(_folder(tmp_path / "other", seed=7)), format="openvino", precision="int8",
                         output=tmp_path / "other.xml", batch={"min": 1, "opt": 2, "max": 4}, check={"enabled": False},
                         quantize={"calibration_images": str(images), "num_calibration": 8})
    art = tmp_path / "swapped.xml"
    shutil.copy(other.artefact, art)
    shutil.copy(other.artefact.with_suffix(".bin"), art.with_suffix(".bin"))
    shutil.copy(int8.sidecar, tmp_path / "swapped.xml.json")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--check-only", str(art), "--check-images", str(images)])
    assert exc.value.code == 1
    assert "cosine" in capsys.readouterr().out
    report = json.loads((tmp_path / "swapped.xml.parity.json").read_text())
    assert report["passed"] is False and any("cosine" in f for f in report["failures"])


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 hardware: the refusal is tested instead")
def test_bf16_on_bf16_hardware_passes_its_gate(tiny: Path, images: Path, tmp_path: Path) -> None:
    res = export_model(str(tiny), format="openvino", precision="bf16", output=tmp_path / "b.xml",
                       batch={"min": 1, "opt": 2, "max": 3}, check={"images": str(images)})
    assert res.report.passed and json.loads(res.sidecar.read_text())["openvino"]["compile_config"][
        "INFERENCE_PRECISION_HINT"] == "bf16"
    runner = OvRunner(res.artefact, "bf16")
    assert runner.inference_precision == "bf16"
    totals = {r.reference: r for r in res.report.rows if r.inputs == "all"}
    assert totals["torch fp32"].metrics.max_abs > 1e-5  # really computed in bf16


@pytest.mark.skipif(cpu_has_bf16(), reason="this CPU has bf16 hardware: the bf16 export runs instead")
def test_bf16_without_bf16_hardware_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    err = cli_error(["export", "mff_vit_small", "--random-init", "--format", "openvino", "--precision", "bf16",
                     "-o", str(tmp_path / "o" / "m.xml")], capsys)
    assert "needs a CPU with bf16 hardware" in err and "use --precision fp32 or int8" in err
    assert not list(tmp_path.iterdir())
    assert compile_config("fp32")["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.parametrize("module,match", [("openvino", "--format openvino needs the 'openvino' package"),
                                          ("nncf", "--format openvino --precision int8 needs the 'nncf' package")])
def test_without_the_extra_is_one_line_exit_2(module: str, match: str, tmp_path: Path) -> None:
    """The package made unimportable in a fresh process (not a mock of the export)."""
    code = (f"import sys; sys.modules[{module!r}] = None; from mffzoo.cli.main import main; "
            f"main(['export', 'mff_vit_small', '--random-init', '--format', 'openvino', '--precision', 'int8', "
            f"'-o', {str(tmp_path / 'o' / 'm.xml')!r}])")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {match}") and "pip install 'mffzoo[openvino]'" in lines[0]
    assert not list(tmp_path.iterdir())


def _corrupt_folder(root: Path) -> Path:
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image at all")
    return root


@pytest.mark.parametrize("case,match", [
    ("fp16", "'fp16' is not a precision of --format openvino"),
    ("suffix", "must end in .xml for --format openvino"),
    ("empty", "holds no images"),
    ("unreadable", "cannot be read"),
    ("missing", "does not exist"),
    ("calib-fp32", "calibration images apply to int8"),
    ("file-in-the-way", "is a file, not a folder"),
    ("unwritable", "cannot write in"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, match: str, tiny: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "o" / "m.xml"
    args = ["export", str(tiny), "--format", "openvino", "--precision", "int8", "-o", str(out)]
    if case == "fp16":
        args[args.index("int8")] = "fp16"
    elif case == "suffix":
        args[-1] = str(tmp_path / "o" / "m.onnx")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--calib-images", str(tmp_path / "empty")]
    elif case == "unreadable":
        args += ["--calib-images", str(_corrupt_folder(tmp_path / "bad"))]
    elif case == "missing":
        args += ["--calib-images", str(tmp_path / "nope")]
    elif case == "calib-fp32":
        args[args.index("int8")] = "fp32"
        args += ["--calib-images", str(tmp_path)]
    elif case == "file-in-the-way":
        (tmp_path / "o").write_text("a file")
        out = tmp_path / "o" / "m.xml"
    elif case == "unwritable":  # /proc refuses new entries even for root
        args[-1] = "/proc/mffzoo-test/m.xml"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert match in cli_error(args, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written, no output folder
    assert not list(tmp_path.glob(".*tmp*"))


def test_ir_whose_weights_are_gone_is_one_line_exit_2(images: Path, tmp_path: Path, capsys) -> None:
    """The sidecar names a model folder that was removed, or the IR lost its .bin: one line, no report."""
    folder = _folder(tmp_path / "gone")
    res = export_model(str(folder), format="openvino", output=tmp_path / "g.xml", batch={"min": 1, "opt": 1, "max": 2},
                       check={"enabled": False})
    shutil.rmtree(folder)
    capsys.readouterr()  # drop log lines of the export above
    err = cli_error(["export", "--check-only", str(res.artefact), "--check-images", str(images)], capsys)
    assert str(folder) in err
    assert not (tmp_path / "g.xml.parity.json").exists()
    folder = _folder(tmp_path / "gone")  # weights back, the IR's own weights file gone
    res.artefact.with_suffix(".bin").unlink()
    err = cli_error(["export", "--check-only", str(res.artefact), "--check-images", str(images)], capsys)
    assert "g.bin' is missing" in err
    assert not (tmp_path / "g.xml.parity.json").exists()


def test_check_artefact_python_api_on_ir(fp32, images: Path) -> None:
    assert check_artefact(fp32.artefact, images=images).passed


def test_openvino_profiles(tmp_path: Path) -> None:
    from mffzoo.export.profile import load_profile

    for p in ("fp32", "bf16", "int8"):
        prof = load_profile(REPO / "profiles" / f"openvino-{p}.yaml")
        assert (prof.format, prof.precision) == ("openvino", p)


_SIGNAL_AFTER_RUNNERS = """
import gc, signal, sys
from mffzoo.export.openvino import OvRunner
a, b = OvRunner(sys.argv[1]), OvRunner(sys.argv[1])  # each one's Core is destroyed first, inside OvRunner
del a; gc.collect()
del b; gc.collect()  # compiled models destroyed out of creation order
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
signal.raise_signal(signal.SIGUSR1)  # a Python handler runs on this thread's alternate signal stack (SA_ONSTACK)
print("handled", len(got))
"""


def test_signals_survive_compiled_models_destroyed_out_of_order(fp32) -> None:
    """OpenVINO leaves the thread's alternate signal stack pointing at unmapped memory after this order of
    destruction; without :func:`keep_signal_stack` the signal kills the process with SIGSEGV (rc -11): the heap
    corruption that used to crash the test suite (torch's SIGCHLD handler, after loader workers exit)."""
    out = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_RUNNERS, str(fp32.artefact)], capture_output=True,
                         text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0 and "handled 1" in out.stdout, (out.returncode, out.stderr[-2000:])
