"""ModelNet40 / ModelNet10 (Wu et al., CVPR 2015) as point clouds, and its few-shot episodes.

Two layouts are read, chosen by the files in ``root``:

- ``modelnet40_normal_resampled`` (Point-BERT's): ``modelnet{C}_shape_names.txt`` (class names in
  label order), ``modelnet{C}_{train,test}.txt`` (shape ids such as ``airplane_0001``), one
  ``<class>/<shape id>.txt`` per shape (lines ``x,y,z,nx,ny,nz``, 10,000 points) and, when present, the
  cached ``modelnet{C}_{train,test}_{N}pts_fps.dat`` pickles (``[clouds (N, 6), labels (1,)]``), which
  are then read instead. Without them the text files are read once and furthest-point sampled to N
  points; the result is cached next to them in ``modelnet{C}_{split}_{N}pts_fps.npz``.
- ``modelnet40_ply_hdf5_2048`` (PointNet's): ``shape_names.txt``, ``{train,test}_files.txt`` listing
  ``ply_data_{split}{i}.h5`` files with ``data`` (S, 2048, 3) and ``label`` (S, 1).

Every cloud is centred and scaled into the unit sphere; normals are not kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from tqdm import tqdm

from any2point.datasets.io import (DataError, DatasetNotFoundError, InMemoryDataset, cached_array,
                                   check_cloud, check_clouds, check_labels, file_signature, furthest_point_indices,
                                   load_pickle, normalize_unit_sphere, read_h5, read_lines, read_point_file,
                                   require_path, stack_clouds, take_points)
from any2point.registry import DATASETS, ConfigError, Fraction, NumPoints, PositiveInt, Seed

MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup",
    "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop",
    "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa",
    "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox")
"""ModelNet40's class names in label order (``modelnet40_shape_names.txt``)."""

MODELNET10_CLASSES = ("bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa", "table",
                      "toilet")
"""ModelNet10's class names in label order, a subset of ModelNet40's."""

HINT = ("Get modelnet40_normal_resampled with Point-BERT's modelnet40_{train,test}_8192pts_fps.dat "
        "(see https://github.com/lulutang0608/Point-BERT/blob/master/DATASET.md) into "
        "data/ModelNet/modelnet40_normal_resampled/, or PointNet's modelnet40_ply_hdf5_2048 "
        "(https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip) and set "
        "dataset.root=PATH (with dataset.num_points=2048 for the latter).")

FEWSHOT_HINT = ("Get Point-BERT's few-shot episodes (see https://github.com/lulutang0608/Point-BERT/blob/"
                "master/DATASET.md): data/ModelNetFewshot/{5,10}way_{10,20}shot/{0..9}.pkl, or set dataset.root=PATH.")


