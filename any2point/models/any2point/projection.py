"""3D-to-any virtual projection (paper sec. 3, "3D-to-any virtual projection").

Each 3D token centre is projected, without rendering anything, to M positions in the source's own
positional-embedding table: M lines for a 1D (language) source, M PointCLIP views for a 2D
(vision / audio) source (PointCLIP V1's six perspective views, two more of ours for 8, or PointCLIP
V2's ten orthographic views; the paper's Table 8). The M embeddings sampled there are averaged and added to the token
once. The same positions, cut into cells, guide the adapter's local attention: :func:`token_cells`
is the one place that says which cell each token is in.

Geometry is pure functions on the centres normalised per sample to the unit sphere (or, with
``frame: data``, on the centres as the data gives them, as the released code did):

- :func:`normalize_to_unit_sphere` ``(B, G, 3) -> (B, G, 3)``;
- :func:`project_to_lines` ``(B, G, 3) -> (B, M, G)`` continuous rows in ``[0, L - 1]``, and
  :func:`line_cells` ``-> (B, M, G)`` cell indices;
- :func:`project_to_plane` ``(B, G, 3) -> (B, M, G, 2)`` pixel ``(row, col)`` on the virtual plane
  (perspective or orthographic camera), and :func:`plane_cells` ``-> (B, M, G)`` cell indices;
- :func:`sample_table_1d` / :func:`sample_table_2d`: the interpolated embeddings ``(B, M, G, C)``.

The released code's own geometry is here too, each part behind its own off-by-default switch of
:class:`VirtualProjection` (docs/method.md, "Where the official code differs from the paper"):
:func:`official_line_positions` and :func:`sample_table_1d_official` (``line_index: official``),
:func:`official_plane_positions` (``plane_index: official``), :func:`official_grid_view`
(``official_grid_view``) and :func:`scramble_2d` (``pe_2d_scramble``).

:class:`VirtualProjection` wires them to a source and offers the positional-embedding variants of
the paper's Table 4: ``virtual`` (default), ``none``, ``sinusoidal`` and ``learnable``.

On a rotary source (:mod:`any2point.models.sources.rotary`), which has no table, ``pe: virtual``
hands the M positions of every token to the source's rotary embedding instead (``rotary:
multiview``, the mean of the M views' attention logits, or ``rotary: mean_position``, one rotation
at the mean position); a rotary source that keeps an absolute table too (EVA-02) also gets the
sampled table. The other ``pe`` kinds give a rotary source no positions (every token at one
position, no rotation) and add their embedding as on any source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import voxel_ids
from any2point.models.sources.base import SourceTransformer
from any2point.models.sources.rotary import RotaryMode, RotarySource
from any2point.models.any2point.tokenizer import sincos_embedding
from any2point.registry import PROJECTIONS
from any2point.errors import ConfigError

PEKind = Literal["virtual", "none", "sinusoidal", "learnable"]
LineKind = Literal["even", "pointclip_views"]
Frame = Literal["unit_sphere", "data"]
IndexKind = Literal["paper", "official"]
ViewKind = Literal["pointclip", "pointclip_v2"]
CellKind = Literal["1d", "2d", "3d"]

#: Euler angles (x, y, z) of the PointCLIP-V1 views: its six (four around the object, then top and
#: bottom), then two more side views half-way between the first and second and the third and fourth,
#: for the paper's 8-view row of Table 8 (PointCLIP V1 defines six; these two are our choice).
POINTCLIP_VIEW_ANGLES = (
    (0.0, 0.0, math.pi / 2),
    (math.pi / 2, 0.0, math.pi / 2),
    (math.pi, 0.0, math.pi / 2),
    (3 * math.pi / 2, 0.0, math.pi / 2),
    (0.0, -math.pi / 2, math.pi / 2),
    (0.0, math.pi / 2, math.pi / 2),
    (math.pi / 4, 0.0, math.pi / 2),
    (5 * math.pi / 4, 0.0, math.pi / 2),
)


#: PointCLIP V2's ten views: Euler angles (x, y, z) of the view rotation, then of the small tilt
#: that reveals more surface (pi/9 about y; pi/15 for the last two), applied after it.
POINTCLIP_V2_VIEW_ANGLES = tuple(
    ((k * math.pi / 4, 0.0, math.pi / 2), (0.0, math.pi / 9, 0.0)) for k in (1, 3, 5, 7)
) + tuple(
    ((k * math.pi / 2, 0.0, math.pi / 2), (0.0, math.pi / 9, 0.0)) for k in range(4)
) + (
    ((0.0, -math.pi / 2, math.pi / 2), (0.0, math.pi / 15, 0.0)),
    ((0.0, math.pi / 2, math.pi / 2), (0.0, math.pi / 15, 0.0)),
)
#: PointCLIP V2 draws the object on 80 % of the image side.
POINTCLIP_V2_OBJECT_RATIO = 0.8
#: How many views each PointCLIP version defines.
MAX_VIEWS = {"pointclip": len(POINTCLIP_VIEW_ANGLES), "pointclip_v2": len(POINTCLIP_V2_VIEW_ANGLES)}


# The view and line geometry below is built on the CPU in float64 (also under a ``meta`` default
# device, where the parameter-counting tool builds models), then registered as buffers.


def normalize_to_unit_sphere(xyz: Tensor, eps: float = 1e-12) -> Tensor:
    """Centre each sample at its mean and divide by its largest radius: ``(B, G, 3) -> (B, G, 3)``.

    Makes the projection independent of the data's scale, so no view degenerates.
    """
    centred = xyz - xyz.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1).clamp_min(eps)
    return centred / radius[:, None, None]


def euler_to_matrix(angles: Tensor) -> Tensor:
    """Rotation matrices ``R = Rx @ Ry @ Rz`` from Euler angles ``(M, 3) -> (M, 3, 3)``."""
    x, y, z = angles.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], -1)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], -1)
    shape = angles.shape[:-1] + (3, 3)
    return rx.reshape(shape) @ ry.reshape(shape) @ rz.reshape(shape)


def pointclip_view_rotations(num_views: int = 6) -> Tensor:
    """The first ``num_views`` PointCLIP-V1 view rotations ``(M, 3, 3)`` (float64)."""
    if not 1 <= num_views <= len(POINTCLIP_VIEW_ANGLES):
        raise ValueError(f"the PointCLIP views are {len(POINTCLIP_VIEW_ANGLES)}; num_views must be in "
                         f"1..{len(POINTCLIP_VIEW_ANGLES)}, got {num_views}")
    angles = torch.tensor(POINTCLIP_VIEW_ANGLES[:num_views], dtype=torch.float64, device="cpu")
    return euler_to_matrix(angles)


def pointclip_v2_view_rotations(num_views: int = 10) -> Tensor:
    """The first ``num_views`` PointCLIP V2 view rotations ``(M, 3, 3)`` (float64): ``R = T_j V_j``,
    the view rotation ``V_j`` followed by its tilt ``T_j`` (both ``Rx Ry Rz`` of their angles)."""
    if not 1 <= num_views <= len(POINTCLIP_V2_VIEW_ANGLES):
        raise ValueError(f"the PointCLIP V2 views are 10; num_views must be in 1..10, got {num_views}")
    angles = torch.tensor(POINTCLIP_V2_VIEW_ANGLES[:num_views], dtype=torch.float64, device="cpu")
    return euler_to_matrix(angles[:, 1]) @ euler_to_matrix(angles[:, 0])


def even_line_directions(num_lines: int) -> Tensor:
    """``num_lines`` unit directions ``(M, 3)`` (float64) of lines spread evenly over the sphere.

    Six lines are the diameters through the vertices of an icosahedron (all pairwise angles equal);
    other counts use a Fibonacci lattice on the upper hemisphere.
    """
    if num_lines < 1:
        raise ValueError(f"num_lines must be positive, got {num_lines}")
    if num_lines == 6:
        phi = (1 + math.sqrt(5)) / 2
        dirs = torch.tensor([[0, 1, phi], [0, 1, -phi], [1, phi, 0], [1, -phi, 0], [phi, 0, 1],
                             [-phi, 0, 1]], dtype=torch.float64, device="cpu")
    else:
        i = torch.arange(num_lines, dtype=torch.float64, device="cpu")
        z = 1 - (i + 0.5) / num_lines
        r = (1 - z ** 2).sqrt()
        theta = i * math.pi * (3 - math.sqrt(5))
        dirs = torch.stack([r * theta.cos(), r * theta.sin(), z], -1)
    return dirs / dirs.norm(dim=-1, keepdim=True)


def pointclip_line_directions(direction: Sequence[float], num_views: int = 6) -> Tensor:
    """Directions ``(M, 3)`` (float64) of the official code's lines: one direction ``u`` seen from the
    PointCLIP views, i.e. ``t = (R_j p) . u = p . (R_j^T u)``."""
    u = torch.tensor(list(direction), dtype=torch.float64, device="cpu")
    if u.shape != (3,) or u.norm() == 0:
        raise ValueError(f"line_direction must be a non-zero 3-vector, got {list(direction)}")
    rotations = pointclip_view_rotations(num_views)
    return rotations.transpose(1, 2) @ (u / u.norm())


def project_to_lines(unit_xyz: Tensor, directions: Tensor, length: int) -> Tensor:
    """Continuous rows ``(B, M, G)`` in ``[0, length - 1]`` of unit-sphere points ``(B, G, 3)`` on
    ``M`` lines ``(M, 3)``: ``t = p . v`` in ``[-1, 1]``, ``s = (t + 1) / 2 * (length - 1)``."""
    t = torch.einsum("bgc,mc->bmg", unit_xyz, directions.to(unit_xyz))
    return ((t + 1) / 2 * (length - 1)).clamp(0, length - 1)


def line_cells(rows: Tensor, length: int, line_size: float) -> tuple[Tensor, int]:
    """Cell of each continuous row ``(B, M, G)``: ``floor(s / line_size)``; also the cell count
    (``length = 77``, ``line_size = 2`` -> 39 cells)."""
    if line_size <= 0:
        raise ValueError(f"line cell size must be positive, got {line_size}")
    num_cells = int((length - 1) // line_size) + 1
    return torch.floor(rows / line_size).long().clamp(0, num_cells - 1), num_cells


def project_to_plane(unit_xyz: Tensor, rotations: Tensor, trans: Optional[float],
                     plane_size: Sequence[int], scale: float = 1.0) -> Tensor:
    """Pixel positions ``(B, M, G, 2)`` as ``(row, col)`` of unit-sphere points ``(B, G, 3)`` seen
    from ``M`` views ``(M, 3, 3)``.

    ``p' = R p``. Perspective camera (PointCLIP V1) looking down ``z`` with the object at distance
    ``|trans|``: ``u = x' / (z' + |trans|)``, ``v = y' / (z' + |trans|)``; orthographic camera
    (PointCLIP V2, ``trans=None``): ``u = x'``, ``v = y'``. Then ``u, v`` are multiplied by
    ``scale`` and ``col = (u + 1) / 2 * (W - 1)``, ``row = (v + 1) / 2 * (H - 1)`` on a plane of
    ``plane_size = (H, W)`` pixels, clamped to it.
    """
    height, width = plane_size
    rotated = torch.einsum("mij,bgj->bmgi", rotations.to(unit_xyz), unit_xyz)
    if trans is None:
        u, v = rotated[..., 0], rotated[..., 1]
    else:
        distance = abs(trans)
        if distance <= 1:
            raise ValueError(f"|trans| must exceed 1 (the unit sphere must lie in front of the camera), got {trans}")
        depth = rotated[..., 2] + distance
        u, v = rotated[..., 0] / depth, rotated[..., 1] / depth
    u, v = u * scale, v * scale
    col = ((u + 1) / 2 * (width - 1)).clamp(0, width - 1)
    row = ((v + 1) / 2 * (height - 1)).clamp(0, height - 1)
    return torch.stack([row, col], dim=-1)


def plane_cells(pixels: Tensor, plane_size: Sequence[int], cell_size: float) -> tuple[Tensor, int]:
    """Cell of each pixel ``(B, M, G, 2)``: the square of side ``cell_size`` px containing it,
    numbered row-major; also the cell count (518 px, 26 px cells -> 20 x 20)."""
    if cell_size <= 0:
        raise ValueError(f"plane cell size must be positive, got {cell_size}")
    rows = int((plane_size[0] - 1) // cell_size) + 1
    cols = int((plane_size[1] - 1) // cell_size) + 1
    r = torch.floor(pixels[..., 0] / cell_size).long().clamp(0, rows - 1)
    c = torch.floor(pixels[..., 1] / cell_size).long().clamp(0, cols - 1)
    return r * cols + c, rows * cols


def sample_table_1d(table: Tensor, rows: Tensor) -> Tensor:
    """Linear interpolation of a 1D table ``(L, C)`` at continuous rows ``(...)`` -> ``(..., C)``:
    rows ``floor(s)`` and ``floor(s) + 1`` weighted ``1 - frac`` and ``frac`` (an integer row is
    taken exactly)."""
    length = table.shape[0]
    lo = rows.floor().long().clamp(0, length - 1)
    hi = (lo + 1).clamp(max=length - 1)
    frac = (rows - lo.to(rows.dtype)).unsqueeze(-1).to(table.dtype)
    return table[lo] * (1 - frac) + table[hi] * frac


def sample_table_2d(table: Tensor, pixels: Tensor, plane_size: Sequence[int],
                    padding: Literal["border", "zeros"] = "border") -> Tensor:
    """Bilinear sample of a 2D table ``(H_grid, W_grid, C)`` at plane pixels ``(..., 2)`` (row, col)
    -> ``(..., C)``; the plane's corner pixels map to the table's corner entries
    (``grid_sample`` with ``align_corners=True``); outside the plane the table's border repeats, or
    zeros are read (``padding``)."""
    height, width = plane_size
    lead = pixels.shape[:-1]
    grid = torch.stack([pixels[..., 1] / (width - 1), pixels[..., 0] / (height - 1)], dim=-1) * 2 - 1
    image = table.permute(2, 0, 1).unsqueeze(0)
    out = F.grid_sample(image, grid.reshape(1, -1, 1, 2).to(table.dtype), mode="bilinear",
                        padding_mode=padding, align_corners=True)
    return out[0, :, :, 0].t().reshape(*lead, table.shape[-1])


def official_line_positions(xyz: Tensor, directions: Tensor, length: int) -> Tensor:
    """The released code's 1D positions ``(B, M, G)`` in ``[0, length)`` of centres ``(B, G, 3)`` on
    ``M`` lines ``(M, 3)`` (deviation 4): per sample and line, ``t = (p - mean p) . v`` is min-max
    scaled to ``[0, length]``, shifted by -0.5 and wrapped modulo ``length`` (the minimum lands on
    ``length - 0.5``). Independent of the centres' frame."""
    t = torch.einsum("bgc,mc->bmg", xyz - xyz.mean(dim=1, keepdim=True), directions.to(xyz))
    lo, hi = t.amin(dim=-1, keepdim=True), t.amax(dim=-1, keepdim=True)
    return torch.remainder((t - lo) / (hi - lo) * length - 0.5, length)


