"""Training checkpoints: full state, atomic, last-k, newest-valid resume.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts) so it loads with ``weights_only=True``
through :func:`mffzoo.zoo.load_checkpoint_file`: the recipe as a dict, RNG states as tensors and lists, the
sampler position as ints. ``"model"`` is ``MFFPretrainModel.state_dict()`` (clean keys, no ``module.`` /
``_orig_mod.``) next to ``"arch"`` and ``"model_args"``, which is what ``mffzoo convert`` reads.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import CHECKSUM_SUFFIX
from ..zoo.checkpoint_io import atomic_torch_save, load_checkpoint_file

_logger = logging.getLogger("mffzoo.train")

__all__ = ["CheckpointManager", "capture_rng", "restore_rng", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "mffzoo-train/1"
_NAME = re.compile(r"checkpoint-(\d+)\.pth\Z")
_REQUIRED = ("model", "optimizer", "global_step", "epoch", "step_in_epoch")


class CheckpointManager:
    """``RUN/checkpoints/checkpoint-<global step>.pth`` + ``.sha256``; the newest usable one wins.

    Rotation deletes only checkpoints this run superseded: files that failed to load are reported, skipped and
    kept (until the run writes a new checkpoint of the same step), and they do not count towards ``keep_last``.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.unusable: set[Path] = set()

    def path(self, step: int) -> Path:
        return self.directory / f"checkpoint-{step:08d}.pth"

    def list(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = atomic_torch_save(state, self.path(step), checksum=True)
        self.unusable.discard(path)  # replaced by this run's own checkpoint of that step
        for old in [p for p in self.list() if p not in self.unusable][self.keep_last:]:
            old.unlink(missing_ok=True)
            Path(f"{old}{CHECKSUM_SUFFIX}").unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """Newest checkpoint that loads, matches its checksum and has the training state; each unusable newer
        one is reported in one line. None when there are no checkpoints; one error line when none is usable."""
        paths, problems = self.list(), []
        for path in paths:
            try:
                state = load_checkpoint_file(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                self.unusable.add(path)
                continue
            missing = [k for k in _REQUIRED if k not in state]
            if missing:
                problems.append(f"checkpoint '{path}' lacks {', '.join(missing)}: not a training checkpoint")
                self.unusable.add(path)
                continue
            for problem in problems:
                _logger.warning("warning: %s; falling back to the previous checkpoint", problem)
            return state, path
        if not paths:
            return None
        for problem in problems:  # the one error line below is what the user sees; details with -v
            _logger.debug("%s", problem)
        names = ", ".join(p.name for p in paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else "")
        raise CheckpointError(
            f"no usable checkpoint in '{self.directory}' ({names}: corrupt, truncated or not training "
            f"checkpoints; details with -v); move them away (mv {self.directory} {self.directory}.bad) and rerun, "
            "or start over with --set checkpoint.restart=true (they are then moved aside, not deleted)"
        )

    def set_aside(self) -> Path | None:
        """Move the checkpoints folder to ``checkpoints.discarded-N`` (a restart never deletes a checkpoint)."""
        if not self.list():
            return None
        n = 1
        while (dest := self.directory.with_name(f"{self.directory.name}.discarded-{n}")).exists():
            n += 1
        self.directory.rename(dest)
        return dest


# --------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and plain numbers (safe to load)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
