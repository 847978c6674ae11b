"""The assembled Any2Point classifier (paper sec. 3).

``points (B, N, 3) -> logits (B, num_classes)``: Point-PN tokens ``(B, G, C)`` + the averaged
virtual-projection PE -> prepend the cls token (+ its PE) and the tuner's prompt tokens, if any ->
the source's blocks, adapted by the tuner -> the source's final norm -> ``[max over point tokens,
cls]`` (2C) -> head (2C -> 256 -> 256 -> classes, BN + ReLU + dropout).

Trainable: the tokenizer, the projection's own parameters, the classifier's cls token and its PE
(initialised from the source's when it has them), the tuner's modules and whatever the tuner
trains inside the source (its final norm always; everything for full fine-tuning), and the head.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from any2point.models.backbones.base import SourceTransformer
from any2point.models.peft.base import Tuner
from any2point.registry import MODELS, ConfigError, build_from_cfg

logger = logging.getLogger("any2point")


class ClassificationHead(nn.Sequential):
    """``(B, in) -> (B, classes)``: per hidden width Linear + BN + ReLU + Dropout, then Linear."""

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int, dropout: float) -> None:
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                       nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


def _init_token(source_value: Optional[Tensor], dim: int) -> nn.Parameter:
    """A trainable (1, 1, C) token: a copy of the source's, or N(0, 0.02) when it has none."""
    if source_value is not None:
        return nn.Parameter(source_value.detach().clone().float().reshape(1, 1, dim))
    return nn.Parameter(torch.randn(1, 1, dim) * 0.02)


@dataclass
class Encoded:
    """What the encoder gives for one batch of clouds.

    Attributes:
        centres: the token centres ``(B, G, 3)``.
        cls: the class token after the final norm ``(B, C)``.
        tokens: the point tokens after the final norm ``(B, G, C)`` (prompt tokens dropped).
    """

    centres: Tensor
    cls: Tensor
    tokens: Tensor


@MODELS.register()
class Any2Point(nn.Module):
    """Any2Point: a source transformer of any modality, adapted by a tuner, as a point-cloud classifier.

    Args:
        num_classes: number of output classes.
        source: ``type:`` mapping of a registered :class:`SourceTransformer`.
        tokenizer: ``type:`` mapping of the 3D tokenizer (default ``PointPNTokenizer``); gets ``dim``.
        projection: ``type:`` mapping of the virtual projection (default ``VirtualProjection``);
            gets ``source``.
        tuner: ``type:`` mapping of the :class:`~any2point.models.peft.base.Tuner` that adapts the
            source (default ``GuidedAdapter``, Any2Point's own); gets what it names in
            ``injected_args`` of ``dim``, ``depth``, ``num_views`` and ``projection``.
        head_widths: hidden widths of the classification head.
        head_dropout: dropout after each hidden layer of the head.
    """

    def __init__(self, num_classes: int, source: dict, tokenizer: Optional[dict] = None,
                 projection: Optional[dict] = None, tuner: Optional[dict] = None,
                 head_widths: Sequence[int] = (256, 256), head_dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.source = build_from_cfg(source, MODELS)
        if not isinstance(self.source, SourceTransformer):
            raise ConfigError(f"model source '{source['type']}' is not a SourceTransformer")
        dim = self.source.dim
        self.tokenizer = build_from_cfg(tokenizer or {"type": "PointPNTokenizer"}, MODELS, dim=dim)
        self.projection = build_from_cfg(projection or {"type": "VirtualProjection"}, MODELS, source=self.source)
        self.tuner = self._build_tuner(tuner or {"type": "GuidedAdapter"})
        self.cls_token = _init_token(self.source.cls_token, dim)
        self.cls_pos_embed = _init_token(self.source.cls_pos_embed, dim)
        self.head = ClassificationHead(2 * dim, head_widths, num_classes, head_dropout)
        self.tuner.attach(self.source)
        self.train()
        counts = self.parameter_counts()
        logger.info("Any2Point(%s, tuner %s): trainable / total parameters: %s / %s; without the head: %s / %s",
                    self.source.name, type(self.tuner).__name__, f"{counts['trainable']:,}", f"{counts['total']:,}",
                    f"{counts['trainable_without_head']:,}", f"{counts['total'] - counts['head']:,}")
        if self.tuner.trains_source:
            logger.info("the source trains: checkpoints hold the whole source (%s parameters)",
                        f"{sum(p.numel() for p in self.source.parameters()):,}")

    def _build_tuner(self, cfg: dict) -> Tuner:
        """Build the tuner of ``cfg`` with the sizes and modules it asks for injected."""
        available = {"dim": self.source.dim, "depth": self.source.depth,
                     "num_views": self.projection.num_views, "projection": self.projection}
        target = MODELS.get(cfg["type"])
        if not (isinstance(target, type) and issubclass(target, Tuner)):
            raise ConfigError(f"model tuner '{cfg['type']}' is not a Tuner")
        return build_from_cfg(cfg, MODELS, **{k: available[k] for k in target.injected_args})

    def train(self, mode: bool = True) -> "Any2Point":
        """Set the mode of every module; the tuner decides the source's (a frozen one stays in eval)."""
        super().train(mode)
        self.tuner.source_mode(self.source, mode)
        return self

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable``, ``head`` and ``trainable_without_head`` parameter counts."""
        return count_parameters(self, self.head)

    def source_identity(self) -> dict[str, Optional[str]]:
        """The source's name and weight-file hash (saved with checkpoints)."""
        return self.source.identity()

    def _table(self) -> Tensor:
        return self.source.pos_embed_1d if self.source.modality_dim == 1 else self.source.pos_embed_2d

    def encode(self, points: Tensor) -> Encoded:
        """``points (B, N, 3)`` -> the normed class and point tokens and the token centres."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Any2Point expects points of shape (B, N, 3), got {tuple(points.shape)}")
        centres, tokens = self.tokenizer(points)
        projected = self.projection(centres, self._table())
        if projected.pe is not None:
            tokens = tokens + projected.pe
        context = self.tuner.prepare(projected, self.projection)
        cls = (self.cls_token + self.cls_pos_embed).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for index in range(self.source.depth):
            x = self.tuner.enter_block(index, x, context)
            hooks = self.tuner.hooks(index, context)
            x = self.source.forward_block(index, x, ffn_hook=hooks.ffn, attn_hook=hooks.attn)
        x = self.source.norm(x)
        return Encoded(centres=centres, cls=x[:, 0], tokens=x[:, 1 + self.tuner.num_prompts:])

    def forward(self, points: Tensor) -> Tensor:
        """``points (B, N, 3) -> logits (B, num_classes)``."""
        encoded = self.encode(points)
        return self.head(torch.cat([encoded.tokens.amax(dim=1), encoded.cls], dim=-1))


def count_parameters(model: nn.Module, head: Optional[nn.Module] = None) -> dict[str, int]:
    """``total``, ``trainable``, ``head`` and ``trainable_without_head`` parameter counts of ``model``
    (shared parameters once; works on the ``meta`` device)."""
    params = list(model.parameters())
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    head_count = sum(p.numel() for p in params if id(p) in head_ids)
    head_trainable = sum(p.numel() for p in params if id(p) in head_ids and p.requires_grad)
    return {"total": total, "trainable": trainable, "head": head_count,
            "trainable_without_head": trainable - head_trainable}
