"""The learned fusion weights of MFF: how much each encoder level contributes to what the decoder sees.

The paper reads these softmax weights to show that the shallow levels take a real share of the reconstruction
(the capacity MAE wastes on pixel detail in its last layer). Sources: a training checkpoint (any format
``mffzoo.zoo.convert_state_dict`` maps, mmpretrain's included), a zoo folder published with
``pretrain_extras.safetensors``, or a run directory, which also gives the weights' evolution over training
from the ``fusion_weights`` field of its ``metrics.jsonl``. Which block each level is comes from the one place
training and conversion record it (:func:`mffzoo.zoo.home.recorded_fusion_layers`); weights without that record
are labelled by level.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import read_yaml
from ..errors import CheckpointError, ConfigError
from ..io import save_figure
from ..train.metrics import read_metrics
from ..train.visualize import block_names, draw_fusion_bars, draw_fusion_history
from ..zoo import convert_state_dict, load_checkpoint_file
from ..zoo.home import EXTRAS_NAME, read_folder_meta, recorded_fusion_layers

__all__ = ["fusion_weights", "fusion_history", "fusion_report", "plot_fusion"]

_CKPT = re.compile(r"checkpoint-(\d+)\.pth\Z")


def _newest_checkpoint(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("checkpoint-*.pth")
             if (m := _CKPT.match(p.name))]
    return max(found)[1] if found else None


def _from_checkpoint(path: Path) -> tuple[torch.Tensor, list[int] | None]:
    conv = convert_state_dict(load_checkpoint_file(path))
    if "fusion.weights" not in conv.extras:
        raise CheckpointError(f"'{path}' has no fusion weights: it is not an MFF/MAE pretraining checkpoint "
                              "(backbone-only and fine-tuned weights drop them)")
    return conv.extras["fusion.weights"].reshape(-1), recorded_fusion_layers(conv.meta)


def _from_zoo_folder(folder: Path) -> tuple[torch.Tensor, list[int] | None]:
    extras = folder / EXTRAS_NAME
    if not extras.is_file():
        raise CheckpointError(f"zoo folder '{folder}' has no {EXTRAS_NAME} (it was published without the fusion "
                              "weights); pass the training checkpoint or run directory instead, or re-publish "
                              "with `mffzoo convert --keep-extras`")
    sd = load_checkpoint_file(extras)
    if "fusion.weights" not in sd:
        raise CheckpointError(f"'{extras}' holds no fusion.weights; it is not an MFF pretraining extras file")
    return sd["fusion.weights"].reshape(-1), recorded_fusion_layers(read_folder_meta(folder))


def _run_fusion_layers(run_dir: Path) -> list[int] | None:
    """The fused blocks of a run that has no checkpoint yet: its ``recipe.yaml`` (written by the engine at start)."""
    path = run_dir / "recipe.yaml"
    try:
        recipe = read_yaml(path) if path.is_file() else None  # the one YAML reader: UTF-8, limited aliases/depth
    except (OSError, ConfigError):
        return None
    return recorded_fusion_layers(recipe.get("model")) if isinstance(recipe, dict) else None


def fusion_history(run_dir: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """``{"step": [...], "epoch": [...], "weights": [[w_0..w_K-1], ...]}`` from ``RUN/metrics.jsonl``."""
    steps, epochs, weights = [], [], []
    for rec in read_metrics(run_dir, "train"):
        w = rec.get("fusion_weights")
        if isinstance(w, list) and w:
            steps.append(int(rec.get("step", len(steps))))
            epochs.append(rec.get("epoch"))
            weights.append([float(v) for v in w])
    return {"step": steps, "epoch": epochs, "weights": weights}


def fusion_weights(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Softmax fusion weights (and the block index of each level, when recorded) of a checkpoint/folder/run."""
    p = Path(source).expanduser()
    history: dict[str, list[Any]] | None = None
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()):
        history = fusion_history(p)
        ckpt = _newest_checkpoint(p)
        if ckpt is not None:
            raw, layers = _from_checkpoint(ckpt)
            w = torch.softmax(raw.float(), dim=0).tolist()
            origin = str(ckpt)
        elif history["weights"]:
            w = history["weights"][-1]  # the log records softmax weights already
            layers = _run_fusion_layers(p)
            origin = str(p / "metrics.jsonl")
        else:
            raise CheckpointError(f"run directory '{p}' has neither checkpoints nor fusion weights in metrics.jsonl")
    elif p.is_dir():
        raw, layers = _from_zoo_folder(p)
        w = torch.softmax(raw.float(), dim=0).tolist()
        origin = str(p / EXTRAS_NAME)
    elif p.is_file():
        raw, layers = _from_checkpoint(p)
        w = torch.softmax(raw.float(), dim=0).tolist()
        origin = str(p)
    else:
        raise CheckpointError(f"'{source}' is not a checkpoint file, zoo folder or run directory; check the path")
    if layers is not None and len(layers) != len(w):
        layers = None  # recorded layers disagree with the tensor: label by level instead of guessing
    return {"source": str(source), "weights_from": origin, "fusion_layers": layers, "weights": w,
            "history": history}


def fusion_report(sources: list[str | os.PathLike[str]]) -> dict[str, Any]:
    return {"models": {str(s): fusion_weights(s) for s in sources}}


def plot_fusion(result: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Per source, the final weights as deviation from uniform (values written on the bars); for run
    directories, a second panel with their evolution. Blocks are 0-based, as ``fusion_layers``."""
    import matplotlib  # optional heavy dependency: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only drawing a figure needs it

    models = result["models"]
    with_hist = [k for k, m in models.items() if m.get("history") and m["history"]["weights"]]
    ncols = len(models) + len(with_hist)
    fig, axes = plt.subplots(1, ncols, figsize=(4.0 * ncols + 0.5, 3.6), squeeze=False, layout="constrained")
    col = 0
    for label, m in models.items():
        names = block_names(m.get("fusion_layers"), len(m["weights"]))
        short = label if len(label) < 40 else "..." + label[-37:]
        ax = axes[0][col]
        col += 1
        draw_fusion_bars(ax, m["weights"], names)
        ax.set_title(f"fusion weights: {short}", fontsize=9)
        if label in with_hist:
            ax = axes[0][col]
            col += 1
            h = m["history"]
            draw_fusion_history(ax, h["step"], h["weights"], block_names(m.get("fusion_layers"), len(h["weights"][0])))
            ax.set_title("over training", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)
