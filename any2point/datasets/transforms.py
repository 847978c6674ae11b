"""Point-cloud augmentations and resampling, built from config by ``type:`` (registry ``TRANSFORMS``).

Every transform maps ``(points (N, C) float array with C >= 3, rng) -> points (N', C)``. Columns 0-2
are xyz. When ``C >= 6``, columns 3-5 are unit normals: rotations rotate them, an anisotropic scale
maps them by the inverse scale and renormalises them (so they stay normals of the scaled surface),
and translations, isotropic scales and normalisation leave them alone. Further columns are carried
through unchanged. All randomness comes from ``rng``, so a transform is deterministic given its seed.

The paper's recipes (sec. 4.1, official code): ScanObjectNN train = anisotropic scale 0.9-1.1, centre,
rotation about the up axis, FPS 1200 then a random 1024; ModelNet40 train = FPS 1200 then a random
1024, scale 2/3-3/2, translate +-0.2; test = FPS 1024.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np

from any2point.registry import TRANSFORMS
from any2point.errors import ConfigError

AXES = {"x": 0, "y": 1, "z": 2}


def _check_points(points: np.ndarray, transform: str) -> None:
    """Raise a ValueError naming ``transform`` unless ``points`` is an (N >= 1, C >= 3) array."""
    if not isinstance(points, np.ndarray) or points.ndim != 2 or points.shape[1] < 3 or len(points) == 0:
        shape = getattr(points, "shape", type(points).__name__)
        raise ValueError(f"{transform}: points must be a non-empty (N, 3+) numpy array, got {shape}")


def random_rotation_matrix(rng: np.random.Generator) -> np.ndarray:
    """A rotation drawn uniformly from SO(3) (Haar measure), as a (3, 3) float64 matrix.

    A normalised 4-D Gaussian is a uniformly random unit quaternion, and unit quaternions cover
    SO(3) twice with equal density, so the rotation they define is uniform.
    """
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def axis_rotation_matrix(axis: str, angle: float) -> np.ndarray:
    """The (3, 3) right-handed rotation by ``angle`` radians about coordinate ``axis`` (x, y or z)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got '{axis}'")
    i = AXES[axis]
    j, k = (i + 1) % 3, (i + 2) % 3
    c, s = math.cos(angle), math.sin(angle)
    r = np.eye(3)
    r[j, j], r[j, k], r[k, j], r[k, k] = c, -s, s, c
    return r


def apply_linear(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map xyz by ``matrix`` (3, 3) and normals (columns 3-5, if present) by its inverse transpose.

    Normals are renormalised afterwards; for a rotation the inverse transpose is the rotation itself.
    Returns a new array of the input's dtype.
    """
    out = points.copy()
    out[:, :3] = points[:, :3] @ matrix.T
    if points.shape[1] >= 6:
        normals = points[:, 3:6] @ np.linalg.inv(matrix)
        norm = np.linalg.norm(normals, axis=1, keepdims=True)
        out[:, 3:6] = normals / np.where(norm > 0, norm, 1.0)
    return out


@TRANSFORMS.register()
class RandomScale:
    """Multiply xyz by a factor drawn uniformly from ``[low, high]``: one per axis when
    ``anisotropic``, else one for all three."""

    def __init__(self, low: float = 2 / 3, high: float = 1.5, anisotropic: bool = True) -> None:
        if not 0 < low <= high:
            raise ConfigError(f"RandomScale needs 0 < low <= high, got low={low}, high={high}")
        self.low, self.high, self.anisotropic = low, high, anisotropic

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "RandomScale")
        scale = rng.uniform(self.low, self.high, size=3 if self.anisotropic else 1)
        return apply_linear(points, np.diag(np.broadcast_to(scale, (3,))))

    def __repr__(self) -> str:
        return f"RandomScale(low={self.low}, high={self.high}, anisotropic={self.anisotropic})"


@TRANSFORMS.register()
class RandomTranslate:
    """Add one offset, uniform in ``[-max_shift, max_shift]`` per axis, to every point's xyz."""

    def __init__(self, max_shift: float = 0.2) -> None:
        if max_shift < 0:
            raise ConfigError(f"RandomTranslate.max_shift must be >= 0, got {max_shift}")
        self.max_shift = max_shift

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "RandomTranslate")
        out = points.copy()
        out[:, :3] += rng.uniform(-self.max_shift, self.max_shift, size=3)
        return out

    def __repr__(self) -> str:
        return f"RandomTranslate(max_shift={self.max_shift})"


