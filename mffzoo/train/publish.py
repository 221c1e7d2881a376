"""Getting trained weights out: a timm model folder (run directory, zoo home) and a Hugging Face Hub repo.

Both are the same layout (``config.json`` + ``model.safetensors``) so ``timm.create_model("local-dir:...")`` and
``timm.create_model("hf-hub:org/name")`` load them. The Hub copy names timm's own architecture
(``vit_small_patch16_224`` ...) with the exact ``model_args``: the encoder is a plain ViT, so plain timm loads it
without mffzoo installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from huggingface_hub import HfApi

from ..archs import describe_arch
from ..errors import ConfigError, WeightsNotFoundError, WriteFailed
from ..io import check_output_folder, write_failed, write_json
from ..zoo.home import CONFIG_NAME, META_NAME, WEIGHTS_NAME, write_model_folder

__all__ = ["save_timm_folder", "build_hub_folder", "push_to_hub", "timm_native_arch"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def timm_native_arch(arch: str) -> str:
    """``mff_vit_small_patch16_224`` -> ``vit_small_patch16_224`` (same module, registered in plain timm)."""
    return arch[len("mff_"):] if arch.startswith("mff_") else arch


def save_timm_folder(
    folder: str | os.PathLike[str], arch: str, model_args: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Path:
    """Write the encoder of a full ``MFFPretrainModel`` state dict as a timm model folder (atomic), with the
    fusion + decoder weights as ``pretrain_extras.safetensors`` and provenance in ``mffzoo.json``."""
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    extras = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    model.load_state_dict(encoder, strict=True)
    return write_model_folder(folder, arch, model, model_args=dict(model_args), meta=meta, extras=extras)


def _model_folder(run_dir: Path) -> Path:
    for cand in (run_dir / "model", run_dir):
        if (cand / CONFIG_NAME).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    raise WeightsNotFoundError(
        f"'{run_dir}' has no finished model (expected {run_dir / 'model' / WEIGHTS_NAME}); let `mffzoo train` "
        f"finish (rerun it to resume), or convert a checkpoint: mffzoo convert {run_dir}/checkpoints/<file>.pth "
        f"{run_dir}/model"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


_PAPER = ('"Improving Pixel-based MIM by Reducing Wasted Modeling Capability" (Liu et al., ICCV 2023, '
          "arXiv:2308.00261; official code: "
          "[open-mmlab/mmpretrain](https://github.com/open-mmlab/mmpretrain/tree/main/configs/mff))")


_CITATION = """
## Citation

```bibtex
@inproceedings{liu2023mff,
  title={Improving Pixel-based MIM by Reducing Wasted Modeling Capability},
  author={Liu, Yuan and Zhang, Songyang and Chen, Jiacheng and Yu, Zhaohui and Chen, Kai and Lin, Dahua},
  booktitle={ICCV},
  year={2023}
}
```
"""


def _provenance_paragraph(kind: str, method: str, recipe: dict[str, Any], meta: dict[str, Any]) -> str:
    """How the weights came to be, as far as the folder records it: trained by mffzoo, or converted from a file."""
    if recipe:
        return (f"A plain ViT encoder (timm `VisionTransformer`, no classifier head) pretrained with {method} by "
                f"mffzoo, the method of {_PAPER}.\nThe fusion projections and the MAE decoder are pretraining-only; "
                "they are kept in `pretrain_extras.safetensors` for resuming or visualising.")
    text = (f"A plain ViT encoder (timm `VisionTransformer`) converted by `mffzoo convert` from a "
            f"{meta.get('source_kind') or 'checkpoint of unrecorded kind'}.")
    if kind == "mff":
        text += f" MFF is the method of {_PAPER}."
    return text


def _model_card(repo_id: str, arch: str, native: str, config: dict[str, Any], meta: dict[str, Any],
                recipe_yaml: str, images: list[str]) -> str:
    args = config.get("model_args") or {}
    data = meta.get("data") or {}
    recipe = meta.get("recipe") or {}
    # what the folder says, never a default of MFF: a converted plain timm state dict records "unknown"
    kind = meta.get("method") or ("mff" if recipe else "unknown")
    method = {"mae": "MAE (single-level baseline)", "mff": "MFF (multi-level feature fusion)"}.get(
        kind, meta.get("source_kind") or "unknown (not recorded)")
    target = "raw pixels" if (recipe.get("model") or {}).get("norm_pix_loss") is False else "norm-pix"
    loss_kind = meta.get("final_loss_kind") or "last log window"  # mffzoo.json of older runs: a window's mean
    rows = [
        ("method", method),
        ("architecture", f"{meta.get('model') or describe_arch(arch, args)}: {arch} (timm: {native}, "
                         f"{json.dumps(args)})"),
        ("recipe", meta.get("recipe_name")), ("epochs", meta.get("epochs")),
        ("optimizer steps", meta.get("global_step")), ("images seen", meta.get("images_seen")),
        (f"final loss ({loss_kind}; masked-patch MSE, {target})", meta.get("final_loss")),
        ("fusion layers", meta.get("fusion_layers")), ("final fusion weights (softmax)", meta.get("fusion_weights")),
        ("data", data.get("root")), ("images in dataset", data.get("num_images")),
        ("augmentation", data.get("augment")), ("processes", meta.get("world_size")),
        ("device", meta.get("device")), ("wall time (s)", meta.get("wall_time_s")),
        ("mffzoo version", meta.get("mffzoo_version")), ("git commit", meta.get("git_commit")),
    ]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows if v not in (None, "", []))
    figs = "\n".join(f"![{Path(p).stem}]({p})" for p in images)
    return f"""---
