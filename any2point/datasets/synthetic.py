"""SyntheticShapes: procedurally generated 3D shapes, the embedded dataset that needs no download.

Twelve classes of closed surfaces (see :data:`SHAPES`), each with its own random proportions. A
sample is drawn on the surface approximately uniformly by area, then optionally cut by a random plane
(partial occlusion), stretched by a mild random per-axis scale, posed by a random rotation, normalised
to the unit sphere, perturbed by Gaussian noise and normalised again. Item ``i`` of split ``s`` is a
pure function of ``(seed, s, i)``: it is generated on the fly from its own random generator, so the
splits never share a sample and any item can be recomputed anywhere, by any worker, in any order.

Uniform sampling by area: a surface made of parts (faces, caps, a lateral surface) picks each point's
part with probability proportional to the part's area, then samples within the part uniformly:
triangles by the square-root barycentric rule, discs by a square-root radius, cylinders by uniform
angle and height, cone mantles by a square-root distance from the apex, spheres by normalised
Gaussians. On surfaces whose area element varies over their parameters (torus, tubes along curves)
each parameter is drawn from its exact marginal or conditional density (see :func:`_cosine_angle`).
The density is uniform before the anisotropic scale, which then distorts it by at most the ratio of
its largest to smallest factor.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import numpy as np

from any2point.datasets.base import PointDataset
from any2point.datasets.transforms import axis_rotation_matrix, random_rotation_matrix
from any2point.registry import DATASETS, ConfigError, NumItems, NumPoints, Seed

Sampler = Callable[[np.random.Generator, int], np.ndarray]
Curve = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

# Distinguishes the generation streams from the per-item augmentation streams of PointDataset,
# which are seeded by (seed, epoch, index).
_STREAM_TAG = 0x5EED5A9E
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Canonical shapes have their main axis along z; this rotation (-90 degrees about x) stands them
# up along y, the up axis of the project's transforms.
_Z_TO_Y = axis_rotation_matrix("x", -math.pi / 2)


# ---------------------------------------------------------------------------------------------
# Surface primitives: (rng, n, shape parameters) -> (n, 3) float64 points, uniform by area.
# ---------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, n: int, weights: np.ndarray) -> np.ndarray:
    """(n,) indices into ``weights`` drawn with probability proportional to the weights."""
    cdf = np.cumsum(weights)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(weights) - 1)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product of (m, 3) arrays (``np.cross`` has a large per-call overhead)."""
    return a[:, [1, 2, 0]] * b[:, [2, 0, 1]] - a[:, [2, 0, 1]] * b[:, [1, 2, 0]]


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) points uniform on the unit sphere."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _disc(rng: np.random.Generator, n: int, radius: float, z: np.ndarray) -> np.ndarray:
    """(n, 3) points uniform on the disc of ``radius`` centred on the z axis at heights ``z``."""
    r = radius * np.sqrt(rng.random(n))
    theta = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta), np.broadcast_to(z, (n,))], axis=1)


