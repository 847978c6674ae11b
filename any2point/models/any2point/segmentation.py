"""Any2Point for part segmentation: the classifier's encoder, multi-level token features propagated
back to every point, and a per-point head.

``points (B, N, 3), category (B,) -> part logits (B, N, P)``: the Any2Point encoder (tokenizer,
virtual-projection PE, the source's blocks adapted by the tuner) gives the point tokens after the
chosen blocks (``levels``, e.g. 4, 8 and 12), each through the source's final norm; concatenated
``(B, G, L*C)`` and projected to ``token_dim`` (linear, so projecting before interpolating equals
projecting after), they are propagated to every point by three-nearest-neighbour inverse-distance
interpolation from the token centres (PointNet++ feature propagation) and joined with the point's
xyz, the shape's global feature (max and mean of the projected tokens) and the category one-hot; a
per-point MLP (Conv1d 1x1 + BN + ReLU + dropout per hidden width, then a Conv1d to P) gives the
part logits.

Trainable: what Any2Point trains (tokenizer, projection, cls token and its PE, the tuner's modules,
the source's final norm) and the head (projection and MLP). Works with every source and tuner.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import three_nn_interpolate
from any2point.models.any2point.classifier import Any2Point, BlockCheckpointing, PEInjection
from any2point.registry import MODELS
from any2point.errors import ConfigError


class PartSegmentationHead(nn.Module):
    """``levels L x (B, G, C), centres (B, G, 3), points (B, N, 3), one-hot (B, K) -> (B, N, P)``;
    each point's features are ``[xyz, propagated tokens, max and mean of the tokens, one-hot]``.

    Args:
        in_features: ``L * C``, the width of the concatenated levels.
        token_dim: width of the projected token features.
        num_classes: K, the number of categories.
        widths: hidden widths of the per-point MLP.
        num_parts: P.
        dropout: after each hidden layer.
    """

    def __init__(self, in_features: int, token_dim: int, num_classes: int, widths: Sequence[int], num_parts: int,
                 dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, token_dim)
        layers: list[nn.Module] = []
        width = 3 + 3 * token_dim + num_classes
        for hidden in widths:
            layers += [nn.Conv1d(width, hidden, 1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                       nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Conv1d(width, num_parts, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, levels: list[Tensor], centres: Tensor, points: Tensor, one_hot: Tensor) -> Tensor:
        tokens = self.proj(torch.cat(levels, dim=-1))  # (B, G, D)
        local = three_nn_interpolate(points, centres, tokens)  # (B, N, D)
        n = points.shape[1]
        shape = torch.cat([tokens.amax(dim=1), tokens.mean(dim=1), one_hot.to(tokens.dtype)], dim=-1)
        x = torch.cat([points.to(tokens.dtype), local, shape.unsqueeze(1).expand(-1, n, -1)], dim=-1)
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


@MODELS.register()
class Any2PointSeg(Any2Point):
    """Any2Point for part segmentation (see the module docstring).

    Args:
        num_classes: K, the number of categories (the one-hot's width).
        num_parts: P, the number of parts over all categories.
        source, tokenizer, projection, tuner: as for :class:`~any2point.models.any2point.classifier.Any2Point`.
        levels: the blocks (numbered from 1) whose point tokens are propagated, in increasing order.
        token_dim: width of the projected multi-level token features.
        head_widths: hidden widths of the per-point MLP.
        head_dropout: dropout after each hidden layer of the MLP.
        pe_injection, random_cls_pos, final_norm_eps, block_norm_eps, checkpoint_blocks,
            block_memory_gb: as for Any2Point.
    """

    def __init__(self, num_classes: int, num_parts: int, source: dict, tokenizer: Optional[dict] = None,
                 projection: Optional[dict] = None, tuner: Optional[dict] = None,
                 levels: Sequence[int] = (4, 8, 12), token_dim: int = 256, head_widths: Sequence[int] = (256, 128),
                 head_dropout: float = 0.5, pe_injection: Optional[PEInjection] = None, random_cls_pos: bool = False,
                 final_norm_eps: Optional[float] = None, block_norm_eps: Optional[float] = None,
                 checkpoint_blocks: BlockCheckpointing = "auto", block_memory_gb: float = 1.2) -> None:
        if num_parts < 1:
            raise ConfigError(f"model num_parts must be positive, got {num_parts}")
        if token_dim < 1:
            raise ConfigError(f"model token_dim must be positive, got {token_dim}")
        levels = [int(k) for k in levels]
        if not levels or levels != sorted(set(levels)):
            raise ConfigError(f"model levels must be a non-empty increasing list of block numbers, got {levels}")
        # Read by _build_head, which Any2Point.__init__ calls once the source (and its depth) exists.
        self.num_parts, self.levels, self.token_dim = num_parts, levels, token_dim
        super().__init__(num_classes, source, tokenizer, projection, tuner, head_widths, head_dropout,
                         pe_injection=pe_injection, random_cls_pos=random_cls_pos, final_norm_eps=final_norm_eps,
                         block_norm_eps=block_norm_eps, checkpoint_blocks=checkpoint_blocks,
                         block_memory_gb=block_memory_gb)
        self.num_classes = num_classes

    def _build_head(self, dim: int, num_classes: int, widths: Sequence[int], dropout: float,
                    hidden_bias: bool) -> nn.Module:
        depth = self.source.depth
        if self.levels[0] < 1 or self.levels[-1] > depth:
            raise ConfigError(f"model levels {self.levels} must be block numbers from 1 to the source's depth {depth}")
        return PartSegmentationHead(len(self.levels) * dim, self.token_dim, num_classes, widths, self.num_parts,
                                    dropout)

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        """``points (B, N, 3), category (B,) -> part logits (B, N, num_parts)``."""
        if category.shape != points.shape[:1] or category.dtype.is_floating_point:
            raise ValueError(f"Any2PointSeg expects one integer category per cloud, shape ({points.shape[0]},), "
                             f"got {tuple(category.shape)} {category.dtype}")
        encoded = self.encode(points, self.levels)
        one_hot = F.one_hot(category.long(), self.num_classes)
        return self.head(encoded.levels, encoded.centres, points, one_hot)