@TRANSFORMS.register()
class RandomRotate:
    """Rotate by an angle uniform in ``[-max_angle, max_angle]`` (radians) about ``axis`` (the up
    axis, ``y`` by default), or by a uniformly random rotation of SO(3) when ``full``."""

    def __init__(self, axis: Literal["x", "y", "z"] = "y", max_angle: float = math.pi,
                 full: bool = False) -> None:
        if axis not in AXES:
            raise ConfigError(f"RandomRotate.axis must be one of {', '.join(AXES)}, got '{axis}'")
        if max_angle < 0:
            raise ConfigError(f"RandomRotate.max_angle must be >= 0 (radians), got {max_angle}")
        if full and max_angle != math.pi:
            raise ConfigError("RandomRotate.max_angle has no effect with full: true (a uniform SO(3) "
                              "rotation); leave it at its default")
        self.axis, self.max_angle, self.full = axis, max_angle, full

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "RandomRotate")
        if self.full:
            matrix = random_rotation_matrix(rng)
        else:
            matrix = axis_rotation_matrix(self.axis, rng.uniform(-self.max_angle, self.max_angle))
        return apply_linear(points, matrix)

    def __repr__(self) -> str:
        return f"RandomRotate(axis='{self.axis}', max_angle={self.max_angle}, full={self.full})"


@TRANSFORMS.register()
class Jitter:
    """Add independent Gaussian noise of std ``sigma``, clipped to ``[-clip, clip]``, to each xyz."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        if sigma < 0:
            raise ConfigError(f"Jitter.sigma must be >= 0, got {sigma}")
        if clip <= 0:
            raise ConfigError(f"Jitter.clip must be > 0, got {clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "Jitter")
        out = points.copy()
        out[:, :3] += np.clip(self.sigma * rng.standard_normal((len(points), 3)), -self.clip, self.clip)
        return out

    def __repr__(self) -> str:
        return f"Jitter(sigma={self.sigma}, clip={self.clip})"


@TRANSFORMS.register()
class ShufflePoints:
    """Randomly permute the points (rows)."""

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "ShufflePoints")
        return points[rng.permutation(len(points))]

    def __repr__(self) -> str:
        return "ShufflePoints()"


@TRANSFORMS.register()
class Center:
    """Translate xyz so that their mean is the origin."""

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "Center")
        out = points.copy()
        out[:, :3] -= points[:, :3].mean(axis=0)
        return out

    def __repr__(self) -> str:
        return "Center()"


@TRANSFORMS.register()
class NormalizeUnitSphere:
    """Centre xyz at their mean and divide by the largest distance to it, so the cloud fits the unit
    sphere and touches it (a cloud of identical points is only centred)."""

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "NormalizeUnitSphere")
        out = points.copy()
        xyz = points[:, :3] - points[:, :3].mean(axis=0)
        radius = np.sqrt((xyz ** 2).sum(axis=1).max())
        out[:, :3] = xyz / radius if radius > 0 else xyz
        return out

    def __repr__(self) -> str:
        return "NormalizeUnitSphere()"


@TRANSFORMS.register()
class RandomSubset:
    """Keep ``num_points`` points drawn uniformly without replacement (in random order)."""

    def __init__(self, num_points: int) -> None:
        if num_points <= 0:
            raise ConfigError(f"RandomSubset.num_points must be > 0, got {num_points}")
        self.num_points = num_points

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_points(points, "RandomSubset")
        if len(points) < self.num_points:
            raise ValueError(f"RandomSubset(num_points={self.num_points}) got a cloud of only "
                             f"{len(points)} points")
        return points[rng.choice(len(points), self.num_points, replace=False)]

    def __repr__(self) -> str:
        return f"RandomSubset(num_points={self.num_points})"


@TRANSFORMS.register()
class FPSResample:
    """Furthest point sampling of ``num_fps`` points starting from point 0, then, when ``num_keep``
    is given, a random subset of ``num_keep`` of them (paper: train FPS 1200 -> random 1024; test
    FPS 1024). FPS itself is deterministic; only the subset uses ``rng``."""

    def __init__(self, num_fps: int, num_keep: Optional[int] = None) -> None:
        if num_fps <= 0:
            raise ConfigError(f"FPSResample.num_fps must be > 0, got {num_fps}")
        if num_keep is not None and not 0 < num_keep <= num_fps:
            raise ConfigError(f"FPSResample.num_keep must be in [1, num_fps={num_fps}], got {num_keep}")
        self.num_fps, self.num_keep = num_fps, num_keep

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import torch

        from any2point.extensions import furthest_point_sample

        _check_points(points, "FPSResample")
        if len(points) < self.num_fps:
            raise ValueError(f"FPSResample(num_fps={self.num_fps}) got a cloud of only {len(points)} points")
        xyz = torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32))[None]
        index = furthest_point_sample(xyz, self.num_fps)[0].cpu().numpy()
        if self.num_keep is not None:
            index = index[rng.choice(self.num_fps, self.num_keep, replace=False)]
        return points[index]

    def __repr__(self) -> str:
        return f"FPSResample(num_fps={self.num_fps}, num_keep={self.num_keep})"