def sample_mesh_surface(rng: np.random.Generator, n: int, vertices: np.ndarray,
                        faces: np.ndarray) -> np.ndarray:
    """(n, 3) points uniform by area on a triangle mesh (``vertices`` (V, 3), ``faces`` (F, 3) int)."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(_cross(b - a, c - a), axis=1)
    f = _pick(rng, n, area)
    su = np.sqrt(rng.random((n, 1)))
    v = rng.random((n, 1))
    return (1 - su) * a[f] + su * (1 - v) * b[f] + su * v * c[f]


def _cosine_angle(rng: np.random.Generator, skew: np.ndarray) -> np.ndarray:
    """Angles (mod 2 pi) with density ``(1 + skew cos(angle)) / (2 pi)``, |skew| <= 1, exactly.

    An angle drawn uniformly is kept with probability ``(1 + skew cos) / 2`` and otherwise moved by
    pi; the two ways of reaching an angle add up to the target density, so nothing is rejected.
    """
    angle = rng.uniform(0, 2 * np.pi, skew.shape)
    flip = 2 * rng.random(skew.shape) > 1 + skew * np.cos(angle)
    return np.where(flip, angle + np.pi, angle)


def sample_torus_surface(rng: np.random.Generator, n: int, major: float, minor: float) -> np.ndarray:
    """(n, 3) points uniform by area on the torus of radii ``major`` > ``minor`` about the z axis.

    The area element is proportional to ``1 + (minor / major) cos(theta)`` (theta: the tube angle,
    0 on the outer equator); the angle around the axis is uniform.
    """
    theta = _cosine_angle(rng, np.full(n, minor / major))
    phi = rng.uniform(0, 2 * np.pi, n)
    ring = major + minor * np.cos(theta)
    return np.stack([ring * np.cos(phi), ring * np.sin(phi), minor * np.sin(theta)], axis=1)


def sample_tube_surface(rng: np.random.Generator, n: int, curve: Curve, t_range: tuple[float, float],
                        radius: float, grid: int = 257) -> np.ndarray:
    """(n, 3) points uniform by area on the tube of ``radius`` around a space curve.

    ``curve(t)`` returns the position and its first and second derivatives, each (m, 3); the curve
    must have nowhere-zero curvature (its Frenet frame spans the tube's cross-sections) and
    ``radius`` must stay below its smallest radius of curvature. The area element is
    ``|c'(t)| (1 - kappa(t) radius cos(phi))`` with phi measured from the principal normal: t is
    drawn proportionally to the speed ``|c'(t)|`` by inverting its cumulative integral, tabulated on
    ``grid`` values of t (piecewise-linear), and phi given t exactly by :func:`_cosine_angle`.
    """
    knots = np.linspace(*t_range, grid)
    speed = np.linalg.norm(curve(knots)[1], axis=1)
    length = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(knots))])
    t = np.interp(rng.random(n) * length[-1], length, knots)
    c, d1, d2 = curve(t)
    speed = np.linalg.norm(d1, axis=1, keepdims=True)
    binormal = _cross(d1, d2)
    bnorm = np.linalg.norm(binormal, axis=1, keepdims=True)
    kappa = bnorm[:, 0] / speed[:, 0] ** 3
    binormal /= bnorm
    normal = _cross(binormal, d1 / speed)
    phi = _cosine_angle(rng, -kappa * radius)[:, None]
    return c + radius * (np.cos(phi) * normal + np.sin(phi) * binormal)


# ---------------------------------------------------------------------------------------------
# The classes: each draws its own proportions, then samples its surface. Main axis along z.
# ---------------------------------------------------------------------------------------------

def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    return _unit_vectors(rng, n)


def _box(rng: np.random.Generator, n: int) -> np.ndarray:
    half = rng.uniform(0.4, 1.0, 3)
    axis = _pick(rng, n, np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]))
    points = rng.uniform(-1, 1, (n, 3)) * half
    points[np.arange(n), axis] = half[axis] * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return points


def _cylinder(rng: np.random.Generator, n: int) -> np.ndarray:
    half_height = rng.uniform(0.6, 1.4)
    on_side = _pick(rng, n, np.array([2 * half_height, 1.0])) == 0  # lateral 4 pi h : caps 2 pi
    theta = rng.uniform(0, 2 * np.pi, n)
    side = np.stack([np.cos(theta), np.sin(theta), rng.uniform(-half_height, half_height, n)], axis=1)
    caps = _disc(rng, n, 1.0, half_height * np.where(rng.random(n) < 0.5, -1.0, 1.0))
    return np.where(on_side[:, None], side, caps)


def _cone(rng: np.random.Generator, n: int) -> np.ndarray:
    height = rng.uniform(1.5, 2.5)
    on_mantle = _pick(rng, n, np.array([math.hypot(1.0, height), 1.0])) == 0  # pi r s : pi r^2
    rho = np.sqrt(rng.random(n))  # distance from the apex, as a fraction of the slant
    theta = rng.uniform(0, 2 * np.pi, n)
    mantle = np.stack([rho * np.cos(theta), rho * np.sin(theta), height * (1 - rho)], axis=1)
    return np.where(on_mantle[:, None], mantle, _disc(rng, n, 1.0, np.zeros(n)))


def _torus(rng: np.random.Generator, n: int) -> np.ndarray:
    return sample_torus_surface(rng, n, 1.0, rng.uniform(0.25, 0.5))


def _pyramid(rng: np.random.Generator, n: int) -> np.ndarray:
    vertices = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0], [0, 0, rng.uniform(1.0, 2.0)]])
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    return sample_mesh_surface(rng, n, vertices.astype(float), faces)


def _capsule(rng: np.random.Generator, n: int) -> np.ndarray:
    half_length = rng.uniform(0.8, 1.6)
    on_side = _pick(rng, n, np.array([half_length, 1.0])) == 0  # lateral 4 pi L : sphere 4 pi
    theta = rng.uniform(0, 2 * np.pi, n)
    side = np.stack([np.cos(theta), np.sin(theta), rng.uniform(-half_length, half_length, n)], axis=1)
    ends = _unit_vectors(rng, n)
    ends[:, 2] += np.sign(ends[:, 2]) * half_length
    return np.where(on_side[:, None], side, ends)


def _helix(rng: np.random.Generator, n: int) -> np.ndarray:
    turns, height = rng.uniform(2.0, 3.5), rng.uniform(2.0, 3.0)
    rise = height / (2 * np.pi * turns)  # z gained per radian; coil gap >= 0.57 - 2 * 0.2 > 0

    def curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cos, sin, zero = np.cos(t), np.sin(t), np.zeros_like(t)
        return (np.stack([cos, sin, rise * t], axis=1), np.stack([-sin, cos, np.full_like(t, rise)], axis=1),
                np.stack([-cos, -sin, zero], axis=1))

    return sample_tube_surface(rng, n, curve, (0.0, 2 * np.pi * turns), rng.uniform(0.12, 0.2))


def _octahedron(rng: np.random.Generator, n: int) -> np.ndarray:
    a, b, c = rng.uniform(0.7, 1.0, 3)
    vertices = np.array([[a, 0, 0], [-a, 0, 0], [0, b, 0], [0, -b, 0], [0, 0, c], [0, 0, -c]])
    faces = np.array([[i, j, k] for i in (0, 1) for j in (2, 3) for k in (4, 5)])
    return sample_mesh_surface(rng, n, vertices, faces)


def _prism(rng: np.random.Generator, n: int) -> np.ndarray:
    half_length = rng.uniform(0.7, 1.5)
    angle = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
    ring = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    vertices = np.concatenate([np.c_[ring, np.full(3, -half_length)], np.c_[ring, np.full(3, half_length)]])
    faces = np.array([[0, 1, 2], [3, 4, 5]] + [f for i in range(3) for f in
                     ([i, (i + 1) % 3, (i + 1) % 3 + 3], [i, (i + 1) % 3 + 3, i + 3])])
    return sample_mesh_surface(rng, n, vertices, faces)


def _hemisphere(rng: np.random.Generator, n: int) -> np.ndarray:
    on_dome = _pick(rng, n, np.array([2.0, 1.0])) == 0  # dome 2 pi : base pi
    dome = _unit_vectors(rng, n)
    dome[:, 2] = np.abs(dome[:, 2])
    return np.where(on_dome[:, None], dome, _disc(rng, n, 1.0, np.zeros(n)))


def _knot(rng: np.random.Generator, n: int) -> np.ndarray:
    depth = rng.uniform(0.8, 1.3)  # trefoil (sin t + 2 sin 2t, cos t - 2 cos 2t, -depth sin 3t) / 3

    def curve(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s1, s2, s3 = np.sin(t), np.sin(2 * t), np.sin(3 * t)
        c1, c2, c3 = np.cos(t), np.cos(2 * t), np.cos(3 * t)
        c = np.stack([s1 + 2 * s2, c1 - 2 * c2, -depth * s3], axis=1)
        d1 = np.stack([c1 + 4 * c2, -s1 + 4 * s2, -3 * depth * c3], axis=1)
        d2 = np.stack([-s1 - 8 * s2, -c1 + 8 * c2, 9 * depth * s3], axis=1)
        return c / 3, d1 / 3, d2 / 3

    # Strands stay >= 0.34 apart and the radius of curvature >= 0.37 for these depths.
    return sample_tube_surface(rng, n, curve, (0.0, 2 * np.pi), rng.uniform(0.08, 0.13))


SHAPES: dict[str, Sampler] = {
    "sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
    "pyramid": _pyramid, "capsule": _capsule, "helix": _helix, "octahedron": _octahedron,
    "prism": _prism, "hemisphere": _hemisphere, "knot": _knot,
}
"""Class name -> sampler ``(rng, n) -> (n, 3)`` of the canonical surface with random proportions."""


def _normalize(points: np.ndarray) -> np.ndarray:
    points = points - points.mean(axis=0)
    return points / np.sqrt((points ** 2).sum(axis=1).max())


def check_generator_settings(dataset: str, *, seed: int, num_points: int, train_size: int, val_size: int,
                             test_size: int, noise: float, anisotropy: float, rotation: str,
                             rotations: tuple[str, ...]) -> None:
    """The settings the synthetic datasets share, checked; an error names ``<dataset>.<key>``."""
    if seed < 0:
        raise ConfigError(f"{dataset}.seed must be >= 0, got {seed}")
    if num_points <= 0:
        raise ConfigError(f"{dataset}.num_points must be > 0, got {num_points}")
    for key, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if size < 0:
            raise ConfigError(f"{dataset}.{key} must be >= 0, got {size}")
    if noise < 0:
        raise ConfigError(f"{dataset}.noise must be >= 0, got {noise}")
    if not 0 <= anisotropy < 1:
        raise ConfigError(f"{dataset}.anisotropy must be in [0, 1), got {anisotropy}")
    if rotation not in rotations:
        names = ", ".join(f"'{r}'" for r in rotations[:-1])
        raise ConfigError(f"{dataset}.rotation must be {names} or '{rotations[-1]}', got '{rotation}'")


@DATASETS.register()
class SyntheticShapes(PointDataset):
    """Procedural shapes on the fly; every item is a pure function of ``(seed, split, index)``.

    Args:
        split: ``train``, ``val``, ``test`` or ``trainval`` (train items, then val items).
        transforms: ``{"train": [...], "test": [...]}`` augmentations applied after generation.
        seed: selects the whole dataset (and the augmentation streams).
        num_points: points per cloud.
        train_size, val_size, test_size: number of items per split; labels cycle through the
            classes, so every class has ``size // classes`` or one more.
        classes: names of the classes to use, in label order (default: all of :data:`SHAPES`).
        noise: std of the Gaussian noise added to each coordinate, as a fraction of the cloud's radius.
        anisotropy: per-axis scale factors are drawn from ``[1 - anisotropy, 1 + anisotropy]``.
        occlusion: probability that a random plane cuts away part of the surface.
        max_occluded: the largest fraction of the surface a cut removes (uniform in ``(0, max]``).
        rotation: ``so3`` (uniformly random pose), ``up`` (random angle about the up axis y, shapes
            standing along y) or ``none``.
    """

    injected_args = ("split",)

    def __init__(self, split: str, transforms: Optional[dict] = None, seed: Seed = 0,
                 num_points: NumPoints = 1024, train_size: NumItems = 2400, val_size: NumItems = 480,
                 test_size: NumItems = 1200, classes: Optional[list] = None, noise: float = 0.01,
                 anisotropy: float = 0.2, occlusion: float = 0.5, max_occluded: float = 0.3,
                 rotation: Literal["so3", "up", "none"] = "so3") -> None:
        super().__init__(split, transforms, seed)
        check_generator_settings("SyntheticShapes", seed=seed, num_points=num_points, train_size=train_size,
                                 val_size=val_size, test_size=test_size, noise=noise, anisotropy=anisotropy,
                                 rotation=rotation, rotations=("so3", "up", "none"))
        if not 0 <= occlusion <= 1:
            raise ConfigError(f"SyntheticShapes.occlusion must be a probability in [0, 1], "
                              f"got {occlusion}")
        if not 0 <= max_occluded < 1:
            raise ConfigError(f"SyntheticShapes.max_occluded must be in [0, 1), got {max_occluded}")
        names = list(SHAPES) if classes is None else list(classes)
        unknown = [c for c in names if c not in SHAPES]
        if unknown:
            raise ConfigError(f"SyntheticShapes.classes has unknown names {unknown}; "
                              f"known: {', '.join(SHAPES)}")
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"SyntheticShapes.classes must be a non-empty list without repeats, "
                              f"got {names}")
        self.class_names = names
        self.num_points = num_points
        self.noise, self.anisotropy, self.rotation = noise, anisotropy, rotation
        self.occlusion, self.max_occluded = occlusion, max_occluded
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        parts = ["train", "val"] if split == "trainval" else [split]
        # (split code, size) of the splits this dataset concatenates, in order.
        self._parts = [(_SPLIT_CODES[p], sizes[p]) for p in parts]

    def __len__(self) -> int:
        return sum(size for _, size in self._parts)

    def labels(self) -> np.ndarray:
        labels = [np.arange(size, dtype=np.int64) % self.num_classes for _, size in self._parts]
        return np.concatenate(labels)

    def get_raw(self, index: int) -> tuple[np.ndarray, int]:
        """Generate item ``index``: ``(points (num_points, 3) float32 in the unit sphere, label)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for SyntheticShapes split '{self.split}' "
                             f"of {len(self)} items")
        for code, size in self._parts:
            if index < size:
                break
            index -= size
        label = index % self.num_classes
        rng = np.random.default_rng([_STREAM_TAG, self.seed, code, index])
        return self._generate(SHAPES[self.class_names[label]], rng), label

    def _generate(self, sampler: Sampler, rng: np.random.Generator) -> np.ndarray:
        """Sample, occlude, scale, pose, normalise, add noise, renormalise: (num_points, 3) float32."""
        n = self.num_points
        cut = rng.uniform(0, self.max_occluded) if rng.random() < self.occlusion else 0.0
        points = sampler(rng, math.ceil(n / (1 - cut)))
        if len(points) > n:  # keep the n points on one side of a random plane
            points = points[np.argpartition(points @ _unit_vectors(rng, 1)[0], n - 1)[:n]]
        points = points * rng.uniform(1 - self.anisotropy, 1 + self.anisotropy, 3)
        if self.rotation == "so3":
            pose = random_rotation_matrix(rng)
        elif self.rotation == "up":
            pose = axis_rotation_matrix("y", rng.uniform(0, 2 * np.pi)) @ _Z_TO_Y
        else:
            pose = _Z_TO_Y
        points = _normalize(points @ pose.T)
        points = _normalize(points + self.noise * rng.standard_normal(points.shape))
        return points.astype(np.float32)
