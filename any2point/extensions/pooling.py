"""Pooling of tokens per cell or voxel and copying the pooled value back (the guided adapter, sec. 3).

A "segment" is any grouping of the points of one sample: a projected cell of one view, or a voxel
of the 3D branch. Everything is batched with one flat scatter over (sample, segment): no Python
loop over samples, segments or points. Several views fold into the batch dim, e.g. (B*6, N, C).
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

from any2point.extensions._checks import (
    check_index,
    check_int,
    check_points,
    check_same_batch,
    check_tensor,
    compute_dtype,
)
from any2point.extensions.grouping import _gather

# Largest voxel coordinate along an axis (extent / size) that voxel_ids accepts.
_MAX_VOXELS_PER_AXIS = 2**31


def _check_segments(values: torch.Tensor, segment_id: torch.Tensor, num_segments: int) -> None:
    check_tensor(values, "values")
    check_tensor(segment_id, "segment_id")
    if values.dim() != 3:
        raise ValueError(f"values must have shape (B, N, C), got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got {values.dtype}")
    if tuple(segment_id.shape) != tuple(values.shape[:2]):
        raise ValueError(
            f"segment_id must have shape (B, N) = {tuple(values.shape[:2])}, got {tuple(segment_id.shape)}"
        )
    check_same_batch(values, "values", segment_id, "segment_id")
    check_int(num_segments, "num_segments", 1, 2**62)
    check_index(segment_id, "segment_id", num_segments)


def segment_reduce(
    values: torch.Tensor,
    segment_id: torch.Tensor,
    num_segments: int,
    reduce: Literal["mean", "max"] = "mean",
    return_counts: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pool the tokens of each segment: (B, N, C), (B, N) -> (B, S, C) with S = ``num_segments``.

    ``segment_id[b, i]`` in [0, S) names the segment of token i of sample b. ``reduce="mean"``
    averages (accumulating in float32, or float64 for float64 values), ``reduce="max"`` takes the
    channel-wise maximum. An empty segment yields zeros and receives no gradient; with
    ``return_counts=True`` the LongTensor (B, S) of token counts per segment is returned too
    (``counts > 0`` is the non-empty mask). Differentiable w.r.t. ``values``; for "max" the
    gradient of a segment's maximum is shared evenly by the tokens that attain it (as ``torch.amax``).
    The output has the dtype of ``values`` (bf16 included).
    """
    _check_segments(values, segment_id, num_segments)
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    batch, num_points, channels = values.shape
    offsets = torch.arange(batch, device=segment_id.device).unsqueeze(1) * num_segments
    flat_id = (segment_id.long() + offsets).reshape(-1)
    flat_values = values.reshape(batch * num_points, channels)
    counts = torch.bincount(flat_id, minlength=batch * num_segments)
    non_empty = (counts > 0).unsqueeze(1)
    if reduce == "mean":
        acc = torch.float64 if values.dtype == torch.float64 else torch.float32
        sums = flat_values.new_zeros(batch * num_segments, channels, dtype=acc).index_add(
            0, flat_id, flat_values.to(acc)
        )
        pooled = (sums / counts.clamp(min=1).unsqueeze(1).to(acc)).to(values.dtype)
    else:
        # Start from -inf, not 0: scatter_reduce's backward shares the gradient with the initial
        # value when it equals the maximum, even with include_self=False.
        init = flat_values.new_full((batch * num_segments, channels), float("-inf"))
        index = flat_id.unsqueeze(1).expand(-1, channels)
        pooled = init.scatter_reduce(0, index, flat_values, reduce="amax", include_self=False)
        pooled = torch.where(non_empty, pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
    pooled = pooled.view(batch, num_segments, channels)
    if return_counts:
        return pooled, counts.view(batch, num_segments)
    return pooled


def scatter_back(pooled: torch.Tensor, segment_id: torch.Tensor) -> torch.Tensor:
    """Copy each segment's pooled value to its tokens: (B, S, C), (B, N) -> (B, N, C).

    The inverse layout of :func:`segment_reduce`; differentiable w.r.t. ``pooled`` (the gradient of
    a segment sums over its tokens).
    """
    check_tensor(pooled, "pooled")
    check_tensor(segment_id, "segment_id")
    if pooled.dim() != 3:
        raise ValueError(f"pooled must have shape (B, S, C), got {tuple(pooled.shape)}")
    if segment_id.dim() != 2:
        raise ValueError(f"segment_id must have shape (B, N), got {tuple(segment_id.shape)}")
    return _gather(pooled, "pooled", segment_id, "segment_id")


def voxel_ids(xyz: torch.Tensor, size: float) -> torch.Tensor:
    """Per-sample voxel index of each point: (B, N, 3) -> LongTensor (B, N).

    Each sample's coordinates are shifted by that sample's per-axis minimum, and a point lies in
    voxel ``floor((p - min) / size)`` (computed in float32, float64 for float64 inputs, with a true
    division on every device). The occupied voxels of sample b are numbered 0..V_b-1 in
    lexicographic order of their integer (x, y, z) grid coordinates, so ``ids.max(1) + 1`` is the
    number of voxels and the ids can feed :func:`segment_reduce` directly.
    """
    check_points(xyz, "xyz")
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size <= 0:
        raise ValueError(f"size must be a positive finite number, got {size!r}")
    points = xyz.detach().to(compute_dtype(xyz))
    batch, num_points, _ = points.shape
    relative = points - points.amin(dim=1, keepdim=True)
    # A 0-d tensor divisor (not a Python scalar): CUDA would otherwise multiply by the reciprocal.
    grid = torch.floor(relative / torch.full((), size, dtype=points.dtype, device=points.device))
    largest = float(grid.max())
    if largest >= _MAX_VOXELS_PER_AXIS:
        raise ValueError(
            f"size={size} is too small for the extent of xyz: {largest:.3g} voxels along an axis "
            f"(at most {_MAX_VOXELS_PER_AXIS})"
        )
    sample = torch.arange(batch, device=points.device).view(batch, 1, 1).expand(batch, num_points, 1)
    keys = torch.cat([sample, grid.long()], dim=2).reshape(batch * num_points, 4)
    inverse = torch.unique(keys, dim=0, return_inverse=True)[1].view(batch, num_points)
    return inverse - inverse.amin(dim=1, keepdim=True)
