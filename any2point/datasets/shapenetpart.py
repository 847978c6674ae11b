"""ShapeNetPart (Yi et al., SIGGRAPH Asia 2016): 16,881 shapes of 16 categories with 50 parts, the
part-segmentation benchmark, from the ``shapenetcore_partanno_segmentation_benchmark_v0_normal``
release (the PointNet++ authors' resampled version with normals).

Layout under ``root``: ``synsetoffset2category.txt`` (lines ``<Category> <synset>``), one folder
per synset holding ``<shape id>.txt`` files (one point per line: ``x y z nx ny nz part``, the part a
global index in ``[0, 50)``), and ``train_test_split/shuffled_{train,val,test}_file_list.json``
(lists of ``shape_data/<synset>/<shape id>``). ``trainval`` is train + val, the usual training set.

The shapes of each official list are parsed once (with a progress bar) and kept in
``parsed.<list>.<digest>.npz`` next to the data, whose header records every file's size and mtime
(parsed again when any changes; ``cache: false`` reads each shape's text file when its item is
fetched). An item's xyz is centred and scaled into the unit sphere (the usual normalisation), then
``num_points`` points are drawn: without replacement when the shape has
that many, else all of them and the rest again at random. Training splits draw new points every
epoch (and augment seed); ``val`` and ``test`` the same points in every pass (so voting averages over
fixed points).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from any2point.datasets.base import PartDataset, split_kind
from any2point.datasets.io import (DataError, cached_arrays, file_signature, normalize_unit_sphere, read_lines,
                                  require_path)
from any2point.registry import DATASETS, ConfigError, NumPoints, Seed

PARTS: dict[str, int] = {
    "Airplane": 4, "Bag": 2, "Cap": 2, "Car": 4, "Chair": 4, "Earphone": 3, "Guitar": 3, "Knife": 2, "Lamp": 4,
    "Laptop": 2, "Motorbike": 6, "Mug": 2, "Pistol": 3, "Rocket": 3, "Skateboard": 3, "Table": 3,
}
"""The 16 categories in label order and their number of parts; the parts of a category are the next
indices of the 50 in this order (Airplane 0-3, Bag 4-5, ..., Table 47-49)."""

NUM_PARTS = sum(PARTS.values())
SPLIT_FILES = {"train": ("train",), "val": ("val",), "trainval": ("train", "val"), "test": ("test",)}
HINT = ("Download shapenetcore_partanno_segmentation_benchmark_v0_normal.zip (the ShapeNetPart release with "
        "normals, https://shapenet.cs.stanford.edu/media/shapenetcore_partanno_segmentation_benchmark_v0_normal.zip), "
        "unzip it into data/, or set dataset.root=PATH to the folder holding synsetoffset2category.txt.")
_STREAM_TAG = 0x5A4E9A27


def category_parts() -> dict[str, list[int]]:
    """Category -> its global part indices."""
    out, start = {}, 0
    for name, count in PARTS.items():
        out[name] = list(range(start, start + count))
        start += count
    return out


def read_part_file(path: Path, parts: list[int]) -> np.ndarray:
    """One shape's ``(N, 7)`` float32 array (xyz, normal, part), checked: seven finite columns,
    at least one point, parts among ``parts`` (its category's)."""
    try:
        data = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable ShapeNetPart shape file ({e})") from e
    if data.ndim != 2 or data.shape[1] != 7:
        raise DataError(f"{path}: expected 7 values per line (x y z nx ny nz part), got an array of shape {data.shape}")
    if len(data) == 0:
        raise DataError(f"{path}: the shape has no points")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    label = data[:, 6]
    bad = ~np.isin(label, np.asarray(parts, dtype=np.float32))
    if bad.any():
        raise DataError(f"{path}: part {label[bad][0]:g} of line {int(np.argmax(bad)) + 1} is not one of its "
                        f"category's parts {parts}")
    return data


@DATASETS.register()
class ShapeNetPart(PartDataset):
    """ShapeNetPart read from the release's files (see the module docstring).

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test`` (the release's own lists).
        root: the folder holding ``synsetoffset2category.txt``.
        num_points: points drawn per shape (2048, the usual).
        categories: names of the categories to use (default all 16); labels follow this order,
            parts keep their global indices.
        normalize: centre each shape and scale it into the unit sphere.
        cache: parse the shapes once into a cache file next to the data (see the module docstring).
        transforms, seed: see :class:`~any2point.datasets.base.PointDataset`.
    """

    injected_args = ("split",)
    part_names = [f"{name}/{k}" for name, count in PARTS.items() for k in range(count)]

    def __init__(self, split: str, root: str = "data/shapenetcore_partanno_segmentation_benchmark_v0_normal",
                 num_points: NumPoints = 2048, categories: Optional[list] = None, normalize: bool = True,
                 cache: bool = True, transforms: Optional[dict] = None, seed: Seed = 0) -> None:
        super().__init__(split, transforms, seed)
        if num_points <= 0:
            raise ConfigError(f"ShapeNetPart.num_points must be > 0, got {num_points}")
        names = list(PARTS) if categories is None else list(categories)
        unknown = [c for c in names if c not in PARTS]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(f"ShapeNetPart.categories must be distinct names among {', '.join(PARTS)}; got {names}")
        self.root, self.num_points, self.normalize = Path(root), num_points, normalize
        require_path(self.root, f"(ShapeNetPart) {HINT}", folder=True)
        index_file = self.root / "synsetoffset2category.txt"
        synsets = {}
        for line in read_lines(index_file, f"(ShapeNetPart) {HINT}"):
            fields = line.split()
            if len(fields) != 2 or fields[0] not in PARTS:
                raise DataError(f"{index_file}: expected lines '<Category> <synset>' with one of the 16 categories "
                                f"{', '.join(PARTS)}; got '{line}'")
            synsets[fields[1]] = fields[0]
        missing = [c for c in names if c not in synsets.values()]
        if missing:
            raise DataError(f"{index_file}: has no line for categories {missing}")
        self.class_names = names
        all_parts = category_parts()
        self.category_parts = [all_parts[c] for c in names]
        label_of = {name: k for k, name in enumerate(names)}
        self.files: list[Path] = []
        self._labels: list[int] = []
        # The parsed shapes (all points of all shapes, one after the other) and where each starts.
        self.parsed: Optional[np.ndarray] = None
        self.starts = np.zeros(1, dtype=np.int64)
        chunks = []
        for official in SPLIT_FILES[split]:
            files, labels = [], []
            for entry in self._split_list(official):
                parts = entry.split("/")
                if len(parts) < 2 or parts[-2] not in synsets:
                    raise DataError(f"{self._split_path(official)}: entry '{entry}' does not name a synset of "
                                    f"{index_file}")
                category = synsets[parts[-2]]
                if category in label_of:
                    files.append(self.root / parts[-2] / f"{parts[-1]}.txt")
                    labels.append(label_of[category])
            if cache:
                chunks.append(self._parsed(official, files, labels))
            self.files += files
            self._labels += labels
        if cache:
            self.parsed = np.concatenate([points for points, _ in chunks]) if chunks else np.zeros((0, 7), np.float32)
            counts = np.concatenate([c for _, c in chunks]) if chunks else np.zeros(0, np.int64)
            self.starts = np.concatenate([[0], np.cumsum(counts)])

    def _parsed(self, official: str, files: list[Path], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(points (P, 7), counts (S,))`` of the official list's shapes ``files``, from the cache
        file when its header matches the files' sizes and mtimes, else parsed and cached."""
        for path in files:
            require_path(path, f"(ShapeNetPart) listed in {self._split_path(official).name}; {HINT}")
        signature = ["shapenetpart parsed v1", *(file_signature(path, self.root) for path in files)]
        digest = hashlib.sha1("\n".join(p.relative_to(self.root).as_posix() for p in files).encode()).hexdigest()[:12]

        def parse() -> dict[str, np.ndarray]:
            shapes = [read_part_file(path, self.category_parts[label])
                      for path, label in tqdm(list(zip(files, labels)), desc=f"ShapeNetPart: parsing {official}",
                                              unit="shape", disable=None)]
            points = np.concatenate(shapes) if shapes else np.zeros((0, 7), np.float32)
            return {"points": points, "counts": np.array([len(x) for x in shapes], dtype=np.int64)}

        stored = cached_arrays(self.root / f"parsed.{official}.{digest}.npz", signature, parse)
        return stored["points"], stored["counts"]

    def _split_path(self, official: str) -> Path:
        return self.root / "train_test_split" / f"shuffled_{official}_file_list.json"

    def _split_list(self, official: str) -> list[str]:
        path = require_path(self._split_path(official), f"(ShapeNetPart {official} list) {HINT}")
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable JSON list ({e})") from e
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise DataError(f"{path}: expected a JSON list of 'shape_data/<synset>/<shape id>' strings")
        return entries

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> np.ndarray:
        return np.asarray(self._labels, dtype=np.int64)

    def get_raw(self, index: int) -> tuple[np.ndarray, int]:
        """Read shape ``index``: ``(points (num_points, 7) float32, category)``, columns xyz, normal, part."""
        label = self._labels[index]
        if self.parsed is not None:
            data = self.parsed[self.starts[index]:self.starts[index + 1]].copy()
        else:
            path = require_path(self.files[index], f"(ShapeNetPart) listed in the {self.split} split; {HINT}")
            data = read_part_file(path, self.category_parts[label])
        if self.normalize:
            normalize_unit_sphere(data[:, :3])
        training = split_kind(self.split) == "train"
        stream = [_STREAM_TAG, self.seed, index] + ([self.augment_seed, self.epoch] if training else [])
        rng = np.random.default_rng(stream)
        n = len(data)
        if n >= self.num_points:
            rows = rng.choice(n, self.num_points, replace=False)
        else:
            rows = np.concatenate([rng.permutation(n), rng.integers(0, n, self.num_points - n)])
        return data[rows], label
