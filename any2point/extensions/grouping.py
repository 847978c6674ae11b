"""Batched gathering of points or features by index, and neighbourhood grouping (Point-PN stages)."""

from __future__ import annotations

from typing import Optional

import torch

from any2point.extensions._checks import check_index, check_same_batch, check_tensor


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample indexing along dim 1: (B, N, *F), (B, *I) -> (B, *I, *F).

    ``out[b, i...] = x[b, idx[b, i...]]``. Differentiable w.r.t. ``x``; any dtype (bf16 included).
    ``idx`` must be an integer tensor with values in [0, N).
    """
    return _gather(x, "x", idx, "idx")


def _gather(x: torch.Tensor, x_name: str, idx: torch.Tensor, idx_name: str) -> torch.Tensor:
    check_tensor(x, x_name)
    check_tensor(idx, idx_name)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape (B, N, ...), got {tuple(x.shape)}")
    if idx.dim() < 1:
        raise ValueError(f"{idx_name} must have shape (B, ...), got a 0-d tensor")
    check_same_batch(x, x_name, idx, idx_name)
    batch, num_points = x.shape[:2]
    check_index(idx, idx_name, num_points)
    offsets = torch.arange(batch, device=idx.device).view(-1, *([1] * (idx.dim() - 1))) * num_points
    rows = (idx.long() + offsets).reshape(-1)
    out = x.reshape(batch * num_points, -1).index_select(0, rows)
    return out.view(*idx.shape, *x.shape[2:])


def group(x: torch.Tensor, idx: torch.Tensor, center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neighbourhoods: (B, N, C), idx (B, M, k) -> (B, M, k, C), optionally relative to centres.

    With ``center`` of shape (B, M, C) the centre of each neighbourhood is subtracted from its
    members (e.g. local xyz offsets). Differentiable w.r.t. ``x`` and ``center``.
    """
    check_tensor(x, "x")
    check_tensor(idx, "idx")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, C), got {tuple(x.shape)}")
    if idx.dim() != 3:
        raise ValueError(f"idx must have shape (B, M, k), got {tuple(idx.shape)}")
    grouped = gather(x, idx)
    if center is None:
        return grouped
    check_tensor(center, "center")
    check_same_batch(x, "x", center, "center")
    expected = (x.shape[0], idx.shape[1], x.shape[2])
    if tuple(center.shape) != expected:
        raise ValueError(f"center must have shape (B, M, C) = {expected}, got {tuple(center.shape)}")
    return grouped - center.unsqueeze(2)
