"""Prompt tuning, VPT-deep (Jia et al. 2022; the paper's Table 2 baseline): learnable prompt tokens
prepended in every block of a frozen source.

Before block ``i`` the ``P`` prompt slots between the class token and the point tokens hold block
``i``'s own prompts ``(P, C)``: ``x (B, 1 + [P +] G, C) -> (B, 1 + P + G, C)`` (block 0 inserts
them; later blocks overwrite what the previous block made of its prompts). The classifier drops the
prompt slots after the last block.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from any2point.models.tuners.base import Tuner
from any2point.registry import TUNERS
from any2point.errors import ConfigError


@TUNERS.register()
class PromptTuning(Tuner):
    """``num_prompts`` learnable tokens per block (VPT-deep), Xavier-uniform initialised.

    Args:
        dim, depth: the source's width and number of blocks (injected).
        num_prompts: P, the prompt length of every block.
        dropout: dropout on the prompts.
    """

    injected_args = ("dim", "depth")

    def __init__(self, dim: int, depth: int, num_prompts: int = 13, dropout: float = 0.0) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ConfigError(f"prompt tuning num_prompts must be positive, got {num_prompts}")
        self.num_prompts = num_prompts
        bound = math.sqrt(6.0 / (2 * dim))
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, dim).uniform_(-bound, bound))
        self.drop = nn.Dropout(dropout)

    def enter_block(self, index: int, x: Tensor, context: object) -> Tensor:
        prompts = self.drop(self.prompts[index]).to(x.dtype).expand(x.shape[0], -1, -1)
        rest = x[:, 1:] if index == 0 else x[:, 1 + self.num_prompts:]
        return torch.cat([x[:, :1], prompts, rest], dim=1)

    def extra_repr(self) -> str:
        return f"depth={self.prompts.shape[0]}, num_prompts={self.num_prompts}"
