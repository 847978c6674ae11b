"""The user's own shapes: one folder per class, class names from the folder names.

Layouts: ``root/<class>/<file>``, split by a seeded, stratified draw of ``test_fraction`` of each
class into the test set; or ``root/train/<class>/<file>`` and ``root/test/<class>/<file>``, used as
given. Files: point clouds ``.npy .npz .txt .xyz .pts`` (kept as they are; ``.npz`` holds a
``points`` array or a single array; text has one point per line) and meshes ``.ply .obj .off .stl``
(sampled on the surface, uniformly by area; a ``.ply`` without faces is read as a point cloud).
Files with other suffixes and hidden files are ignored. Clouds may differ in size: end the
transforms with ``FPSResample`` or ``RandomSubset`` so a batch has one size.

Cross-validation (``folds: K``, ``fold: i``; ``main.py --folds K`` runs every fold): the files of the
first layout are dealt into K stratified, seeded folds; fold ``i`` is the test set and the others
the training set, so over the K runs every file is tested exactly once.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
from tqdm import tqdm

from any2point.datasets.base import fold_of_each, holdout_indices
from any2point.datasets.io import (MESH_SUFFIXES, POINT_SUFFIXES, InMemoryDataset, file_signature, read_shape_file,
                                   require_path)
from any2point.errors import ConfigError, DataError
from any2point.registry import DATASETS, Fraction, NonNegativeInt, NumPoints, Range, Seed

HINT = "Set dataset.root=PATH to a folder with one sub-folder of shape files per class (see PointFolder)."


def class_folders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder``, sorted (the classes in label order)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{folder}: holds no class folders (expected {folder}/<class>/<file>)")
    return names


def shape_files(folder: Path) -> list[Path]:
    """The readable files of one class folder, sorted; none is an error naming the folder."""
    suffixes = POINT_SUFFIXES + MESH_SUFFIXES
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"class folder {folder} has no readable files (supported: {', '.join(suffixes)})")
    return files


@DATASETS.register()
class PointFolder(InMemoryDataset):
    """A folder of the user's shapes, one sub-folder per class (see the module docstring).

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test``.
        root: the folder.
        num_samples: points sampled on each mesh's surface.
        test_fraction: share of each class drawn into ``test`` when there are no ``train/`` and
            ``test/`` sub-folders (a class with one file keeps it for training).
        data_seed: seed of that draw (or of the folds) and of the mesh sampling, kept apart from
            ``seed`` so runs with different seeds see the same test set and the same clouds.
        folds: the number of cross-validation folds (``null``: no cross-validation, the
            ``test_fraction`` draw); needs the ``root/<class>/<file>`` layout.
        fold: with ``folds``, the fold that is the test set (from 0).
        transforms, seed, val_fraction, fps_cache: see :class:`InMemoryDataset`.
    """

    def __init__(self, split: str, root: str, num_samples: NumPoints = 2048, test_fraction: Fraction = 0.2,
                 data_seed: Seed = 0, transforms: Optional[dict] = None, seed: Seed = 0,
                 val_fraction: Fraction = 0.1, fps_cache: bool = True,
                 folds: Optional[Annotated[int, Range(ge=2)]] = None, fold: NonNegativeInt = 0) -> None:
        super().__init__(split, transforms, seed, val_fraction, fps_cache)
        if num_samples <= 0:
            raise ConfigError(f"PointFolder.num_samples must be > 0, got {num_samples}")
        if not 0.0 <= test_fraction < 1.0:
            raise ConfigError(f"PointFolder.test_fraction must be in [0, 1), got {test_fraction}")
        self.root = require_path(Path(root), HINT, folder=True)
        if folds is not None and not 0 <= fold < folds:
            raise ConfigError(f"PointFolder.fold must be in [0, folds={folds}), got {fold}")
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            if folds is not None:
                raise ConfigError(f"PointFolder.folds: {self.root} has train/ and test/ folders; cross-validation "
                                  f"needs one folder per class ({self.root}/<class>/<file>)")
            for part in ("train", "test"):
                require_path(self.root / part, f"{self.root} has a train/ or test/ folder, so it needs both. {HINT}",
                             folder=True)
            self.class_names = class_folders(self.root / "train")
            folder = self.root / self.official_split
            unknown = sorted(set(class_folders(folder)) - set(self.class_names))
            if unknown:
                raise DataError(f"{folder}: class folders {unknown} have no counterpart in {self.root / 'train'}")
            files, labels = self._scan(folder)
        else:
            self.class_names = class_folders(self.root)
            files, labels = self._scan(self.root)
            if folds is None:
                train, test = holdout_indices(labels, test_fraction, data_seed)
            else:
                fold_of = fold_of_each(labels, folds, data_seed)
                train, test = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
            rows = test if self.official_split == "test" else train
            files, labels = [files[i] for i in rows], labels[rows]
        self.files = files
        self.source = str(self.root)
        clouds = [read_shape_file(f, num_samples, np.random.default_rng([data_seed, zlib.crc32(self._key(f))]))
                  for f in tqdm(files, desc=f"reading {self.root}", unit="file")]
        signature = [file_signature(f, self.root) for f in files] + [f"mesh samples {num_samples} seed {data_seed}"]
        self.finish(clouds, labels, signature, self.root / ".any2point")

    def _scan(self, folder: Path) -> tuple[list[Path], np.ndarray]:
        """All readable files under ``folder/<class>/`` with their labels."""
        files, labels = [], []
        for label, name in enumerate(self.class_names):
            if (folder / name).is_dir():
                found = shape_files(folder / name)
                files += found
                labels += [label] * len(found)
        return files, np.array(labels, dtype=np.int64)

    def _key(self, path: Path) -> bytes:
        """A stable per-file seed component: the path relative to ``root``."""
        return path.relative_to(self.root).as_posix().encode()

    def describe(self, row: int) -> str:
        return str(self.files[row])
