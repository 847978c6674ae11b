"""k-nearest-neighbour search and three-nearest-neighbour interpolation (feature propagation).

Squared distances are computed exactly as ``((qx - rx)^2 + (qy - ry)^2) + (qz - rz)^2`` in the
compute dtype (float64 if an input is float64, float32 otherwise), never through the
``|q|^2 + |r|^2 - 2 q.r`` expansion, whose cancellation misorders close neighbours of points far
from the origin. Neighbours come in ascending distance, equal distances (duplicate points) in
ascending index: the order is fully determined, on every device. Queries are processed in chunks so
the (B, chunk, N) distance block stays small (cache-sized on CPU, bounded on GPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from any2point.extensions._checks import (
    check_int,
    check_points,
    check_same_batch,
    check_tensor,
    compute_dtype,
)
from any2point.extensions.grouping import gather

# Elements of one (B, chunk, N) distance block: ~2 MiB of float32 on CPU (measured fastest), 64 MiB on GPU.
_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_DEFAULT_CHUNK_ELEMENTS = 1 << 24
_LOW_32_BITS = 0xFFFFFFFF


def _squared_distances(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, M, 3), (B, N, 3) -> (B, M, N) exact squared distances."""
    dist = (query[..., 0, None] - ref[:, None, :, 0]).square_()
    term = (query[..., 1, None] - ref[:, None, :, 1]).square_()
    dist.add_(term)
    torch.sub(query[..., 2, None], ref[:, None, :, 2], out=term).square_()
    return dist.add_(term)


def _smallest_k_prefiltered(dist: torch.Tensor, k: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``_smallest_k`` of a float32 CPU block, selecting among ~k candidates per row instead of N.

    The first ``s * 2k`` columns (``s = N // 2k``) form 2k strided groups; the k-th smallest group
    minimum is a bound with at least k distances <= it in its row (minima of distinct columns), so
    the k smallest all lie in {dist <= bound}. One flat sort of (row, distance bits, column) keys
    then orders the candidates per row by (distance, index): exactly ``_smallest_k``'s result.
    None where it does not pay (N < 8k, measured; ties flooding the bound) or the keys need > 63 bits.
    """
    *lead, num = dist.shape
    bits = dist.reshape(-1, num).view(torch.int32)  # non-negative floats order like their bits
    col_bits = max(1, (num - 1).bit_length())
    if num < 8 * k or 31 + col_bits + (bits.shape[0] - 1).bit_length() > 63:
        return None
    group_min = bits[:, : num // (2 * k) * (2 * k)].view(bits.shape[0], -1, 2 * k).amin(1)
    bound = group_min.topk(k, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    row, col = (bits <= bound).nonzero(as_tuple=True)
    if row.numel() > 2 * k * bits.shape[0]:
        return None
    key = bits[row, col].to(torch.int64).bitwise_left_shift_(col_bits).bitwise_or_(col)
    key = key.bitwise_or_(row.bitwise_left_shift(31 + col_bits)).sort().values
    counts = torch.bincount(row, minlength=bits.shape[0])
    key = key[(counts.cumsum(0) - counts)[:, None] + torch.arange(k)].view(*lead, k)
    values = key.bitwise_right_shift(col_bits).bitwise_and_(0x7FFFFFFF).to(torch.int32).view(torch.float32)
    return values, key.bitwise_and_((1 << col_bits) - 1)


def _smallest_k(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, N) -> the k smallest along N, ordered by (distance, index)."""
    if dist.dtype == torch.float32:
        found = _smallest_k_prefiltered(dist, k) if dist.device.type == "cpu" else None
        if found is not None:
            return found
        # Non-negative floats order like their bit patterns, so (bits << 32 | index) is one int64
        # key whose order is exactly (distance, index); a plain top-k on it is deterministic.
        index = torch.arange(dist.shape[-1], device=dist.device)
        key = dist.view(torch.int32).to(torch.int64).bitwise_left_shift_(32).bitwise_or_(index)
        # Unsorted selection then a sort of the k survivors: ~10% faster than a sorted top-k on CPU.
        key = key.topk(k, dim=-1, largest=False, sorted=False).values.sort(dim=-1).values
        idx = key.bitwise_and(_LOW_32_BITS)
        return key.bitwise_right_shift(32).to(torch.int32).view(torch.float32), idx
    values, idx = dist.sort(dim=-1, stable=True)
    return values[..., :k], idx[..., :k]


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``ref`` points of each query: (B, M, 3), (B, N, 3) -> (B, M, k), (B, M, k).

    Returns ``(dist2, idx)``: squared distances in the compute dtype (float32 for float32 or
    half-precision inputs, float64 if either input is float64) in ascending order, ties in ascending
    index, and the LongTensor of indices into N. Not differentiable (the output is a selection).
    """
    check_points(query, "query")
    check_points(ref, "ref")
    check_same_batch(query, "query", ref, "ref")
    batch, num_queries, _ = query.shape
    num_ref = ref.shape[1]
    check_int(k, "k", 1, num_ref)
    dtype = compute_dtype(query, ref)
    query = query.detach().to(dtype)
    ref = ref.detach().to(dtype)
    budget = _CHUNK_ELEMENTS.get(query.device.type, _DEFAULT_CHUNK_ELEMENTS)
    chunk = max(1, budget // (batch * num_ref))
    parts = [_smallest_k(_squared_distances(query[:, s : s + chunk], ref), k) for s in range(0, num_queries, chunk)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def three_nn_interpolate(
    xyz: torch.Tensor, known_xyz: torch.Tensor, known_feats: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Propagate features to new points: (B, N, 3), (B, M, 3), (B, M, C) -> (B, N, C).

    Each target point takes the inverse-distance weighted mean of the features of its 3 nearest
    known points (all of them when M < 3): weights ``1 / (d + eps)`` with ``d`` the Euclidean
    distance, normalised to sum to 1 (PointNet++ feature propagation). Differentiable w.r.t.
    ``known_feats``; the weights are treated as constants. Weighting runs in float32 (float64 for
    float64 features) and the result has ``known_feats``' dtype.
    """
    check_points(xyz, "xyz")
    check_points(known_xyz, "known_xyz")
    check_same_batch(xyz, "xyz", known_xyz, "known_xyz")
    check_tensor(known_feats, "known_feats")
    if known_feats.dim() != 3 or known_feats.shape[:2] != known_xyz.shape[:2]:
        expected = f"{tuple(known_xyz.shape[:2])} + (C,)"
        raise ValueError(f"known_feats must have shape (B, M, C) = {expected}, got {tuple(known_feats.shape)}")
    if not known_feats.is_floating_point():
        raise ValueError(f"known_feats must be a floating-point tensor, got {known_feats.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    check_same_batch(known_xyz, "known_xyz", known_feats, "known_feats")
    dist2, idx = knn(xyz, known_xyz, min(3, known_xyz.shape[1]))
    acc = torch.float64 if known_feats.dtype == torch.float64 else torch.float32
    weight = 1.0 / (dist2.to(acc).sqrt() + eps)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    # One (B, N, C) gather per neighbour rank, never the (B, N, k, C) block.
    out = gather(known_feats, idx[..., 0]).to(acc) * weight[..., :1]
    for j in range(1, idx.shape[-1]):
        out.addcmul_(gather(known_feats, idx[..., j]).to(acc), weight[..., j : j + 1])
    return out.to(known_feats.dtype)
