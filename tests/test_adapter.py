"""Any-to-3D guided adapter: the grouped BatchNorm and the batched local attention against
per-group / per-view references, cell masking, the whole guided branch against a brute-force loop
over samples, views, cells and voxels, the position variants, and parameter counts."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from any2point.models.any2point.adapter import (CellPairs, GroupedBatchNorm, ViewLocalAttention, compact_segments,
                                               pair_attention)
from any2point.models.any2point.tuner import GuidedAdapter, ensemble_views
from any2point.errors import ConfigError
from any2point.utils.attention import attention


def _batch_norm_like(norm: GroupedBatchNorm, group: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(norm.running_mean.shape[1])
    with torch.no_grad():
        bn.weight.copy_(norm.weight[group])
        bn.bias.copy_(norm.bias[group])
        bn.running_mean.copy_(norm.running_mean[group])
        bn.running_var.copy_(norm.running_var[group])
    return bn


def test_grouped_batch_norm_equals_one_batch_norm_per_group():
    torch.manual_seed(0)
    norm = GroupedBatchNorm(3, 5)
    with torch.no_grad():
        for weight, bias in zip(norm.weight, norm.bias):
            weight.uniform_(0.5, 1.5)
            bias.normal_()
    x = torch.randn(20, 5) * 3 + 1
    group = torch.tensor([0] * 8 + [1] * 12)
    references = [_batch_norm_like(norm, g) for g in range(3)]
    out = norm(x, group)
    for g in (0, 1):
        torch.testing.assert_close(out[group == g], references[g](x[group == g]))
        torch.testing.assert_close(norm.running_mean[g], references[g].running_mean)
        torch.testing.assert_close(norm.running_var[g], references[g].running_var)
    torch.testing.assert_close(norm.running_mean[2], torch.zeros(5))
    torch.testing.assert_close(norm.running_var[2], torch.ones(5))
    norm.eval()
    for g in (0, 1):
        references[g].eval()
        torch.testing.assert_close(norm(x, group)[group == g], references[g](x[group == g]))


def _reference_local_attention(attn: ViewLocalAttention, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per sample, per view and per head: LayerNorm, attention over same-cell tokens, projection."""
    b, g, c = x.shape
    m, d, h = attn.num_views, attn.attn_dim, attn.heads
    out = torch.empty(b, m, g, c)
    for i in range(b):
        for v in range(m):
            normed = attn.norms[v](x[i])
            qkv = (normed @ attn.qkv[v].weight.T + attn.qkv[v].bias).reshape(g, 3, h, d // h)
            heads = []
            for head in range(h):
                q, k, val = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
                scores = q @ k.T * d ** -0.5
                scores = scores.masked_fill(cells[i, v][:, None] != cells[i, v][None, :], float("-inf"))
                heads.append(scores.softmax(dim=-1) @ val)
            out[i, v] = x[i] + torch.cat(heads, dim=-1) @ attn.proj[v].weight.T + attn.proj[v].bias
    return out


def _adapter(**kwargs) -> GuidedAdapter:
    torch.manual_seed(0)
    adapter = GuidedAdapter(dim=16, depth=2, num_views=3, bottleneck=4, attn_dim=6, attn_heads=3, **kwargs)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(mean=1.0 if "norm" in name and "weight" in name else 0.0, std=0.2)
    return adapter


def test_local_attention_matches_per_view_reference():
    adapter = _adapter()
    x = torch.randn(2, 12, 16)
    cells = torch.randint(0, 4, (2, 3, 12))
    context = adapter.context(cells, torch.rand(2, 12, 3))
    out = adapter.local_attention(x, context.pairs)
    torch.testing.assert_close(out, _reference_local_attention(adapter.local_attention, x, cells),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_attention_of_narrow_cpu_inputs_runs_in_float32(mask: Optional[str]) -> None:
    """``attention`` on bf16 CPU inputs: float32 SDPA of their values, rounded back to bf16 (not
    bf16 SDPA, which rounds differently); float32 inputs: PyTorch's SDPA itself."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, 20, 4) for _ in range(3))
    cells = torch.randint(0, 5, (6, 20))
    same = (cells[:, :, None] == cells[:, None, :])[:, None]
    attn_mask = {None: None, "bool": same, "float": torch.zeros(same.shape).masked_fill(~same, -1e4)}[mask]
    narrow = [t.to(torch.bfloat16) for t in (q, k, v)]
    narrow_mask = attn_mask.to(torch.bfloat16) if mask == "float" else attn_mask
    ours = attention(*narrow, attn_mask=narrow_mask, scale=0.4)
    wide = F.scaled_dot_product_attention(*(t.float() for t in narrow), attn_mask=attn_mask, scale=0.4)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, wide.to(torch.bfloat16), atol=0, rtol=0)
    assert not torch.equal(ours, F.scaled_dot_product_attention(*narrow, attn_mask=narrow_mask, scale=0.4))
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    assert torch.equal(attention(q, k, v, attn_mask=attn_mask), plain)


def test_under_cpu_bf16_autocast_the_ensemble_runs_in_float32():
    """The cosine ensemble of bf16 features computes (and returns) float32: exactly the ensemble of
    their float32 values."""
    adapter = _adapter()
    cells = torch.randint(0, 4, (2, 3, 12))
    context = adapter.context(cells, torch.rand(2, 12, 3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.randn(context.view_of_cell.numel(), 16).to(torch.bfloat16)
        voxels = torch.randn(2, 12, 16).to(torch.bfloat16)
        ensembled = ensemble_views(features, voxels, context)
    assert ensembled.dtype == torch.float32
    torch.testing.assert_close(ensembled, ensemble_views(features.float(), voxels.float(), context), atol=0, rtol=0)


def test_cell_mask_confines_the_local_attention():
    adapter = _adapter()
    x = torch.randn(1, 12, 16)
    cells = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]] * 3)[None]
    context = adapter.context(cells, torch.rand(1, 12, 3))
    before = adapter.local_attention(x, context.pairs)
    changed = x.clone()
    changed[0, 5] = torch.randn(16) * 3
    after = adapter.local_attention(changed, context.pairs)
    other_cells = [i for i in range(12) if i // 3 != 1]
    torch.testing.assert_close(after[0, :, other_cells], before[0, :, other_cells], atol=1e-6, rtol=0)
    assert (after[0, :, 3] - before[0, :, 3]).abs().max() > 1e-3


def test_ensemble_equals_torchs_cosine_weighting_of_the_gathered_views():
    """Per-cell norms and batched matmuls against F.cosine_similarity on every (token, view), values
    and gradients."""
    adapter = _adapter()
    cells = torch.randint(0, 4, (2, 3, 12))
    context = adapter.context(cells, torch.rand(2, 12, 3))
    num_cells = context.view_of_cell.numel()
    torch.manual_seed(0)
    features = torch.randn(num_cells, 8, dtype=torch.float64, requires_grad=True)
    voxels = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        features[0] = 0.0  # a zero vector: both clamp its norm
    ours = ensemble_views(features, voxels, context)
    views = features[context.cell_ids].view(2, 3, 12, 8)
    weights = (F.cosine_similarity(views, voxels[:, None], dim=-1) + 1) / 2
    reference = ((weights / weights.sum(1, keepdim=True))[..., None] * views).sum(1)
    torch.testing.assert_close(ours, reference)
    g = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, [features, voxels], g),
                         torch.autograd.grad(reference, [features, voxels], g)):
        torch.testing.assert_close(got, want)


def test_compact_segments_numbers_nonempty_segments_per_row():
    ids = torch.tensor([[3, 1, 3], [0, 0, 2]])
    segment, row = compact_segments(ids)
    assert segment.tolist() == [1, 0, 1, 2, 2, 3]
    assert row.tolist() == [0, 0, 1, 1]


def test_cell_pairs_are_every_ordered_pair_of_rows_in_a_segment():
    torch.manual_seed(0)
    segment, _ = compact_segments(torch.randint(0, 7, (5, 30)))
    pairs = CellPairs.of(segment)
    same = segment[:, None] == segment[None, :]
    want = sorted(map(tuple, same.nonzero().tolist()))
    assert sorted(zip(pairs.query.tolist(), pairs.key.tolist())) == want
    assert torch.equal(pairs.query, pairs.query.sort().values)
    assert torch.equal(pairs.segment, segment[pairs.query]) and torch.equal(pairs.segment, segment[pairs.key])
    assert torch.equal(pairs.sizes, torch.bincount(segment)) and pairs.rows == segment.numel()


def test_pair_attention_equals_masked_softmax_attention_and_runs_in_float32_under_cpu_autocast():
    torch.manual_seed(0)
    segment, _ = compact_segments(torch.randint(0, 4, (1, 20)))
    pairs = CellPairs.of(segment)
    q, k, v = (torch.randn(20, 3, 2) for _ in range(3))
    rows = torch.zeros(20, 3, 2).index_add(0, pairs.query, pair_attention(q, k, v, pairs, 0.7))
    same = (segment[:, None] == segment[None, :])[None]
    dense = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=same, scale=0.7)
    torch.testing.assert_close(rows, dense.transpose(0, 1), atol=1e-6, rtol=1e-6)
    narrow = [t.to(torch.bfloat16) for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pair_attention(*narrow, pairs, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pair_attention(*(t.float() for t in narrow), pairs, 0.7), atol=0, rtol=0)


def _reference_guide(adapter: GuidedAdapter, index: int, z: torch.Tensor, cells: torch.Tensor,
                     unit: torch.Tensor) -> torch.Tensor:
    """The guided branch by loops over samples, views, cells and voxels (the adapter's BN mode)."""
    block = adapter.blocks[index]
    b, t, c = z.shape
    m = cells.shape[1]
    points = z[:, 1:]
    local = _reference_local_attention(adapter.local_attention, points, cells)
    views = torch.empty(b, m, t - 1, c)
    for v in range(m):
        pooled, members = [], []
        for i in range(b):
            for cell in cells[i, v].unique():
                idx = (cells[i, v] == cell).nonzero()[:, 0]
                value = local[i, v, idx].mean(0)
                if adapter.pool == "maxmean":
                    value = value + local[i, v, idx].amax(0)
                pooled.append(value)
                members.append((i, idx))
        bn = _batch_norm_like(block.view_norm, v).train(adapter.training)
        for (i, idx), value in zip(members, F.gelu(bn(torch.stack(pooled)))):
            views[i, v, idx] = value
    if not adapter.ensemble:
        return torch.cat([z[:, :1], points + adapter.coef * views.mean(1)], dim=1)
    pooled, members = [], []
    for i in range(b):
        grid = torch.floor((unit[i] - unit[i].amin(0)) / adapter.voxel_size)
        for key in grid.unique(dim=0):
            idx = (grid == key).all(-1).nonzero()[:, 0]
            pooled.append(points[i, idx].amax(0) + points[i, idx].mean(0))
            members.append((i, idx))
    voxels = torch.empty(b, t - 1, c)
    for (i, idx), value in zip(members, F.gelu(_batch_norm_like(block.voxel_norm, 0).train(adapter.training)(torch.stack(pooled)))):
        voxels[i, idx] = value
    weights = (F.cosine_similarity(views, voxels[:, None], dim=-1) + 1) / 2
    weights = weights / weights.sum(1, keepdim=True)
    return torch.cat([z[:, :1], points + adapter.coef * (weights[..., None] * views).sum(1)], dim=1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool, ensemble, voxel_size", [("mean", True, 0.5), ("maxmean", True, 0.5),
                                                       ("mean", False, 0.5), ("mean", True, 1e-3)])
def test_guided_branch_matches_brute_force(pool, ensemble, voxel_size, training):
    """Values and gradients (input and local attention), with batch and running statistics; the mean
    pool averages before the projection, and voxel_size 1e-3 puts every token in its own voxel (the
    branch skips the voxel pooling)."""
    adapter = _adapter(pool=pool, ensemble=ensemble, coef=0.7, voxel_size=voxel_size).train(training)
    with torch.no_grad():
        for buffer in adapter.buffers():
            buffer.uniform_(0.5, 1.5)
    z = torch.randn(2, 13, 16, requires_grad=True)
    cells = torch.randint(0, 4, (2, 3, 12))
    unit = torch.rand(2, 12, 3) * 2 - 1
    context = adapter.context(cells, unit)
    assert (context.num_voxels == 24) == (voxel_size < 0.01)
    out = adapter._guide(adapter.blocks[1], context, z)
    reference = _reference_guide(adapter, 1, z, cells, unit)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], z[:, 0])
    inputs = [z, *adapter.local_attention.parameters()]  # the reference copies the batch norms' parameters
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(reference, inputs, g)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", ["after", "parallel", "before"])
def test_bottleneck_position(position):
    adapter = _adapter(position=position, coef=0.0, scale=0.5).eval()
    x, f = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    context = adapter.context(torch.randint(0, 3, (2, 3, 8)), torch.rand(2, 8, 3))
    out = adapter.hook(0, context)(x, f)
    block = adapter.blocks[0]
    expected = {"after": x + f + 0.5 * block.bottleneck(f), "parallel": x + f + 0.5 * block.bottleneck(x),
                "before": x + 0.5 * block.bottleneck(x) + f}[position]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("position", ["after", "parallel", "before"])
