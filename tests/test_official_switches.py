"""The switches that reproduce the released code's deviations from the paper (docs/method.md, "Where the
official code differs from the paper"): each is off by default, and each, switched on, equals a
straightforward (loop or hand-written) computation of what the released code does."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from any2point import build_model
from any2point.models import build_source
from any2point.models.any2point.adapter import GroupedBatchNorm
from any2point.models.sources.clip_text import CLIPTextSource
from any2point.models.sources.imagebind_audio import BiasKVAttention, ImageBindAudioSource
from any2point.models.any2point.classifier import Any2Point, ClassificationHead
from any2point.models.any2point.tuner import GuidedAdapter
from any2point.models.any2point.projection import (VirtualProjection, official_grid_view, official_line_positions,
                                         official_plane_positions, pointclip_line_directions,
                                         pointclip_view_rotations, sample_table_1d_official, sample_table_2d,
                                         scramble_2d)
from any2point.models.any2point.tokenizer import PointPNTokenizer, normalize_offsets
from any2point.models.sources.base import Embedded
from tests.conftest import TINY_SOURCES

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(source: str, **overrides) -> Any2Point:
    torch.manual_seed(0)
    cfg = dict(type="Any2Point", num_classes=5, source=TINY_SOURCES[source],
               tokenizer=dict(type="PointPNTokenizer", k=16),
               tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5))
    cfg.update(overrides)
    return build_model(cfg)


# ------------------------------------------------------------------------------------- off by default

SWITCHES = [
    (CLIPTextSource, "official_seq_first_bug", False),
    (ImageBindAudioSource, "official_plain_qkv", False),
    (PointPNTokenizer, "norm", "scan"),
    (VirtualProjection, "frame", "unit_sphere"),
    (VirtualProjection, "line_index", "paper"),
    (VirtualProjection, "plane_index", "paper"),
    (VirtualProjection, "official_grid_view", False),
    (VirtualProjection, "pe_2d_scramble", False),
    (GuidedAdapter, "dense_cell_norm", False),
    (Any2Point, "head_hidden_bias", True),
    (Any2Point, "pe_injection", None),  # once for 1D/2D sources; a 3D-pretrained source was pretrained so
    (Any2Point, "random_cls_pos", False),
    (Any2Point, "final_norm_eps", None),
    (Any2Point, "block_norm_eps", None),
]


@pytest.mark.parametrize("cls, name, default", SWITCHES, ids=[s[1] for s in SWITCHES])
def test_every_deviation_switch_is_off_by_default(cls, name, default):
    assert inspect.signature(cls).parameters[name].default == default
    # and no config outside cfgs/official turns one on (norm: mn40_batch is the tokenizer's switch)
    key = "mn40_batch" if name == "norm" else f"{name}:"
    for path in ROOT.glob("cfgs/**/*.yaml"):
        if "official" not in path.parts:
            assert key not in path.read_text(), f"{path} sets {key}"


# ------------------------------------------------------------------------------------- 1D positions

def brute_line_positions(xyz: torch.Tensor, directions: torch.Tensor, length: int) -> torch.Tensor:
    b, g, _ = xyz.shape
    out = torch.zeros(b, len(directions), g, dtype=torch.float64)
    for i in range(b):
        mean = [sum(float(xyz[i, n, a]) for n in range(g)) / g for a in range(3)]
        for v, d in enumerate(directions.tolist()):
            t = [sum((float(xyz[i, n, a]) - mean[a]) * d[a] for a in range(3)) for n in range(g)]
            lo, hi = min(t), max(t)
            for n in range(g):
                out[i, v, n] = ((t[n] - lo) / (hi - lo) * length - 0.5) % length
    return out


def brute_table_1d_official(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    last = table.shape[0] - 1
    scale = last / (float(positions.max()) - float(positions.min()))
    out = torch.zeros(*positions.shape, table.shape[1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in positions.shape)).tolist():
        x = float(positions[tuple(idx)]) * scale
        lo, hi = min(max(math.floor(x), 0), last), min(max(math.ceil(x), 0), last)
        out[tuple(idx)] = (hi - x) * table[lo] + (x - lo) * table[hi]
    return out


def test_official_line_positions_equal_a_loop():
    torch.manual_seed(0)
    xyz = torch.randn(2, 9, 3, dtype=torch.float64) * 3 + 5  # any frame: min-max scaled per sample and line
    dirs = pointclip_line_directions([-1.0, 0.0, 1.0])
    got = official_line_positions(xyz, dirs, 77)
    torch.testing.assert_close(got, brute_line_positions(xyz, dirs, 77))
    # every position lies in [0, 77); each line's lowest point wraps round to 76.5
    assert float(got.min()) >= 0 and float(got.max()) < 77
    lowest = torch.einsum("bgc,mc->bmg", xyz, dirs).argmin(dim=-1, keepdim=True)
    assert torch.allclose(got.gather(-1, lowest), torch.full((2, 6, 1), 76.5, dtype=torch.float64))


def test_official_1d_lookup_rescales_by_the_batch_and_zeroes_integers():
    torch.manual_seed(0)
    table = torch.randn(5, 4, dtype=torch.float64)
    positions = torch.tensor([[[0.0, 2.0, 4.0, 1.5]]], dtype=torch.float64)  # range 4 -> scale 1
    got = sample_table_1d_official(table, positions)
    assert torch.equal(got[0, 0, :3], torch.zeros(3, 4, dtype=torch.float64))  # integers read nothing
    torch.testing.assert_close(got[0, 0, 3], 0.5 * table[1] + 0.5 * table[2])
    positions = torch.rand(2, 3, 7, dtype=torch.float64) * 4.2 + 0.3  # scale from the whole batch
    torch.testing.assert_close(sample_table_1d_official(table, positions), brute_table_1d_official(table, positions))


def test_projection_line_index_official_is_the_official_lookup():
    torch.manual_seed(0)
    source = build_source(TINY_SOURCES["clip_text"])
    projection = VirtualProjection(source, lines="pointclip_views", line_direction=[1.0, -1.0, 0.0],
                                   line_index="official")
    centres = torch.randn(3, 10, 3)
    out = projection(centres, source.pos_embed_1d)
    expected = brute_line_positions(centres.double(), projection.directions.double(), 77)
    torch.testing.assert_close(out.positions.double(), expected, atol=1e-4, rtol=0)
    reference = brute_table_1d_official(source.pos_embed_1d.double(), out.positions.double()).mean(dim=1)
    torch.testing.assert_close(out.pe.double(), reference, atol=1e-5, rtol=0)
    cells, count = projection.cells_and_count(out, "1d", 2.0)
    assert count == 39 and torch.equal(cells, torch.floor(out.positions / 2).long())


# ------------------------------------------------------------------------------------- 2D positions

def brute_plane_pixel(p: list[float], rotation: list[list[float]], trans: float, height: int,
                      width: int) -> tuple[float, float]:
    x, y, z = (sum(rotation[i][j] * p[j] for j in range(3)) for i in range(3))
    depth = z + abs(trans) + 1e-12
    u, v = x / depth, y / depth * height / width
    return ((v + 1) * height / 2 - 0.5) % height, ((u + 1) * width / 2 - 0.5) % width


def test_official_plane_positions_equal_the_formula_and_wrap():
    torch.manual_seed(0)
    xyz = torch.randn(2, 6, 3, dtype=torch.float64) * 0.6
    xyz[0, 0] = torch.tensor([0.0, 0.0, 0.0])
    rotations = pointclip_view_rotations(6)
    got = official_plane_positions(xyz, rotations, -1.4, (304, 192))
    for b in range(2):
        for v in range(6):
            for n in range(6):
                row, col = brute_plane_pixel(xyz[b, n].tolist(), rotations[v].tolist(), -1.4, 304, 192)
                torch.testing.assert_close(got[b, v, n], torch.tensor([row, col], dtype=torch.float64))
    # the centre lands half a pixel before the middle; far points wrap instead of clamping
    torch.testing.assert_close(got[0, :, 0], torch.tensor([[151.5, 95.5]] * 6, dtype=torch.float64))
    far = torch.tensor([[[0.0, 3.0, 0.0]]], dtype=torch.float64)  # v > 1 in view 0 (x' = -y)
    pixel = official_plane_positions(far, rotations[:1], -1.4, (10, 10))[0, 0, 0]
    assert 0 <= float(pixel.min()) and float(pixel.max()) < 10


def brute_bilinear_zeros(table: torch.Tensor, row: float, col: float, plane: tuple[int, int]) -> torch.Tensor:
    rows, cols, _ = table.shape
    y, x = row / (plane[0] - 1) * (rows - 1), col / (plane[1] - 1) * (cols - 1)
    out = torch.zeros(table.shape[-1], dtype=table.dtype)
    for r, wr in ((math.floor(y), 1 - (y - math.floor(y))), (math.floor(y) + 1, y - math.floor(y))):
        for c, wc in ((math.floor(x), 1 - (x - math.floor(x))), (math.floor(x) + 1, x - math.floor(x))):
            if 0 <= r < rows and 0 <= c < cols:
                out += wr * wc * table[r, c]
    return out


def test_table_sampling_with_zero_padding_reads_zeros_past_the_last_pixel():
    torch.manual_seed(0)
    table = torch.randn(3, 5, 4, dtype=torch.float64)
    pixels = torch.tensor([[47.6, 79.5], [10.0, 20.0], [47.0, 79.0]], dtype=torch.float64)
    got = sample_table_2d(table, pixels, (48, 80), padding="zeros")
    for i, (row, col) in enumerate(pixels.tolist()):
        torch.testing.assert_close(got[i], brute_bilinear_zeros(table, row, col, (48, 80)))
    assert not torch.allclose(got[0], sample_table_2d(table, pixels, (48, 80))[0])  # border padding differs


def test_official_grid_view_rereads_the_flat_table():
    table = torch.arange(3 * 5 * 2).reshape(3, 5, 2)
    view = official_grid_view(table)
    flat = table.reshape(15, 2)
    assert view.shape == (5, 3, 2)
    for i in range(5):
        for j in range(3):
            assert torch.equal(view[i, j], flat[3 * i + j])  # row i, column j = entry 3 i + j
    square = torch.randn(4, 4, 2)
    assert torch.equal(official_grid_view(square), square)


def test_scramble_2d_is_the_reshape_without_transpose():
    torch.manual_seed(0)
    b, m, g, c = 2, 3, 5, 4
    sampled = torch.randn(b, m, g, c)
    got = scramble_2d(sampled)
    for i in range(b):
        for v in range(m):
            for n in range(g):
                for k in range(c):
                    flat = n * c + k  # the (C, G) output of grid_sample read as (G, C)
                    assert got[i, v, n, k] == sampled[i, v, flat % g, flat // g]


def test_projection_official_2d_on_a_non_square_plane():
    torch.manual_seed(0)
    source = build_source(TINY_SOURCES["imagebind_audio"])
    assert source.plane_size == (48, 80) and source.pos_embed_2d.shape[:2] == (3, 5)
    projection = VirtualProjection(source, frame="data", trans=-1.4, plane_index="official",
                                   official_grid_view=True, pe_2d_scramble=True)
    assert projection.view_plane == (80, 48)  # camera x across 48 px, y across 80 px
    centres = torch.randn(2, 7, 3) * 0.4 + 0.1
    out = projection(centres, source.pos_embed_2d)
    assert torch.equal(out.xyz, centres)  # the data frame, not the unit sphere
    rotations = pointclip_view_rotations(6)
    table = official_grid_view(source.pos_embed_2d).double()
    sampled = torch.zeros(2, 6, 7, 64, dtype=torch.float64)
    for b in range(2):
        for v in range(6):
            for n in range(7):
                row, col = brute_plane_pixel(centres[b, n].double().tolist(), rotations[v].tolist(), -1.4, 80, 48)
                torch.testing.assert_close(out.positions[b, v, n].double(), torch.tensor([row, col], dtype=torch.float64),
                                           atol=1e-4, rtol=0)
                sampled[b, v, n] = brute_bilinear_zeros(table, row, col, (80, 48))
    torch.testing.assert_close(out.pe.double(), scramble_2d(sampled).mean(dim=1), atol=1e-5, rtol=0)
    cells, count = projection.cells_and_count(out, "2d", 16.0)
    assert count == 15
    expected = torch.floor(out.positions[..., 0] / 16).long() * 3 + torch.floor(out.positions[..., 1] / 16).long()
    assert torch.equal(cells, expected)


def test_frame_data_voxelises_the_centres_as_given():
    torch.manual_seed(0)
    model = tiny_model("dinov2", projection=dict(type="VirtualProjection", frame="data", trans=-1.4))
    centres = torch.randn(2, 8, 3) * 5
    out = model.projection(centres, model.source.pos_embed_2d)
    assert torch.equal(out.xyz, centres)
    context = model.tuner.prepare(Embedded(centres, centres, None, model.source, out, model.projection))
    from any2point.extensions import voxel_ids
    ids = voxel_ids(centres, 0.5)
    for b in range(2):  # the same tokens share a voxel as in a per-sample voxel grid of the raw centres
        same = context.voxel_ids.reshape(2, 8)[b, :, None] == context.voxel_ids.reshape(2, 8)[b, None, :]
        assert torch.equal(same, ids[b, :, None] == ids[b, None, :])


# ------------------------------------------------------------------------------------- the model

def block_io(model: Any2Point, points: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Inputs and outputs of every source block, and the tokenizer / projection outputs."""
    inputs, outputs, seen = [], [], {}
    original = model.source.forward_block

    def forward_block(index, x, *args, **kwargs):
        inputs.append(x.detach().clone())
        out = original(index, x, *args, **kwargs)
        outputs.append(out.detach().clone())
        return out

    model.source.forward_block = forward_block
    hook = model.tokenizer.register_forward_hook(lambda m, i, o: seen.update(tokens=o[1].detach()))
    hook2 = model.projection.register_forward_hook(lambda m, i, o: seen.update(pe=o.pe.detach()))
    try:
        with torch.no_grad():
            model(points)
    finally:
        del model.source.forward_block
        hook.remove()
        hook2.remove()
    return inputs, outputs, seen


