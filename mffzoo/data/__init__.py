"""Datasets for mffzoo demos and evaluation."""

from mffzoo.data.demo import DEMO_CLASSES, DEMO_DATASET_VERSION, default_demo_root, write_demo_dataset

__all__ = ["DEMO_CLASSES", "DEMO_DATASET_VERSION", "default_demo_root", "write_demo_dataset"]