def test_without_local_aggregation_the_adapter_is_the_bottleneck_alone(position):
    """The paper's Table 5 row 1: no cells, attentions or batch norms; only the bottleneck."""
    adapter = GuidedAdapter(dim=16, depth=2, num_views=3, bottleneck=4, scale=0.5, position=position,
                            local_aggregation=False, ensemble=False).train()
    assert adapter.local_attention is None and adapter.blocks[0].view_norm is None
    assert sum(p.numel() for p in adapter.parameters()) == 2 * (16 * 4 + 4 + 4 * 16 + 16)
    x, f = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    block = adapter.blocks[1]
    block.drop.p = 0.0
    expected = {"after": x + f + 0.5 * block.up(block.act(block.down(f))),
                "parallel": x + f + 0.5 * block.up(block.act(block.down(x))),
                "before": x + 0.5 * block.up(block.act(block.down(x))) + f}[position]
    torch.testing.assert_close(adapter.hook(1, None)(x, f), expected)
    with pytest.raises(ConfigError, match="set ensemble: false too"):
        GuidedAdapter(dim=16, depth=2, num_views=3, local_aggregation=False)


def test_parameter_counts_and_insert_depth():
    adapter = GuidedAdapter(dim=768, depth=12, num_views=6, bottleneck=16)
    assert sum(p.numel() for p in adapter.local_attention.parameters()) == 235_224
    assert sum(p.numel() for p in adapter.blocks[0].parameters()) == 36_112
    assert sum(p.numel() for p in adapter.parameters()) == 235_224 + 12 * 36_112
    shallow = GuidedAdapter(dim=16, depth=4, num_views=2, bottleneck=4, insert_depth=2)
    assert len(shallow.blocks) == 2
    context = shallow.context(torch.zeros(1, 2, 5, dtype=torch.long), torch.rand(1, 5, 3))
    assert shallow.hook(1, context) is not None and shallow.hook(2, context) is None
    no_ensemble = GuidedAdapter(dim=16, depth=1, num_views=2, bottleneck=4, ensemble=False)
    assert no_ensemble.blocks[0].voxel_norm is None


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="divisible"):
        GuidedAdapter(dim=16, depth=2, num_views=2, attn_dim=12, attn_heads=5)
    with pytest.raises(ConfigError, match="insert_depth"):
        GuidedAdapter(dim=16, depth=2, num_views=2, insert_depth=3)
    with pytest.raises(ConfigError, match="pool"):
        GuidedAdapter(dim=16, depth=2, num_views=2, pool="sum")
    with pytest.raises(ConfigError, match="voxel_size"):
        GuidedAdapter(dim=16, depth=2, num_views=2, voxel_size=0.0)
