"""Count the operators that make the host wait for a CUDA device.

A training step on a GPU runs ahead of the device as long as the host never needs a value the
device computes: reading a number (``.item()``, ``int(t)``, ``.tolist()``, ``if t:``) or an operator
whose output size depends on the data (``nonzero``, ``unique``, ``masked_select``, a boolean
index, ``bincount`` without a known length, ``repeat_interleave`` without ``output_size``) waits
for everything queued before it. :class:`DeviceWaits` counts such operators at the dispatcher, on
any device, so a CPU run tells how often the same code would wait on a GPU. ``.tolist()`` reads
memory without passing the dispatcher; a function mode entered with the counter counts it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators (overload packets) that read device memory back to the host.
WAITING_OPS = frozenset({
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist() per element
    "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "repeat_interleave",
})


class _ToList(TorchFunctionMode):
    """Counts ``Tensor.tolist`` calls into ``counts``."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", None) == "tolist":
            self.counts["tolist"] += 1
        return func(*args, **(kwargs or {}))


class DeviceWaits(TorchDispatchMode):
    """``with DeviceWaits() as waits: ...`` then ``waits.counts`` (operator -> calls) and
    ``waits.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._tolist = _ToList(self.counts)

    def __enter__(self) -> "DeviceWaits":
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in WAITING_OPS:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
