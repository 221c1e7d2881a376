"""Write tests/data/resume_v1/: a mid-run checkpoint of the tiny recipe made by mffzoo before the engine was split
into components (issue 21), and the weights the uninterrupted run ends with.

Run once with the code whose checkpoints must keep resuming: ``python tests/data/make_resume_fixture.py``.
tests/test_resume_fixture.py resumes the checkpoint with today's code and compares.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from helpers import tiny_recipe, write_train_data  # noqa: E402

from mffzoo.cpu import cpu_features  # noqa: E402
from mffzoo.train import train  # noqa: E402
from mffzoo.train.checkpoint import CheckpointManager  # noqa: E402
from mffzoo.zoo import load_checkpoint_file  # noqa: E402

OUT = HERE / "resume_v1"
MID_STEP = 8  # of 12: epoch 2 of 3 done, so the resume crosses an epoch boundary and an lr-schedule step


def fixture_recipe(root: Path) -> dict:
    return tiny_recipe(root, publish={"tag": None}, train={"compile": False, "attention": "math"})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = write_train_data(Path(tmp) / "data")
        run = Path(tmp) / "run"
        train(fixture_recipe(data), output_dir=run)
        ckpts = {int(p.stem.split("-")[-1]): p for p in CheckpointManager(run / "checkpoints").list()}
        OUT.mkdir(exist_ok=True)
        shutil.copy(ckpts[MID_STEP], OUT / ckpts[MID_STEP].name)
        final = load_checkpoint_file(ckpts[max(ckpts)])["model"]
        save_file({k: v.contiguous() for k, v in final.items()}, str(OUT / "final_model.safetensors"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    meta = {"made_by_commit": commit, "torch": torch.__version__, "cpu": cpu_features().describe(),
            "checkpoint": ckpts[MID_STEP].name, "mid_step": MID_STEP, "final_step": max(ckpts)}
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
