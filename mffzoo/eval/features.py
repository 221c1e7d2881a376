"""Frozen features: the cls token after the final norm and the average of the patch tokens.

These are the two read-outs the MAE/MFF papers evaluate (linear probing uses the cls token after the pretrained
norm; fine-tuning pools the patch tokens). For a timm ViT whose final norm is ``fc_norm`` (``global_pool='avg'``
classifiers: the ``mff_ft_*`` tags, fine-tune outputs) ``forward_features`` returns un-normalised tokens, so
``fc_norm`` is applied to both read-outs here: ``avg`` is then exactly the model's own pre-logits output
(``forward_head(tokens, pre_logits=True)``). Features are cached on disk keyed by a hash of the model's weights,
the image files and the transform, so a second kNN/linear/filter run on the same model and data skips the
encoder entirely, and a changed weight or image can never be served stale features.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError
from ..io import cache_root
from ..progress import Progress
from ..zoo import atomic_torch_save, load_checkpoint_file, load_model
from .data import eval_transform, make_loader, model_input_size, open_splits

_logger = logging.getLogger("mffzoo")

__all__ = ["FeatureSet", "POOLS", "READOUTS", "resolve_device", "load_eval_model", "pool_tokens",
           "extract_features", "compute_features", "model_fingerprint", "dataset_fingerprint", "feature_cache_dir",
           "features_info", "frozen_features"]

POOLS = ("cls", "avg")
# What each pooling reads out, for every label a result carries (JSON, tables, the zoo's metric column): a number
# that does not say which feature it scored is not comparable with the papers' (linear probe: cls; fine-tune: avg).
READOUTS = {"cls": "cls token", "avg": "avg-pooled patch tokens"}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the first CUDA GPU if one is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but no CUDA GPU is visible; use --device cpu (or auto)")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"--device '{device}' is not a device; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                              "use --device cuda:0")
        return dev
    raise ConfigError(f"--device '{device}' is not one of auto, cpu, cuda (or cuda:N)")


@dataclass
class FeatureSet:
    """Per-image features for each pooling, plus labels (float32, CPU)."""

    cls: torch.Tensor
    avg: torch.Tensor
    labels: torch.Tensor

    def __getitem__(self, pool: str) -> torch.Tensor:
        if pool not in POOLS:
            raise KeyError(f"unknown pooling {pool!r}; choose from {POOLS}")
        return getattr(self, pool)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"cls": self.cls, "avg": self.avg, "labels": self.labels}


def load_eval_model(spec: str | os.PathLike[str], *, img_size: int | None = None, random_init: bool = False,
                    seed: int = 0, device: str | torch.device | None = None, **kwargs: Any) -> nn.Module:
    """A headless backbone for any MODEL spec (via :func:`mffzoo.zoo.load_model`), in eval mode, on ``device``
    (None: left on the CPU, as built; see :func:`resolve_device`).

    ``random_init`` builds the architecture without weights (seeded, so smoke runs are reproducible).
    """
    kwargs.setdefault("num_classes", 0)
    model = load_model(spec, pretrained=True, random_init=random_init, img_size=img_size, seed=seed, **kwargs)
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval()


def _fc_norm(model: nn.Module) -> nn.Module | None:
    """The model's ``fc_norm`` when it is its final norm (timm then sets ``norm`` to Identity), else None."""
    fc_norm = getattr(model, "fc_norm", None)
    return fc_norm if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity) else None


