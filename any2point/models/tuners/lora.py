"""LoRA (Hu et al. 2022; the paper's Table 2 baseline): low-rank updates of the attention
projections of a frozen source.

For each targeted projection (``q``, ``k``, ``v``, output ``o``) of every block, with weight rows
``W_t`` (out, in): ``W_t + (alpha / r) B_t A_t``, ``A_t`` (r, in) Kaiming-uniform, ``B_t`` (out, r)
zero, so the adapted model starts as the source.

Where the projections live is the source's business
(:meth:`~any2point.models.sources.base.SourceTransformer.attention_weights`): separate ``nn.Linear``
layers (transformers encoders), or one fused weight holding q, k and v as row blocks (open_clip's
``nn.MultiheadAttention.in_proj_weight``, timm's ``qkv`` Linear, ImageBind's attention). Hugging Face
``peft`` adapts whole ``nn.Linear`` modules, so it cannot put LoRA on q and v alone of a fused
weight; this module does both layouts the same way: :class:`LoRAWrapper` replaces the module that
owns the weights and runs the original module with ``W + delta`` substituted
(``torch.func.functional_call``), whatever its forward does with them. The original module stays
inside, frozen, as ``base``: checkpoints hold only ``lora_A`` / ``lora_B``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from any2point.models.sources.base import AttentionWeight, SourceTransformer
from any2point.models.tuners.base import Tuner
from any2point.registry import TUNERS
from any2point.errors import ConfigError

TARGETS = ("q", "k", "v", "o")


def _key(param: str, target: str) -> str:
    """Parameter-dict key of one (weight, projection) pair: ``in_proj_weight__q``."""
    return f"{param.replace('.', '__')}__{target}"


class LoRAWrapper(nn.Module):
    """A module with low-rank updates on row blocks of some of its weights.

    ``forward(*args, **kwargs)`` is ``base``'s forward with every adapted weight replaced by
    ``W + scale * delta``, where ``delta`` is zero except ``B_t A_t`` on each target's rows.

    Args:
        base: the original module (kept, frozen by the tuner, as the child ``base``).
        weights: the adapted weights of ``base`` (``param`` relative to ``base``) with the rows of
            each target to update.
        rank, alpha: r and alpha; the update is scaled by ``alpha / r``.
    """

    def __init__(self, base: nn.Module, weights: Sequence[AttentionWeight], rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.rows = {w.param: dict(w.rows) for w in weights}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for w in weights:
            weight = base.get_parameter(w.param)
            # Factors of a half-precision (e.g. bfloat16) frozen weight train in float32.
            dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
            for target, (start, stop) in w.rows.items():
                a = torch.empty(rank, weight.shape[1], dtype=dtype, device=weight.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_A[_key(w.param, target)] = nn.Parameter(a)
                self.lora_B[_key(w.param, target)] = nn.Parameter(
                    torch.zeros(stop - start, rank, dtype=dtype, device=weight.device))

    def delta(self, param: str) -> Tensor:
        """The dense update of weight ``param`` (out, in): ``scale * B_t A_t`` on each target's rows."""
        weight = self.base.get_parameter(param)
        blocks = []
        position = 0
        for target, (start, stop) in sorted(self.rows[param].items(), key=lambda item: item[1][0]):
            if start > position:
                blocks.append(weight.new_zeros(start - position, weight.shape[1]))
            key = _key(param, target)
            blocks.append(self.lora_B[key] @ self.lora_A[key] * self.scale)
            position = stop
        if position < weight.shape[0]:
            blocks.append(weight.new_zeros(weight.shape[0] - position, weight.shape[1]))
        return torch.cat(blocks, dim=0)

    def merged(self, param: str) -> Tensor:
        """``W + delta`` of weight ``param``."""
        weight = self.base.get_parameter(param)
        return weight + self.delta(param).to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, {param: self.merged(param) for param in self.rows}, args, kwargs)

    def extra_repr(self) -> str:
        targets = {param: sorted(rows) for param, rows in self.rows.items()}
        return f"rank={self.rank}, scale={self.scale:g}, targets={targets}"


@TUNERS.register()
class LoRA(Tuner):
    """Low-rank updates of the attention projections of every block of a frozen source.

    Args:
        rank: r, the rank of every update.
        alpha: the update's scale is ``alpha / rank``.
        targets: which projections to adapt, of ``q``, ``k``, ``v`` and ``o`` (output).
    """

    def __init__(self, rank: int = 16, alpha: float = 16.0, targets: Sequence[str] = ("q", "v")) -> None:
        super().__init__()
        targets = tuple(targets)
        if rank < 1:
            raise ConfigError(f"LoRA rank must be positive, got {rank}")
        if not targets or not set(targets) <= set(TARGETS):
            raise ConfigError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
        self.rank, self.alpha, self.targets = rank, alpha, targets

    def attach(self, source: SourceTransformer) -> None:
        """Freeze the source (but its final norm) and wrap the modules holding the targeted
        projections of every block; a block without one of the targets is an error naming it."""
        super().attach(source)
        for index, block in enumerate(source.blocks):
            chosen: dict[str, list[AttentionWeight]] = {}
            found: set[str] = set()
            for weight in source.attention_weights(index):
                rows = {t: r for t, r in weight.rows.items() if t in self.targets}
                if rows:
                    chosen.setdefault(weight.module, []).append(AttentionWeight(weight.module, weight.param, rows))
                    found.update(rows)
            missing = sorted(set(self.targets) - found)
            if missing:
                raise ConfigError(f"LoRA targets {missing} not found in block {index} of {source.name}")
            for path, weights in chosen.items():
                parent, _, name = path.rpartition(".")
                owner = block.get_submodule(parent) if parent else block
                owner.register_module(name, LoRAWrapper(owner.get_submodule(name), weights, self.rank, self.alpha))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, targets={list(self.targets)}"
