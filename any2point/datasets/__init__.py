"""Point-cloud datasets and transforms; every module here registers its classes on import."""
from __future__ import annotations

from typing import Any

from any2point.datasets.base import SPLITS, Compose, PartDataset, PointDataset, build_transforms, holdout_indices
from any2point.registry import DATASETS, build_from_cfg
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)


def build_dataset(cfg: Any, split: str) -> PointDataset:
    """Build the dataset of ``cfg`` (a ``type:`` mapping) for ``split`` (train/val/trainval/test)."""
    return build_from_cfg(cfg, DATASETS, split=split)


__all__ = ["SPLITS", "Compose", "PartDataset", "PointDataset", "build_dataset", "build_transforms", "holdout_indices"]
