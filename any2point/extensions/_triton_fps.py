"""Triton kernel for furthest point sampling on GPU: one program per cloud, every pick on chip.

The torch path launches ~8 small kernels per pick (4,000 launches for 1024 -> 512); this kernel
keeps the cloud and the running distances in registers and loops over the picks inside a single
launch. It performs the same IEEE operations in the same order as the torch path (floating-point
contraction into FMA is disabled at launch) and takes the first maximum, so the indices are identical.
Imported only when Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest cloud the kernel holds in registers; larger clouds use the torch path.
MAX_POINTS = 8192


def fps_kernel_source(xyz_ptr, out_ptr, num_points, n, start, BLOCK: tl.constexpr):  # noqa: N803 (Triton constexpr)
    """Un-decorated kernel body: ``triton.jit`` turns it into a GPU kernel (or an interpreted one)."""
    cloud = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    valid = offsets < num_points
    base = xyz_ptr + cloud * num_points * 3
    x = tl.load(base + offsets * 3, mask=valid, other=0.0)
    y = tl.load(base + offsets * 3 + 1, mask=valid, other=0.0)
    z = tl.load(base + offsets * 3 + 2, mask=valid, other=0.0)
    # Padding lanes sit at -1, below any real distance, so they are never picked.
    min_dist = tl.where(valid, tl.full([BLOCK], float("inf"), x.dtype), tl.full([BLOCK], -1.0, x.dtype))
    current = start
    tl.store(out_ptr + cloud * n, current.to(tl.int64))
    for i in range(1, n):
        dx = x - tl.load(base + current * 3)
        dy = y - tl.load(base + current * 3 + 1)
        dz = z - tl.load(base + current * 3 + 2)
        dist = (dx * dx + dy * dy) + dz * dz
        min_dist = tl.minimum(min_dist, dist)
        current = tl.argmax(min_dist, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(out_ptr + cloud * n + i, current.to(tl.int64))


def build_kernel() -> triton.JITFunction:
    """Compile-on-first-launch kernel; an interpreted one on CPU when ``TRITON_INTERPRET=1`` is set.

    The scalar arguments are never specialised (Triton would turn a value of 1 into a constant).
    """
    return triton.jit(fps_kernel_source, do_not_specialize=["num_points", "n", "start"])


fps_kernel = build_kernel()


def launch(kernel: triton.JITFunction, points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """Run ``kernel`` on contiguous (B, N, 3) float32/float64 points: -> LongTensor (B, n)."""
    batch, num_points, _ = points.shape
    block = triton.next_power_of_2(num_points)
    out = torch.empty(batch, n, dtype=torch.long, device=points.device)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    kernel[(batch,)](
        points.contiguous(), out, num_points, n, start, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False
    )
    return out
