"""3D-to-any virtual projection: positions against hand computation, table sampling against exact
interpolants, cells, and the projection module's PE variants on the real tiny sources."""
from __future__ import annotations

import math

import pytest
import torch

from any2point.models.sources.clip_text import CLIPTextSource
from any2point.models.sources.timm_vit import TimmViTSource
from any2point.models.any2point.projection import (
    VirtualProjection,
    euler_to_matrix,
    even_line_directions,
    line_cells,
    normalize_to_unit_sphere,
    plane_cells,
    pointclip_line_directions,
    pointclip_view_rotations,
    project_to_lines,
    project_to_plane,
    sample_table_1d,
    sample_table_2d,
)
from any2point.models.any2point.tokenizer import sincos_embedding
from any2point.errors import ConfigError

PHI = (1 + math.sqrt(5)) / 2
NORM = math.sqrt(1 + PHI ** 2)


@pytest.fixture(scope="module")
def clip_tiny() -> CLIPTextSource:
    torch.manual_seed(0)
    return CLIPTextSource(width=64, depth=2, heads=4)


@pytest.fixture(scope="module")
def dinov2_tiny() -> TimmViTSource:
    torch.manual_seed(0)
    return TimmViTSource("vit_base_patch14_dinov2", img_size=56, embed_dim=64, depth=2, num_heads=4)


def test_normalize_to_unit_sphere_centres_and_scales():
    xyz = torch.tensor([[[3.0, 1.0, 1.0], [1.0, 1.0, 1.0], [5.0, 1.0, 1.0]]])
    expected = torch.tensor([[[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(normalize_to_unit_sphere(xyz), expected)


def test_euler_to_matrix_is_rx_ry_rz():
    angles = torch.tensor([[0.0, 0.0, math.pi / 2], [math.pi / 2, 0.0, math.pi / 2]], dtype=torch.float64)
    expected = torch.tensor([[[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                             [[0, -1, 0], [0, 0, -1], [1, 0, 0]]], dtype=torch.float64)
    torch.testing.assert_close(euler_to_matrix(angles), expected, atol=1e-12, rtol=0)


def test_even_lines_are_the_icosahedron_diameters():
    dirs = even_line_directions(6)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(6, dtype=torch.float64))
    cos = (dirs @ dirs.T).abs()
    off_diagonal = cos[~torch.eye(6, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, 1 / math.sqrt(5)))
    torch.testing.assert_close(even_line_directions(4).norm(dim=-1), torch.ones(4, dtype=torch.float64))


def test_pointclip_lines_of_the_official_direction_give_five_distinct_lines():
    dirs = pointclip_line_directions([-1.0, 0.0, 1.0])
    distinct = {tuple(round(v, 6) + 0.0 for v in d.tolist()) for d in dirs}
    assert len(distinct) == 5
    p = torch.randn(10, 3, dtype=torch.float64)
    u = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    rotated = torch.einsum("mij,nj->mni", pointclip_view_rotations(6), p)
    torch.testing.assert_close(rotated @ u, (p @ dirs.T).T)


def test_project_to_lines_hand_positions():
    dirs = even_line_directions(6).float()
    points = torch.stack([dirs[0], -dirs[0], torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])])[None]
    rows = project_to_lines(points, dirs, 77)
    assert rows.shape == (1, 6, 4)
    assert rows[0, 0, 0] == pytest.approx(76.0, abs=1e-4)
    assert rows[0, 0, 1] == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(rows[0, :, 2], torch.full((6,), 38.0))
    # On the x axis: t = v_x for v = (0, 1, phi), (0, 1, -phi), (1, phi, 0), (1, -phi, 0), (phi, 0, 1),
    # (-phi, 0, 1), all divided by sqrt(1 + phi^2).
    t = torch.tensor([0.0, 0.0, 1 / NORM, 1 / NORM, PHI / NORM, -PHI / NORM])
    torch.testing.assert_close(rows[0, :, 3], (t + 1) / 2 * 76)


def test_line_cells_hand_values():
    rows = torch.tensor([0.0, 1.99, 2.0, 75.9, 76.0])
    cells, count = line_cells(rows, 77, 2)
    assert cells.tolist() == [0, 0, 1, 37, 38]
    assert count == 39


def test_project_to_plane_hand_positions():
    rotations = pointclip_view_rotations(2).float()
    points = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    pixels = project_to_plane(points, rotations, -1.4, (518, 518))
    assert pixels.shape == (1, 2, 4, 2)
    centre, near = 258.5, (1 / 1.4 + 1) / 2 * 517
    far = (1 - 1 / 1.4) / 2 * 517
    # View 0, R = Rz(pi/2): (1,0,0) -> (0,1,0), (0,1,0) -> (-1,0,0), (0,0,1) -> (0,0,1).
    expected0 = torch.tensor([[centre, centre], [near, centre], [centre, far], [centre, centre]])
    # View 1, R = Rx(pi/2) Rz(pi/2): (1,0,0) -> (0,0,1), (0,1,0) -> (-1,0,0), (0,0,1) -> (0,-1,0).
    expected1 = torch.tensor([[centre, centre], [centre, centre], [centre, far], [far, centre]])
    torch.testing.assert_close(pixels[0, 0], expected0)
    torch.testing.assert_close(pixels[0, 1], expected1)


def test_project_to_plane_non_square_plane_and_clamping():
    rotations = pointclip_view_rotations(1).float()
    points = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.0, -0.8]]])
    pixels = project_to_plane(points, rotations, 1.1, (192, 304))
    # (1,0,0) -> (0,1,0): v = 1/1.1; (0.6,0,-0.8) -> (0,0.6,-0.8): v = 0.6/0.3 = 2 -> clamped.
    torch.testing.assert_close(pixels[0, 0, 0], torch.tensor([(1 / 1.1 + 1) / 2 * 191, 151.5]))
    torch.testing.assert_close(pixels[0, 0, 1], torch.tensor([191.0, 151.5]))
    with pytest.raises(ValueError, match="trans"):
        project_to_plane(points, rotations, 0.9, (192, 304))


