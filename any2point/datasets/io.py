"""Reading the datasets' files: readers for each format, checks that name the offending file, an
on-disk cache whose header records the files it was computed from, and :class:`InMemoryDataset`,
the base of the datasets that read their split into memory once.

Errors: :class:`DatasetNotFoundError` (a ``FileNotFoundError``) when a folder or file is missing,
with where to get the data; :class:`DataError` (a ``ValueError``) when a file is unreadable or
holds invalid data (missing key, wrong dimensionality, NaN, empty cloud, label out of range).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import h5py
import numpy as np
import torch
from tqdm import tqdm

from any2point.datasets.base import PointDataset, holdout_indices
from any2point.datasets.transforms import FPSResample, RandomSubset
from any2point.errors import UserError

Clouds = Union[np.ndarray, list]
"""The clouds of a split: one (S, N, 3) array, or a list of (N_i, 3) arrays of varying N_i."""

POINT_SUFFIXES = (".npy", ".npz", ".txt", ".xyz", ".pts")
MESH_SUFFIXES = (".ply", ".obj", ".off", ".stl")


class DataError(UserError, ValueError):
    """A dataset file is unreadable or holds invalid data; the message names the file."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message says where to get the dataset."""


def require_path(path: Path, hint: str, folder: bool = False) -> Path:
    """Return ``path`` if it is an existing folder (``folder``) or file, else raise
    :class:`DatasetNotFoundError` with ``hint`` (where to get the data, which key to set)."""
    if not (path.is_dir() if folder else path.is_file()):
        raise DatasetNotFoundError(f"{'folder' if folder else 'file'} not found: {path.absolute()}. {hint}")
    return path


def read_lines(path: Path, hint: str) -> list[str]:
    """The non-empty, stripped lines of a text file (class names, shape-id lists)."""
    return [line.strip() for line in require_path(path, hint).read_text().splitlines() if line.strip()]


def check_cloud(points: np.ndarray, where: str) -> np.ndarray:
    """Check one cloud of shape (N, 3+): non-empty and finite. Returns its xyz as float32 (N, 3)."""
    if points.ndim != 2 or points.shape[1] < 3:
        raise DataError(f"{where}: expected points of shape (N, 3+) (x, y, z, ...), got shape {points.shape}")
    if len(points) == 0:
        raise DataError(f"{where}: the cloud is empty (0 points)")
    if not np.isfinite(points[:, :3]).all():
        raise DataError(f"{where}: the cloud holds NaN or infinite coordinates")
    return np.ascontiguousarray(points[:, :3], dtype=np.float32)


def check_clouds(points: np.ndarray, where: str) -> np.ndarray:
    """Check a stack of clouds (S, N, 3+) as :func:`check_cloud` does each; the error names the
    first bad sample. Returns the xyz as float32 (S, N, 3)."""
    if points.ndim != 3 or points.shape[2] < 3:
        raise DataError(f"{where}: expected clouds of shape (samples, points, 3+), got shape {points.shape}")
    if len(points) == 0:
        raise DataError(f"{where}: holds no samples")
    if points.shape[1] == 0:
        check_cloud(points[0], f"{where}, sample 0")
    finite = np.isfinite(points[:, :, :3]).all(axis=(1, 2))
    if not finite.all():
        bad, more = int(np.argmin(finite)), int((~finite).sum()) - 1
        check_cloud(points[bad], f"{where}, sample {bad}" + (f" (and {more} more)" if more else ""))
    return np.ascontiguousarray(points[:, :, :3], dtype=np.float32)


def stack_clouds(clouds: Sequence[Any], num_points: int, where: str) -> np.ndarray:
    """Check each cloud of a sequence (:func:`check_cloud`), keep its first ``num_points`` points and
    stack them: (S, num_points, 3) float32. A cloud with fewer points is an error."""
    if len(clouds) == 0:
        raise DataError(f"{where}: holds no samples")
    out = np.empty((len(clouds), num_points, 3), dtype=np.float32)
    for i, cloud in enumerate(clouds):
        cloud = check_cloud(np.asarray(cloud), f"{where}, sample {i}")
        if len(cloud) < num_points:
            raise DataError(f"{where}, sample {i}: {len(cloud)} points, fewer than num_points={num_points}")
        out[i] = cloud[:num_points]
    return out


def check_labels(labels: Any, count: int, num_classes: int, where: str) -> np.ndarray:
    """Check ``count`` labels, shaped (S,) or (S, 1), to be integers in ``[0, num_classes)``.
    Returns them as int64 (S,)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{where}: expected {count} labels (one per cloud), got an array of shape {labels.shape}")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{where}: label {labels[bad[0]]} of sample {bad[0]} is out of range [0, {num_classes}) "
                        f"({len(bad)} labels out of range)")
    return labels.astype(np.int64)


def read_h5(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the whole arrays ``keys`` of an HDF5 file; a missing key is an error naming the file."""
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from e
    with handle:
        missing = [k for k in keys if k not in handle]
        if missing:
            raise DataError(f"{path}: missing key(s) {missing}; the file holds {sorted(handle.keys())}")
        try:
            return {k: np.asarray(handle[k][()]) for k in keys}
        except (OSError, RuntimeError, ValueError, TypeError) as e:  # a damaged chunk fails only when read
            raise DataError(f"{path}: cannot read its data, the file is damaged ({str(e).splitlines()[0]})") from e


