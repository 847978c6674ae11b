"""Building blocks of the any-to-3D guided adapter (paper sec. 3, "Any-to-3D guided adapter"); the
tuner that wires them into the blocks is :class:`any2point.models.any2point.tuner.GuidedAdapter`.

The adapter sits where each frozen block adds its FFN output ``f`` to the residual stream ``x``, on
tokens ``(B, 1 + G, C)``:

1. bottleneck: ``z = x + f + s * Up(Drop(QuickGELU(Down(f))))``;
2. on the G point tokens (the cls token is split off and re-attached), for each of the M views at
   once: LayerNorm -> small multi-head attention among the tokens of the same cell -> residual;
   pool per cell (mean, or max + mean); BN + GELU; copy back to the tokens: ``F_v (B, M, G, C)``;
3. 3D branch: pool per voxel of the centres (max + mean), BN + GELU, copy back: ``B3 (B, G, C)``;
4. ensemble: ``w_v = (cos(B3, F_v) + 1) / 2`` normalised over the views;
   ``z = z + c * sum_v w_v F_v``.

The M local attentions and their LayerNorms are shared by all blocks (:class:`ViewLocalAttention`);
each block has its own bottleneck, per-view BN and 3D BN (:class:`AdapterBlock`). Cells and voxels
are pooled only where they hold tokens (empty ones take no part in the BN statistics, unless
``dense_cell_norm`` asks for the released code's dense table); views,
samples and cells are all batched, without Python loops. The local attention runs over the pairs of
tokens that share a cell (:class:`CellPairs`), a few per token, not over a ``(G, G)`` mask per view:
in the paper's configurations cells hold 2 to 5 of the 128 tokens on average, so such a mask is
96-99% False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import segment_reduce
from any2point.errors import ConfigError
from any2point.utils.activation_checkpoint import is_recomputing

Pool = Literal["mean", "maxmean"]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, CLIP's GELU approximation (the official adapter's activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class GroupedBatchNorm(nn.Module):
    """Batch normalisation of rows ``(R, C)`` that each belong to one of ``num_groups`` groups
    ``(R,)``; every group has its own batch statistics, running statistics and affine parameters.

    Equals an ``nn.BatchNorm1d`` applied to each group's rows separately (a group without rows in a
    batch leaves its running statistics untouched). Statistics are computed in float32. The affine
    parameters are one 1-D tensor per group (``weight.g``, ``bias.g``), like a BatchNorm's, so the
    optimizer's no-decay rule for 1-D parameters applies to them. When activation checkpointing runs
    the forward pass again for backward, the running statistics are not updated a second time.
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_groups, self.eps, self.momentum = num_groups, eps, momentum
        self.weight = nn.ParameterList(torch.ones(channels) for _ in range(num_groups))
        self.bias = nn.ParameterList(torch.zeros(channels) for _ in range(num_groups))
        self.register_buffer("running_mean", torch.zeros(num_groups, channels))
        self.register_buffer("running_var", torch.ones(num_groups, channels))

    def forward(self, x: Tensor, group: Tensor, rows_per_group: Optional[int] = None) -> Tensor:
        """Normalise ``x (R, C)``. ``rows_per_group``: every group has that many rows, those not in
        ``x`` being zero rows that count in the batch statistics (the released code's dense table of
        all cells, empty ones included; docs/method.md deviation 5); ``None``: only the given rows."""
        x32 = x.float()
        weight, bias = torch.stack(list(self.weight)), torch.stack(list(self.bias))
        if not self.training:  # the running statistics folded into one scale and shift per group
            scale = weight * torch.rsqrt(self.running_var + self.eps)
            shift = bias - self.running_mean * scale
            return torch.addcmul(shift.index_select(0, group), x32, scale.index_select(0, group)).to(x.dtype)
        # index_add_, not bincount or boolean masks: no value read back from a GPU.
        present_rows = x32.new_zeros(self.num_groups, 1).index_add_(0, group, x32.new_ones(group.shape[0], 1))
        counts = present_rows if rows_per_group is None else torch.full_like(present_rows, rows_per_group)
        zeros = x32.new_zeros(self.num_groups, x32.shape[1])
        mean = zeros.index_add(0, group, x32) / counts.clamp_min(1)
        centred = x32 - mean.index_select(0, group)
        var = zeros.index_add(0, group, centred.square())
        if rows_per_group is not None:
            var = var + (counts - present_rows) * mean.square()  # the absent zero rows
        var = var / counts.clamp_min(1)
        if not is_recomputing():
            self._update_running_stats(mean, var, counts)
        # Per group first, then one gather each (index_select: its backward is a plain index_add).
        scale = weight * torch.rsqrt(var + self.eps)
        out = centred * scale.index_select(0, group) + bias.index_select(0, group)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, counts: Tensor) -> None:
        """Move the running statistics of the groups with rows towards the batch's ``(groups, C)``."""
        present = counts > 0
        unbiased = var * counts / (counts - 1).clamp_min(1)
        m = self.momentum
        self.running_mean.copy_(torch.where(present, (1 - m) * self.running_mean + m * mean, self.running_mean))
        self.running_var.copy_(torch.where(present, (1 - m) * self.running_var + m * unbiased, self.running_var))

    def extra_repr(self) -> str:
        return (f"groups={self.num_groups}, channels={self.running_mean.shape[1]}, eps={self.eps}, "
                f"momentum={self.momentum}")