@DATASETS.register()
class ModelNet40(InMemoryDataset):
    """ModelNet40, or ModelNet10 with ``num_category: 10``, in either layout (module docstring).

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test``.
        root: the ``modelnet40_normal_resampled`` or ``modelnet40_ply_hdf5_2048`` folder.
        num_category: 40, or 10 for ModelNet10 (its own list files in the resampled layout; the
            ten classes picked out of the 40, relabelled, in the h5 layout).
        num_points: points per cloud (8192 for the resampled layout; at most 2048 in the h5 layout,
            whose clouds are cut to their first ``num_points``).
        transforms, seed, val_fraction, fps_cache: see :class:`InMemoryDataset`.
    """

    def __init__(self, split: str, root: str = "data/ModelNet/modelnet40_normal_resampled",
                 num_category: Literal[10, 40] = 40, num_points: NumPoints = 8192,
                 transforms: Optional[dict] = None, seed: Seed = 0, val_fraction: Fraction = 0.1,
                 fps_cache: bool = True) -> None:
        super().__init__(split, transforms, seed, val_fraction, fps_cache)
        if num_category not in (10, 40):
            raise ConfigError(f"ModelNet40.num_category must be 10 or 40, got {num_category}")
        if num_points <= 0:
            raise ConfigError(f"ModelNet40.num_points must be > 0, got {num_points}")
        self.num_category, self.num_points = num_category, num_points
        folder = require_path(Path(root), HINT, folder=True)
        if (folder / f"modelnet{num_category}_shape_names.txt").is_file():
            points, labels, signature = self._read_resampled(folder)
        elif (folder / "shape_names.txt").is_file():
            points, labels, signature = self._read_h5(folder)
        else:
            raise DatasetNotFoundError(
                f"{folder} holds neither modelnet{num_category}_shape_names.txt (layout modelnet40_normal_resampled) "
                f"nor shape_names.txt (layout modelnet40_ply_hdf5_2048). {HINT}")
        for cloud in points:
            normalize_unit_sphere(cloud)
        self.finish(points, labels, [*signature, f"modelnet{num_category} {num_points} points, unit sphere"],
                    folder / f"modelnet{num_category}_{num_points}pts")

    def _read_resampled(self, root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Read the official set from the ``.dat`` cache or else from the per-shape text files."""
        prefix = f"modelnet{self.num_category}"
        self.class_names = read_lines(root / f"{prefix}_shape_names.txt", HINT)
        dat = root / f"{prefix}_{self.official_split}_{self.num_points}pts_fps.dat"
        if dat.is_file():
            self.source = str(dat)
            content = load_pickle(dat)
            if not (isinstance(content, (list, tuple)) and len(content) == 2
                    and all(isinstance(part, (list, tuple)) for part in content) and len(content[0]) == len(content[1])):
                raise DataError(f"{dat}: expected [list of clouds, list of labels] of equal lengths (Point-BERT's format)")
            points = stack_clouds(content[0], self.num_points, str(dat))
            labels = check_labels(np.asarray(content[1]), len(points), len(self.class_names), str(dat))
            return points, labels, [file_signature(dat, root)]
        list_file = root / f"{prefix}_{self.official_split}.txt"
        self.source = str(list_file)
        label_of = {name: i for i, name in enumerate(self.class_names)}
        files, labels = [], []
        for line, shape_id in enumerate(read_lines(list_file, HINT), start=1):
            name = shape_id.rpartition("_")[0]
            if name not in label_of:
                raise DataError(f"{list_file}, line {line}: shape id '{shape_id}' names no class of "
                                f"{prefix}_shape_names.txt")
            files.append(require_path(root / name / f"{shape_id}.txt", f"(listed in {list_file}) {HINT}"))
            labels.append(label_of[name])
        signature = [file_signature(f, root) for f in files]
        cache = root / f"{prefix}_{self.official_split}_{self.num_points}pts_fps.npz"
        points = cached_array(cache, [*signature, f"fps {self.num_points} start 0"], lambda: self._sample_text(files))
        return points, np.array(labels, dtype=np.int64), signature

    def _sample_text(self, files: list[Path]) -> np.ndarray:
        """Read per-shape text files and keep ``num_points`` furthest-point samples of each."""
        clouds = [read_point_file(f) for f in tqdm(files, desc=f"reading {files[0].parent.parent}", unit="shape")]
        for path, cloud in zip(files, clouds):
            if len(cloud) < self.num_points:
                raise DataError(f"{path}: {len(cloud)} points, fewer than num_points={self.num_points}")
        index = furthest_point_indices(clouds, self.num_points, f"ModelNet {self.official_split} set")
        return np.stack(take_points(clouds, index))

    def _read_h5(self, root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Read the official set from the h5 files its ``{split}_files.txt`` lists."""
        names = read_lines(root / "shape_names.txt", HINT)
        list_file = root / f"{self.official_split}_files.txt"
        self.source = str(list_file)
        files = [require_path(root / Path(line).name, f"(listed in {list_file}) {HINT}")
                 for line in read_lines(list_file, HINT)]
        points, labels = [], []
        for path in files:
            arrays = read_h5(path, ("data", "label"))
            clouds = check_clouds(arrays["data"], str(path))
            if clouds.shape[1] < self.num_points:
                raise DataError(f"{path}: {clouds.shape[1]} points per cloud, fewer than num_points="
                                f"{self.num_points} (set dataset.num_points)")
            points.append(clouds[:, :self.num_points])
            labels.append(check_labels(arrays["label"], len(clouds), len(names), str(path)))
        points, labels = np.concatenate(points), np.concatenate(labels)
        self.class_names = names
        if self.num_category == 10:
            missing = [c for c in MODELNET10_CLASSES if c not in names]
            if missing:
                raise DataError(f"{root / 'shape_names.txt'}: lacks the ModelNet10 classes {missing}")
            relabel = np.full(len(names), -1)
            relabel[[names.index(c) for c in MODELNET10_CLASSES]] = np.arange(len(MODELNET10_CLASSES))
            keep = relabel[labels] >= 0
            points, labels = points[keep], relabel[labels[keep]]
            self.class_names = list(MODELNET10_CLASSES)
        return points, labels, [file_signature(f, root) for f in files]


@DATASETS.register()
class ModelNetFewShot(InMemoryDataset):
    """One few-shot episode of ModelNet40 in Point-BERT's published splits (as peers report them).

    ``root/{way}way_{shot}shot/{fold}.pkl`` holds ``{"train": support, "test": query}``, each a list of
    ``(points (8192, 6), episode label in [0, way), ModelNet40 label)``. Splits follow the episode:
    ``trainval`` is the support set, ``test`` the query set, and ``train``/``val`` a stratified
    hold-out of the support set (``val_fraction``; a class keeps at least one shot for ``train``).
    Class names are the ModelNet40 names of the episode's classes.

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test``.
        root: the ``ModelNetFewshot`` folder.
        way, shot: the episode family (published: 5 or 10 way, 10 or 20 shot).
        fold: the episode (published: 0 to 9).
        transforms, seed, val_fraction, fps_cache: see :class:`InMemoryDataset`.
    """

    def __init__(self, split: str, root: str = "data/ModelNetFewshot", way: PositiveInt = 5, shot: PositiveInt = 10,
                 fold: int = 0, transforms: Optional[dict] = None, seed: Seed = 0, val_fraction: Fraction = 0.1,
                 fps_cache: bool = True) -> None:
        super().__init__(split, transforms, seed, val_fraction, fps_cache)
        path = require_path(Path(root) / f"{way}way_{shot}shot" / f"{fold}.pkl", FEWSHOT_HINT)
        episode = load_pickle(path)
        if not (isinstance(episode, dict) and all(isinstance(episode.get(k), list) for k in ("train", "test"))):
            raise DataError(f"{path}: expected a dict with 'train' and 'test' lists (Point-BERT's few-shot format)")
        parts = {k: self._read_part(path, k, episode[k], way) for k in ("train", "test")}
        self.class_names = []
        for label in range(way):
            sources = {int(o) for _, labels, originals in parts.values() for o in originals[labels == label]}
            if len(sources) != 1:
                raise DataError(f"{path}: episode label {label} must stand for one ModelNet40 class, found "
                                f"ModelNet40 labels {sorted(sources)}")
            self.class_names.append(MODELNET40_CLASSES[sources.pop()])
        points, labels, _ = parts[self.official_split]
        for cloud in points:
            normalize_unit_sphere(cloud)
        self.source = f"{path} ({self.official_split})"
        self.finish(points, labels, [file_signature(path, path.parent), "unit sphere"], path.with_suffix(""))

    @staticmethod
    def _read_part(path: Path, part: str, entries: list[Any], way: int) -> tuple[list, np.ndarray, np.ndarray]:
        """Clouds (N_i, 3), episode labels and ModelNet40 labels of the ``part`` list of an episode."""
        where = f"{path} ({part})"
        if not entries:
            raise DataError(f"{where}: holds no samples")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise DataError(f"{where}, sample {i}: expected (points, label, ModelNet40 label)")
        points = [check_cloud(np.asarray(e[0]), f"{where}, sample {i}") for i, e in enumerate(entries)]
        labels = check_labels(np.array([e[1] for e in entries]), len(entries), way, where)
        originals = check_labels(np.array([e[2] for e in entries]), len(entries), len(MODELNET40_CLASSES), where)
        return points, labels, originals
