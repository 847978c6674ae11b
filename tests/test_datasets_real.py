"""Real datasets: small files in each distributed layout, read back through the base configs'
dataset entries; every bad-data case raises an error that names the file."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import trimesh
import yaml

from any2point.config import load_config
from any2point.datasets import build_dataset
from any2point.errors import DataError, DatasetNotFoundError
from any2point.datasets.modelnet40 import MODELNET10_CLASSES, MODELNET40_CLASSES
from any2point.datasets.scanobjectnn import CLASSES as SCANOBJECTNN_CLASSES
from any2point.extensions import furthest_point_sample

REPO = Path(__file__).resolve().parents[1]


def dataset_config(tmp_path: Path, base: str, *overrides: str):
    """The ``dataset`` section of an experiment built on ``cfgs/_base_/datasets/<base>``."""
    leaf = tmp_path / "experiment.yaml"
    leaf.write_text(yaml.safe_dump({"_base_": str(REPO / "cfgs/_base_/datasets" / base),
                                    "model": {"type": "PointNet", "num_classes": 2}}))
    return load_config(leaf, list(overrides)).dataset


def clouds(rng: np.random.Generator, count: int, points: int, dims: int = 3) -> np.ndarray:
    """(count, points, dims) float32, xyz off-centre and anisotropic; further columns standard normal."""
    scale, shift = np.r_[1.0, 2.0, 3.0, np.ones(dims - 3)], np.r_[5.0, 0.0, -1.0, np.zeros(dims - 3)]
    return (rng.normal(size=(count, points, dims)) * scale + shift).astype(np.float32)


PAPER_CONFIGS = sorted((REPO / "cfgs").glob("scanobjectnn/*.yaml")) + sorted((REPO / "cfgs").glob("modelnet40/*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_paper_configs_read_these_datasets_under_data(path: Path) -> None:
    dataset = load_config(path).dataset
    assert dataset.type == {"scanobjectnn": "ScanObjectNN", "modelnet40": "ModelNet40"}[path.parent.name]
    assert dataset.root.startswith("data/")
    assert load_config(path, ["dataset.root=/elsewhere"]).dataset.root == "/elsewhere"


# ------------------------------------------------------------------------------------------------
# ScanObjectNN
# ------------------------------------------------------------------------------------------------

def write_scanobjectnn(root: Path, folder: str, suffix: str, per_class: int = 3, points: int = 2048,
                       **replace: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``root/folder/{training,test}_<suffix>.h5`` with ``per_class`` scans of each of the 15 classes
    (labels shuffled); ``replace`` swaps in arrays for keys of the training file (None drops a key)."""
    rng = np.random.default_rng(len(folder) + len(suffix))
    written = {}
    (root / folder).mkdir(parents=True, exist_ok=True)
    for prefix, count in (("training", per_class), ("test", 1)):
        arrays = {"data": clouds(rng, 15 * count, points), "label": rng.permutation(np.arange(15 * count) % 15)}
        if prefix == "training":
            arrays.update(replace)
        with h5py.File(root / folder / f"{prefix}_{suffix}.h5", "w") as f:
            for key, value in arrays.items():
                if value is not None:
                    f[key] = value
        written[prefix] = arrays
    return written