def sample_table_1d_official(table: Tensor, positions: Tensor) -> Tensor:
    """The released code's 1D lookup (deviation 4) at positions ``(B, M, G)`` -> ``(B, M, G, C)``.

    The positions of the *whole batch* are rescaled by one factor, ``x = s * (L - 1) / (max s - min s)``;
    rows ``l = clamp(floor x)`` and ``r = clamp(ceil x)`` (clamped to ``[0, L - 1]``) are weighted
    ``r - x`` and ``x - l``: an exact integer gets zero weight on both, and so does every ``x >= L - 1``
    (always the batch's largest position)."""
    last = table.shape[0] - 1
    x = positions * (last / (positions.max() - positions.min()))
    lo = x.floor().clamp(0, last)
    hi = x.ceil().clamp(0, last)
    return ((hi - x).unsqueeze(-1) * table[lo.long()] + (x - lo).unsqueeze(-1) * table[hi.long()]).to(table.dtype)


def official_plane_positions(xyz: Tensor, rotations: Tensor, trans: float, plane_size: Sequence[int]) -> Tensor:
    """The released code's pixels ``(B, M, G, 2)`` as ``(row, col)`` on a plane of ``(H, W)`` pixels
    (deviation 12): ``p' = R p``, ``z = z' + |trans| + 1e-12``, ``u = x' / z``, ``v = y' / z * H / W``,
    ``col = ((u + 1) W / 2 - 0.5) mod W``, ``row = ((v + 1) H / 2 - 0.5) mod H``: not clamped, so a
    point outside the view wraps around to the other side."""
    height, width = plane_size
    rotated = torch.einsum("mij,bgj->bmgi", rotations.to(xyz), xyz)
    depth = rotated[..., 2] + abs(trans) + 1e-12
    u = rotated[..., 0] / depth
    v = rotated[..., 1] / depth * (height / width)
    col = torch.remainder((u + 1) * width / 2 - 0.5, width)
    row = torch.remainder((v + 1) * height / 2 - 0.5, height)
    return torch.stack([row, col], dim=-1)


