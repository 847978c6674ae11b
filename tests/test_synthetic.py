"""SyntheticShapes: determinism, splits, labels, geometry of the samplers, argument errors, learnability."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from any2point.datasets import build_dataset
from any2point.datasets.synthetic import (SHAPES, SyntheticShapes, sample_mesh_surface,
                                          sample_torus_surface, sample_tube_surface)
from any2point.errors import ConfigError

C = len(SHAPES)
SMALL = dict(num_points=256, train_size=2 * C, val_size=C, test_size=C)


def make(split: str, **kwargs) -> SyntheticShapes:
    return SyntheticShapes(split, **{**SMALL, **kwargs})


def test_at_least_ten_classes_with_stable_label_order():
    ds = make("train")
    assert len(SHAPES) >= 10
    assert ds.class_names == list(SHAPES) and ds.num_classes == C


def test_items_are_unit_sphere_float32_clouds_of_every_class():
    ds = make("train", num_points=301)
    seen = set()
    for i in range(C):
        points, label = ds.get_raw(i)
        seen.add(label)
        assert points.shape == (301, 3) and points.dtype == np.float32
        assert np.isfinite(points).all()
        np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-5)
        assert np.linalg.norm(points, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    assert seen == set(range(C))


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_class_survives_strong_occlusion(name):
    ds = make("test", classes=[name], occlusion=1.0, max_occluded=0.9, noise=0.05, anisotropy=0.5)
    for i in range(3):
        points, label = ds.get_raw(i)
        assert label == 0 and points.shape == (256, 3) and np.isfinite(points).all()


def test_getitem_follows_the_dataset_contract():
    item = make("val")[3]
    assert set(item) == {"points", "label"}
    assert item["points"].dtype == torch.float32 and item["points"].shape == (256, 3)
    assert isinstance(item["label"], int)


def test_same_seed_split_index_gives_identical_items():
    a, b = make("train", seed=7), make("train", seed=7)
    for i in (0, 5, 2 * C - 1):
        pa, la = a.get_raw(i)
        pb, lb = b.get_raw(i)
        assert la == lb
        np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.get_raw(4)[0], a.get_raw(4)[0])


def test_different_index_split_or_seed_gives_different_items():
    train = make("train")
    reference = train.get_raw(1)[0]
    others = [train.get_raw(1 + C)[0],  # same class, next index
              make("val").get_raw(1)[0], make("test").get_raw(1)[0], make("train", seed=1).get_raw(1)[0]]
    for other in others:
        assert not np.allclose(reference, other)


def test_splits_never_share_a_sample():
    clouds = {split: {make(split).get_raw(i)[0].tobytes() for i in range(len(make(split)))}
              for split in ("train", "val", "test")}
    assert len(clouds["train"]) == 2 * C and len(clouds["val"]) == C and len(clouds["test"]) == C
    assert not clouds["train"] & clouds["val"]
    assert not clouds["train"] & clouds["test"]
    assert not clouds["val"] & clouds["test"]


def test_trainval_is_train_followed_by_val():
    train, val, trainval = make("train"), make("val"), make("trainval")
    assert len(trainval) == len(train) + len(val)
    np.testing.assert_array_equal(trainval.labels(), np.concatenate([train.labels(), val.labels()]))
    for i in (0, len(train) - 1):
        np.testing.assert_array_equal(trainval.get_raw(i)[0], train.get_raw(i)[0])
    for j in (0, len(val) - 1):
        np.testing.assert_array_equal(trainval.get_raw(len(train) + j)[0], val.get_raw(j)[0])


def test_labels_are_balanced_and_match_the_items():
    ds = make("train", train_size=50, classes=["torus", "box", "knot"])
    counts = np.bincount(ds.labels(), minlength=3)
    assert counts.sum() == 50 and counts.max() - counts.min() <= 1
    assert ds.class_names == ["torus", "box", "knot"]
    np.testing.assert_array_equal(ds.labels(), [ds.get_raw(i)[1] for i in range(len(ds))])


def test_index_out_of_range_raises_index_error():
    ds = make("val")
    with pytest.raises(IndexError, match="out of range"):
        ds.get_raw(len(ds))
    with pytest.raises(IndexError):
        ds.get_raw(-1)


def _cap_fraction(points: np.ndarray) -> tuple[float, float]:
    """For points on a sphere missing a cap: (fraction cut away, predicted - actual cut height).

    The centre comes from an algebraic sphere fit; on the unit sphere cut at height 1 - 2f, the
    remaining unit directions have a mean of length f pointing away from the cap.
    """
    design = np.c_[2 * points, np.ones(len(points))]
    centre = np.linalg.lstsq(design, (points ** 2).sum(axis=1), rcond=None)[0][:3]
    directions = points - centre
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    mean = directions.mean(axis=0)
    fraction = float(np.linalg.norm(mean))
    height = float((directions @ (-mean / fraction)).max())
    return fraction, (1 - 2 * fraction) - height


def test_occlusion_cuts_a_cap_by_a_plane():
    clean = dict(classes=["sphere"], noise=0.0, anisotropy=0.0, num_points=2000)
    whole = make("train", occlusion=0.0, **clean)
    assert max(_cap_fraction(whole.get_raw(i)[0])[0] for i in range(4)) < 0.08
    cut = make("train", occlusion=1.0, max_occluded=0.5, **clean)
    fractions = []
    for i in range(4):
        fraction, height_error = _cap_fraction(cut.get_raw(i)[0])
        fractions.append(fraction)
        assert fraction < 0.5 + 0.08 and abs(height_error) < 0.1
    assert max(fractions) > 0.15


@pytest.mark.parametrize("rotation, upright", [("up", True), ("none", True), ("so3", False)])
def test_up_rotation_keeps_the_main_axis_along_y(rotation, upright):
    ds = make("train", classes=["cylinder"], rotation=rotation, noise=0.0, anisotropy=0.0,
              occlusion=0.0, num_points=1024)
    fractions = []
    for i in range(4):
        points = ds.get_raw(i)[0]
        axis = (points.max(axis=0) + points.min(axis=0)) / 2  # in xz: the axis, if it is along y
        radial = np.hypot(points[:, 0] - axis[0], points[:, 2] - axis[2])
        fractions.append(np.mean(radial > radial.max() - 0.01))  # the lateral surface, if upright
    assert (min(fractions) > 0.3) if upright else (max(fractions) < 0.1)


def test_sphere_sampler_is_uniform_by_area():
    # Archimedes: the height of a uniform point on the unit sphere is uniform in [-1, 1].
    z = SHAPES["sphere"](np.random.default_rng(0), 20000)[:, 2]
    counts = np.histogram(z, bins=10, range=(-1, 1))[0]
    assert np.abs(counts - 2000).max() < 5 * np.sqrt(2000)


def test_mesh_sampler_weights_faces_by_area_and_is_uniform_within_them():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1]], dtype=float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])  # areas 0.5 and 1.5
    points = sample_mesh_surface(np.random.default_rng(0), 20000, vertices, faces)
    lower = points[:, 2] == 0
    assert lower.mean() == pytest.approx(0.25, abs=0.015)
    assert (points[lower, :2] >= 0).all() and (points[lower, :2].sum(axis=1) <= 1 + 1e-12).all()
    # The corner triangle x + y < 1/2 holds a quarter of the first face's area.
    assert np.mean(points[lower, :2].sum(axis=1) < 0.5) == pytest.approx(0.25, abs=0.03)


def test_torus_sampler_is_uniform_by_area():
    major, minor = 1.0, 0.5
    points = sample_torus_surface(np.random.default_rng(0), 20000, major, minor)
    radial = np.hypot(points[:, 0], points[:, 1])
    np.testing.assert_allclose((radial - major) ** 2 + points[:, 2] ** 2, minor ** 2, atol=1e-9)
    # Area of the outer half (radial > major) over the total: 1/2 + minor / (pi major).
    assert np.mean(radial > major) == pytest.approx(0.5 + minor / (np.pi * major), abs=0.015)


def test_tube_sampler_handles_speed_and_curvature():
    # A unit circle traversed at a varying speed, s(t) = t + 0.5 sin t: its tube is a torus, so the
    # azimuth must come out uniform and the outer half must hold 1/2 + radius / pi of the points.
    def curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, ds, dds = t + 0.5 * np.sin(t), 1 + 0.5 * np.cos(t), -0.5 * np.sin(t)
        along = np.stack([-np.sin(s), np.cos(s), np.zeros_like(s)], axis=1)
        inward = np.stack([-np.cos(s), -np.sin(s), np.zeros_like(s)], axis=1)
        position = np.stack([np.cos(s), np.sin(s), np.zeros_like(s)], axis=1)
        return position, ds[:, None] * along, dds[:, None] * along + ds[:, None] ** 2 * inward

    radius = 0.5
    points = sample_tube_surface(np.random.default_rng(0), 20000, curve, (0.0, 2 * np.pi), radius)
    radial = np.hypot(points[:, 0], points[:, 1])
    np.testing.assert_allclose((radial - 1) ** 2 + points[:, 2] ** 2, radius ** 2, atol=1e-9)
    assert np.mean(radial > 1) == pytest.approx(0.5 + radius / np.pi, abs=0.015)
    counts = np.histogram(np.arctan2(points[:, 1], points[:, 0]), bins=8, range=(-np.pi, np.pi))[0]
    assert np.abs(counts - 2500).max() < 5 * np.sqrt(2500)


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=["sphere", "dodecahedron"]), "unknown names.*dodecahedron.*known: sphere, box"),
    (dict(classes=["box", "box"]), "repeats"),
    (dict(classes=[]), "non-empty"),
    (dict(seed=-1), "seed"),
    (dict(num_points=0), "num_points"),
    (dict(train_size=-1), "train_size"),
    (dict(val_size=-2), "val_size"),
    (dict(test_size=-3), "test_size"),
    (dict(noise=-0.1), "noise"),
    (dict(anisotropy=1.0), "anisotropy"),
    (dict(occlusion=1.5), "occlusion"),
    (dict(max_occluded=1.0), "max_occluded"),
    (dict(rotation="random"), "rotation"),
])
def test_bad_arguments_raise_errors_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make("train", **kwargs)


def test_unknown_split_is_rejected():
    with pytest.raises(ConfigError, match="unknown split 'training'"):
        make("training")


def test_built_from_config_with_transforms_and_checked_keys():
    cfg = {"type": "SyntheticShapes", **SMALL,
           "transforms": {"train": [{"type": "RandomSubset", "num_points": 100}]}}
    train = build_dataset(cfg, split="train")
    assert train[0]["points"].shape == (100, 3)
    assert build_dataset(cfg, split="test")[0]["points"].shape == (256, 3)
    with pytest.raises(ConfigError, match="'num_point'"):
        build_dataset({"type": "SyntheticShapes", "num_point": 10}, split="train")
    with pytest.raises(ConfigError, match="'noise'"):
        build_dataset({"type": "SyntheticShapes", "noise": "high"}, split="train")


def _descriptor(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pose-invariant shape features: covariance spectrum, radial and pair-distance histograms."""
    centred = points - points.mean(axis=0)
    spectrum = np.sort(np.linalg.eigvalsh(np.cov(centred.T)))
    radial = np.histogram(np.linalg.norm(centred, axis=1), bins=10, range=(0, 1))[0] / len(points)
    i, j = rng.integers(0, len(points), (2, 2000))
    pairs = np.histogram(np.linalg.norm(points[i] - points[j], axis=1), bins=12, range=(0, 2))[0] / 2000
    return np.concatenate([spectrum, radial, pairs])


def test_classes_are_learnable_by_a_nearest_centroid_classifier():
    rng = np.random.default_rng(0)
    train, test = make("train", train_size=20 * C), make("test", test_size=10 * C)
    x = np.stack([_descriptor(train.get_raw(i)[0], rng) for i in range(len(train))])
    x_test = np.stack([_descriptor(test.get_raw(i)[0], rng) for i in range(len(test))])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    x, x_test = (x - mean) / std, (x_test - mean) / std
    centroids = np.stack([x[train.labels() == k].mean(axis=0) for k in range(C)])
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    assert np.mean(predicted == test.labels()) > 3.5 / C  # chance is 1 / C
