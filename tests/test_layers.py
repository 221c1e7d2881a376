"""The low layers: the catalog needs no torch, caches share one root rule, fusion defaults have one resolver."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mffzoo import archs
from mffzoo.io import cache_root, default_demo_root, save_figure
from mffzoo.table import print_table


def test_catalog_imports_neither_torch_nor_timm() -> None:
    code = "import sys, mffzoo.archs; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_local_tags_are_resolved_at_creation_not_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No path of the zoo home is frozen into the registered tags; the resolver asks the home of the moment."""
    import timm

    from mffzoo.zoo.weights import resolve_pretrained

    cfg = timm.get_pretrained_cfg("mff_vit_small_patch16_224.demo")
    assert cfg.file == archs.LOCAL_FILE and archs.is_local_cfg(archs.ZOO_TAGS["mff_vit_small_patch16_224"]["demo"])
    monkeypatch.setenv("MFFZOO_HOME", str(tmp_path / "later"))
    with pytest.raises(Exception, match=str(tmp_path / "later")):
        resolve_pretrained("mff_vit_small_patch16_224", "demo")


def test_cache_root_follows_xdg_and_ignores_a_relative_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mffzoo.eval.features import feature_cache_dir
    from mffzoo.export.trt import default_timing_cache
    from mffzoo.zoo.home import zoo_home

    for var in ("MFFZOO_HOME", "MFFZOO_DEMO_DATA", "MFFZOO_FEATURE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "mffzoo"
    assert cache_root() == root
    assert [zoo_home(), default_demo_root(), feature_cache_dir(), default_timing_cache()] == [
        root / "zoo", root / "demo-data", root / "features", root / "trt-timing"]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: relative paths are invalid
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mffzoo" == zoo_home().parent


def test_pretrain_heads_defaults_and_logged_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mffzoo"):
        full = archs.pretrain_heads("mff_vit_base", 12)
        assert not caplog.records
        small = archs.pretrain_heads("mff_vit_small", 4, decoder_dim=32)
    assert full == {"fusion_layers": [0, 2, 4, 6, 8, 11], "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
    assert small == {"fusion_layers": [3], "decoder_dim": 32, "decoder_depth": 8, "decoder_heads": 16}
    assert len(caplog.records) == 1 and "plain MAE" in caplog.records[0].getMessage()
    assert archs.pretrain_heads("mff_vit_small", 4, fusion_layers=(1, 3))["fusion_layers"] == [1, 3]


def test_recipe_and_model_share_the_fusion_defaults() -> None:
    from mffzoo.models import create_pretrain_model
    from mffzoo.train.recipe import ModelConfig

    cfg = ModelConfig(arch="mff_vit_small", img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)
    cfg.validate()
    model = create_pretrain_model("mff_vit_small", img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)
    assert cfg.fusion_layers == list(model.fusion.layers) == [3]


def test_save_figure_writes_whole_file_and_closes(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure()
    out = save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]


def test_print_table_aligns(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([["a", 1], ["long", 22]], ["name", "n"])
    assert capsys.readouterr().out.splitlines() == ["name  n", "----  --", "a     1", "long  22"]


def test_no_import_cycle_between_package_modules() -> None:
    """The layers contract forbids upward imports between layers; this also catches a circle inside one layer
    (the models <-> zoo circle that hid behind imports inside functions, or a module importing the package root).
    Imports under ``if TYPE_CHECKING:`` never run: a pair of them is how Python spells two modules naming each
    other's types (an export format's methods take the profile that names the format), so they do not count."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the [test] extra)")
    graph = grimp.build_graph("mffzoo", exclude_type_checking_imports=True)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(imports[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[module] = 2

    for module in sorted(imports):
        if module not in state:
            visit(module, [])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
