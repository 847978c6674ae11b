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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86 AVX512-BF16 or AMX), where bf16
    autocast pays; elsewhere the bf16 matmuls are emulated and slower than fp32."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)


def uses_bf16(device: torch.device, train) -> bool:
    """Whether a run on ``device`` computes under bf16 autocast: ``train.amp`` on CUDA,
    ``train.cpu_amp`` on the CPU (``auto``: where :func:`cpu_has_bf16`; off by default)."""
    if device.type == "cuda":
        return bool(train.amp)
    cpu_amp = train.get("cpu_amp", False)
    return cpu_has_bf16() if cpu_amp == "auto" else bool(cpu_amp)


def precision_note(device: torch.device, train) -> str:
    """How a run computes (:func:`uses_bf16`), for the log: ``bf16 autocast`` or ``float32``, and the
    key that decided."""
    bf16 = uses_bf16(device, train)
    key = "train.amp" if device.type == "cuda" else "train.cpu_amp"
    value = train.amp if device.type == "cuda" else train.get("cpu_amp", False)
    why = f": {'this CPU has' if bf16 else 'this CPU lacks'} native bf16 matmuls" if value == "auto" else ""
    return f"{'bf16 autocast' if bf16 else 'float32'} ({key}={value}{why})"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16`` (see :func:`uses_bf16`), else full precision."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