def official_grid_view(table: Tensor) -> Tensor:
    """The released code's reading of a ``(H_grid, W_grid, C)`` table (deviation 2): its entries in
    row-major order re-read as a ``(W_grid, H_grid, C)`` grid (ImageBind's 12 x 19 grid as 19 x 12);
    the identity for a square grid."""
    rows, cols, channels = table.shape
    return table.reshape(cols, rows, channels)


def scramble_2d(sampled: Tensor) -> Tensor:
    """The released code's reshape of the sampled 2D embeddings (deviation 2): ``(B, M, G, C)`` laid out
    as the ``(B, M, C, G)`` output of ``grid_sample`` and reshaped to ``(B, M, G, C)`` without a
    transpose, which mixes tokens and channels."""
    b, m, g, c = sampled.shape
    return sampled.transpose(-1, -2).reshape(b, m, g, c)


@dataclass
class Projected:
    """What the projection hands to the classifier for one batch.

    Attributes:
        xyz: the token centres in the projection's frame ``(B, G, 3)``: normalised to the unit sphere
            (``frame: unit_sphere``) or as given (``frame: data``); the 3D cells and voxels use them.
        positions: per view, rows ``(B, M, G)`` (1D source) or pixels ``(B, M, G, 2)`` (2D source).
        pe: the positional embedding to add to the tokens ``(B, G, C)``, or ``None`` (``pe: none``, or
            a rotary source without a table).
        rotary: a rotary source's positions: ``positions`` (``rotary: multiview``, V = M views) or
            their mean over the views (``mean_position``, V = 1), ``(B, V, G)`` or ``(B, V, G, 2)``;
            ``None`` for a table source and for the ``pe`` ablations.
    """

    xyz: Tensor
    positions: Tensor
    pe: Optional[Tensor]
    rotary: Optional[Tensor] = None


