"""SyntheticParts: procedurally generated objects made of labelled parts, the embedded
part-segmentation dataset that needs no download (for the CPU demo and the tests).

Six categories (see :data:`CATEGORIES`), each with its own parts: a mug is a body and a handle, a
lamp a base, a pole and a shade, a table a top and legs, a chair a seat, a back and legs, an airplane
a fuselage, wings and a tail, a rocket a body, a nose and fins. Every object draws its own
proportions, then its surface is sampled uniformly by area over all its pieces (boxes, open or
capped cylinders and cone frustums, half tori), each point labelled with the part of its piece; the
points are shuffled, stretched by a mild random per-axis scale, posed, normalised to the unit
sphere, perturbed by Gaussian noise and normalised again. Part indices are contiguous over the
chosen categories, in category order, as in ShapeNetPart.

Item ``i`` of split ``s`` is a pure function of ``(seed, s, i)``, as in
:class:`~any2point.datasets.synthetic.SyntheticShapes`.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import numpy as np

from any2point.datasets.base import PartDataset
from any2point.datasets.synthetic import (_SPLIT_CODES, _Z_TO_Y, _disc, _normalize, _pick, check_generator_settings,
                                          sample_torus_surface)
from any2point.datasets.transforms import axis_rotation_matrix, random_rotation_matrix
from any2point.registry import DATASETS, ConfigError, NumItems, NumPoints, Seed

Sampler = Callable[[np.random.Generator, int], np.ndarray]
Piece = tuple[int, float, Sampler]
"""(part index within the category, surface area, sampler ``(rng, n) -> (n, 3)`` uniform by area)."""

# Distinguishes these generation streams from SyntheticShapes' and from the augmentation streams.
_STREAM_TAG = 0x9A575EED


# ---------------------------------------------------------------------------------------------
# Pieces: surfaces with their area and a sampler uniform by area. Canonical frame: z is up.
# ---------------------------------------------------------------------------------------------

def _moved(sampler: Sampler, rotation: Optional[np.ndarray] = None, offset=(0.0, 0.0, 0.0)) -> Sampler:
    """``sampler`` rotated by ``rotation`` (3, 3) about the origin, then translated by ``offset``."""
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        points = sampler(rng, n)
        if rotation is not None:
            points = points @ rotation.T
        return points + np.asarray(offset)
    return sample


def box(part: int, centre, half) -> Piece:
    """The surface of the axis-aligned box of half extents ``half`` centred at ``centre``."""
    half = np.asarray(half, dtype=float)
    faces = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]])

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        axis = _pick(rng, n, faces)
        points = rng.uniform(-1, 1, (n, 3)) * half
        points[np.arange(n), axis] = half[axis] * np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return points + np.asarray(centre)

    return part, 8.0 * faces.sum(), sample


def frustum(part: int, r0: float, r1: float, z0: float, z1: float, bottom: bool = False,
            top: bool = False) -> list[Piece]:
    """The lateral surface of the cone frustum about the z axis of radius ``r0`` at height ``z0``
    and ``r1`` at ``z1`` (a cylinder when equal, a cone when ``r1 = 0``), with its caps on request.

    Uniform by area: the area element grows linearly with the radius, so the radius at a uniform
    ``u`` is ``sqrt(r0^2 + u (r1^2 - r0^2))`` (the inverse of the cumulative area)."""
    def lateral(rng: np.random.Generator, n: int) -> np.ndarray:
        radius = np.sqrt(r0 ** 2 + rng.random(n) * (r1 ** 2 - r0 ** 2))
        t = (radius - r0) / (r1 - r0) if r1 != r0 else rng.random(n)
        theta = rng.uniform(0, 2 * np.pi, n)
        return np.stack([radius * np.cos(theta), radius * np.sin(theta), z0 + t * (z1 - z0)], axis=1)

    pieces = [(part, math.pi * (r0 + r1) * math.hypot(r1 - r0, z1 - z0), lateral)]
    for cap, radius, z in ((bottom, r0, z0), (top, r1, z1)):
        if cap and radius > 0:
            pieces.append((part, math.pi * radius ** 2,
                           lambda rng, n, radius=radius, z=z: _disc(rng, n, radius, np.full(n, z))))
    return pieces


def half_torus(part: int, major: float, minor: float) -> Piece:
    """The half (x >= 0) of the torus of radii ``major`` > ``minor`` about the z axis (the torus is
    symmetric in x, so folding x onto x >= 0 keeps the density uniform)."""
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        points = sample_torus_surface(rng, n, major, minor)
        points[:, 0] = np.abs(points[:, 0])
        return points

    return part, 2 * math.pi ** 2 * major * minor, sample


def _legs(part: int, x: float, y: float, height: float, half_width: float) -> list[Piece]:
    """Four vertical square legs from the floor to ``height`` at ``(+-x, +-y)``."""
    return [box(part, (sx * x, sy * y, height / 2), (half_width, half_width, height / 2))
            for sx in (-1, 1) for sy in (-1, 1)]


# ---------------------------------------------------------------------------------------------
# The categories: each draws its own proportions and returns its pieces.
# ---------------------------------------------------------------------------------------------

def _mug(rng: np.random.Generator) -> list[Piece]:
    radius, height = rng.uniform(0.55, 0.8), rng.uniform(1.1, 1.7)
    major = rng.uniform(0.25, 0.4) * height
    handle = half_torus(1, major, rng.uniform(0.06, 0.1))
    upright = axis_rotation_matrix("x", math.pi / 2)  # the handle's ring stands in the xz plane
    handle = (1, handle[1], _moved(handle[2], upright, (radius - 0.02, 0.0, height / 2)))
    return frustum(0, radius, radius * rng.uniform(0.9, 1.1), 0.0, height, bottom=True) + [handle]


def _lamp(rng: np.random.Generator) -> list[Piece]:
    base_r, base_h = rng.uniform(0.45, 0.75), rng.uniform(0.08, 0.18)
    pole_r, pole_top = rng.uniform(0.04, 0.07), rng.uniform(1.3, 2.0)
    shade_h = rng.uniform(0.45, 0.75)
    shade_z = pole_top - 0.3 * shade_h
    return (frustum(0, base_r, base_r * rng.uniform(0.7, 1.0), 0.0, base_h, bottom=True, top=True)
            + frustum(1, pole_r, pole_r, base_h, pole_top)
            + frustum(2, rng.uniform(0.45, 0.75), rng.uniform(0.15, 0.3), shade_z, shade_z + shade_h))


def _table(rng: np.random.Generator) -> list[Piece]:
    half_x, half_y = rng.uniform(0.8, 1.2), rng.uniform(0.5, 0.9)
    height, thick = rng.uniform(0.8, 1.2), rng.uniform(0.03, 0.07)
    inset = rng.uniform(0.05, 0.15)
    return ([box(0, (0, 0, height), (half_x, half_y, thick))]
            + _legs(1, half_x - inset, half_y - inset, height - thick, rng.uniform(0.04, 0.07)))


def _chair(rng: np.random.Generator) -> list[Piece]:
    half, height, thick = rng.uniform(0.4, 0.55), rng.uniform(0.5, 0.7), rng.uniform(0.04, 0.07)
    back = rng.uniform(0.4, 0.7)
    return ([box(0, (0, 0, height), (half, half, thick)),
             box(1, (0, -half + thick, height + thick + back), (half, thick, back))]
            + _legs(2, half - 0.06, half - 0.06, height - thick, rng.uniform(0.03, 0.05)))


def _airplane(rng: np.random.Generator) -> list[Piece]:
    length, radius = rng.uniform(1.6, 2.2), rng.uniform(0.14, 0.22)
    along_x = axis_rotation_matrix("y", math.pi / 2)  # the fuselage's axis from z to x
    fuselage = [(0, area, _moved(s, along_x, (-length / 2, 0, 0)))
                for _, area, s in frustum(0, radius, radius * rng.uniform(0.5, 0.8), 0.0, length, bottom=True,
                                          top=True)]
    span, chord = rng.uniform(1.0, 1.5), rng.uniform(0.2, 0.35)
    tail_x = length / 2 - 0.15
    return fuselage + [
        box(1, (rng.uniform(-0.2, 0.2), 0, 0), (chord, span, 0.025)),
        box(2, (tail_x, 0, radius + 0.2), (0.12, 0.02, 0.2)),
        box(2, (tail_x, 0, radius * 0.5), (0.1, rng.uniform(0.3, 0.45), 0.02)),
    ]


def _rocket(rng: np.random.Generator) -> list[Piece]:
    radius, height = rng.uniform(0.2, 0.3), rng.uniform(1.6, 2.2)
    nose = rng.uniform(0.4, 0.7)
    fins, fin_r, fin_h = int(rng.integers(3, 5)), rng.uniform(0.2, 0.35), rng.uniform(0.3, 0.5)
    turn = rng.uniform(0, 2 * np.pi)
    fin_pieces = []
    for k in range(fins):
        _, area, sample = box(2, (radius + fin_r / 2, 0, fin_h / 2), (fin_r / 2, 0.02, fin_h / 2))
        fin_pieces.append((2, area, _moved(sample, axis_rotation_matrix("z", turn + 2 * np.pi * k / fins))))
    return (frustum(0, radius, radius, 0.0, height, bottom=True) + frustum(1, radius, 0.0, height, height + nose)
            + fin_pieces)


CATEGORIES: dict[str, tuple[tuple[str, ...], Callable[[np.random.Generator], list[Piece]]]] = {
    "mug": (("body", "handle"), _mug),
    "lamp": (("base", "pole", "shade"), _lamp),
    "table": (("top", "legs"), _table),
    "chair": (("seat", "back", "legs"), _chair),
    "airplane": (("fuselage", "wings", "tail"), _airplane),
    "rocket": (("body", "nose", "fins"), _rocket),
}
"""Category name -> (its part names, the generator of an object's pieces with random proportions)."""


def sample_parts(rng: np.random.Generator, n: int, pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area over the pieces, in random order: ``(points (n, 3), parts (n,))``
    with each point's part index within its category."""
    counts = np.bincount(_pick(rng, n, np.array([area for _, area, _ in pieces])), minlength=len(pieces))
    points = np.concatenate([sample(rng, int(c)) for (_, _, sample), c in zip(pieces, counts)])
    parts = np.repeat([part for part, _, _ in pieces], counts)
    order = rng.permutation(n)
    return points[order], parts[order]


@DATASETS.register()
class SyntheticParts(PartDataset):
    """Procedural objects of labelled parts, on the fly; every item is a pure function of
    ``(seed, split, index)``.

    Args:
        split: ``train``, ``val``, ``test`` or ``trainval`` (train items, then val items).
        transforms: ``{"train": [...], "test": [...]}`` augmentations applied after generation.
        seed: selects the whole dataset (and the augmentation streams).
        num_points: points per object.
        train_size, val_size, test_size: number of items per split; categories cycle, so every
            category has ``size // categories`` items or one more.
        categories: names of the categories to use, in label order (default: all of :data:`CATEGORIES`).
        noise: std of the Gaussian noise added to each coordinate, as a fraction of the object's radius.
        anisotropy: per-axis scale factors are drawn from ``[1 - anisotropy, 1 + anisotropy]``.
        rotation: ``none`` (objects upright along y, facing one way, as ShapeNetPart's), ``up`` (a
            random angle about the up axis y) or ``so3`` (uniformly random pose).
    """

    injected_args = ("split",)

    def __init__(self, split: str, transforms: Optional[dict] = None, seed: Seed = 0, num_points: NumPoints = 512,
                 train_size: NumItems = 1200, val_size: NumItems = 240, test_size: NumItems = 600,
                 categories: Optional[list] = None, noise: float = 0.005, anisotropy: float = 0.15,
                 rotation: Literal["none", "up", "so3"] = "none") -> None:
        super().__init__(split, transforms, seed)
        check_generator_settings("SyntheticParts", seed=seed, num_points=num_points, train_size=train_size,
                                 val_size=val_size, test_size=test_size, noise=noise, anisotropy=anisotropy,
                                 rotation=rotation, rotations=("none", "up", "so3"))
        names = list(CATEGORIES) if categories is None else list(categories)
        unknown = [c for c in names if c not in CATEGORIES]
        if unknown:
            raise ConfigError(f"SyntheticParts.categories has unknown names {unknown}; known: {', '.join(CATEGORIES)}")
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"SyntheticParts.categories must be a non-empty list without repeats, got {names}")
        self.class_names = names
        self.part_names, self.category_parts = [], []
        for name in names:
            parts = CATEGORIES[name][0]
            self.category_parts.append(list(range(len(self.part_names), len(self.part_names) + len(parts))))
            self.part_names += [f"{name}/{part}" for part in parts]
        self.num_points, self.noise, self.anisotropy, self.rotation = num_points, noise, anisotropy, rotation
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        parts = ["train", "val"] if split == "trainval" else [split]
        self._parts = [(_SPLIT_CODES[p], sizes[p]) for p in parts]

    def __len__(self) -> int:
        return sum(size for _, size in self._parts)

    def labels(self) -> np.ndarray:
        return np.concatenate([np.arange(size, dtype=np.int64) % self.num_classes for _, size in self._parts])

    def get_raw(self, index: int) -> tuple[np.ndarray, int]:
        """Generate item ``index``: ``(points (num_points, 4) float32, category)``: xyz in the unit
        sphere and the part of each point."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for SyntheticParts split '{self.split}' of {len(self)} items")
        for code, size in self._parts:
            if index < size:
                break
            index -= size
        label = index % self.num_classes
        rng = np.random.default_rng([_STREAM_TAG, self.seed, code, index])
        points, parts = sample_parts(rng, self.num_points, CATEGORIES[self.class_names[label]][1](rng))
        points = points * rng.uniform(1 - self.anisotropy, 1 + self.anisotropy, 3)
        if self.rotation == "so3":
            pose = random_rotation_matrix(rng)
        elif self.rotation == "up":
            pose = axis_rotation_matrix("y", rng.uniform(0, 2 * np.pi)) @ _Z_TO_Y
        else:
            pose = _Z_TO_Y
        points = _normalize(points @ pose.T)
        points = _normalize(points + self.noise * rng.standard_normal(points.shape))
        parts = np.asarray(self.category_parts[label])[parts]
        return np.concatenate([points, parts[:, None]], axis=1).astype(np.float32), label
