"""The installed package wins over a same-named folder in the current directory (a clone called ``mffzoo``)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_is_not_shadowed_by_the_clone_folder(tmp_path):
    """`git clone ... mffzoo && pip install -e mffzoo`, then `python -c "import mffzoo"` from the parent folder."""
    clone = tmp_path / "parent" / "mffzoo"
    shutil.copytree(REPO / "mffzoo", clone / "mffzoo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    # the editable wheel pip would build with the project's own backend; pip installs it by unpacking it
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", build, str(tmp_path / "wheel")], cwd=clone, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    site_dir = tmp_path / "site-packages"
    with zipfile.ZipFile(tmp_path / "wheel" / r.stdout.split()[-1]) as whl:
        whl.extractall(site_dir)
    # -S: this interpreter's own site-packages (which may hold an editable install of the repository under test)
    # come after the unpacked wheel, as for a user with only the clone installed. They are read here, in the
    # running interpreter, because under -S Python no longer knows them: a venv's or conda env's site-packages
    # are set up by the `site` module that -S skips (sysconfig then names the base interpreter's folder).
    deps = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    check = ("import site, sys; [site.addsitedir(d) for d in sys.argv[1:]]; import mffzoo, timm; "
             "print(mffzoo.__file__, 'mff_vit_small' in timm.list_models('mff*'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-S", "-c", check, str(site_dir), *deps], cwd=clone.parent,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(clone / "mffzoo" / "__init__.py"), "True"]
