"""Weighted k-NN classification of frozen features (DINO's protocol: k=20, cosine similarity, T=0.07).

Each of the k nearest training features votes for its class with weight ``exp(sim / T)``. It needs no training
and no hyper-parameter search, which makes it the quickest honest read-out of a pretrained representation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import check_image_folder
from .features import POOLS, READOUTS, frozen_features, load_eval_model, resolve_device

_logger = logging.getLogger("mffzoo")

__all__ = ["knn_scores", "topk_accuracy", "knn_accuracy", "knn_eval"]


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Class scores ``(N_query, num_classes)``: sum of ``exp(cos / T)`` over each query's k nearest neighbours.

    The similarity search runs on ``device`` (default: where ``train_feats`` lives); scores come back on the CPU.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev = torch.device(device) if device is not None else train_feats.device
    train = F.normalize(train_feats.to(dev).float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, train.shape[0])
    labels = train_labels.to(dev).long()
    out = []
    for q in query.split(chunk):
        sim, idx = (q.to(dev) @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype, device=dev)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.cpu())
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent top-k accuracy; k is capped at the number of classes (top-5 of a 4-class task is 100)."""
    labels = labels.long()
    maxk = min(max(topk), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices
    hit = pred.eq(labels[:, None])
    return {f"top{k}": round(100.0 * float(hit[:, : min(k, maxk)].any(dim=1).float().mean()), 4) for k in topk}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, *, k: int = 20, temperature: float = 0.07,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1/top-5 of :func:`knn_scores` against ``val_labels``."""
    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k=k, temperature=temperature,
                        device=device)
    return topk_accuracy(scores, val_labels)


def knn_eval(model: str | os.PathLike[str], data: str | os.PathLike[str], *, k: int = 20, temperature: float = 0.07,
             pools: Sequence[str] = POOLS, img_size: int | None = None, random_init: bool = False,
             batch_size: int = 128, workers: int = 0, bf16: bool = False, cache: bool | str = True,
             seed: int = 0, device: str | torch.device = "auto") -> dict[str, Any]:
    """k-NN top-1/top-5 of a MODEL spec on an ImageNet-style folder, per pooling (``cls``, ``avg``); each result
    names its read-out (``readout``: cls token or avg-pooled patch tokens).

    The encoder and the neighbour search run on ``device`` (``auto``: a CUDA GPU when one is visible)."""
    dev = resolve_device(device)
    check_image_folder(data)  # bad data fails before any model is built
    net = load_eval_model(model, img_size=img_size, random_init=random_init, seed=seed, device=dev)
    train, val, classes, info = frozen_features(net, data, img_size=img_size, batch_size=batch_size,
                                                workers=workers, bf16=bf16, cache=cache)
    _logger.info("k-NN (k=%d, T=%g): %d validation images against %d training features; read-outs: %s", k,
                 temperature, len(val), len(train), ", ".join(READOUTS[p] for p in pools))
    results = {p: {**knn_accuracy(train[p], train.labels, val[p], val.labels, len(classes), k=k,
                                  temperature=temperature, device=dev), "readout": READOUTS[p]} for p in pools}
    return {"task": "knn", "model": str(model), "random_init": random_init, "data": str(data), "k": k,
            "temperature": temperature, "device": dev.type, **info, "classes": classes, "results": results}