@pytest.mark.parametrize("injection", ["once", "every_block", "every_block_plus_initial"])
def test_pe_injection_schedules(injection):
    model = tiny_model("dinov2", pe_injection=injection).eval()
    torch.manual_seed(1)
    inputs, outputs, seen = block_io(model, torch.randn(2, 256, 3))
    b = 2
    pos = torch.cat([model.cls_pos_embed.expand(b, -1, -1), seen["pe"]], dim=1)
    start = torch.cat([model.cls_token.expand(b, -1, -1), seen["tokens"]], dim=1)
    if injection != "every_block":
        start = start + pos
    added = pos if injection != "once" else torch.zeros_like(pos)
    torch.testing.assert_close(inputs[0], start + added)
    for i in range(1, len(inputs)):
        torch.testing.assert_close(inputs[i], outputs[i - 1] + added)


def test_grouped_batch_norm_over_the_dense_table_equals_batch_norm_with_zero_rows():
    torch.manual_seed(0)
    norm = GroupedBatchNorm(2, 4)
    with torch.no_grad():
        for p in (*norm.weight, *norm.bias):
            p.copy_(torch.randn(4))
    x = torch.randn(5, 4)
    group = torch.tensor([0, 1, 0, 0, 1])
    out = norm.train()(x, group, rows_per_group=6)
    for g in range(2):
        reference = nn.BatchNorm1d(4).train()
        with torch.no_grad():
            reference.weight.copy_(norm.weight[g])
            reference.bias.copy_(norm.bias[g])
        rows = x[group == g]
        dense = torch.cat([rows, torch.zeros(6 - len(rows), 4)])  # the empty cells
        expected = reference(dense)[:len(rows)]
        torch.testing.assert_close(out[group == g], expected)
        torch.testing.assert_close(norm.running_mean[g], reference.running_mean)
        torch.testing.assert_close(norm.running_var[g], reference.running_var)


