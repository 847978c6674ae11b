"""Benchmark the point ops on the Point-PN / guided-adapter workload and compare with reference libraries.

Workload: B = 32 clouds of N = 1024 points; three stages 1024 -> 512 -> 256 -> 128 (FPS, kNN with
k = 64, grouping of the stage's input features), then the adapter's pooling of 128 tokens x 768
channels over 6 views folded into the batch (segment_reduce mean / max into 39 cells, scatter_back)
and voxel ids of the 128 token centres, and one three-NN propagation 128 -> 1024.

Each op is timed per backend (median of ``--repeats`` runs after one warm-up) next to the best
reference library installed: ``fpsample.fps_sampling`` (one call per cloud) for FPS and
``scipy.spatial.cKDTree`` (build + query per cloud, on ``--threads`` workers) for kNN, both CPU
only. The ratio is our time over the reference time (< 1 is faster).

    python scripts/bench_ops.py [--device cpu|cuda] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Hashable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without pip install

from any2point.extensions import (  # noqa: E402
    furthest_point_sample,
    gather,
    group,
    knn,
    scatter_back,
    segment_reduce,
    set_backend,
    three_nn_interpolate,
    voxel_ids,
)

BATCH = 32
NUM_POINTS = 1024
STAGES = [(1024, 512, 96), (512, 256, 192), (256, 128, 384)]  # (N in, N out, feature width)
K = 64
VIEWS, TOKENS, CHANNELS, CELLS = 6, 128, 768, 39


def timed(fns: dict[Hashable, Callable[[], object]], repeats: int, device: torch.device) -> dict[Hashable, float]:
    """Median wall time of each function in milliseconds, after one warm-up run each.

    The functions run interleaved (one round of all, ``repeats`` times), so a change of machine
    load during the run biases no candidate against another.
    """
    for fn in fns.values():
        fn()
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        set_backend(name)
        return fn()

    return run


def fpsample_reference(xyz: np.ndarray, n: int) -> Callable[[], object]:
    import fpsample

    return lambda: [fpsample.fps_sampling(cloud, n, start_idx=0) for cloud in xyz]


def ckdtree_reference(query: np.ndarray, ref: np.ndarray, k: int, workers: int) -> Callable[[], object]:
    from scipy.spatial import cKDTree

    return lambda: [cKDTree(r).query(q, k=k, workers=workers) for q, r in zip(query, ref)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and cKDTree (default: all)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    has_fpsample = importlib.util.find_spec("fpsample") is not None
    has_triton = importlib.util.find_spec("triton") is not None
    has_scipy = importlib.util.find_spec("scipy") is not None
    generator = torch.Generator().manual_seed(0)

    rows: list[tuple[str, str, str, float, str, Optional[float]]] = []

    def measure(
        op: str,
        shape: str,
        ours: dict[str, Callable[[], object]],
        ref: str = "-",
        ref_fn: Optional[Callable[[], object]] = None,
    ) -> None:
        candidates = {("ours", name): fn for name, fn in ours.items()}
        if ref_fn is not None:
            candidates["reference", ref] = ref_fn
        ms = timed(candidates, args.repeats, device)
        for name in ours:
            rows.append((op, shape, name, ms["ours", name], ref, ms.get(("reference", ref))))

    xyz = torch.rand(BATCH, NUM_POINTS, 3, generator=generator).to(device)
    fps_backends = ["torch", "auto"] + (["fpsample"] if on_cpu and has_fpsample else [])
    fps_backends += ["triton"] if not on_cpu and has_triton else []
    for n_in, n_out, width in STAGES:
        points = xyz[:, :n_in].contiguous()
        feats = torch.randn(BATCH, n_in, width, generator=generator).to(device)
        fps_ref = fpsample_reference(points.cpu().numpy(), n_out) if on_cpu and has_fpsample else None
        ours = {
            name: with_backend(name, functools.partial(furthest_point_sample, points, n_out)) for name in fps_backends
        }
        measure("furthest_point_sample", f"{BATCH}x{n_in}->{n_out}", ours, "fpsample" if fps_ref else "-", fps_ref)
        set_backend(None)
        centres = gather(points, furthest_point_sample(points, n_out))
        knn_ref = None
        if on_cpu and has_scipy:
            knn_ref = ckdtree_reference(centres.numpy(), points.numpy(), K, args.threads or -1)
        ours = {"torch": functools.partial(knn, centres, points, K)}
        measure("knn", f"{BATCH}x{n_out}q x {n_in}, k={K}", ours, "scipy cKDTree" if knn_ref else "-", knn_ref)
        idx = knn(centres, points, K)[1]
        measure("group", f"{BATCH}x{n_out}x{K}x{width}", {"torch": functools.partial(group, feats, idx)})

    tokens = torch.randn(BATCH * VIEWS, TOKENS, CHANNELS, generator=generator).to(device)
    cells = torch.randint(0, CELLS, (BATCH * VIEWS, TOKENS), generator=generator).to(device)
    shape = f"{BATCH}*{VIEWS}x{TOKENS}x{CHANNELS} -> {CELLS}"
    for reduce in ("mean", "max"):
        measure(
            f"segment_reduce {reduce}",
            shape,
            {"torch": functools.partial(segment_reduce, tokens, cells, CELLS, reduce)},
        )
    pooled = segment_reduce(tokens, cells, CELLS, "max")
    measure("scatter_back", shape, {"torch": functools.partial(scatter_back, pooled, cells)})
    token_xyz = xyz[:, :TOKENS].contiguous()
    measure("voxel_ids", f"{BATCH}x{TOKENS}, size 0.16", {"torch": functools.partial(voxel_ids, token_xyz, 0.16)})
    known = torch.randn(BATCH, TOKENS, 384, generator=generator).to(device)
    interpolate = functools.partial(three_nn_interpolate, xyz, token_xyz, known)
    measure("three_nn_interpolate", f"{BATCH}x{TOKENS}->{NUM_POINTS}, C=384", {"torch": interpolate})

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"device: {device} ({device_name}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; median of {args.repeats} runs"
    )
    header = ("op", "shape", "backend", "ms", "reference", "ref ms", "ratio")
    table = [
        (
            op,
            shape,
            backend,
            f"{ms:.2f}",
            ref,
            "-" if ref_ms is None else f"{ref_ms:.2f}",
            "-" if ref_ms is None else f"{ms / ref_ms:.2f}",
        )
        for op, shape, backend, ms, ref, ref_ms in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