@dataclass
class CellPairs:
    """Every ordered pair of rows in the same segment (self pairs included), for attention within
    segments: row ``query[p]`` attends to row ``key[p]``, both in ``segment[p]``; the pairs are ordered
    by query. Rows are those of the flat ``(sample, view, token)`` order; ``sizes (U,)`` counts the
    rows of each segment."""

    query: Tensor
    key: Tensor
    segment: Tensor
    sizes: Tensor
    rows: int

    @classmethod
    def of(cls, segment: Tensor) -> "CellPairs":
        """The pairs of ``segment (R,)``, segments numbered from 0 with none empty (as
        :func:`compact_segments` gives them). Their number is read once (one host sync on a GPU)."""
        order = torch.argsort(segment, stable=True)
        sizes = torch.bincount(segment)
        per_row = sizes.index_select(0, segment)
        ends = per_row.cumsum(0)
        query = torch.repeat_interleave(per_row, output_size=int(ends[-1]))
        within = torch.arange(query.numel(), device=segment.device) - (ends - per_row).index_select(0, query)
        pair_segment = segment.index_select(0, query)
        key = order.index_select(0, (sizes.cumsum(0) - sizes).index_select(0, pair_segment) + within)
        return cls(query, key, pair_segment, sizes, segment.numel())


def pair_attention(q: Tensor, k: Tensor, v: Tensor, pairs: CellPairs, scale: float) -> Tensor:
    """Softmax attention of each row over the rows it pairs with: ``q, k, v (R, heads, head_dim)`` ->
    each pair's weighted value ``p v_key`` ``(P, heads, head_dim)``, whose sum per query row is the
    row's attention output (and per segment, the segment's sum of outputs). Computed in float32 (or
    wider) whatever the inputs' dtype: the sums run over scattered rows."""
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scores = (q.index_select(0, pairs.query) * k.index_select(0, pairs.key)).sum(dim=-1) * scale
        index = pairs.query[:, None].expand_as(scores)
        top = scores.new_full((pairs.rows, scores.shape[1]), float("-inf"))
        top = top.scatter_reduce(0, index, scores.detach(), "amax")  # a shift: no gradient
        weights = (scores - top.index_select(0, pairs.query)).exp()
        totals = weights.new_zeros(top.shape).index_add(0, pairs.query, weights)
        weights = weights / totals.index_select(0, pairs.query)
        return weights.unsqueeze(-1) * v.index_select(0, pairs.key)