@pytest.mark.parametrize("base, folder, suffix", [
    ("scanobjectnn_pb_t50_rs.yaml", "main_split", "objectdataset_augmentedrot_scale75"),
    ("scanobjectnn_obj_bg.yaml", "main_split", "objectdataset"),
    ("scanobjectnn_obj_only.yaml", "main_split_nobg", "objectdataset"),
])
def test_scanobjectnn_variants_read_back_through_configs(tmp_path: Path, base: str, folder: str,
                                                         suffix: str) -> None:
    written = write_scanobjectnn(tmp_path / "ScanObjectNN", folder, suffix)
    cfg = dataset_config(tmp_path, base, f"dataset.root={tmp_path / 'ScanObjectNN'}", "dataset.fps_cache=false")
    sets = {split: build_dataset(cfg, split) for split in ("train", "val", "trainval", "test")}
    assert sets["trainval"].class_names == list(SCANOBJECTNN_CLASSES) and sets["trainval"].num_classes == 15
    assert (len(sets["train"]), len(sets["val"]), len(sets["trainval"]), len(sets["test"])) == (30, 15, 45, 15)
    for split, official in (("trainval", "training"), ("test", "test")):
        ds = sets[split]
        np.testing.assert_array_equal(ds.labels(), written[official]["label"])
        for i in (0, len(ds) - 1):
            points, label = ds.get_raw(i)
            np.testing.assert_array_equal(points, written[official]["data"][i])
            assert label == written[official]["label"][i]
    train_rows = {tuple(sets["train"].get_raw(i)[0][0]) for i in range(len(sets["train"]))}
    val_rows = {tuple(sets["val"].get_raw(i)[0][0]) for i in range(len(sets["val"]))}
    assert not train_rows & val_rows and len(train_rows | val_rows) == 45
    assert np.bincount(sets["val"].labels(), minlength=15).tolist() == [1] * 15
    for split in ("train", "test"):
        item = sets[split][0]
        assert item["points"].shape == (1024, 3) and item["points"].dtype == torch.float32


def test_scanobjectnn_accepts_the_h5_files_folder_as_root(tmp_path: Path) -> None:
    write_scanobjectnn(tmp_path / "h5_files", "main_split_nobg", "objectdataset", per_class=1, points=8)
    ds = build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_ONLY"}, "test")
    assert len(ds) == 15


def test_scanobjectnn_missing_folder_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"main_split.*hkust-vgd.github.io/scanobjectnn.*dataset.root"):
        build_dataset({"type": "ScanObjectNN", "root": str(tmp_path / "nowhere")}, "train")


def test_scanobjectnn_missing_test_file_is_named(tmp_path: Path) -> None:
    write_scanobjectnn(tmp_path, "main_split", "objectdataset", per_class=1, points=8)
    (tmp_path / "main_split/test_objectdataset.h5").unlink()
    build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_BG"}, "train")
    with pytest.raises(DatasetNotFoundError, match="test_objectdataset.h5"):
        build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_BG"}, "test")


@pytest.mark.parametrize("replace, message", [
    ({"label": None}, r"training_objectdataset\.h5: missing key\(s\) \['label'\]"),
    ({"data": np.zeros((15, 8, 2), np.float32)}, r"training_objectdataset\.h5: expected clouds of shape.*\(15, 8, 2\)"),
    ({"data": np.zeros((15, 0, 3), np.float32)}, r"training_objectdataset\.h5, sample 0: the cloud is empty"),
    ({"label": np.r_[np.arange(14), 15]}, r"training_objectdataset\.h5: label 15 of sample 14 is out of range \[0, 15\)"),
    ({"label": np.arange(14)}, r"training_objectdataset\.h5: expected 15 labels"),
])
def test_scanobjectnn_bad_files(tmp_path: Path, replace: dict, message: str) -> None:
    write_scanobjectnn(tmp_path, "main_split", "objectdataset", per_class=1, points=8, **replace)
    with pytest.raises(DataError, match=message):
        build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_BG"}, "trainval")


def test_scanobjectnn_nan_cloud_names_file_and_sample(tmp_path: Path) -> None:
    data = np.ones((15, 8, 3), np.float32)
    data[6, 3, 1] = np.nan
    write_scanobjectnn(tmp_path, "main_split", "objectdataset", per_class=1, points=8, data=data)
    with pytest.raises(DataError, match=r"training_objectdataset\.h5, sample 6: the cloud holds NaN"):
        build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_BG"}, "train")


