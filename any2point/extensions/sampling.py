"""Furthest point sampling (FPS), the centre selection of the Point-PN tokenizer (paper sec. 3).

The classic algorithm: the first pick is ``start``; every later pick is the point whose squared
distance to the nearest already-picked point is largest, ties going to the lowest index. Distances
are computed as ``((x - cx)^2 + (y - cy)^2) + (z - cz)^2`` in the compute dtype (float64 for
float64 inputs, float32 otherwise), so results are reproducible bit for bit. Already-picked points
have distance 0 and stay candidates: when every remaining distance is 0 (e.g. all points equal) the
next pick is the lowest index of all, which may repeat an earlier pick.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from any2point.extensions import backend
from any2point.extensions._checks import check_int, check_points, compute_dtype

FpsFunction = Callable[[torch.Tensor, int, int], torch.Tensor]

# Outcome of the Triton kernel's self-check, per (device, dtype): run once, then trusted or dropped.
_triton_checked: dict[tuple[str, torch.dtype], bool] = {}


def furthest_point_sample(xyz: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Pick ``n`` well-spread points per sample: (B, N, 3) -> LongTensor (B, n) of indices into N.

    Exact FPS (see the module docstring for the order and tie rule). Not differentiable: the
    output is indices. The ``fpsample`` backend (CPU) or the Triton kernel (CUDA) may run instead
    of the torch path (see ``any2point.extensions.backend``); they give identical indices.
    """
    check_points(xyz, "xyz")
    num_points = xyz.shape[1]
    check_int(n, "n", 1, num_points)
    check_int(start, "start", 0, num_points - 1)
    points = xyz.detach().to(compute_dtype(xyz))
    return _select(points)(points, n, start)


def _select(points: torch.Tensor) -> FpsFunction:
    """The implementation for these points under the mode in force."""
    mode = backend.get_backend()
    batch, num_points, _ = points.shape
    if points.device.type == "cpu" and points.dtype == torch.float32:
        faster = torch.get_num_threads() == 1 or batch * num_points <= backend.FPSAMPLE_MAX_POINTS
        if mode == "fpsample" or (mode == "auto" and faster and backend.package_installed("fpsample")):
            return _fps_fpsample
    if points.device.type == "cuda" and mode in ("auto", "triton") and backend.package_installed("triton"):
        from any2point.extensions import _triton_fps

        fits = num_points <= _triton_fps.MAX_POINTS and batch * num_points * 3 < 2**31
        if fits and (mode == "triton" or _triton_passes_self_check(points.device, points.dtype)):
            return _fps_triton
    return _fps_torch


def _fps_torch(points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """Vectorised over the batch; the only loop is over the ``n`` picks."""
    batch, num_points, _ = points.shape
    x, y, z = points.permute(2, 0, 1).contiguous()
    min_dist = torch.full((batch, num_points), float("inf"), dtype=points.dtype, device=points.device)
    dist = torch.empty_like(min_dist)
    term = torch.empty_like(min_dist)
    out = torch.empty(batch, n, dtype=torch.long, device=points.device)
    current = torch.full((batch, 1), start, dtype=torch.long, device=points.device)
    for i in range(n):
        out[:, i : i + 1] = current
        if i == n - 1:
            break
        torch.sub(x, x.gather(1, current), out=dist).square_()
        torch.sub(y, y.gather(1, current), out=term).square_()
        dist.add_(term)
        torch.sub(z, z.gather(1, current), out=term).square_()
        dist.add_(term)
        torch.minimum(min_dist, dist, out=min_dist)
        current = min_dist.argmax(dim=1, keepdim=True)
    return out


def _fps_fpsample(points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """``fpsample.fps_sampling`` per sample (the package has no batched call).

    fpsample computes the same float32 distances but breaks ties towards the highest index, so it
    runs on the points in reversed order (reversed start index) and the indices are mapped back.
    """
    import fpsample

    batch, num_points, _ = points.shape
    reversed_points = points.flip(1).numpy()
    picks = [fpsample.fps_sampling(reversed_points[b], n, start_idx=num_points - 1 - start) for b in range(batch)]
    return (num_points - 1) - torch.from_numpy(np.stack(picks).astype(np.int64))


def _fps_triton(points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    from any2point.extensions import _triton_fps

    return _triton_fps.launch(_triton_fps.fps_kernel, points, n, start)


def _self_check(run: FpsFunction, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``run`` reproduces the torch path on random and tie-heavy clouds on ``device``.

    Any error (e.g. a kernel that fails to compile on this GPU) counts as a failure; both are
    logged as a warning, and the caller falls back to the torch path.
    """
    generator = torch.Generator().manual_seed(0)
    lattice = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), dim=-1).reshape(1, -1, 3)
    probes = [(torch.rand(3, 700, 3, generator=generator), 300, 5), (lattice, 150, 0), (torch.zeros(2, 9, 3), 5, 4)]
    try:
        for cloud, n, start in probes:
            cloud = cloud.to(device=device, dtype=dtype)
            if not torch.equal(run(cloud, n, start), _fps_torch(cloud, n, start)):
                backend.logger.warning("FPS kernel disagrees with the torch path on %s %s: using torch", device, dtype)
                return False
    except Exception as error:  # noqa: BLE001 (a broken optional kernel must not break sampling)
        backend.logger.warning("FPS kernel failed on %s %s (%s): using torch", device, dtype, error)
        return False
    return True


def _triton_passes_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _triton_checked:
        _triton_checked[key] = _self_check(_fps_triton, device, dtype)
    return _triton_checked[key]