def test_plane_cells_hand_values():
    pixels = torch.tensor([[0.0, 0.0], [517.0, 517.0], [26.0, 52.0], [25.9, 0.0]])
    cells, count = plane_cells(pixels, (518, 518), 26)
    assert cells.tolist() == [0, 399, 22, 0]
    assert count == 400
    cells, count = plane_cells(torch.tensor([[191.0, 303.0], [16.0, 15.9]]), (192, 304), 16)
    assert cells.tolist() == [11 * 19 + 18, 19]
    assert count == 12 * 19


def test_sample_table_1d_interpolates_between_neighbouring_rows():
    table = torch.randn(77, 5)
    rows = torch.tensor([3.25, 76.0, 10.0, 0.0])
    out = sample_table_1d(table, rows)
    torch.testing.assert_close(out[0], 0.75 * table[3] + 0.25 * table[4])
    torch.testing.assert_close(out[1], table[76])
    torch.testing.assert_close(out[2], table[10])
    torch.testing.assert_close(out[3], table[0])


@pytest.mark.parametrize("plane, grid", [((518, 518), (37, 37)), ((48, 80), (3, 5))])
def test_sample_table_2d_is_exact_on_a_bilinear_table(plane, grid):
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32),
                                torch.arange(grid[1], dtype=torch.float32), indexing="ij")
    table = torch.stack([rows, cols, rows * cols], dim=-1)
    pixels = torch.rand(2, 3, 2) * torch.tensor([plane[0] - 1, plane[1] - 1], dtype=torch.float32)
    pixels[0, 0] = torch.tensor([0.0, 0.0])
    pixels[0, 1] = torch.tensor([plane[0] - 1.0, plane[1] - 1.0])
    out = sample_table_2d(table, pixels, plane)
    r = pixels[..., 0] / (plane[0] - 1) * (grid[0] - 1)
    c = pixels[..., 1] / (plane[1] - 1) * (grid[1] - 1)
    torch.testing.assert_close(out, torch.stack([r, c, r * c], dim=-1), atol=1e-4, rtol=1e-5)