def test_a_corrupt_h5_file_is_named(tmp_path: Path) -> None:
    write_scanobjectnn(tmp_path, "main_split", "objectdataset", per_class=1, points=8)
    (tmp_path / "main_split/test_objectdataset.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"test_objectdataset\.h5: not a readable HDF5 file"):
        build_dataset({"type": "ScanObjectNN", "root": str(tmp_path), "variant": "OBJ_BG"}, "test")


# ------------------------------------------------------------------------------------------------
# ModelNet40 / ModelNet10 / few-shot
# ------------------------------------------------------------------------------------------------

RESAMPLED_CLASSES = ["airplane", "bathtub", "chair"]


def write_resampled(root: Path, prefix: str = "modelnet40", points: int = 8192, per_class: int = 3,
                    dat: bool = True) -> dict[str, tuple[list[np.ndarray], list[int]]]:
    """Point-BERT's layout for three classes: shape names, id lists, per-shape text files
    (x,y,z,nx,ny,nz) and, with ``dat``, the ``.dat`` pickles of the same clouds."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{prefix}_shape_names.txt").write_text("\n".join(RESAMPLED_CLASSES) + "\n")
    written = {}
    for split, count in (("train", per_class), ("test", 1)):
        ids, points_list, labels = [], [], []
        for label, name in enumerate(RESAMPLED_CLASSES):
            for k in range(count):
                shape_id = f"{name}_{k + 1 + (100 if split == 'test' else 0):04d}"
                cloud = clouds(rng, 1, points, dims=6)[0]
                (root / name).mkdir(exist_ok=True)
                np.savetxt(root / name / f"{shape_id}.txt", cloud, delimiter=",", fmt="%.6f")
                ids.append(shape_id)
                points_list.append(np.loadtxt(root / name / f"{shape_id}.txt", delimiter=",").astype(np.float32))
                labels.append(label)
        (root / f"{prefix}_{split}.txt").write_text("\n".join(ids) + "\n")
        if dat:
            with open(root / f"{prefix}_{split}_{points}pts_fps.dat", "wb") as f:
                pickle.dump([points_list, [np.array([c], np.int32) for c in labels]], f)
        written[split] = (points_list, labels)
    return written


def assert_unit_sphere_of(points: np.ndarray, source: np.ndarray) -> None:
    """``points`` is ``source``'s xyz centred at the mean and scaled to radius 1."""
    xyz = source[:, :3] - source[:, :3].mean(axis=0)
    np.testing.assert_allclose(points, xyz / np.linalg.norm(xyz, axis=1).max(), atol=1e-5)


def test_modelnet40_dat_layout_reads_back_through_the_config(tmp_path: Path) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    written = write_resampled(root)
    cfg = dataset_config(tmp_path, "modelnet40.yaml", f"dataset.root={root}", "dataset.fps_cache=false")
    sets = {split: build_dataset(cfg, split) for split in ("train", "val", "trainval", "test")}
    assert (len(sets["train"]), len(sets["val"]), len(sets["trainval"]), len(sets["test"])) == (6, 3, 9, 3)
    for split, official in (("trainval", "train"), ("test", "test")):
        ds = sets[split]
        assert ds.class_names == RESAMPLED_CLASSES
        assert ds.labels().tolist() == written[official][1]
        for i in range(len(ds)):
            points, label = ds.get_raw(i)
            assert points.shape == (8192, 3) and label == written[official][1][i]
            assert_unit_sphere_of(points, written[official][0][i])
    assert sets["test"][0]["points"].shape == (1024, 3)


def test_modelnet40_text_layout_is_sampled_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    written = write_resampled(root, points=40, dat=False)
    cfg = {"type": "ModelNet40", "root": str(root), "num_points": 24}
    ds = build_dataset(cfg, "trainval")
    assert (root / "modelnet40_train_24pts_fps.npz").is_file()
    assert ds.labels().tolist() == written["train"][1] and ds.class_names == RESAMPLED_CLASSES
    for i in range(len(ds)):
        source = torch.from_numpy(written["train"][0][i][None, :, :3])
        sampled = source[0, furthest_point_sample(source, 24)[0]].numpy()
        assert_unit_sphere_of(ds.get_raw(i)[0], sampled)
    monkeypatch.setattr("any2point.datasets.modelnet40.read_point_file", lambda path: pytest.fail("re-read"))
    again = build_dataset(cfg, "trainval")
    np.testing.assert_array_equal(again.get_raw(4)[0], ds.get_raw(4)[0])


def test_modelnet10_reads_its_own_lists(tmp_path: Path) -> None:
    write_resampled(tmp_path, prefix="modelnet10", points=16, dat=True)
    ds = build_dataset({"type": "ModelNet40", "root": str(tmp_path), "num_category": 10, "num_points": 16}, "test")
    assert len(ds) == 3 and ds.class_names == RESAMPLED_CLASSES


def write_h5_layout(root: Path, points: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PointNet's modelnet40_ply_hdf5_2048 layout (with fewer points), two training files."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    (root / "shape_names.txt").write_text("\n".join(MODELNET40_CLASSES) + "\n")
    written = {}
    for split, files in (("train", 2), ("test", 1)):
        names, data, labels = [], [], []
        for i in range(files):
            name = f"ply_data_{split}{i}.h5"
            part_labels = rng.permutation(40 + 10 * i)[:, None] % 40
            part = clouds(rng, len(part_labels), points)
            with h5py.File(root / name, "w") as f:
                f["data"], f["label"], f["normal"] = part, part_labels.astype(np.uint8), part
            names.append(f"data/modelnet40_ply_hdf5_2048/{name}")
            data.append(part)
            labels.append(part_labels[:, 0])
        (root / f"{split}_files.txt").write_text("\n".join(names) + "\n")
        written[split] = (np.concatenate(data), np.concatenate(labels))
    return written


def test_modelnet40_h5_layout_and_modelnet10_subset(tmp_path: Path) -> None:
    root = tmp_path / "modelnet40_ply_hdf5_2048"
    written = write_h5_layout(root)
    cfg = dataset_config(tmp_path, "modelnet40.yaml", f"dataset.root={root}", "dataset.num_points=32",
                         "dataset.fps_cache=false")
    ds = build_dataset(cfg, "trainval")
    data, labels = written["train"]
    assert len(ds) == 90 and ds.class_names == list(MODELNET40_CLASSES)
    np.testing.assert_array_equal(ds.labels(), labels)
    assert_unit_sphere_of(ds.get_raw(57)[0], data[57, :32])
    ten = build_dataset({**cfg, "num_category": 10}, "trainval")
    keep = np.isin(labels, [MODELNET40_CLASSES.index(c) for c in MODELNET10_CLASSES])
    assert ten.class_names == list(MODELNET10_CLASSES) and len(ten) == keep.sum()
    assert [ten.class_names[c] for c in ten.labels()] == [MODELNET40_CLASSES[c] for c in labels[keep]]
    with pytest.raises(DataError, match=r"ply_data_test0\.h5: 64 points per cloud, fewer than num_points=8192"):
        build_dataset({"type": "ModelNet40", "root": str(root)}, "test")


def test_modelnet40_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"folder not found: .*nowhere.*Point-BERT.*dataset.root"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path / "nowhere")}, "train")
    with pytest.raises(DatasetNotFoundError, match="neither modelnet40_shape_names.txt"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path)}, "train")
    write_resampled(tmp_path, points=16, dat=False)
    (tmp_path / "chair" / "chair_0101.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"chair_0101\.txt.*listed in .*modelnet40_test\.txt"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path), "num_points": 16}, "test")


def test_modelnet40_bad_files(tmp_path: Path) -> None:
    write_resampled(tmp_path, points=16, dat=False)
    np.savetxt(tmp_path / "airplane" / "airplane_0101.txt", np.ones((16, 2)), delimiter=",")
    with pytest.raises(DataError, match=r"airplane_0101\.txt: expected points of shape \(N, 3\+\)"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path), "num_points": 16}, "test")
    (tmp_path / "modelnet40_test.txt").write_text("airplane_0101\nsubmarine_0001\n")
    with pytest.raises(DataError, match=r"modelnet40_test\.txt, line 2: shape id 'submarine_0001'"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path), "num_points": 16}, "test")
    with open(tmp_path / "modelnet40_train_16pts_fps.dat", "wb") as f:
        pickle.dump([[np.ones((16, 6), np.float32)] * 2, [np.array([0]), np.array([3])]], f)
    with pytest.raises(DataError, match=r"modelnet40_train_16pts_fps\.dat: label 3 of sample 1 is out of range"):
        build_dataset({"type": "ModelNet40", "root": str(tmp_path), "num_points": 16}, "train")


