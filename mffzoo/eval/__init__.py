"""Evaluation of frozen and fine-tuned backbones: k-NN, linear probe, fine-tuning (the MAE-vs-MFF check that
uses them is :mod:`mffzoo.analysis.reproduce`)."""

from .features import FeatureSet, compute_features, frozen_features, load_eval_model, resolve_device
from .knn import knn_accuracy, knn_eval, knn_scores, topk_accuracy
from .linear import LinearProbeConfig, linear_probe, train_linear_head
from .results import update_zoo_metrics

__all__ = [
    "FeatureSet", "compute_features", "frozen_features", "load_eval_model", "resolve_device",
    "knn_accuracy", "knn_eval", "knn_scores", "topk_accuracy",
    "LinearProbeConfig", "linear_probe", "train_linear_head",
    "update_zoo_metrics",
]
