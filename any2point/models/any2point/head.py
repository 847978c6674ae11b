"""The classification head of Any2Point (paper sec. 3), also Point-PN's:
``(B, in) -> (B, classes)``."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn


class ClassificationHead(nn.Sequential):
    """``(B, in) -> (B, classes)``: per hidden width Linear + BN + ReLU + Dropout, then Linear.

    ``hidden_bias=False`` drops the hidden Linears' biases (the BN after them has its own), as the
    released ScanObjectNN code did (docs/method.md deviation 7)."""

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int, dropout: float,
                 hidden_bias: bool = True) -> None:
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Linear(in_features, width, bias=hidden_bias), nn.BatchNorm1d(width),
                       nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)
