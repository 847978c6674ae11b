"""The any-to-3D guided adapter (paper sec. 3, "Any-to-3D guided adapter";
docs/method.md, "The method").

Sits where each frozen block adds its FFN output ``f`` to the residual stream ``x`` (the source's
``ffn_hook``), on tokens ``(B, 1 + G, C)``:

1. bottleneck: ``z = x + f + s * Up(Drop(QuickGELU(Down(f))))``;
2. on the G point tokens (the cls token is split off and re-attached), for each of the M views at
   once: LayerNorm -> small multi-head attention masked to tokens of the same cell -> residual;
   pool per cell (mean, or max + mean); BN + GELU; copy back to the tokens: ``F_v (B, M, G, C)``;
3. 3D branch: pool per voxel of the centres (max + mean), BN + GELU, copy back: ``B3 (B, G, C)``;
4. ensemble: ``w_v = (cos(B3, F_v) + 1) / 2`` normalised over the views;
   ``z = z + c * sum_v w_v F_v``.

The M local attentions and their LayerNorms are shared by all blocks (:class:`ViewLocalAttention`);
each block has its own bottleneck, per-view BN and 3D BN (:class:`AdapterBlock`). Cells and voxels
are pooled only where they hold tokens (empty ones take no part in the BN statistics); views,
samples and cells are all batched, without Python loops.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import segment_reduce, voxel_ids
from any2point.models.backbones.base import FFNHook
from any2point.registry import MODELS, ConfigError

Pool = Literal["mean", "maxmean"]
GuidanceKind = Literal["source", "1d", "2d", "3d"]
Position = Literal["after", "before", "parallel"]


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
    optimizer's no-decay rule for 1-D parameters applies to them.
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_groups, self.eps, self.momentum = num_groups, eps, momentum
        self.weight = nn.ParameterList(torch.ones(channels) for _ in range(num_groups))
        self.bias = nn.ParameterList(torch.zeros(channels) for _ in range(num_groups))
        self.register_buffer("running_mean", torch.zeros(num_groups, channels))
        self.register_buffer("running_var", torch.ones(num_groups, channels))

    def forward(self, x: Tensor, group: Tensor) -> Tensor:
        x32 = x.float()
        if self.training:
            counts = torch.bincount(group, minlength=self.num_groups).to(x32.dtype)[:, None]
            zeros = x32.new_zeros(self.num_groups, x32.shape[1])
            mean = zeros.index_add(0, group, x32) / counts.clamp_min(1)
            centred = x32 - mean[group]
            var = zeros.index_add(0, group, centred.square()) / counts.clamp_min(1)
            with torch.no_grad():
                present = counts[:, 0] > 0
                unbiased = var * counts / (counts - 1).clamp_min(1)
                m = self.momentum
                self.running_mean[present] = (1 - m) * self.running_mean[present] + m * mean[present]
                self.running_var[present] = (1 - m) * self.running_var[present] + m * unbiased[present]
        else:
            centred = x32 - self.running_mean[group]
            var = self.running_var
        weight, bias = torch.stack(list(self.weight)), torch.stack(list(self.bias))
        out = centred * torch.rsqrt(var[group] + self.eps) * weight[group] + bias[group]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"groups={self.num_groups}, channels={self.running_mean.shape[1]}, eps={self.eps}, "
                f"momentum={self.momentum}")


class ViewLocalAttention(nn.Module):
    """M per-view LayerNorms + small multi-head attentions (``C -> 3 x attn_dim``, ``heads`` heads,
    ``attn_dim -> C``), each restricted to tokens of the same cell, batched over the views.

    ``x (B, G, C)`` and ``mask (B * M, 1, G, G)`` (True where two tokens share a cell) ->
    ``x + attention_v(LN_v(x))`` for every view: ``(B, M, G, C)``. The attention scale is
    ``attn_dim ** -0.5``, as in the official code. Each view keeps its own ``nn.LayerNorm`` and
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

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
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
        q, k, v = qkv.reshape(b * m, g, 3, h, self.attn_dim // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_dim ** -0.5)
        out = out.transpose(1, 2).reshape(b, m, g, self.attn_dim)
        proj_w = torch.stack([p.weight for p in self.proj])
        proj_b = torch.stack([p.bias for p in self.proj])
        return x[:, None] + torch.einsum("bmgd,mcd->bmgc", out, proj_w) + proj_b[None, :, None]


class AdapterBlock(nn.Module):
    """One block's own adapter parameters: the bottleneck ``C -> r -> C`` and the per-view and 3D
    BatchNorms (the 3D one only when the cosine ensemble is on)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, num_views: int, ensemble: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.view_norm = GroupedBatchNorm(num_views, dim)
        self.voxel_norm = GroupedBatchNorm(1, dim) if ensemble else None
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def bottleneck(self, x: Tensor) -> Tensor:
        """``Up(Drop(QuickGELU(Down(x))))``: ``(..., C) -> (..., C)``."""
        return self.up(self.drop(self.act(self.down(x))))


@dataclass
class GuidanceContext:
    """Cells and voxels of one batch, shared by the adapters of every block.

    Attributes:
        shape: ``(B, M, G)``.
        mask: ``(B * M, 1, G, G)``, True where two tokens share a cell in a view.
        cell_ids: ``(B * M * G,)`` index of each (sample, view, token)'s non-empty cell.
        cell_view: ``(U,)`` view of each non-empty cell.
        voxel_ids: ``(B * G,)`` index of each (sample, token)'s non-empty voxel (``None`` without the
            cosine ensemble, which alone uses the 3D branch).
        num_voxels: number of non-empty voxels in the batch.
    """

    shape: tuple[int, int, int]
    mask: Tensor
    cell_ids: Tensor
    cell_view: Tensor
    voxel_ids: Optional[Tensor]
    num_voxels: int


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


@MODELS.register()
class GuidedAdapter(nn.Module):
    """The any-to-3D guided adapters of all blocks.

    Use :meth:`context` once per batch, then pass ``hook(i, context)`` as block ``i``'s ``ffn_hook``.

    Args:
        dim, depth, num_views: the source's width and number of blocks, and the projection's M
            (injected).
        bottleneck: the bottleneck width r (8 to 16 in the paper's runs).
        scale: s, the bottleneck output's scale.
        dropout: dropout inside the bottleneck.
        coef: c, the weight of the guided branch.
        attn_dim, attn_heads: width and heads of the local attentions (12 and 6: heads of 2).
        pool: per-cell pooling, ``mean`` or ``maxmean`` (max + mean).
        guidance: the cells of the local attention: ``source`` (1D for a 1D source, 2D for a 2D one,
            the paper), or ``1d`` / ``2d`` / ``3d`` (voxels) for the ablation.
        cell_size: side of a cell: rows for 1D (default 2), pixels for 2D (default the source's
            patch size), unit-sphere length for 3D (default ``voxel_size``).
        voxel_size: voxel side of the 3D branch, on the centres normalised to the unit sphere.
        ensemble: weight the views by their cosine agreement with the 3D branch; else average them
            (and build no 3D branch).
        position: ``after`` the FFN (the paper: the bottleneck reads the FFN output), ``parallel``
            (the bottleneck reads the FFN's input stream), or ``before`` (the adapter transforms the
            stream before the FFN output is added).
        insert_depth: adapt only the first ``insert_depth`` blocks (default: all).
    """

    injected_args = ("dim", "depth", "num_views")

    def __init__(self, dim: int, depth: int, num_views: int, bottleneck: int = 16, scale: float = 0.3,
                 dropout: float = 0.1, coef: float = 0.3, attn_dim: int = 12, attn_heads: int = 6,
                 pool: Pool = "mean", guidance: GuidanceKind = "source", cell_size: Optional[float] = None,
                 voxel_size: float = 0.08, ensemble: bool = True, position: Position = "after",
                 insert_depth: Optional[int] = None) -> None:
        super().__init__()
        for key, value, allowed in (("pool", pool, Pool), ("guidance", guidance, GuidanceKind),
                                    ("position", position, Position)):
            if value not in allowed.__args__:
                raise ConfigError(f"adapter {key} must be one of {allowed.__args__}, got '{value}'")
        insert_depth = depth if insert_depth is None else insert_depth
        if not 0 <= insert_depth <= depth:
            raise ConfigError(f"adapter insert_depth must be in 0..{depth}, got {insert_depth}")
        if bottleneck < 1 or voxel_size <= 0 or (cell_size is not None and cell_size <= 0):
            raise ConfigError("adapter bottleneck, voxel_size and cell_size must be positive, got "
                              f"{bottleneck}, {voxel_size}, {cell_size}")
        self.scale, self.coef, self.pool = scale, coef, pool
        self.guidance, self.cell_size, self.voxel_size = guidance, cell_size, voxel_size
        self.ensemble, self.position, self.insert_depth = ensemble, position, insert_depth
        self.local_attention = ViewLocalAttention(num_views, dim, attn_dim, attn_heads)
        self.blocks = nn.ModuleList(AdapterBlock(dim, bottleneck, dropout, num_views, ensemble)
                                    for _ in range(insert_depth))

    def context(self, cells: Tensor, unit_centres: Tensor) -> GuidanceContext:
        """Build the batch's :class:`GuidanceContext` from the cell of each token in each view
        ``(B, M, G)`` and the unit-sphere centres ``(B, G, 3)`` (voxelised here for the 3D branch)."""
        b, m, g = cells.shape
        mask = (cells[..., :, None] == cells[..., None, :]).reshape(b * m, 1, g, g)
        cell_ids, cell_row = compact_segments(cells.reshape(b * m, g))
        if not self.ensemble:
            return GuidanceContext((b, m, g), mask, cell_ids, cell_row % m, None, 0)
        voxel_index, voxel_row = compact_segments(voxel_ids(unit_centres, self.voxel_size))
        return GuidanceContext((b, m, g), mask, cell_ids, cell_row % m, voxel_index, voxel_row.numel())

    def hook(self, index: int, context: GuidanceContext) -> Optional[FFNHook]:
        """The ``ffn_hook`` of block ``index``, or ``None`` past ``insert_depth`` (plain ``x + f``)."""
        if index >= self.insert_depth:
            return None
        return functools.partial(self._forward_block, self.blocks[index], context)

    def _forward_block(self, block: AdapterBlock, context: GuidanceContext, x: Tensor, f: Tensor) -> Tensor:
        if self.position == "after":
            return self._guide(block, context, x + f + self.scale * block.bottleneck(f))
        if self.position == "parallel":
            return self._guide(block, context, x + f + self.scale * block.bottleneck(x))
        return self._guide(block, context, x + self.scale * block.bottleneck(x)) + f

    def _guide(self, block: AdapterBlock, context: GuidanceContext, z: Tensor) -> Tensor:
        """The guided branch on the point tokens of ``z (B, 1 + G, C)``; the cls token passes."""
        b, m, g = context.shape
        cls, points = z[:, :1], z[:, 1:]
        c = points.shape[-1]
        local = self.local_attention(points, context.mask).reshape(b * m * g, c)
        pooled = pool_segments(local, context.cell_ids, context.cell_view.numel(), self.pool)
        views = F.gelu(block.view_norm(pooled, context.cell_view))[context.cell_ids].reshape(b, m, g, c)
        if self.ensemble:
            flat = points.reshape(b * g, c)
            pooled3d = pool_segments(flat, context.voxel_ids, context.num_voxels, "maxmean")
            groups = torch.zeros(context.num_voxels, dtype=torch.long, device=z.device)
            voxels = F.gelu(block.voxel_norm(pooled3d, groups))[context.voxel_ids].reshape(b, 1, g, c)
            weights = (F.cosine_similarity(views, voxels, dim=-1) + 1) / 2
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
            guided = (weights.unsqueeze(-1) * views).sum(dim=1)
        else:
            guided = views.mean(dim=1)
        return torch.cat([cls, points + self.coef * guided], dim=1)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, coef={self.coef}, pool={self.pool}, guidance={self.guidance}, "
                f"cell_size={self.cell_size}, voxel_size={self.voxel_size}, ensemble={self.ensemble}, "
                f"position={self.position}, insert_depth={self.insert_depth}")