def pool_tokens(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls, avg) from ``forward_features`` output; CNN maps (B, C, H, W) give the spatial mean for both.

    ``avg`` is the mean of the patch tokens (cls/register prefix tokens excluded); a model with an ``fc_norm``
    gets it applied to both, so ``avg`` equals ``forward_head(tokens, pre_logits=True)`` of an avg-pool model.
    """
    if tokens.ndim == 4:
        avg = tokens.mean(dim=(2, 3))
        return avg, avg
    if tokens.ndim != 3:
        raise DataError(f"model returned features of shape {tuple(tokens.shape)}; expected tokens (B, N, C)")
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_cls = getattr(model, "cls_token", None) is not None and n_prefix > 0
    avg = tokens[:, n_prefix:].mean(dim=1)
    cls = tokens[:, 0] if has_cls else avg
    fc_norm = _fc_norm(model)
    if fc_norm is not None:
        cls, avg = fc_norm(cls), fc_norm(avg)
    return cls, avg


@torch.no_grad()
def extract_features(model: nn.Module, loader: Any, *, bf16: bool = False,
                     device: torch.device | str | None = None, progress: Progress | None = None) -> FeatureSet:
    """Run the frozen encoder over ``loader`` (yielding ``(images, labels)``) on the model's device (or
    ``device``); autocast uses that device's type. ``progress`` advances by the images of each batch."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    cls_out, avg_out, labels = [], [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = model.forward_features(x.to(device, non_blocking=True))
        c, a = pool_tokens(model, tokens)
        cls_out.append(c.float().cpu())
        avg_out.append(a.float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
        if progress is not None:
            progress.update(len(labels[-1]))
    if not labels:
        raise DataError("no images to extract features from; the split is empty")
    return FeatureSet(torch.cat(cls_out), torch.cat(avg_out), torch.cat(labels))


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture name and every weight byte: two models share cached features only if identical."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode() + str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def dataset_fingerprint(ds: Any) -> str:
    """Hash of each sample's path, size, mtime and label, plus the transform: edits to the data miss the cache."""
    h = hashlib.sha256()
    samples = getattr(ds, "samples", None)
    if samples is None:
        raise TypeError("dataset_fingerprint needs an ImageFolder-like dataset with .samples")
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    h.update(repr(getattr(ds, "transform", None)).encode())
    return h.hexdigest()[:24]


def feature_cache_dir() -> Path:
    """``$MFFZOO_FEATURE_CACHE``, else ``~/.cache/mffzoo/features``."""
    env = os.environ.get("MFFZOO_FEATURE_CACHE")
    if env:
        return Path(env).expanduser()
    return cache_root() / "features"


def compute_features(model: nn.Module, ds: Any, *, batch_size: int = 128, workers: int = 0, bf16: bool = False,
                     cache: bool | str | os.PathLike[str] = True, model_key: str | None = None) -> FeatureSet:
    """Features of an ImageFolder split, from the cache when model, files and transform are unchanged.

    ``cache``: True (default location), False (never read or write), or a folder. ``model_key`` skips hashing
    the weights when the caller already has a fingerprint.
    """
    path: Path | None = None
    if cache is not False:
        root = feature_cache_dir() if cache is True else Path(cache)
        dev = next(model.parameters()).device.type
        key = f"{model_key or model_fingerprint(model)}-{dataset_fingerprint(ds)}-{'bf16' if bf16 else 'fp32'}"
        key += "" if dev == "cpu" else f"-{dev}"  # GPU kernels round differently: keep their features apart
        path = root / f"{key}.pt"
        if path.is_file():
            try:
                d = load_checkpoint_file(path)
                _logger.debug("features from cache %s", path)
                return FeatureSet(d["cls"], d["avg"], d["labels"])
            except (CheckpointError, KeyError) as exc:  # a damaged cache entry is recomputed, never fatal
                _logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    split = Path(getattr(ds, "root", "")).name or "dataset"
    with Progress(total=len(ds), desc=f"features: {split} split, {len(ds)} images", unit="img") as progress:
        feats = extract_features(model, make_loader(ds, batch_size, workers=workers), bf16=bf16, progress=progress)
    if path is not None:
        atomic_torch_save(feats.to_dict(), path)
    return feats


def features_info(model: nn.Module, classes: list[str], num_train: int, val: FeatureSet,
                  img_size: int | None = None) -> dict[str, Any]:
    """The sizes every frozen-feature result reports."""
    return {"num_classes": len(classes), "num_train": num_train, "num_val": len(val),
            "img_size": model_input_size(model, img_size), "feature_dim": int(val.cls.shape[1])}


def frozen_features(model: nn.Module, data: str | os.PathLike[str], *, img_size: int | None = None,
                    batch_size: int = 128, workers: int = 0, bf16: bool = False,
                    cache: bool | str | os.PathLike[str] = True,
                    ) -> tuple[FeatureSet, FeatureSet, list[str], dict[str, Any]]:
    """(train, val, classes, info) features of a checked ImageNet-style folder with the model's test transform.

    ``classes[i]`` is the class of label ``i`` (timm's training order, see :mod:`mffzoo.eval.data`)."""
    tf = eval_transform(model, img_size)
    train_ds, val_ds = open_splits(data, tf, tf)
    key = model_fingerprint(model) if cache is not False else None
    kw = dict(batch_size=batch_size, workers=workers, bf16=bf16, cache=cache, model_key=key)
    train = compute_features(model, train_ds, **kw)
    val = compute_features(model, val_ds, **kw)
    classes = list(train_ds.classes)
    return train, val, classes, features_info(model, classes, len(train), val, img_size)