_PICKLE_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                   for name in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and refuses everything else (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """Read a pickle of numpy arrays, lists, tuples and dicts (Point-BERT's ``.dat`` and few-shot
    ``.pkl`` files). Any other object is refused, so a tampered file cannot run code."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a readable pickle of numpy arrays ({e})") from e


def read_point_file(path: Path) -> np.ndarray:
    """Read a point file: ``.npy`` (N, 3+); ``.npz`` with a ``points`` array or a single array;
    ``.txt``/``.xyz``/``.pts`` with one point per line, values separated by spaces or commas."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.keys()}
        else:
            points = np.loadtxt(io.StringIO(path.read_text().replace(",", " ")), dtype=np.float32, ndmin=2)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable {suffix} point file ({e})") from e
    if suffix == ".npz":
        if "points" not in arrays and len(arrays) != 1:
            raise DataError(f"{path}: expected a 'points' array or a single array, found {sorted(arrays)}")
        points = arrays["points"] if "points" in arrays else next(iter(arrays.values()))
    return check_cloud(np.asarray(points), str(path))


def read_shape_file(path: Path, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Read any supported file as an (N, 3) float32 cloud. Meshes (``.ply .obj .off .stl`` with
    faces) are sampled with ``num_samples`` points uniformly by area; point clouds keep their points."""
    if path.suffix.lower() in POINT_SUFFIXES:
        return read_point_file(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise DataError(f"{path}: unsupported file type; supported: {', '.join(POINT_SUFFIXES + MESH_SUFFIXES)}")
    import trimesh

    try:
        geometry = trimesh.load(path, process=False)
    except Exception as e:  # trimesh raises many exception types for malformed files
        raise DataError(f"{path}: not a readable {path.suffix} file ({type(e).__name__}: {e})") from e
    if isinstance(geometry, trimesh.Scene):
        geometry = geometry.to_geometry()
    faces = getattr(geometry, "faces", None)
    if faces is not None and len(faces) and geometry.area > 0:
        points, _ = trimesh.sample.sample_surface(geometry, num_samples, seed=rng)
    else:
        points = geometry.vertices
    return check_cloud(np.asarray(points, dtype=np.float32), str(path))


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre a cloud (N, 3) at its mean and scale it so the farthest point lies on the unit sphere
    (in place; a cloud of identical points is only centred)."""
    points -= points.mean(axis=0)
    radius = np.sqrt((points ** 2).sum(axis=1).max())
    if radius > 0:
        points /= radius
    return points


def file_signature(path: Path, root: Path) -> str:
    """``'relative/path size mtime_ns'``: identifies a file's content for cache validation."""
    stat = path.stat()
    return f"{path.relative_to(root).as_posix()} {stat.st_size} {stat.st_mtime_ns}"


def cached_arrays(path: Path, signature: Sequence[str],
                  compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored at ``path`` when the ``signature`` in its header equals ``signature``; else
    ``compute()`` (a dict of named arrays), stored atomically with ``signature`` (a stale or
    unreadable cache is replaced).

    The signature lists the source files with their sizes and mtimes (:func:`file_signature`) and the
    parameters of the computation, so a cache of changed data is never used.
    """
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if stored["signature"].tolist() == list(signature):
                    return {key: stored[key] for key in stored.files if key != "signature"}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable: recompute and overwrite below
    data = compute()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **data, signature=np.array(list(signature), dtype=str))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the cache {path} ({e}); it is recomputed on every run", stacklevel=2)
    return data


def cached_array(path: Path, signature: Sequence[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """:func:`cached_arrays` for one array."""
    return cached_arrays(path, signature, lambda: {"data": compute()})["data"]


def furthest_point_indices(clouds: Clouds, num_points: int, desc: str) -> np.ndarray:
    """Indices (S, num_points) int32 of ``furthest_point_sample`` (start 0) of each cloud, computed in
    batches of equal-size clouds (on the GPU when there is one) with a progress bar."""
    from any2point.extensions import furthest_point_sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = np.array([len(c) for c in clouds])
    per_batch = max(1, 2 ** 21 // max(1, int(sizes.max())))
    batches = [rows[i:i + per_batch] for n in np.unique(sizes)
               for rows in [np.flatnonzero(sizes == n)] for i in range(0, len(rows), per_batch)]
    out = np.empty((len(sizes), num_points), dtype=np.int32)
    for rows in tqdm(batches, desc=f"FPS {num_points} points: {desc}", unit="batch"):
        xyz = torch.from_numpy(np.stack([clouds[i][:, :3] for i in rows])).to(device, torch.float32)
        out[rows] = furthest_point_sample(xyz, num_points).cpu().numpy()
    return out


def take_points(clouds: Clouds, index: np.ndarray) -> Clouds:
    """Gather per-cloud point indices (S, K) from ``clouds``."""
    if isinstance(clouds, np.ndarray):
        return np.take_along_axis(clouds, index[:, :, None], axis=1)
    return [c[i] for c, i in zip(clouds, index)]


class InMemoryDataset(PointDataset):
    """Base of the datasets that read their official ``train`` or ``test`` set into memory once.

    A subclass reads the official set that :attr:`official_split` names and calls :meth:`finish`,
    which keeps this split's rows: ``train`` and ``val`` are a stratified hold-out of the official
    training set (``val_fraction``, seeded with ``seed``), ``trainval`` is all of it, ``test`` the
    official test set.

    When ``fps_cache`` is set and the split's transforms start with ``FPSResample`` (deterministic
    furthest point sampling from point 0 of the stored cloud), that sampling is computed once for the
    split's clouds, stored next to the data in ``<stem>.<split>.fps<K>.npz`` whose header records the
    source files' sizes and mtimes and the split's rows (recomputed when any of them changes), and the
    transform is replaced by its random part alone (``RandomSubset(num_keep)``, which draws the same
    points) or dropped. The items are the same as without the cache.

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test``.
        transforms: ``{"train": [...], "test": [...]}`` transform configs.
        seed: seed of the augmentation streams and of the val hold-out.
        val_fraction: fraction of each class of the official training set held out as ``val``.
        fps_cache: precompute and cache the leading ``FPSResample`` of the split's transforms.
    """

    injected_args = ("split",)

    def __init__(self, split: str, transforms: Optional[dict] = None, seed: int = 0, val_fraction: float = 0.1,
                 fps_cache: bool = True) -> None:
        super().__init__(split, transforms, seed)
        self.val_fraction = val_fraction
        self.fps_cache = fps_cache
        self.source = ""
        self.rows = np.zeros(0, dtype=np.int64)
        self.clouds: Clouds = []
        self._labels = np.zeros(0, dtype=np.int64)

    @property
    def official_split(self) -> str:
        """The official set this split is drawn from: ``test`` for test, else ``train``."""
        return "test" if self.split == "test" else "train"

    def __len__(self) -> int:
        return len(self._labels)

    def get_raw(self, index: int) -> tuple[np.ndarray, int]:
        return self.clouds[index], int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def describe(self, row: int) -> str:
        """Where row ``row`` of the official set comes from, for error messages."""
        return f"{self.source}, sample {row}"

    def finish(self, clouds: Clouds, labels: np.ndarray, signature: Sequence[str], cache_stem: Path) -> None:
        """Keep this split's rows of the official set's ``clouds`` (xyz float32) and ``labels``.

        ``signature`` identifies the clouds' content (:func:`file_signature` of the sources plus the
        reading parameters); the FPS cache is ``<cache_stem>.<split>.fps<K>.npz``.
        """
        if self.split in ("train", "val"):
            train, val = holdout_indices(labels, self.val_fraction, self.seed)
            self.rows = train if self.split == "train" else val
        else:
            self.rows = np.arange(len(labels))
        if len(self.rows) != len(labels):
            clouds = clouds[self.rows] if isinstance(clouds, np.ndarray) else [clouds[i] for i in self.rows]
        steps = self.transform.transforms
        if self.fps_cache and len(self.rows) and steps and isinstance(steps[0], FPSResample):
            rows = f"rows {hashlib.sha1(self.rows.tobytes()).hexdigest()}"
            clouds = self._apply_fps_cache(clouds, steps, [*signature, rows], cache_stem)
        self.clouds, self._labels = clouds, labels[self.rows]

    def _apply_fps_cache(self, clouds: Clouds, steps: list, signature: Sequence[str], cache_stem: Path) -> Clouds:
        """Replace each cloud by its cached leading FPS; swap that transform for its random part."""
        fps = steps[0]
        for i, cloud in enumerate(clouds):
            if len(cloud) < fps.num_fps:
                raise DataError(f"{self.describe(int(self.rows[i]))}: {len(cloud)} points, fewer than the "
                                f"{fps.num_fps} of the first transform {fps!r}")
        path = cache_stem.with_name(f"{cache_stem.name}.{self.split}.fps{fps.num_fps}.npz")
        index = cached_array(path, [*signature, f"fps {fps.num_fps} start 0"],
                             lambda: furthest_point_indices(clouds, fps.num_fps, f"{cache_stem.name} {self.split}"))
        steps[0:1] = [] if fps.num_keep is None else [RandomSubset(fps.num_keep)]
        return take_points(clouds, index)
