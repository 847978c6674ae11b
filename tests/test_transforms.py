"""Transforms: each against its definition, normals handling, determinism, config building."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from any2point.datasets.base import build_transforms
from any2point.datasets.transforms import (Center, FPSResample, Jitter, NormalizeUnitSphere,
                                           RandomRotate, RandomScale, RandomSubset, RandomTranslate,
                                           ShufflePoints, random_rotation_matrix)
from any2point.registry import TRANSFORMS, build_from_cfg
from any2point.errors import ConfigError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def cloud() -> np.ndarray:
    """(300, 7) float64: xyz, unit normals, one extra feature column."""
    g = rng(123)
    normals = g.standard_normal((300, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return np.c_[g.uniform(-1, 1, (300, 3)) + [0.3, -0.2, 0.5], normals, g.random(300)]


def plane_cloud(n: int = 200) -> np.ndarray:
    """(n, 6) points on a tilted plane, each carrying the plane's unit normal."""
    g = rng(5)
    normal = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    basis = np.linalg.svd(normal[None])[2][1:]  # two unit vectors orthogonal to the normal
    xyz = g.uniform(-1, 1, (n, 2)) @ basis + 0.7 * normal
    return np.c_[xyz, np.tile(normal, (n, 1))]


def assert_normals_fit_the_plane(points: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(points[:, 3:6], axis=1), 1.0, atol=1e-12)
    in_plane = points[1:, :3] - points[:1, :3]
    np.testing.assert_allclose(in_plane @ points[0, 3:6], 0.0, atol=1e-9)
    np.testing.assert_allclose(points[:, 3:6], np.tile(points[0, 3:6], (len(points), 1)), atol=1e-12)