class ViewLocalAttention(nn.Module):
    """M per-view LayerNorms + small multi-head attentions (``C -> 3 x attn_dim``, ``heads`` heads,
    ``attn_dim -> C``), each restricted to tokens of the same cell, batched over the views.

    ``x (B, G, C)`` and the pairs of tokens that share a cell in a view (:class:`CellPairs` over the
    flat ``(B, M, G)`` rows) -> ``x + attention_v(LN_v(x))`` for every view: ``(B, M, G, C)``. The
    attention scale is ``attn_dim ** -0.5``, as in the official code. Each view keeps its own ``nn.LayerNorm`` and
    ``nn.Linear`` modules (``norms.v``, ``qkv.v``, ``proj.v``); their weights are stacked per call.
    """

    def __init__(self, num_views: int, dim: int, attn_dim: int = 12, heads: int = 6) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ConfigError(f"adapter attn_dim ({attn_dim}) must be divisible by attn_heads ({heads})")
        self.num_views, self.attn_dim, self.heads = num_views, attn_dim, heads
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_views))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * attn_dim) for _ in range(num_views))
        self.proj = nn.ModuleList(nn.Linear(attn_dim, dim) for _ in range(num_views))
        for linear in (*self.qkv, *self.proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, pairs: CellPairs) -> Tensor:
        b, g, _ = x.shape
        per_pair = self.attend(x, pairs)
        heads = per_pair.new_zeros(pairs.rows, self.attn_dim).index_add_(0, pairs.query, per_pair)
        return x[:, None] + self.project(heads.view(b, self.num_views, g, self.attn_dim))

    def attend(self, x: Tensor, pairs: CellPairs) -> Tensor:
        """The heads' concatenated weighted values of every pair ``(P, attn_dim)`` (float32 or wider):
        summed per query row, the heads' outputs before the projection."""
        b, g, c = x.shape
        m, h = self.num_views, self.heads
        norm_w = torch.stack([n.weight for n in self.norms])
        norm_b = torch.stack([n.bias for n in self.norms])
        qkv_w = torch.stack([q.weight for q in self.qkv])
        qkv_b = torch.stack([q.bias for q in self.qkv])
        normed = F.layer_norm(x, (c,), eps=self.norms[0].eps)
        # LN_v's affine folded into qkv_v: (n * w + b) W^T + q = n (W * w)^T + (W b + q).
        weight = qkv_w * norm_w[:, None, :]
        bias = torch.einsum("mdc,mc->md", qkv_w, norm_b) + qkv_b
        qkv = torch.einsum("bgc,mdc->bmgd", normed, weight) + bias[None, :, None]
        q, k, v = qkv.reshape(b * m * g, 3, h, self.attn_dim // h).unbind(1)
        return pair_attention(q, k, v, pairs, self.attn_dim ** -0.5).flatten(1)

    def project(self, out: Tensor) -> Tensor:
        """Each view's output projection ``(B, M, G, attn_dim) -> (B, M, G, C)``."""
        proj_w = torch.stack([p.weight for p in self.proj])
        proj_b = torch.stack([p.bias for p in self.proj])
        return torch.einsum("bmgd,mcd->bmgc", out, proj_w) + proj_b[None, :, None]

    def project_cells(self, out: Tensor, view_sizes: Sequence[int]) -> Tensor:
        """The output projection of rows ``(U, attn_dim)`` that come view by view, ``view_sizes[v]``
        rows of view ``v``: one matmul per view."""
        per_view = zip(out.split(list(view_sizes)), self.proj)
        return torch.cat([F.linear(rows, proj.weight, proj.bias) for rows, proj in per_view])


class AdapterBlock(nn.Module):
    """One block's own adapter parameters: the bottleneck ``C -> r -> C`` and the per-view and 3D
    BatchNorms (the per-view ones only with local aggregation, the 3D one only when the cosine
    ensemble is on)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, num_views: int, ensemble: bool,
                 local_aggregation: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.view_norm = GroupedBatchNorm(num_views, dim) if local_aggregation else None
        self.voxel_norm = GroupedBatchNorm(1, dim) if ensemble else None
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def bottleneck(self, x: Tensor) -> Tensor:
        """``Up(Drop(QuickGELU(Down(x))))``: ``(..., C) -> (..., C)``."""
        return self.up(self.drop(self.act(self.down(x))))


def compact_segments(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Number the distinct ``(row, id)`` pairs of ``ids (R, G)`` (cells or voxels of each sample and
    view) from 0: returns the segment of each entry ``(R * G,)`` and the row of each segment ``(U,)``;
    only non-empty segments exist."""
    stride = int(ids.max()) + 1
    keys = ids + torch.arange(ids.shape[0], device=ids.device)[:, None] * stride
    unique, segment = torch.unique(keys.flatten(), return_inverse=True)
    return segment, unique // stride


def pool_segments(values: Tensor, ids: Tensor, num: int, pool: Pool) -> Tensor:
    """Mean (or max + mean) of rows ``(R, C)`` per segment ``ids (R,)`` -> ``(num, C)``."""
    out = segment_reduce(values[None], ids[None], num, reduce="mean")[0]
    if pool == "maxmean":
        out = out + segment_reduce(values[None], ids[None], num, reduce="max")[0]
    return out
