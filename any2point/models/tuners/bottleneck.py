"""Adapter tuning (Houlsby et al. 2019; the paper's Table 2 baseline): a bottleneck adapter after
the attention and after the FFN of every block of a frozen source.

Each adapter reads its sublayer's output ``f`` (B, T, C) and adds ``Up(GELU(Down(f)))`` to it
before the residual add: ``x + f + Up(GELU(Down(f)))``. ``Up`` starts at zero, so the adapted
model starts as the source.
"""
from __future__ import annotations

import functools

import torch.nn as nn
from torch import Tensor

from any2point.models.tuners.base import BlockHooks, Tuner
from any2point.registry import TUNERS
from any2point.errors import ConfigError


class Bottleneck(nn.Module):
    """``(..., C) -> (..., C)``: ``Up(GELU(Down(f)))`` with ``C -> r -> C``, ``Up`` zero-initialised."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: Tensor) -> Tensor:
        return self.up(self.act(self.down(f)))


def _adapted_add(adapter: Bottleneck, x: Tensor, f: Tensor) -> Tensor:
    """The residual add of an adapted sublayer: ``x + f + adapter(f)``."""
    return x + f + adapter(f)


@TUNERS.register()
class AdapterTuning(Tuner):
    """Houlsby bottleneck adapters, two per block (after attention, after the FFN).

    Args:
        dim, depth: the source's width and number of blocks (injected).
        bottleneck: r, the width of every adapter.
    """

    injected_args = ("dim", "depth")

    def __init__(self, dim: int, depth: int, bottleneck: int = 3) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ConfigError(f"adapter tuning bottleneck must be positive, got {bottleneck}")
        self.attn_adapters = nn.ModuleList(Bottleneck(dim, bottleneck) for _ in range(depth))
        self.ffn_adapters = nn.ModuleList(Bottleneck(dim, bottleneck) for _ in range(depth))

    def hooks(self, index: int, context: object) -> BlockHooks:
        return BlockHooks(attn=functools.partial(_adapted_add, self.attn_adapters[index]),
                          ffn=functools.partial(_adapted_add, self.ffn_adapters[index]))
