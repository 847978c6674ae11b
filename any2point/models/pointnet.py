"""A small PointNet (Qi et al., 2017) without transform nets: a fast baseline and the model of the
engine's tests. ``(B, N, 3) -> (B, num_classes)``."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from any2point.registry import MODELS


def _norm1d(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if kind == "batch" else nn.Identity()


@MODELS.register()
class PointNet(nn.Module):
    """Shared per-point MLP -> max pool -> MLP head.

    Args:
        num_classes: number of output classes.
        widths: channels of the shared point MLP.
        head_width: hidden width of the classification head.
        dropout: dropout before the last layer of the head.
        norm: ``batch`` (BatchNorm) or ``none`` (no normalisation: makes a run independent of how
            the batch is split over processes, which the engine's DDP test relies on).
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 128, 256), head_width: int = 128,
                 dropout: float = 0.3, norm: Literal["batch", "none"] = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv1d(c, w, 1, bias=norm == "none"), _norm1d(norm, w), nn.ReLU(inplace=True)]
            c = w
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, head_width, bias=norm == "none"), _norm1d(norm, head_width),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(head_width, num_classes))

    def forward(self, points: Tensor) -> Tensor:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"PointNet expects points of shape (B, N, 3), got {tuple(points.shape)}")
        feats = self.encoder(points.transpose(1, 2))
        return self.head(torch.amax(feats, dim=2))
