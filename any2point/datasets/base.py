"""The dataset contract shared by every point-cloud dataset.

An item is ``dict(points=FloatTensor (N, 3), label=int)``; a part-segmentation dataset
(:class:`PartDataset`) adds ``parts=LongTensor (N,)``, the part of each point. Datasets expose the splits
``train`` / ``val`` / ``test`` and ``trainval`` (= train + val, the whole official training set):
``val`` is held out from the training set so model selection never sees the test split.

Augmentation randomness is a pure function of ``(seed, augment seed, epoch, index)``: every item
draws from its own ``numpy.random.Generator``, so results do not depend on the number of loader
workers or on the order in which items are fetched, and a resumed run sees exactly the augmentations
of a straight run. ``seed`` belongs to the dataset (it also fixes the val hold-out, so runs with
different seeds select models on the same items); the augment seed is the run's (derived from
``experiment.seed`` unless ``experiment.augment_seed`` pins it, see :mod:`any2point.engine.seeds`; set
by the trainer), so repeated runs of one config see different augmentations.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from any2point.registry import TRANSFORMS, Slot, build_from_cfg
from any2point.errors import ConfigError

SPLITS = ("train", "val", "trainval", "test")
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class Compose:
    """Apply transforms in order; each maps ``(points (N, 3+), rng) -> points``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for t in self.transforms:
            points = t(points, rng)
        return points

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def build_transforms(cfgs: Optional[Sequence[Any]]) -> Compose:
    """Build a :class:`Compose` from a list of ``type:`` mappings of the transform registry."""
    return Compose([build_from_cfg(c, TRANSFORMS) for c in (cfgs or [])])


def split_kind(split: str) -> str:
    """Which transform list a split uses: ``train`` for train/trainval, ``test`` for val/test."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    return "train" if split in ("train", "trainval") else "test"


class PointDataset(Dataset):
    """Base class. Subclasses implement :meth:`__len__`, :meth:`get_raw` and set ``class_names``.

    Args:
        split: one of ``train``, ``val``, ``trainval``, ``test``.
        transforms: ``{"train": [...], "test": [...]}`` lists of transform configs, and optionally
            ``"vote": [...]``, the augmentations of test-time voting (default: the ``train`` list;
            see :mod:`any2point.engine.evaluate`).
        seed: base seed of the per-item augmentation generators.
    """

    class_names: list[str] = []
    #: The task the dataset's items are labelled for (a name in the task registry).
    task: str = "classification"
    config_slots = {"transforms": Slot(TRANSFORMS, many=True)}

    def __init__(self, split: str, transforms: Optional[dict] = None, seed: int = 0) -> None:
        transforms = transforms or {}
        unknown = set(transforms) - {"train", "test", "vote"}
        if unknown:
            raise ConfigError(f"dataset.transforms has unknown keys {sorted(unknown)}; use 'train', 'test' "
                              f"and (for test-time voting) 'vote'")
        self.split = split
        self.seed = seed
        self.augment_seed = 0
        self.epoch = 0
        self.transform = build_transforms(transforms.get(split_kind(split)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (called by the trainer before each epoch)."""
        self.epoch = epoch

    def set_augment_seed(self, seed: int) -> None:
        """Select the augmentation streams of a run whose augment seed is ``seed`` (called by the trainer)."""
        if seed < 0:
            raise ConfigError(f"the augment seed must be >= 0, got {seed}")
        self.augment_seed = seed

    def item_rng(self, index: int) -> np.random.Generator:
        """The augmentation generator of item ``index`` in the current epoch and run."""
        return np.random.default_rng([self.seed, self.augment_seed, self.epoch, index])

    def get_raw(self, index: int) -> tuple[np.ndarray, int]:
        """Return the untransformed ``(points (N, 3+) float32, label)`` of item ``index``."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """All labels of the split, in order (used for per-class counts and stratified splits)."""
        return np.array([self.get_raw(i)[1] for i in range(len(self))], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        points, label = self.get_raw(index)
        points = self.transform(points, self.item_rng(index))
        return {"points": torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32)),
                "label": int(label)}


class PartDataset(PointDataset):
    """Base class of part-segmentation datasets: ``label`` is the shape's category, ``parts`` the
    part of each point, in ``[0, num_parts)`` and among its category's ``category_parts``.

    :meth:`get_raw` returns ``(points (N, C), category)`` whose last column is the part of each point
    (so the transforms, which carry extra columns and resample rows, keep points and parts
    together); the item's ``points`` are its first three columns.
    """

    task = "part_segmentation"
    category_parts: list[list[int]] = []
    part_names: list[str] = []

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        points, label = self.get_raw(index)
        points = self.transform(points, self.item_rng(index))
        return {"points": torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32)),
                "label": int(label), "parts": torch.from_numpy(points[:, -1].astype(np.int64))}


def holdout_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of a training set into (train, val) index arrays, deterministic in ``seed``.

    Every class with at least two samples gives ``max(1, round(fraction * count))`` samples to val.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0 if fraction == 0 or len(idx) < 2 else max(1, int(round(fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fold_of_each(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The cross-validation fold ``(N,)`` of each of ``N`` items, stratified and deterministic in
    ``seed``: each class's items, in a seeded random order, are dealt to the folds in turn (starting
    where the previous class stopped), so every fold holds ``floor`` or ``ceil`` of each class's
    share and the fold sizes differ by at most one."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    if folds > len(labels):
        raise ConfigError(f"{folds} folds need at least {folds} items, got {len(labels)}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        fold[idx] = (start + np.arange(len(idx))) % folds
        start = (start + len(idx)) % folds
    return fold