def test_virtual_pe_is_the_mean_of_the_sampled_rows(clip_tiny):
    proj = VirtualProjection(clip_tiny)
    centres = torch.randn(2, 16, 3) * 3 + 1
    out = proj(centres, clip_tiny.pos_embed_1d)
    unit = normalize_to_unit_sphere(centres)
    rows = project_to_lines(unit, even_line_directions(6).float(), 77)
    expected = torch.stack([sample_table_1d(clip_tiny.pos_embed_1d, rows[:, j]) for j in range(6)]).mean(0)
    torch.testing.assert_close(out.pe, expected)
    torch.testing.assert_close(out.positions, rows)
    assert out.xyz.norm(dim=-1).amax(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_virtual_pe_2d_is_the_mean_over_the_six_views(dinov2_tiny):
    proj = VirtualProjection(dinov2_tiny, trans=-1.8)
    centres = torch.randn(2, 16, 3)
    out = proj(centres, dinov2_tiny.pos_embed_2d)
    pixels = project_to_plane(normalize_to_unit_sphere(centres), pointclip_view_rotations(6).float(),
                              1.8, dinov2_tiny.plane_size)
    expected = sample_table_2d(dinov2_tiny.pos_embed_2d, pixels, dinov2_tiny.plane_size).mean(1)
    assert out.positions.shape == (2, 6, 16, 2)
    torch.testing.assert_close(out.pe, expected)
    cells = proj.token_cells(out, "2d", None)
    assert cells.shape == (2, 6, 16) and int(cells.max()) < 16


def _pointclip_v2_pixel(p: torch.Tensor, view: int, plane: tuple[int, int]) -> torch.Tensor:
    """PointCLIP V2's own order, written out for one point: row vectors times the transposed Euler
    matrices (view, then tilt), orthographic, the object on 80 % of the plane."""
    angles = [((k * math.pi / 4, 0, math.pi / 2), (0, math.pi / 9, 0)) for k in (1, 3, 5, 7)]
    angles += [((k * math.pi / 2, 0, math.pi / 2), (0, math.pi / 9, 0)) for k in range(4)]
    angles += [((0, -math.pi / 2, math.pi / 2), (0, math.pi / 15, 0)), ((0, math.pi / 2, math.pi / 2),
                                                                          (0, math.pi / 15, 0))]
    view_angles, tilt_angles = (torch.tensor(a, dtype=torch.float64) for a in angles[view])
    rotated = p.double() @ euler_to_matrix(view_angles).T @ euler_to_matrix(tilt_angles).T
    u, v = 0.8 * rotated[0], 0.8 * rotated[1]
    return torch.stack([(v + 1) / 2 * (plane[0] - 1), (u + 1) / 2 * (plane[1] - 1)]).float()


def test_pointclip_v2_views_follow_pointclip_v2(dinov2_tiny):
    proj = VirtualProjection(dinov2_tiny, views="pointclip_v2", num_views=8)
    centres = torch.randn(2, 10, 3)
    out = proj(centres, dinov2_tiny.pos_embed_2d)
    assert out.positions.shape == (2, 8, 10, 2) and proj.rotations.shape == (8, 3, 3)
    for b, view, g in [(0, 0, 0), (1, 3, 7), (0, 5, 2), (1, 7, 9)]:
        expected = _pointclip_v2_pixel(out.xyz[b, g], view, dinov2_tiny.plane_size)
        torch.testing.assert_close(out.positions[b, view, g], expected, atol=1e-4, rtol=1e-5)
    assert VirtualProjection(dinov2_tiny, views="pointclip_v2", num_views=10).num_views == 10
    with pytest.raises(ConfigError, match="1..10 with the pointclip_v2 views"):
        VirtualProjection(dinov2_tiny, views="pointclip_v2", num_views=11)
    with pytest.raises(ConfigError, match="views must be one of"):
        VirtualProjection(dinov2_tiny, views="pointclip_v3")


def test_token_cells_of_each_guidance_kind(clip_tiny):
    proj = VirtualProjection(clip_tiny, plane_size=[56, 56])
    out = proj(torch.randn(2, 12, 3), clip_tiny.pos_embed_1d)
    torch.testing.assert_close(proj.token_cells(out, "1d", None), line_cells(out.positions, 77, 2.0)[0])
    pixels = project_to_plane(out.xyz, pointclip_view_rotations(6).float(), 1.4, (56, 56))
    torch.testing.assert_close(proj.token_cells(out, "2d", 14), plane_cells(pixels, (56, 56), 14)[0])
    voxels = proj.token_cells(out, "3d", 0.5)
    assert voxels.shape == (2, 6, 12) and torch.equal(voxels[:, 0], voxels[:, 5])


def test_pe_variants(clip_tiny):
    centres = torch.randn(2, 8, 3)
    table = clip_tiny.pos_embed_1d
    assert VirtualProjection(clip_tiny, pe="none")(centres, table).pe is None
    sinusoidal = VirtualProjection(clip_tiny, pe="sinusoidal")
    out = sinusoidal(centres, table)
    torch.testing.assert_close(out.pe, sincos_embedding(out.xyz, 64))
    assert not list(sinusoidal.parameters())
    learnable = VirtualProjection(clip_tiny, pe="learnable")
    assert learnable(centres, table).pe.shape == (2, 8, 64)
    assert sum(p.numel() for p in learnable.parameters()) == 3 * 128 + 128 + 128 * 64 + 64


def test_projection_rejects_bad_settings(clip_tiny, dinov2_tiny):
    with pytest.raises(ConfigError, match="trans"):
        VirtualProjection(dinov2_tiny, trans=0.5)
    with pytest.raises(ConfigError, match="line_direction"):
        VirtualProjection(clip_tiny, line_direction=[1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="num_views"):
        VirtualProjection(dinov2_tiny, num_views=9)
    with pytest.raises(ConfigError, match="line_length"):
        VirtualProjection(clip_tiny, line_length=77)
    with pytest.raises(ConfigError, match="plane_size"):
        VirtualProjection(dinov2_tiny, plane_size=[56, 56])
    with pytest.raises(ConfigError, match="pe"):
        VirtualProjection(clip_tiny, pe="rotary")
    with pytest.raises(ValueError, match=r"\(B, G, 3\)"):
        VirtualProjection(clip_tiny)(torch.randn(8, 3), clip_tiny.pos_embed_1d)


def test_pointclip_v1_views_seven_and_eight_bisect_the_side_views():
    """Table 8's 8-view row: the camera axis of views 7 and 8 (``R^T e_z``, where the camera looks
    from) lies half-way between those of views 1 and 2, and of views 3 and 4."""
    rotations = pointclip_view_rotations(8)
    axes = rotations.transpose(1, 2)[:, :, 2]
    for extra, (a, b) in ((6, (0, 1)), (7, (2, 3))):
        bisector = axes[a] + axes[b]
        torch.testing.assert_close(axes[extra], bisector / bisector.norm())
    torch.testing.assert_close(rotations[:6], pointclip_view_rotations(6))  # the first six are PointCLIP's