def write_episode(root: Path, way: int = 5, shot: int = 4, queries: int = 2, points: int = 32) -> dict:
    """Point-BERT's few-shot pickle: support and query lists of (points, label, ModelNet40 label)."""
    rng = np.random.default_rng(3)
    originals = rng.choice(40, way, replace=False)
    episode = {part: [(clouds(rng, 1, points, dims=6)[0], i, np.int32(originals[i]))
                      for i in range(way) for _ in range(count)]
               for part, count in (("train", shot), ("test", queries))}
    for part in episode.values():
        rng.shuffle(part)
    (root / f"{way}way_{shot}shot").mkdir(parents=True)
    with open(root / f"{way}way_{shot}shot" / "3.pkl", "wb") as f:
        pickle.dump(episode, f)
    return {"episode": episode, "names": [MODELNET40_CLASSES[o] for o in originals]}


def test_fewshot_episode_splits_follow_the_episode(tmp_path: Path) -> None:
    written = write_episode(tmp_path)
    cfg = dataset_config(tmp_path, "modelnet40_fewshot.yaml", f"dataset.root={tmp_path}", "dataset.shot=4",
                         "dataset.fold=3", "+dataset.val_fraction=0.25", "dataset.fps_cache=false")
    sets = {split: build_dataset(cfg, split) for split in ("train", "val", "trainval", "test")}
    assert (len(sets["train"]), len(sets["val"]), len(sets["trainval"]), len(sets["test"])) == (15, 5, 20, 10)
    for split, part in (("trainval", "train"), ("test", "test")):
        assert sets[split].class_names == written["names"]
        assert sets[split].labels().tolist() == [label for _, label, _ in written["episode"][part]]
        assert_unit_sphere_of(sets[split].get_raw(7)[0], written["episode"][part][7][0])