@PROJECTIONS.register()
class VirtualProjection(nn.Module):
    """3D-to-any virtual projection and the positional embedding of the 3D tokens (paper sec. 3).

    ``forward(centres (B, G, 3), table) -> Projected``, where ``table`` is the source's frozen
    ``pos_embed_1d`` (L, C) or ``pos_embed_2d`` (H, W, C), passed at call time so the table lives in
    the source only.

    Args:
        source: the source transformer (injected): its table kind and size, plane and patch size.
        pe: ``virtual`` (average of the M sampled source embeddings, the paper), ``none``,
            ``sinusoidal`` (fixed sin/cos of the unit-sphere centre) or ``learnable`` (an MLP
            3 -> 128 -> C on it); the ablation of the paper's Table 4.
        num_views: M, the number of lines or views.
        lines: 1D sources: ``even`` (lines spread evenly over the sphere) or ``pointclip_views``
            (``line_direction`` seen from the PointCLIP views, as the official code did).
        line_direction: the direction ``u`` for ``lines: pointclip_views``.
        views: 2D sources: ``pointclip`` (PointCLIP V1's six perspective views, the paper, and two
            more side views of ours, :data:`POINTCLIP_VIEW_ANGLES`) or
            ``pointclip_v2`` (PointCLIP V2's ten orthographic views, the object on 80 % of the
            plane; the paper's Table 8); the first ``num_views`` of them are used.
        trans: 2D sources, PointCLIP V1 views: camera distance (its magnitude is used; must exceed 1).
        line_length: rows of the virtual line when the source is 2D but the adapter asks for 1D
            guidance (default: the source's table length for 1D sources).
        plane_size: ``[H, W]`` pixels of the virtual plane when the source is 1D but the adapter asks
            for 2D guidance (default: the source's plane for 2D sources).

    The released code's geometry (docs/method.md, "Where the official code differs from the paper"),
    each switch off by default:

        frame: ``unit_sphere`` (default) projects and voxelises the centres normalised per sample;
            ``data`` uses them as the data gives them (deviation 11).
        line_index: ``paper`` (default) or ``official``: positions min-max scaled per sample and line
            and wrapped (:func:`official_line_positions`), the table read at positions rescaled by the
            whole batch's range, zero weight at integers (:func:`sample_table_1d_official`; deviation 4).
        plane_index: ``paper`` (default) or ``official``: perspective pixels without clamping, wrapped
            modulo the plane (:func:`official_plane_positions`), the table sampled with zero padding
            outside it (deviation 12).
        official_grid_view: lay the plane out transposed (camera x across ``H`` pixels, y across
            ``W``) and read the table's entries as a grid of the transposed shape
            (:func:`official_grid_view`): ImageBind's 12 x 19 grid read as 19 x 12; no effect on a
            square plane (deviation 2).
        pe_2d_scramble: reshape the sampled 2D embeddings without the transpose
            (:func:`scramble_2d`; deviation 2).

    Rotary sources (no table: the line length or the plane is the source's setting):

        rotary: ``multiview`` (default) or ``mean_position``; only for rotary sources.
    """

    injected_args = ("source",)

    def __init__(self, source: SourceTransformer, pe: PEKind = "virtual", num_views: int = 6,
                 lines: LineKind = "even", line_direction: Optional[list[float]] = None,
                 views: ViewKind = "pointclip", trans: float = 1.4, line_length: Optional[int] = None,
                 plane_size: Optional[list[int]] = None, frame: Frame = "unit_sphere",
                 line_index: IndexKind = "paper", plane_index: IndexKind = "paper",
                 official_grid_view: bool = False, pe_2d_scramble: bool = False,
                 rotary: Optional[RotaryMode] = None) -> None:
        super().__init__()
        self.is_rotary = isinstance(source, RotarySource)
        if rotary is not None and not self.is_rotary:
            raise ConfigError(f"projection rotary applies to rotary sources only; {source.name} has a position table")
        if rotary is not None and rotary not in RotaryMode.__args__:
            raise ConfigError(f"projection rotary must be one of {RotaryMode.__args__}, got '{rotary}'")
        self.rotary = (rotary or "multiview") if self.is_rotary else None
        for key, value, allowed in (("frame", frame, Frame), ("line_index", line_index, IndexKind),
                                    ("plane_index", plane_index, IndexKind)):
            if value not in allowed.__args__:
                raise ConfigError(f"projection {key} must be one of {allowed.__args__}, got '{value}'")
        if (plane_index == "official" or official_grid_view) and views != "pointclip":
            raise ConfigError("projection plane_index: official and official_grid_view apply to the "
                              "pointclip views only")
        self.frame, self.line_index, self.plane_index = frame, line_index, plane_index
        self.official_grid_view, self.pe_2d_scramble = official_grid_view, pe_2d_scramble
        if pe not in PEKind.__args__:
            raise ConfigError(f"projection pe must be one of {PEKind.__args__}, got '{pe}'")
        if lines not in LineKind.__args__:
            raise ConfigError(f"projection lines must be one of {LineKind.__args__}, got '{lines}'")
        if views not in ViewKind.__args__:
            raise ConfigError(f"projection views must be one of {ViewKind.__args__}, got '{views}'")
        if (line_direction is not None) != (lines == "pointclip_views"):
            raise ConfigError("projection line_direction is required with lines: pointclip_views and "
                              "only allowed with it")
        max_views = MAX_VIEWS["pointclip" if source.modality_dim == 1 else views]
        if num_views < 1 or (num_views > max_views and (source.modality_dim == 2 or lines == "pointclip_views")):
            raise ConfigError(f"projection num_views must be in 1..{max_views} with the {views} views, "
                              f"got {num_views}")
        if abs(trans) <= 1:
            raise ConfigError(f"projection trans must have magnitude above 1, got {trans}")
        self.dim = source.dim
        self.pe_kind = pe
        self.num_views = num_views
        self.views = views
        self.trans = float(trans)
        self.modality_dim = source.modality_dim
        if self.modality_dim == 1:
            if line_length is not None:
                raise ConfigError("projection line_length is set by a 1D source's own table; leave it unset")
            self.line_length = source.line_length if self.is_rotary else source.pos_embed_1d.shape[0]
            self.plane_size = tuple(plane_size) if plane_size is not None else None
        else:
            if plane_size is not None:
                raise ConfigError("projection plane_size is set by a 2D source's own plane; leave it unset")
            if line_length is not None and line_length < 2:
                raise ConfigError(f"projection line_length must be at least 2, got {line_length}")
            self.line_length = line_length
            self.plane_size = tuple(source.plane_size)
        self.source_patch_size = source.patch_size
        if self.plane_size is not None and (len(self.plane_size) != 2 or min(self.plane_size) < 2):
            raise ConfigError(f"projection plane_size must be [H, W] with both at least 2, got {plane_size}")
        directions = (even_line_directions(num_views) if lines == "even"
                      else pointclip_line_directions(line_direction, num_views))
        self.register_buffer("directions", directions.float(), persistent=False)
        rotations = (pointclip_view_rotations(min(num_views, MAX_VIEWS["pointclip"])) if views == "pointclip"
                     else pointclip_v2_view_rotations(min(num_views, 10)))
        self.register_buffer("rotations", rotations.float(), persistent=False)
        self.mlp = (nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, self.dim))
                    if pe == "learnable" else None)

    @property
    def view_plane(self) -> Optional[tuple[int, int]]:
        """``(H, W)`` pixels of the plane the views are laid out on (transposed with
        ``official_grid_view``)."""
        if self.plane_size is None or not self.official_grid_view:
            return self.plane_size
        return self.plane_size[1], self.plane_size[0]

    def positions(self, xyz: Tensor, kind: Literal["1d", "2d"]) -> Tensor:
        """Rows ``(B, M, G)`` on the M lines or pixels ``(B, M, G, 2)`` on the M views."""
        if kind == "1d":
            if self.line_length is None:
                raise ConfigError("1D guidance on a 2D source needs the projection's line_length")
            if self.line_index == "official":
                return official_line_positions(xyz, self.directions, self.line_length)
            return project_to_lines(xyz, self.directions, self.line_length)
        if self.plane_size is None:
            raise ConfigError("2D guidance on a 1D source needs the projection's plane_size")
        if self.num_views > self.rotations.shape[0]:
            raise ConfigError(f"2D guidance uses the {self.rotations.shape[0]} {self.views} views; num_views "
                              f"is {self.num_views}")
        if self.views == "pointclip_v2":
            return project_to_plane(xyz, self.rotations, None, self.plane_size, POINTCLIP_V2_OBJECT_RATIO)
        if self.plane_index == "official":
            return official_plane_positions(xyz, self.rotations, self.trans, self.view_plane)
        return project_to_plane(xyz, self.rotations, self.trans, self.view_plane)

    def cell_size(self, kind: CellKind, cell_size: Optional[float]) -> Optional[float]:
        """The side of a cell of ``kind``: ``cell_size``, else 2 rows (1D) or the source's patch (2D);
        ``None`` where there is no default (2D cells on a 1D source, 3D cells)."""
        if cell_size is not None:
            return cell_size
        return {"1d": 2.0, "2d": self.source_patch_size, "3d": None}[kind]

    def check_cells(self, kind: CellKind, cell_size: Optional[float], what: str) -> None:
        """Raise a :class:`ConfigError` (naming ``what``) when cells of ``kind`` cannot be cut here."""
        if kind == "1d" and self.line_length is None:
            raise ConfigError(f"{what} guidance '1d' on a 2D source needs the projection's line_length")
        if kind == "2d" and (self.plane_size is None or self.cell_size("2d", cell_size) is None):
            raise ConfigError(f"{what} guidance '2d' on a 1D source needs the projection's plane_size and "
                              f"the {what}'s cell_size")
        if kind == "3d" and cell_size is None:
            raise ConfigError(f"{what} guidance '3d' needs a cell_size (voxel side on the unit sphere)")

    def token_cells(self, projected: "Projected", kind: CellKind, cell_size: Optional[float]) -> Tensor:
        """Which cell each point token is in, in each view: ``(B, M, G)``.

        ``1d``: segments of ``cell_size`` rows on each line; ``2d``: squares of ``cell_size`` px on
        each view's plane (both from the source's own projection, or projected here when the source
        is of the other kind); ``3d``: voxels of side ``cell_size`` of the centres in the projection's frame, the
        same in every view."""
        return self.cells_and_count(projected, kind, cell_size)[0]

    def cells_and_count(self, projected: "Projected", kind: CellKind, cell_size: Optional[float]) -> tuple[Tensor, int]:
        """:meth:`token_cells` and the number of cells per sample and view (``0`` for 3D cells, whose
        number depends on the data)."""
        xyz = projected.xyz
        if kind == "3d":
            return voxel_ids(xyz, cell_size).unsqueeze(1).expand(-1, self.num_views, -1), 0
        native = "1d" if self.modality_dim == 1 else "2d"
        positions = projected.positions if kind == native else self.positions(xyz, kind)
        size = self.cell_size(kind, cell_size)
        if kind == "1d":
            return line_cells(positions, self.line_length, size)
        return plane_cells(positions, self.view_plane, size)

    def forward(self, centres: Tensor, table: Optional[Tensor]) -> Projected:
        """``centres (B, G, 3)`` and the source table (``None`` for a rotary source without one) ->
        :class:`Projected`."""
        if centres.ndim != 3 or centres.shape[-1] != 3:
            raise ValueError(f"token centres must have shape (B, G, 3), got {tuple(centres.shape)}")
        unit = normalize_to_unit_sphere(centres)
        xyz = unit if self.frame == "unit_sphere" else centres
        kind = "1d" if self.modality_dim == 1 else "2d"
        positions = self.positions(xyz, kind)
        pe: Optional[Tensor] = None
        rotary: Optional[Tensor] = None
        if self.pe_kind == "virtual" and self.is_rotary:
            rotary = positions if self.rotary == "multiview" else positions.mean(dim=1, keepdim=True)
        if self.pe_kind == "virtual" and table is not None:
            pe = self._sample(table, positions, kind).mean(dim=1).to(centres.dtype)
        elif self.pe_kind == "sinusoidal":
            pe = sincos_embedding(unit, self.dim)
        elif self.pe_kind == "learnable":
            pe = self.mlp(unit)
        return Projected(xyz=xyz, positions=positions, pe=pe, rotary=rotary)

    def _sample(self, table: Tensor, positions: Tensor, kind: Literal["1d", "2d"]) -> Tensor:
        """The source's embeddings at the positions: ``(B, M, G, C)``."""
        if kind == "1d":
            if self.line_index == "official":
                return sample_table_1d_official(table, positions)
            return sample_table_1d(table, positions)
        if self.official_grid_view:
            table = official_grid_view(table)
        padding = "zeros" if self.plane_index == "official" else "border"
        sampled = sample_table_2d(table, positions, self.view_plane, padding)
        return scramble_2d(sampled) if self.pe_2d_scramble else sampled

    def extra_repr(self) -> str:
        geometry = (f"lines={self.num_views}, length={self.line_length}" if self.modality_dim == 1
                    else f"views={self.views} x {self.num_views}, plane={self.plane_size}, trans={self.trans}")
        return f"pe={self.pe_kind}, {geometry}" + (f", rotary={self.rotary}" if self.is_rotary else "")
