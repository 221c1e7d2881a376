"""The command line answers --help, --version and argument errors without importing torch.

Each check runs in a fresh interpreter (``sys.modules`` of this pytest process already holds torch), walks the
real click tree and asserts on what got imported; no timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs every given argv through the CLI entry point, then reports what was imported.
_PROBE = r"""
import contextlib, io, json, sys
from mffzoo.cli.main import main
out = []
for argv in json.loads(sys.argv[1]):
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
    out.append({"argv": argv, "code": code, "stdout": buf.getvalue(), "stderr": err.getvalue()})
print(json.dumps({"runs": out, "heavy": sorted(m for m in ("torch", "timm", "numpy", "PIL", "matplotlib")
                                                 if m in sys.modules)}))
"""

_WALK = r"""
import json, click
from mffzoo.cli.main import cli
ctx = click.Context(cli)
def walk(group, prefix):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield prefix + [name]
        if isinstance(cmd, click.Group):
            yield from walk(cmd, prefix + [name])
print(json.dumps(list(walk(cli, []))))
"""


def _python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _probe(argvs: list[list[str]]) -> dict:
    return json.loads(_python(_PROBE, json.dumps(argvs)).splitlines()[-1])


def test_help_and_version_import_no_torch() -> None:
    commands = json.loads(_python(_WALK))
    assert ["eval", "knn"] in commands and ["analyze", "fusion"] in commands and ["bench", "infer"] in commands
    res = _probe([["--help"], ["--version"], *[[*c, "--help"] for c in commands]])
    assert res["heavy"] == [], f"--help imported {res['heavy']}"
    for run in res["runs"]:
        assert run["code"] == 0, run
        assert run["stdout"].strip(), run
    assert "0.1.0" in res["runs"][1]["stdout"]


def test_argument_errors_import_no_torch() -> None:
    bad = [["eval", "knn"], ["train"], ["export", "--precision", "fp7"], ["bench", "infer", "m", "--batch", "x"],
           ["zoo", "--bogus"], ["nosuchcommand"], ["analyze", "freq", "--radius", "1"], ["reproduce", "--seeds", "a"]]
    res = _probe(bad)
    assert res["heavy"] == [], f"an argument error imported {res['heavy']}"
    for run in res["runs"]:
        assert run["code"] == 2, run
        lines = run["stderr"].strip().splitlines()  # one line, as for every bad input (no click usage block)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], run


def test_import_mffzoo_is_light_and_registers_models_with_timm() -> None:
    """Library users: ``import mffzoo`` still makes the mff_* names known to timm, in either import order."""
    out = _python("import sys, mffzoo; print('torch' in sys.modules); import timm; "
                  "print(sorted(timm.list_models('mff_vit_small*'))); print(mffzoo.load_model.__module__)")
    assert out.split("\n")[:3] == ["False", "['mff_vit_small', 'mff_vit_small_patch16_224']", "mffzoo.zoo.weights"]
    out = _python("import timm, mffzoo; print(timm.create_model('mff_vit_small', img_size=32).__class__.__name__)")
    assert out.strip() == "VisionTransformer"
    out = _python("import mffzoo.models, timm; print(len(timm.list_models('mff_vit_*')))")
    assert out.strip() == "6"
    # an availability check (transformers does this) before the real import must not use the hook up
    out = _python("import importlib.util, sys, mffzoo; assert importlib.util.find_spec('timm'); "
                  "assert 'timm' not in sys.modules; import timm; print(len(timm.list_models('mff_vit_*')))")
    assert out.strip() == "6"


@pytest.mark.slow
def test_reproduce_quick_through_the_cli(tmp_path: Path) -> None:
    """`mffzoo reproduce --quick` end to end in a fresh process (one seed: the full --quick takes ~4 min here),
    with its worker processes' third-party chatter kept off the console."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MFFZOO_HOME": str(tmp_path / "zoo"),
           "MFFZOO_FEATURE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mffzoo", "reproduce", "--quick", "--seeds", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "MAE" in proc.stdout and "MFF" in proc.stdout and "k-NN top-1 (cls token)" in proc.stdout
    assert proc.stdout.count("smoke run (--quick: tiny data, 1 epoch), not a result") == 2  # above + below the table
    res = json.loads((out / "reproduction.json").read_text())
    assert res["quick"] is True and res["seeds"] == 1 and res["note"].startswith("smoke run")
    assert (out / "table.md").read_text().startswith("**Smoke run (--quick")
    assert sorted(r["method"] for r in res["runs"]) == ["mae", "mff"] and set(res["aggregate"]) >= {"mae", "mff"}
    assert (out / "table.md").is_file() and (out / "freq.png").stat().st_size > 0
    for stage in ("writing the demo dataset", "[mae seed 0] pretraining", "[mff seed 0] kNN", "reproduce: done"):
        assert stage in proc.stderr, proc.stderr
    for noise in ("Traceback", "Cosine annealing", "covers the whole run"):
        assert noise not in proc.stderr, proc.stderr