def test_fewshot_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"5way_10shot.0\.pkl.*Point-BERT"):
        build_dataset({"type": "ModelNetFewShot", "root": str(tmp_path)}, "train")
    written = write_episode(tmp_path)
    query = written["episode"]["test"]
    query[0] = (query[0][0], query[0][1], np.int32((query[0][2] + 1) % 40))
    with open(tmp_path / "5way_4shot" / "3.pkl", "wb") as f:
        pickle.dump(written["episode"], f)
    with pytest.raises(DataError, match=rf"3\.pkl: episode label {query[0][1]} must stand for one ModelNet40 class"):
        build_dataset({"type": "ModelNetFewShot", "root": str(tmp_path), "shot": 4, "fold": 3}, "test")


# ------------------------------------------------------------------------------------------------
# PointFolder
# ------------------------------------------------------------------------------------------------

BOX = trimesh.creation.box(extents=(1.0, 2.0, 4.0))


def write_folder(root: Path) -> dict[str, np.ndarray]:
    """Three classes, four files each, one of every supported format; returns the point files' clouds."""
    rng = np.random.default_rng(4)
    points = {}

    def cloud(path: Path, n: int = 50) -> np.ndarray:
        path.parent.mkdir(parents=True, exist_ok=True)
        points[path.name] = clouds(rng, 1, n)[0]
        return points[path.name]

    np.save(root / "chair" / "a.npy", cloud(root / "chair" / "a.npy"))
    np.savez(root / "chair" / "b.npz", points=cloud(root / "chair" / "b.npz"), colors=np.zeros((50, 3)))
    np.savetxt(root / "chair" / "c.txt", cloud(root / "chair" / "c.txt"), delimiter=",")
    np.savetxt(root / "chair" / "d.xyz", cloud(root / "chair" / "d.xyz"))
    (root / "mug").mkdir()
    for ext in ("obj", "off", "stl", "ply"):
        BOX.export(root / "mug" / f"m.{ext}")
    trimesh.PointCloud(cloud(root / "scan" / "p.ply")).export(root / "scan" / "p.ply")
    np.savetxt(root / "scan" / "q.pts", cloud(root / "scan" / "q.pts"))
    np.savez(root / "scan" / "r.npz", cloud(root / "scan" / "r.npz"))
    np.save(root / "scan" / "s.npy", cloud(root / "scan" / "s.npy"))
    (root / "scan" / "README.md").write_text("not a shape")
    return points


