"""Dataset I/O: the on-disk FPS cache (same items, never stale), the safe pickle reader, readers."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from any2point.datasets import build_dataset
from any2point.datasets.io import cached_array, check_labels, load_pickle
from any2point.errors import DataError

TRANSFORMS = {"train": [{"type": "FPSResample", "num_fps": 16, "num_keep": 8}],
              "test": [{"type": "FPSResample", "num_fps": 16}]}


def write_h5(folder: Path, prefix: str, seed: int, points: int = 64) -> Path:
    """A ScanObjectNN-layout file of 30 clouds (two per class)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}_objectdataset.h5"
    with h5py.File(path, "w") as f:
        f["data"] = rng.normal(size=(30, points, 3)).astype(np.float32)
        f["label"] = np.arange(30) % 15
    return path


def scanobjectnn(root: Path, split: str, **kwargs):
    return build_dataset({"type": "ScanObjectNN", "root": str(root), "variant": "OBJ_BG",
                          "transforms": TRANSFORMS, **kwargs}, split)


def items(ds) -> list[torch.Tensor]:
    return [ds[i]["points"] for i in range(len(ds))]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_h5(tmp_path / "main_split", "training", seed=0)
    write_h5(tmp_path / "main_split", "test", seed=1)
    return tmp_path


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_fps_cache_gives_the_items_of_the_uncached_pipeline(root: Path, split: str) -> None:
    cached, plain = scanobjectnn(root, split), scanobjectnn(root, split, fps_cache=False)
    assert same(items(cached), items(plain))
    assert items(cached)[0].shape == ((8, 3) if split == "train" else (16, 3))
    assert repr(cached.transform) == ("Compose([RandomSubset(num_points=8)])" if split == "train" else "Compose([])")
    official = "test" if split == "test" else "training"
    source = root / "main_split" / f"{official}_objectdataset.h5"
    cache = root / "main_split" / f"{official}_objectdataset.{split}.fps16.npz"
    with np.load(cache) as stored:  # the header names the source with its size and mtime
        assert f"{source.name} {source.stat().st_size} {source.stat().st_mtime_ns}" in stored["signature"].tolist()
        assert stored["data"].shape == (len(cached), 16)


def test_fps_cache_is_reused_and_recomputed_when_the_source_changes(root: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import any2point.datasets.io as dio

    first = items(scanobjectnn(root, "test"))
    calls = []
    compute = dio.furthest_point_indices
    monkeypatch.setattr(dio, "furthest_point_indices", lambda *a: calls.append(a) or compute(*a))
    assert same(items(scanobjectnn(root, "test")), first) and not calls
    source = write_h5(root / "main_split", "test", seed=2)  # same size; only the content and mtime differ
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    changed = items(scanobjectnn(root, "test"))
    assert len(calls) == 1 and not same(changed, first)
    assert same(changed, items(scanobjectnn(root, "test", fps_cache=False)))


def test_fps_cache_follows_the_val_rows_of_the_seed(root: Path) -> None:
    first = scanobjectnn(root, "val")
    other = scanobjectnn(root, "val", seed=1)
    assert not np.array_equal(first.rows, other.rows)
    assert same(items(other), items(scanobjectnn(root, "val", seed=1, fps_cache=False)))


def test_a_corrupt_cache_is_recomputed(root: Path) -> None:
    expected = items(scanobjectnn(root, "test"))
    (root / "main_split" / "test_objectdataset.test.fps16.npz").write_bytes(b"garbage")
    assert same(items(scanobjectnn(root, "test")), expected)
    with np.load(root / "main_split" / "test_objectdataset.test.fps16.npz") as stored:
        assert stored["data"].shape == (30, 16)


def test_an_unwritable_cache_warns_and_still_gives_the_items(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr("any2point.datasets.io.os.replace", refuse)
    with pytest.warns(UserWarning, match=r"could not write the cache .*test_objectdataset\.test\.fps16\.npz"):
        ds = scanobjectnn(root, "test")
    assert same(items(ds), items(scanobjectnn(root, "test", fps_cache=False)))
    assert not list((root / "main_split").glob("*.npz")) and not list((root / "main_split").glob("*.tmp"))


def test_clouds_smaller_than_the_fps_are_named(tmp_path: Path) -> None:
    write_h5(tmp_path / "main_split", "test", seed=0, points=10)
    with pytest.raises(DataError, match=r"test_objectdataset\.h5, sample 0: 10 points, fewer than the 16"):
        scanobjectnn(tmp_path, "test")


def test_fps_cache_of_clouds_of_different_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, size in (("a", 20), ("b", 31), ("c", 20), ("d", 17)):
        (tmp_path / "cup").mkdir(exist_ok=True)
        np.save(tmp_path / "cup" / f"{name}.npy", rng.normal(size=(size, 3)))
    cfg = {"type": "PointFolder", "root": str(tmp_path), "test_fraction": 0.0, "transforms": TRANSFORMS}
    cached = build_dataset(cfg, "trainval")
    assert (tmp_path / ".any2point.trainval.fps16.npz").is_file()
    assert same(items(cached), items(build_dataset({**cfg, "fps_cache": False}, "trainval")))


def test_cached_array_validates_the_signature(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    assert cached_array(path, ["a 1 2"], lambda: np.arange(3)).tolist() == [0, 1, 2]
    assert cached_array(path, ["a 1 2"], lambda: pytest.fail("recomputed")).tolist() == [0, 1, 2]
    assert cached_array(path, ["a 1 3"], lambda: np.arange(2)).tolist() == [0, 1]


def test_pickles_are_read_only_when_they_hold_arrays(tmp_path: Path) -> None:
    data = [[np.ones((4, 6), np.float32)], [np.array([3], np.int32)], {"k": (np.int32(2), 1.5, "s")}]
    path = tmp_path / "ok.dat"
    # numpy 1.x (which wrote the published files) names numpy.core; numpy 2 names numpy._core.
    path.write_bytes(pickle.dumps(data, protocol=3).replace(b"numpy._core.", b"numpy.core."))
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded[0][0], data[0][0])
    assert loaded[1][0].tolist() == [3] and loaded[2]["k"] == (2, 1.5, "s")

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(DataError, match=r"ok\.dat: not a readable pickle.*refusing to load .*system"):
        load_pickle(path)
    assert not marker.exists()


def test_check_labels_accepts_column_and_integral_float_labels() -> None:
    assert check_labels(np.array([[1], [0]], np.uint8), 2, 2, "f").tolist() == [1, 0]
    assert check_labels(np.array([1.0, 0.0]), 2, 2, "f").dtype == np.int64
    with pytest.raises(DataError, match="f: labels must be integers"):
        check_labels(np.array([0.5, 1.0]), 2, 2, "f")
    with pytest.raises(DataError, match=r"f: label -1 of sample 1 is out of range \[0, 2\)"):
        check_labels(np.array([0, -1]), 2, 2, "f")
