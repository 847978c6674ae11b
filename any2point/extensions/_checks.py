"""Input validation shared by the point ops: every bad input gets a ValueError naming the argument."""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Raise unless ``x`` is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_points(x: object, name: str) -> torch.Tensor:
    """Raise unless ``x`` is a finite floating-point (B, N, 3) tensor with B >= 1 and N >= 1."""
    x = check_tensor(x, name)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one sample and one point, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds non-finite coordinates (NaN or inf)")
    return x


def check_int(value: object, name: str, low: int, high: int) -> int:
    """Raise unless ``value`` is an int (not a bool) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_same_batch(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Raise unless the two tensors share batch size and device."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} and {b_name} must have the same batch size, got {a.shape[0]} and {b.shape[0]}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def check_index(idx: object, name: str, upper: int) -> torch.Tensor:
    """Raise unless ``idx`` is an integer tensor whose values all lie in ``[0, upper)``."""
    idx = check_tensor(idx, name)
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.numel() > 0:
        low, high = torch.stack(torch.aminmax(idx.reshape(-1))).tolist()
        if low < 0 or high >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got values in [{low}, {high}]")
    return idx


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Dtype the geometry is computed in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
