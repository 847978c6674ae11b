"""Distributed data parallel through the standard launcher (``torchrun --nproc_per_node=N``).

Without torchrun's environment variables everything runs in one process and these helpers are
no-ops. With them, NCCL is used on CUDA and Gloo on CPU; rank 0 alone writes logs and checkpoints.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_launched() -> bool:
    """True when started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun; pick the backend from the device."""
    if is_launched() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (returns the input unchanged in a single process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank, reproducible from ``(seed, epoch)``.

    Training: a permutation drawn from ``(seed, epoch)``, trimmed to a multiple of ``world`` and dealt
    round-robin, so the union of the ranks' i-th batches equals the single-process i-th batch when
    the per-rank batch is the global batch divided by the world size. Evaluation (``shuffle=False``):
    every index exactly once over all ranks, no padding, so all-reduced metrics count each sample once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        usable = len(perm) - len(perm) % self.world
        return perm[self.rank:usable:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