def test_dense_cell_norm_counts_every_cell_of_the_batch():
    model = tiny_model("clip_text", tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5,
                                                dense_cell_norm=True))
    torch.manual_seed(1)
    centres, _ = model.tokenizer(torch.randn(3, 256, 3))
    out = model.projection(centres, model.source.pos_embed_1d)
    assert model.tuner.prepare(Embedded(centres, centres, None, model.source, out, model.projection)
                               ).cells_per_view == 3 * 39
    default = tiny_model("clip_text")
    assert default.tuner.prepare(Embedded(centres, centres, None, default.source, out, default.projection)
                                 ).cells_per_view is None


def test_head_without_hidden_biases_has_the_official_count():
    head = ClassificationHead(1536, (256, 256), 15, 0.5, hidden_bias=False)
    assert head[0].bias is None and head[4].bias is None and head[8].bias is not None
    assert sum(p.numel() for p in head.parameters()) == 463_631
    assert sum(p.numel() for p in ClassificationHead(1536, (256, 256), 15, 0.5).parameters()) == 464_143


def test_random_cls_pos_ignores_the_source_position():
    default = tiny_model("dinov2")
    torch.testing.assert_close(default.cls_pos_embed.data, default.source.cls_pos_embed)
    switched = tiny_model("dinov2", random_cls_pos=True)
    assert not torch.allclose(switched.cls_pos_embed, switched.source.cls_pos_embed)
    assert 0.005 < float(switched.cls_pos_embed.detach().std()) < 0.05  # N(0, 0.02)
    torch.testing.assert_close(switched.cls_token.data, switched.source.cls_token)  # the token itself is kept