library_name: timm
license: apache-2.0
pipeline_tag: image-feature-extraction
tags:
- image-feature-extraction
- timm
- mffzoo
- masked-image-modeling{f"{chr(10)}- {kind}" if kind in ("mff", "mae") else ""}
---

# {repo_id.split("/")[-1]}

{recipe.get("description", "")}

{_provenance_paragraph(kind, method, recipe, meta)}

## Usage

```python
import timm
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()  # plain timm; no mffzoo needed
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
image = Image.open("image.jpg").convert("RGB")
features = model.forward_features(transform(image).unsqueeze(0))  # (1, 1 + patches, width)
```

## Training

| | |
|---|---|
{table}

{figs}

### Recipe (fully resolved)

```yaml
{recipe_yaml.rstrip()}
```
{_CITATION if kind in ("mff", "mae") else ""}"""


def build_hub_folder(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], repo_id: str) -> Path:
    """Lay out the Hub repo for a finished run in ``out_dir`` (created; must be empty or absent)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    check_output_folder(out, "--local-dir")  # a file there (or above it): one line, before anything is read
    src = _model_folder(run_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--local-dir '{out}' is not empty; pass a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / CONFIG_NAME).read_text())
    meta = json.loads((src / META_NAME).read_text()) if (src / META_NAME).is_file() else {}
    arch = config.get("architecture", "")
    native = timm_native_arch(arch)
    hub_config = {**config, "architecture": native}
    write_json(out / CONFIG_NAME, hub_config)
    for name in (WEIGHTS_NAME, META_NAME, "pretrain_extras.safetensors"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    images = []
    recon = sorted((run_dir / "vis").glob("reconstruction_epoch*.png")) if (run_dir / "vis").is_dir() else []
    for png, name in ((recon[-1] if recon else None, "reconstruction.png"),
                      (run_dir / "fusion_weights.png", "fusion_weights.png")):
        if png is not None and png.is_file():
            shutil.copy2(png, out / name)
            images.append(name)
    recipe = meta.get("recipe")
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False) if recipe else "# recipe not recorded"
    if recipe:
        (out / "recipe.yaml").write_text(recipe_yaml)
    (out / "README.md").write_text(_model_card(repo_id, arch, native, hub_config, meta, recipe_yaml, images))
    return out


def push_to_hub(
    run_dir: str | os.PathLike[str], repo_id: str, *, local_dir: str | os.PathLike[str] | None = None,
    private: bool = False, token: str | None = None, commit_message: str | None = None,
) -> str:
    """Publish a finished run as a timm-compatible Hub repo; with ``local_dir`` only lay it out there (no
    network). Returns the repo URL or the local folder."""
    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"--repo '{repo_id}' is not a Hub repo id; write it as org/name (e.g. me/mff-vit-small)")
    if local_dir is not None:
        try:
            return str(build_hub_folder(run_dir, local_dir, repo_id))
        except WriteFailed:
            raise
        except OSError as exc:  # disk full, file-size limit, read-only: one line naming the folder
            raise write_failed(local_dir, exc, where="pass another --local-dir") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mffzoo-push-") as tmp:
        folder = build_hub_folder(run_dir, Path(tmp) / "repo", repo_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or f"mffzoo: upload {Path(run_dir).name}")
    return str(url)
