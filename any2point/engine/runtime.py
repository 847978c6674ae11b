"""Where and how a run computes: the device it picks and the autocast it runs under (processes and
their ranks are :mod:`any2point.engine.distributed`)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from any2point.engine import distributed
from any2point.errors import ConfigError


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; a device this machine
    does not have is a :class:`ConfigError` naming ``key`` (the config key or the flag that asked)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}='{name}' is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine; "
                              f"use {key}=cpu or {key}=auto")
        if device.index is None:
            device = torch.device("cuda", distributed.local_rank())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{key}={name}: only auto, cpu and cuda devices are supported")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; full precision on CPU (no fast bf16 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
