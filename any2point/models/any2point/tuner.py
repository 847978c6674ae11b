"""The Any2Point tuner: the any-to-3D guided adapter in every block of a frozen source (paper
sec. 3, "Any-to-3D guided adapter"); its building blocks are in :mod:`any2point.models.any2point.adapter`.

Per batch, the projection says which cell every point token is in, in every view
(:meth:`~any2point.models.any2point.projection.VirtualProjection.token_cells`); :meth:`GuidedAdapter.context`
turns that into the pairs of same-cell tokens and the segment ids all blocks share (:class:`GuidanceContext`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import voxel_ids
from any2point.models.any2point.adapter import (AdapterBlock, CellPairs, Pool, ViewLocalAttention, compact_segments,
                                               pool_segments)
from any2point.models.sources.base import Embedded, ResidualHook
from any2point.models.tuners.base import BlockHooks, Tuner
from any2point.models.any2point.projection import CellKind, VirtualProjection
from any2point.registry import TUNERS
from any2point.errors import ConfigError
from any2point.utils.activation_checkpoint import checkpoint as checkpointed

GuidanceKind = Literal["source", "1d", "2d", "3d"]
Position = Literal["after", "before", "parallel"]


@dataclass
class GuidanceContext:
    """Cells and voxels of one batch, shared by the adapters of every block.

    Attributes:
        shape: ``(B, M, G)``.
        pairs: every pair of tokens that share a cell in a view (rows of the flat ``(B, M, G)``
            order; its segments are the cells of ``cell_ids``).
        cell_ids: ``(B * M * G,)`` index of each (sample, view, token)'s non-empty cell; the cells
            are numbered view by view (all cells of view 0 first, then view 1, ...).
        view_of_cell: ``(U,)`` the view of each non-empty cell.
        view_sizes: the number of non-empty cells of each view, ``(M,)`` ints summing to U.
        token_cells: ``(B * G * M,)`` the same cells ordered by (sample, token, view): a gather with
            it gives each token its M views side by side.
        voxel_ids: ``(B * G,)`` index of each (sample, token)'s non-empty voxel (``None`` without the
            cosine ensemble, which alone uses the 3D branch).
        num_voxels: number of non-empty voxels in the batch.
        cells_per_view: with ``dense_cell_norm``, the number of cells of each view in the batch,
            empty ones included (samples x cells per sample); else ``None``.
    """

    shape: tuple[int, int, int]
    pairs: CellPairs
    cell_ids: Tensor
    view_of_cell: Tensor
    view_sizes: list[int]
    token_cells: Tensor
    voxel_ids: Optional[Tensor]
    num_voxels: int
    cells_per_view: Optional[int] = None


def ensemble_views(cells: Tensor, voxels: Tensor, context: GuidanceContext, eps: float = 1e-8) -> Tensor:
    """The cosine ensemble ``sum_v w_v F_v`` of each token's M views, ``w_v = (cos(F_v, B3) + 1) / 2``
    normalised over the views (``F.cosine_similarity``'s clamped norms).

    ``cells (U, C)`` are the views' per-cell features, ``voxels (B, G, C)`` each token's 3D-branch
    feature -> ``(B, G, C)``, at least float32. The products run in float32 (or wider) even under
    autocast: in bf16 they were the adapter's slowest operations on the CPU. The views' norms are
    taken once per cell.
    """
    b, m, g = context.shape
    c = cells.shape[-1]
    with torch.autocast(cells.device.type, enabled=False):
        dtype = torch.promote_types(cells.dtype, torch.float32)
        cells, flat = cells.to(dtype), voxels.to(dtype).reshape(b * g, 1, c)
        views = cells.index_select(0, context.token_cells).view(b * g, m, c)
        norms = torch.linalg.vector_norm(cells, dim=-1).clamp_min(eps).index_select(0, context.token_cells)
        norms = norms.view(b * g, m) * torch.linalg.vector_norm(flat, dim=-1).clamp_min(eps)
        weights = ((views * flat).sum(dim=-1) / norms + 1) / 2
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return (weights.unsqueeze(-1) * views).sum(dim=1).view(b, g, c)


@TUNERS.register()
class GuidedAdapter(Tuner):
    """Any2Point's tuner: the any-to-3D guided adapters of all blocks, after each block's FFN, on a
    frozen source (its final norm trains).

    :meth:`prepare` builds the batch's :class:`GuidanceContext` once from the projection (the cell of
    every token in every view); :meth:`hooks` gives block ``i`` its adapter as the FFN hook.

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
        voxel_size: voxel side of the 3D branch, on the centres in the projection's frame (the unit sphere by
            default).
        ensemble: weight the views by their cosine agreement with the 3D branch; else average them
            (and build no 3D branch).
        local_aggregation: ``false`` leaves the bottleneck alone, a plain bottleneck MLP adapter: no
            local attentions, no cells, no per-view batch norms (the paper's Table 5, first row; needs
            ``ensemble: false``, which has nothing to weigh then).
        position: ``after`` the FFN (the paper: the bottleneck reads the FFN output), ``parallel``
            (the bottleneck reads the FFN's input stream), or ``before`` (the adapter transforms the
            stream before the FFN output is added).
        insert_depth: adapt only the first ``insert_depth`` blocks (default: all).
        projection: the virtual projection (injected): checked to be able to cut the guidance's cells.
        dense_cell_norm: the per-view batch norms take their training statistics over every cell of
            the plane or line, empty ones as zero rows, as the released code did (docs/method.md
            deviation 5; identical in eval mode); default off: over the cells that hold tokens.
        checkpoint: in training, keep only the input of each block's guided branch for backward and
            run the branch again there (activation checkpointing): the branch's per-view tensors
            ``(B, M, G, C)`` are most of the adapters' memory, their FLOPs a small part of the step.
            The running statistics of its batch norms are updated once.
    """

    injected_args = ("dim", "depth", "num_views", "projection")

    def __init__(self, dim: int, depth: int, num_views: int, bottleneck: int = 16, scale: float = 0.3,
                 dropout: float = 0.1, coef: float = 0.3, attn_dim: int = 12, attn_heads: int = 6,
                 pool: Pool = "mean", guidance: GuidanceKind = "source", cell_size: Optional[float] = None,
                 voxel_size: float = 0.08, ensemble: bool = True, local_aggregation: bool = True,
                 position: Position = "after",
                 insert_depth: Optional[int] = None, projection: Optional[VirtualProjection] = None,
                 dense_cell_norm: bool = False, checkpoint: bool = True) -> None:
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
        self.dense_cell_norm, self.checkpoint = dense_cell_norm, checkpoint
        self.local_aggregation = local_aggregation
        if dense_cell_norm and guidance == "3d":
            raise ConfigError("adapter dense_cell_norm needs cells of a line or plane (guidance 3d has none)")
        if not local_aggregation and ensemble:
            raise ConfigError("adapter local_aggregation: false leaves no views for the ensemble to weigh; "
                              "set ensemble: false too")
        self.local_attention = ViewLocalAttention(num_views, dim, attn_dim, attn_heads) if local_aggregation else None
        self.blocks = nn.ModuleList(AdapterBlock(dim, bottleneck, dropout, num_views, ensemble, local_aggregation)
                                    for _ in range(insert_depth))
        if projection is not None and local_aggregation:
            projection.check_cells(self.cell_kind(projection), self.guidance_cell_size(), "adapter")

    def cell_kind(self, projection: VirtualProjection) -> CellKind:
        """The kind of the guidance's cells; ``source`` is the projection's own (1D or 2D)."""
        if self.guidance != "source":
            return self.guidance
        return "1d" if projection.modality_dim == 1 else "2d"

    def guidance_cell_size(self) -> Optional[float]:
        """The cell side asked for (3D cells default to the voxel size)."""
        return self.cell_size if self.guidance != "3d" else (self.cell_size or self.voxel_size)

    def prepare(self, embedded: Embedded) -> Optional[GuidanceContext]:
        """The batch's :class:`GuidanceContext` from the projection's cells of every token (``None``
        without local aggregation, which alone uses them)."""
        if not self.local_aggregation:
            return None
        projection, projected = embedded.projection, embedded.projected
        cells, num_cells = projection.cells_and_count(projected, self.cell_kind(projection),
                                                      self.guidance_cell_size())
        return self.context(cells, projected.xyz, num_cells)

    def context(self, cells: Tensor, xyz: Tensor, num_cells: int = 0) -> GuidanceContext:
        """Build the batch's :class:`GuidanceContext` from the cell of each token in each view
        ``(B, M, G)``, the centres in the projection's frame ``(B, G, 3)`` (voxelised here for the 3D
        branch) and the number of cells of a sample's line or plane (for ``dense_cell_norm``)."""
        b, m, g = cells.shape
        # Rows ordered (view, sample) so that each view's cells are numbered together.
        by_view, cell_row = compact_segments(cells.transpose(0, 1).reshape(m * b, g))
        view_of_cell = cell_row // b
        view_sizes = torch.bincount(view_of_cell, minlength=m).tolist()
        cell_ids = by_view.view(m, b, g).transpose(0, 1).flatten()
        token_cells = cell_ids.view(b, m, g).transpose(1, 2).flatten()
        shared = ((b, m, g), CellPairs.of(cell_ids), cell_ids, view_of_cell, view_sizes, token_cells)
        dense = b * num_cells if self.dense_cell_norm else None
        if not self.ensemble:
            return GuidanceContext(*shared, None, 0, dense)
        voxel_index, voxel_row = compact_segments(voxel_ids(xyz, self.voxel_size))
        return GuidanceContext(*shared, voxel_index, voxel_row.numel(), dense)

    def hook(self, index: int, context: GuidanceContext) -> Optional[ResidualHook]:
        """The FFN hook of block ``index``, or ``None`` past ``insert_depth`` (plain ``x + f``)."""
        if index >= self.insert_depth:
            return None
        return functools.partial(self._forward_block, self.blocks[index], context)

    def hooks(self, index: int, context: GuidanceContext) -> BlockHooks:
        return BlockHooks(ffn=self.hook(index, context))

    def _forward_block(self, block: AdapterBlock, context: GuidanceContext, x: Tensor, f: Tensor) -> Tensor:
        guide = self._guide
        if not self.local_aggregation:
            guide = _bottleneck_only
        elif self.checkpoint and self.training and torch.is_grad_enabled():
            guide = functools.partial(checkpointed, self._guide)
        if self.position == "after":
            return guide(block, context, x + f + self.scale * block.bottleneck(f))
        if self.position == "parallel":
            return guide(block, context, x + f + self.scale * block.bottleneck(x))
        return guide(block, context, x + self.scale * block.bottleneck(x)) + f

    def _guide(self, block: AdapterBlock, context: GuidanceContext, z: Tensor) -> Tensor:
        """The guided branch on the point tokens of ``z (B, 1 + G, C)``; the cls token passes."""
        b, m, g = context.shape
        cls, points = z[:, :1], z[:, 1:]
        c = points.shape[-1]
        pooled = self._pool_cells(context, points)
        cells = F.gelu(block.view_norm(pooled, context.view_of_cell, context.cells_per_view))
        if self.ensemble:
            flat = points.reshape(b * g, c)
            groups = torch.zeros(context.num_voxels, dtype=torch.long, device=z.device)
            if context.num_voxels == b * g:  # a token per voxel: its max + mean is twice the token
                voxels = F.gelu(block.voxel_norm(2 * flat, groups))
            else:
                pooled3d = pool_segments(flat, context.voxel_ids, context.num_voxels, "maxmean")
                voxels = F.gelu(block.voxel_norm(pooled3d, groups)).index_select(0, context.voxel_ids)
            guided = ensemble_views(cells, voxels.view(b, g, c), context)
        else:
            guided = cells.index_select(0, context.token_cells).view(b * g, m, c).mean(dim=1)
        return torch.cat([cls, points + self.coef * guided.view(b, g, c)], dim=1)

    def _pool_cells(self, context: GuidanceContext, points: Tensor) -> Tensor:
        """The local attention's output ``x + attention_v(LN_v(x))`` pooled per non-empty cell of each
        view: ``(B, G, C) -> (U, C)``. A mean is linear, so it averages the tokens and the heads'
        outputs (``attn_dim`` wide) per cell before the projection, and never builds the
        ``(B, M, G, C)`` per-view tokens; max + mean pools those tokens per cell."""
        b, m, g = context.shape
        c = points.shape[-1]
        pairs, num_cells = context.pairs, context.view_of_cell.numel()
        if self.pool == "maxmean":
            local = self.local_attention(points, pairs).reshape(b * m * g, c)
            return pool_segments(local, context.cell_ids, num_cells, "maxmean")
        per_pair = self.local_attention.attend(points, pairs)
        sizes = pairs.sizes.to(per_pair.dtype)[:, None]
        # Per cell, its pairs' weighted values sum to the sum of its tokens' heads.
        mean_heads = per_pair.new_zeros(num_cells, per_pair.shape[1]).index_add_(0, pairs.segment, per_pair) / sizes
        tokens = points.reshape(b * g, c).to(per_pair.dtype)
        sum_x = tokens.new_zeros(num_cells, c)
        for view_cells in context.cell_ids.view(b, m, g).unbind(1):  # M adds, no (B, M, G, C) copy
            sum_x.index_add_(0, view_cells.flatten(), tokens)
        return sum_x / sizes + self.local_attention.project_cells(mean_heads, context.view_sizes)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, coef={self.coef}, pool={self.pool}, guidance={self.guidance}, "
                f"cell_size={self.cell_size}, voxel_size={self.voxel_size}, ensemble={self.ensemble}, "
                f"local_aggregation={self.local_aggregation}, "
                f"position={self.position}, insert_depth={self.insert_depth}, dense_cell_norm={self.dense_cell_norm}, "
                f"checkpoint={self.checkpoint}")


def _bottleneck_only(block: AdapterBlock, context: Optional[GuidanceContext], z: Tensor) -> Tensor:
    """No guided branch (``local_aggregation: false``): the bottleneck's output passes unchanged."""
    return z
