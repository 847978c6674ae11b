"""The assembled Any2Point classifier (paper sec. 3; docs/method.md, "The method").

``points (B, N, 3) -> logits (B, num_classes)``: Point-PN tokens ``(B, G, C)`` + the averaged
virtual-projection PE -> prepend the cls token (+ its PE) -> the frozen source's blocks, each with
its guided adapter after the FFN -> final norm -> ``[max over point tokens, cls]`` (2C) -> head
(2C -> 256 -> 256 -> classes, BN + ReLU + dropout).

Trainable: everything but the source (tokenizer, projection, the classifier's own cls token and its
PE, initialised from the source's when it has them, a trainable copy of the source's final norm,
adapters, head), decided once in ``__init__`` by module type.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from any2point.extensions import voxel_ids
from any2point.models.adapter import GuidanceContext
from any2point.models.backbones.base import SourceTransformer
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


@MODELS.register()
class Any2Point(nn.Module):
    """Any2Point: a frozen source transformer of any modality as a point-cloud classifier.

    Args:
        num_classes: number of output classes.
        source: ``type:`` mapping of a registered :class:`SourceTransformer`.
        tokenizer: ``type:`` mapping of the 3D tokenizer (default ``PointPNTokenizer``); gets ``dim``.
        projection: ``type:`` mapping of the virtual projection (default ``VirtualProjection``);
            gets ``source``.
        adapter: ``type:`` mapping of the guided adapter (default ``GuidedAdapter``); gets ``dim``,
            ``depth`` and ``num_views``.
        head_widths: hidden widths of the classification head.
        head_dropout: dropout after each hidden layer of the head.
    """

    def __init__(self, num_classes: int, source: dict, tokenizer: Optional[dict] = None,
                 projection: Optional[dict] = None, adapter: Optional[dict] = None,
                 head_widths: Sequence[int] = (256, 256), head_dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.source = build_from_cfg(source, MODELS)
        if not isinstance(self.source, SourceTransformer):
            raise ConfigError(f"model source '{source['type']}' is not a SourceTransformer")
        dim, depth = self.source.dim, self.source.depth
        self.tokenizer = build_from_cfg(tokenizer or {"type": "PointPNTokenizer"}, MODELS, dim=dim)
        self.projection = build_from_cfg(projection or {"type": "VirtualProjection"}, MODELS, source=self.source)
        self.adapter = build_from_cfg(adapter or {"type": "GuidedAdapter"}, MODELS, dim=dim, depth=depth,
                                      num_views=self.projection.num_views)
        self.guidance = self._resolve_guidance()
        self.cls_token = _init_token(self.source.cls_token, dim)
        self.cls_pos_embed = _init_token(self.source.cls_pos_embed, dim)
        self.norm = copy.deepcopy(self.source.norm)
        self.head = ClassificationHead(2 * dim, head_widths, num_classes, head_dropout)
        self._set_trainable()
        counts = self.parameter_counts()
        logger.info("Any2Point(%s): trainable / total parameters: %s / %s; without the head: %s / %s",
                    self.source.name, f"{counts['trainable']:,}", f"{counts['total']:,}",
                    f"{counts['trainable_without_head']:,}", f"{counts['total'] - counts['head']:,}")

    def _resolve_guidance(self) -> str:
        """The adapter's cell kind (``1d``, ``2d`` or ``3d``), checked against the geometry at hand."""
        kind = self.adapter.guidance
        if kind == "source":
            kind = "1d" if self.source.modality_dim == 1 else "2d"
        if kind == "1d" and self.projection.line_length is None:
            raise ConfigError("adapter guidance '1d' on a 2D source needs the projection's line_length")
        if kind == "2d" and (self.projection.plane_size is None
                             or (self.adapter.cell_size is None and self.source.patch_size is None)):
            raise ConfigError("adapter guidance '2d' on a 1D source needs the projection's plane_size and "
                              "the adapter's cell_size")
        return kind

    def _set_trainable(self) -> None:
        """Freeze the source (a :class:`SourceTransformer`); train every other module."""
        for module in self.children():
            module.requires_grad_(not isinstance(module, SourceTransformer))
        self.cls_token.requires_grad_(True)
        self.cls_pos_embed.requires_grad_(True)

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable``, ``head`` and ``trainable_without_head`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters())
        return {"total": total, "trainable": trainable, "head": head, "trainable_without_head": trainable - head}

    def source_identity(self) -> dict[str, Optional[str]]:
        """The source's name and weight-file hash (saved with checkpoints)."""
        return self.source.identity()

    def _table(self) -> Tensor:
        return self.source.pos_embed_1d if self.source.modality_dim == 1 else self.source.pos_embed_2d

    def _guidance_context(self, unit: Tensor, positions: Tensor) -> GuidanceContext:
        """Cells of every token in every view ``(B, M, G)`` -> the adapters' shared context."""
        native = "1d" if self.source.modality_dim == 1 else "2d"
        if self.guidance == "3d":
            size = self.adapter.cell_size or self.adapter.voxel_size
            cells = voxel_ids(unit, size).unsqueeze(1).expand(-1, self.projection.num_views, -1)
        else:
            if self.guidance != native:
                positions = self.projection.positions(unit, self.guidance)
            cells, _ = self.projection.cells(positions, self.guidance, self.adapter.cell_size)
        return self.adapter.context(cells, unit)

    def forward(self, points: Tensor) -> Tensor:
        """``points (B, N, 3) -> logits (B, num_classes)``."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Any2Point expects points of shape (B, N, 3), got {tuple(points.shape)}")
        centres, tokens = self.tokenizer(points)
        projected = self.projection(centres, self._table())
        if projected.pe is not None:
            tokens = tokens + projected.pe
        context = self._guidance_context(projected.unit, projected.positions)
        cls = (self.cls_token + self.cls_pos_embed).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        for index in range(self.source.depth):
            x = self.source.forward_block(index, x, self.adapter.hook(index, context))
        x = self.norm(x)
        features = torch.cat([x[:, 1:].amax(dim=1), x[:, 0]], dim=-1)
        return self.head(features)