def test_point_folder_seeded_split_reads_every_format(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    points = write_folder(root)
    cfg = dataset_config(tmp_path, "point_folder.yaml", f"dataset.root={root}", "dataset.num_samples=300",
                         "dataset.test_fraction=0.25", "dataset.fps_cache=false")
    sets = {split: build_dataset(cfg, split) for split in ("trainval", "test")}
    assert sets["test"].class_names == ["chair", "mug", "scan"]
    assert (len(sets["trainval"]), len(sets["test"])) == (9, 3)
    assert sorted(sets["test"].labels().tolist()) == [0, 1, 2]
    files = {f.name: ds.get_raw(i) for ds in sets.values() for i, f in enumerate(ds.files)}
    assert len(files) == 12
    for name, cloud in points.items():
        np.testing.assert_allclose(files[name][0], cloud, rtol=1e-5, atol=1e-5)
    for ext in ("obj", "off", "stl", "ply"):
        mesh_points, label = files[f"m.{ext}"]
        assert label == 1 and mesh_points.shape == (300, 3)
        assert np.allclose(np.abs(mesh_points / [0.5, 1.0, 2.0]).max(axis=1), 1.0, atol=1e-5)  # on the surface
    same = build_dataset({**cfg, "seed": 7}, "test")  # `seed` moves neither the split nor the samples
    assert [f.name for f in same.files] == [f.name for f in sets["test"].files]
    assert all(np.array_equal(same.get_raw(i)[0], sets["test"].get_raw(i)[0]) for i in range(3))
    other = build_dataset({**cfg, "data_seed": 1}, "test")
    assert [f.name for f in other.files] != [f.name for f in sets["test"].files]
    item = build_dataset({**cfg, "num_samples": 1200}, "test")[1]
    assert item["points"].shape == (1024, 3) and np.linalg.norm(item["points"], axis=1).max() == pytest.approx(1.0)


def test_point_folder_train_and_test_subfolders(tmp_path: Path) -> None:
    write_folder(tmp_path / "train")
    (tmp_path / "test" / "scan").mkdir(parents=True)
    np.save(tmp_path / "test" / "scan" / "t.npy", np.ones((5, 3)))
    cfg = {"type": "PointFolder", "root": str(tmp_path), "num_samples": 8}
    train, test = build_dataset(cfg, "trainval"), build_dataset(cfg, "test")
    assert len(train) == 12 and train.class_names == ["chair", "mug", "scan"]
    assert len(test) == 1 and test.labels().tolist() == [2]


@pytest.mark.parametrize("setup, error, message", [
    (lambda root: None, DatasetNotFoundError, r"folder not found: .*nowhere"),
    (lambda root: root.mkdir(), DataError, r"holds no class folders"),
    (lambda root: (root / "cup").mkdir(parents=True) or (root / "cup" / "notes.md").write_text("x"),
     DataError, r"class folder .*cup has no readable files"),
    (lambda root: (root / "train" / "cup").mkdir(parents=True), DatasetNotFoundError,
     r"folder not found: .*test\. .*needs both"),
    (lambda root: (root / "cup").mkdir(parents=True) or np.save(root / "cup" / "a.npy", np.full((4, 3), np.nan)),
     DataError, r"cup.a\.npy: the cloud holds NaN"),
    (lambda root: (root / "cup").mkdir(parents=True) or np.save(root / "cup" / "a.npy", np.zeros((0, 3))),
     DataError, r"cup.a\.npy: the cloud is empty"),
    (lambda root: (root / "cup").mkdir(parents=True) or (root / "cup" / "a.txt").write_text("1 2\n3 4\n"),
     DataError, r"cup.a\.txt: expected points of shape \(N, 3\+\)"),
    (lambda root: (root / "cup").mkdir(parents=True) or (root / "cup" / "a.obj").write_text("v 0 0 0\nf 1 x\n"),
     DataError, r"cup.a\.obj: not a readable \.obj file"),
    (lambda root: (root / "cup").mkdir(parents=True) or (root / "cup" / "a.xyz").write_text("1 2 three\n"),
     DataError, r"cup.a\.xyz: not a readable \.xyz point file"),
])
def test_point_folder_errors_name_the_folder_or_file(tmp_path: Path, setup, error: type, message: str) -> None:
    root = tmp_path / ("nowhere" if "nowhere" in message else "shapes")
    setup(root)
    with pytest.raises(error, match=message):
        build_dataset({"type": "PointFolder", "root": str(root), "test_fraction": 0.0}, "trainval")


def test_point_folder_test_class_unknown_to_train(tmp_path: Path) -> None:
    for part, name in (("train", "cup"), ("test", "lamp")):
        (tmp_path / part / name).mkdir(parents=True)
        np.save(tmp_path / part / name / "a.npy", np.ones((4, 3)))
    with pytest.raises(DataError, match=r"class folders \['lamp'\] have no counterpart"):
        build_dataset({"type": "PointFolder", "root": str(tmp_path)}, "test")


# ------------------------------------------------------------------------------------------------
# tools/check_data.py
# ------------------------------------------------------------------------------------------------

def check_data_main():
    spec = importlib.util.spec_from_file_location("check_data", REPO / "tools" / "check_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_check_data_reports_splits_classes_points_and_what_is_missing(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    write_scanobjectnn(tmp_path / "ScanObjectNN", "main_split", "objectdataset_augmentedrot_scale75", points=64)
    leaf = tmp_path / "experiment.yaml"
    leaf.write_text(yaml.safe_dump({"_base_": str(REPO / "cfgs/_base_/datasets/scanobjectnn_pb_t50_rs.yaml"),
                                    "model": {"type": "PointNet", "num_classes": 15}}))
    main = check_data_main()
    assert main(["--config", str(leaf), f"dataset.root={tmp_path / 'ScanObjectNN'}"]) == 0
    out = capsys.readouterr().out
    assert "dataset: ScanObjectNN" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["train"] == ["30", "64"] and rows["val"] == ["15", "64"] and rows["test"] == ["15", "64"]
    assert rows["toilet"] == ["2", "1", "3", "1"]
    assert not list((tmp_path / "ScanObjectNN" / "main_split").glob("*.npz"))  # the check writes no cache
    (tmp_path / "ScanObjectNN/main_split/test_objectdataset_augmentedrot_scale75.h5").unlink()
    assert main(["--config", str(leaf), f"dataset.root={tmp_path / 'ScanObjectNN'}"]) == 1
    out = capsys.readouterr().out
    assert "missing or invalid:" in out and "  test: file not found:" in out and "trainval" in out
    assert main(["--config", str(leaf), f"dataset.root={tmp_path / 'nowhere'}"]) == 1
    assert "  train, val, trainval, test: folder not found:" in capsys.readouterr().out