def fitted_linear_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The (3, 3) matrix M with after = before @ M.T, by least squares (exact for linear maps)."""
    return np.linalg.lstsq(before, after, rcond=None)[0].T


ALL = [RandomScale(), RandomTranslate(), RandomRotate(), RandomRotate(full=True), Jitter(),
       ShufflePoints(), Center(), NormalizeUnitSphere(), RandomSubset(100)]


@pytest.mark.parametrize("transform", ALL, ids=repr)
def test_same_seed_same_output_and_input_untouched(transform, cloud):
    original = cloud.copy()
    a, b = transform(cloud, rng(1)), transform(cloud, rng(1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cloud, original)
    assert a.shape[1] == cloud.shape[1]


@pytest.mark.parametrize("transform", [t for t in ALL if not isinstance(t, (Center, NormalizeUnitSphere))],
                         ids=repr)
def test_different_seeds_give_different_outputs(transform, cloud):
    assert not np.array_equal(transform(cloud, rng(1)), transform(cloud, rng(2)))


@pytest.mark.parametrize("transform", ALL, ids=repr)
def test_malformed_points_are_rejected_with_the_transform_name(transform):
    name = type(transform).__name__
    with pytest.raises(ValueError, match=name):
        transform(np.zeros((10, 2)), rng())
    with pytest.raises(ValueError, match=name):
        transform(np.zeros(30), rng())


@pytest.mark.parametrize("anisotropic", [True, False])
def test_random_scale_multiplies_each_axis_within_bounds(anisotropic, cloud):
    low, high = 0.8, 1.25
    out = RandomScale(low, high, anisotropic)(cloud, rng(3))
    factors = out[:, :3] / cloud[:, :3]
    np.testing.assert_allclose(factors, np.tile(factors[0], (len(cloud), 1)))
    assert ((factors[0] >= low) & (factors[0] <= high)).all()
    assert (len(set(factors[0].round(12))) == 3) if anisotropic else np.allclose(factors[0], factors[0, 0])
    np.testing.assert_array_equal(out[:, 6], cloud[:, 6])


def test_random_scale_keeps_normals_normal_to_the_scaled_surface():
    assert_normals_fit_the_plane(RandomScale(0.5, 2.0, anisotropic=True)(plane_cloud(), rng(4)))
    iso = RandomScale(0.5, 2.0, anisotropic=False)(plane_cloud(), rng(4))
    np.testing.assert_allclose(iso[:, 3:6], plane_cloud()[:, 3:6], atol=1e-12)


def test_random_translate_shifts_every_point_by_one_bounded_offset(cloud):
    out = RandomTranslate(0.1)(cloud, rng(6))
    shift = out[:, :3] - cloud[:, :3]
    np.testing.assert_allclose(shift, np.tile(shift[0], (len(cloud), 1)), atol=1e-12)
    assert (np.abs(shift[0]) <= 0.1).all() and np.abs(shift[0]).max() > 0
    np.testing.assert_array_equal(out[:, 3:], cloud[:, 3:])


@pytest.mark.parametrize("axis, index", [("x", 0), ("y", 1), ("z", 2)])
def test_axis_rotation_keeps_the_axis_coordinate_and_bounds_the_angle(axis, index, cloud):
    for seed in range(20):
        out = RandomRotate(axis=axis, max_angle=0.3)(cloud, rng(seed))
        matrix = fitted_linear_map(cloud[:, :3], out[:, :3])
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(matrix) == pytest.approx(1.0)
        np.testing.assert_allclose(out[:, index], cloud[:, index], atol=1e-12)
        angle = math.acos(np.clip((np.trace(matrix) - 1) / 2, -1, 1))
        assert angle <= 0.3 + 1e-9
        np.testing.assert_allclose(out[:, 3:6], cloud[:, 3:6] @ matrix.T, atol=1e-9)
        np.testing.assert_array_equal(out[:, 6], cloud[:, 6])


def test_full_rotation_is_a_proper_rotation_applied_to_normals(cloud):
    out = RandomRotate(full=True)(cloud, rng(8))
    matrix = fitted_linear_map(cloud[:, :3], out[:, :3])
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(matrix) == pytest.approx(1.0)
    np.testing.assert_allclose(out[:, 3:6], cloud[:, 3:6] @ matrix.T, atol=1e-9)


def test_random_rotation_matrix_is_uniform_on_so3():
    # Under the Haar measure each column is uniform on the sphere: coordinates have mean 0 and
    # second moment 1/3, and the rotation angle has mean pi/2 + 2/pi.
    g = rng(9)
    matrices = np.stack([random_rotation_matrix(g) for _ in range(4000)])
    np.testing.assert_allclose(matrices.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose((matrices ** 2).mean(axis=0), 1 / 3, atol=0.03)
    angles = np.arccos(np.clip((np.trace(matrices, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angles.mean() == pytest.approx(math.pi / 2 + 2 / math.pi, abs=0.05)
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-9)


def test_jitter_adds_clipped_noise_of_the_given_scale(cloud):
    big = np.zeros((20000, 3))
    noise = Jitter(sigma=0.02, clip=1.0)(big, rng(10))
    assert noise.std() == pytest.approx(0.02, rel=0.05)
    clipped = Jitter(sigma=0.02, clip=0.01)(big, rng(10))
    assert np.abs(clipped).max() <= 0.01 and np.mean(np.abs(clipped) == 0.01) > 0.5
    out = Jitter()(cloud, rng(11))
    np.testing.assert_array_equal(out[:, 3:], cloud[:, 3:])


def test_shuffle_permutes_whole_rows(cloud):
    out = ShufflePoints()(cloud, rng(12))
    assert not np.array_equal(out, cloud)
    np.testing.assert_array_equal(out[np.lexsort(out.T)], cloud[np.lexsort(cloud.T)])


def test_center_and_normalize_unit_sphere(cloud):
    centred = Center()(cloud, rng())
    np.testing.assert_allclose(centred[:, :3].mean(axis=0), 0.0, atol=1e-12)
    shift = centred[:, :3] - cloud[:, :3]
    np.testing.assert_allclose(shift, np.tile(shift[0], (len(cloud), 1)))
    unit = NormalizeUnitSphere()(cloud, rng())
    np.testing.assert_allclose(unit[:, :3].mean(axis=0), 0.0, atol=1e-12)
    assert np.linalg.norm(unit[:, :3], axis=1).max() == pytest.approx(1.0)
    ratio = unit[:, :3] / centred[:, :3]
    np.testing.assert_allclose(ratio, ratio[0, 0])
    for out in (centred, unit):
        np.testing.assert_array_equal(out[:, 3:], cloud[:, 3:])
    single = NormalizeUnitSphere()(np.ones((5, 3)), rng())
    np.testing.assert_array_equal(single, np.zeros((5, 3)))


def test_random_subset_draws_distinct_rows(cloud):
    out = RandomSubset(50)(cloud, rng(13))
    assert out.shape == (50, 7)
    rows = {tuple(r) for r in cloud}
    assert all(tuple(r) in rows for r in out) and len({tuple(r) for r in out}) == 50
    with pytest.raises(ValueError, match="num_points=400.*only 300"):
        RandomSubset(400)(cloud, rng())


def brute_force_fps(xyz: np.ndarray, n: int) -> np.ndarray:
    """Reference furthest point sampling from index 0: each pick maximises the distance to the set."""
    chosen = [0]
    for _ in range(n - 1):
        distance = np.min(np.linalg.norm(xyz[:, None] - xyz[chosen][None], axis=2), axis=1)
        chosen.append(int(np.argmax(distance)))
    return np.array(chosen)


@pytest.fixture
def reference_extensions(monkeypatch):
    """Stand in for ``any2point.extensions`` with the brute-force FPS, to test FPSResample alone."""
    def furthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(brute_force_fps(x.numpy(), n)) for x in xyz])

    module = types.ModuleType("any2point.extensions")
    module.furthest_point_sample = furthest_point_sample
    monkeypatch.setitem(sys.modules, "any2point.extensions", module)


def test_fps_resample_takes_the_fps_points_then_a_random_subset(reference_extensions, cloud):
    expected = cloud[brute_force_fps(cloud[:, :3], 64)]
    np.testing.assert_array_equal(FPSResample(64)(cloud, rng(14)), expected)
    kept = FPSResample(64, num_keep=40)(cloud, rng(14))
    fps_rows = {tuple(r) for r in expected}
    assert kept.shape == (40, 7) and len({tuple(r) for r in kept}) == 40
    assert all(tuple(r) in fps_rows for r in kept)
    np.testing.assert_array_equal(kept, FPSResample(64, num_keep=40)(cloud, rng(14)))
    assert not np.array_equal(kept, FPSResample(64, num_keep=40)(cloud, rng(15)))
    with pytest.raises(ValueError, match="num_fps=301.*only 300"):
        FPSResample(301)(cloud, rng())


def test_fps_resample_subset_equals_random_subset_of_the_fps_cloud(reference_extensions, cloud):
    # The FPS cache of the in-memory datasets relies on this: it stores the FPS points and then
    # replaces FPSResample(K, m) by RandomSubset(m), which must draw the same points.
    fps_cloud = FPSResample(64)(cloud, rng())
    np.testing.assert_array_equal(FPSResample(64, num_keep=40)(cloud, rng(16)),
                                  RandomSubset(40)(fps_cloud, rng(16)))


def test_fps_resample_with_the_project_extension_matches_brute_force(cloud):
    extensions = pytest.importorskip("any2point.extensions")
    if not hasattr(extensions, "furthest_point_sample"):
        pytest.skip("any2point.extensions has no furthest_point_sample yet")
    for num_fps in (1, 17, 120):
        np.testing.assert_array_equal(FPSResample(num_fps)(cloud, rng()),
                                      cloud[brute_force_fps(cloud[:, :3].astype(np.float32), num_fps)])


@pytest.mark.parametrize("build, message", [
    (lambda: RandomScale(low=1.5, high=1.0), "low <= high"),
    (lambda: RandomScale(low=0.0), "0 < low"),
    (lambda: RandomTranslate(max_shift=-0.1), "max_shift"),
    (lambda: RandomRotate(axis="w"), "axis"),
    (lambda: RandomRotate(max_angle=-1.0), "max_angle"),
    (lambda: RandomRotate(max_angle=1.0, full=True), "max_angle.*full"),
    (lambda: Jitter(sigma=-0.01), "sigma"),
    (lambda: Jitter(clip=0.0), "clip"),
    (lambda: RandomSubset(0), "num_points"),
    (lambda: FPSResample(0), "num_fps"),
    (lambda: FPSResample(100, num_keep=200), "num_keep"),
])
def test_bad_arguments_raise_errors_naming_them(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_transforms_build_from_config_and_reject_bad_keys(cloud):
    pipeline = build_transforms([{"type": "Center"}, {"type": "RandomRotate", "axis": "z", "max_angle": 0.5},
                                 {"type": "RandomSubset", "num_points": 30}])
    assert [type(t) for t in pipeline.transforms] == [Center, RandomRotate, RandomSubset]
    assert pipeline(cloud, rng()).shape == (30, 7)
    fps = build_from_cfg({"type": "FPSResample", "num_fps": 1200, "num_keep": 1024}, TRANSFORMS)
    assert (fps.num_fps, fps.num_keep) == (1200, 1024)
    with pytest.raises(ConfigError, match="'sigm'"):
        build_from_cfg({"type": "Jitter", "sigm": 0.1}, TRANSFORMS)
    with pytest.raises(ConfigError, match="'axis'"):
        build_from_cfg({"type": "RandomRotate", "axis": "up"}, TRANSFORMS)
    with pytest.raises(ConfigError, match="'anisotropic'"):
        build_from_cfg({"type": "RandomScale", "anisotropic": "yes"}, TRANSFORMS)
    with pytest.raises(ConfigError, match="missing required key 'num_points'"):
        build_from_cfg({"type": "RandomSubset"}, TRANSFORMS)
    with pytest.raises(ConfigError, match="registered transform types:.* RandomScale,"):
        build_from_cfg({"type": "RandomScales"}, TRANSFORMS)