def test_norm_eps_overrides_reach_every_layer_norm():
    default = tiny_model("dinov2")
    assert default.source.norm.eps == 1e-6
    model = tiny_model("dinov2", final_norm_eps=1e-2, block_norm_eps=0.5)
    assert model.source.norm.eps == 1e-2
    block_norms = [m for m in model.source.blocks.modules() if isinstance(m, nn.LayerNorm)]
    assert len(block_norms) == 4 and all(m.eps == 0.5 for m in block_norms)
    assert all(m.eps == 1e-5 for m in model.tuner.local_attention.norms)  # the adapter's own norms keep theirs
    x = torch.randn(3, 64)
    norm = model.source.norm
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-2) * norm.weight + norm.bias)


def test_imagebind_plain_qkv_is_attention_without_the_bias_tokens():
    torch.manual_seed(0)
    attn = BiasKVAttention(64, 4)
    x = torch.randn(2, 7, 64)
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = [(t.reshape(2, 7, 4, 16).transpose(1, 2)) for t in (q, k, v)]
    weights = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / 4.0, dim=-1)  # 16 ** -0.5
    expected = attn.out_proj((weights @ heads[2]).transpose(1, 2).reshape(2, 7, 64))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, plain_qkv=True), expected)
        assert not torch.allclose(attn(x), expected, atol=1e-4)
    source = build_source({**TINY_SOURCES["imagebind_audio"], "official_plain_qkv": True})
    assert all(block.plain_qkv for block in source.blocks)


def test_mn40_batch_std_divides_by_the_std_of_the_whole_batch():
    torch.manual_seed(0)
    offsets = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    offsets[1] *= 5  # per-sample stds differ: a per-sample norm would give another answer
    values = offsets.flatten().tolist()
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    torch.testing.assert_close(normalize_offsets(offsets, "mn40_batch"), offsets / (std + 1e-5))
    assert not torch.allclose(normalize_offsets(offsets, "mn40"), offsets / (std + 1e-5))
