"""Point-PN: Point-NN's encoder with a few learnable layers, trained from scratch (Zhang et al.,
"Parameter is not all you need", CVPR 2023: the parametric network, 0.8M parameters).

``points (B, N, 3) -> logits (B, num_classes)``. A stem (Conv1d 3 -> ``embed_dim``, no bias, + BN +
ReLU) embeds each point. Each stage samples half the points by FPS and groups k neighbours (the
grouping of Any2Point's tokenizer, :func:`~any2point.models.any2point.tokenizer.sample_and_group`),
concatenates ``[neighbour feature, centre feature]``, maps it to the stage's width (1x1 conv, no
bias, + BN + ReLU), weighs it with the sin/cos encoding ``pe`` of the normalised neighbour
offsets, ``(x + pe) * pe``, runs the tokenizer's residual blocks
(:class:`~any2point.models.any2point.tokenizer.ResidualBlock`, hidden width C/2) and pools max + mean
over the neighbours. The cloud's feature (max + mean over the last stage's points) goes through the
classification head of Any2Point (512 -> 256 -> classes, BN + ReLU + dropout 0.5).

The paper's configuration: 4 stages, widths 72, 144, 288, 288 (``embed_dim`` 36 times the
expansions 2, 2, 2, 1), 2, 1, 1, 1 residual blocks, k = 40: 762,083 trainable parameters for 15
classes and 768,508 for 40.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from any2point.errors import ConfigError
from any2point.extensions import gather, group
from any2point.models.any2point.head import ClassificationHead
from any2point.models.any2point.tokenizer import NormMode, ResidualBlock, sample_and_group, sincos_embedding
from any2point.registry import MODELS, Fraction, PositiveFloat, PositiveInt


class LocalGeometryStage(nn.Module):
    """One stage (the paper's local geometry aggregation and pooling):
    ``(xyz (B, N, 3), feats (B, N, C_in)) -> (xyz (B, N/2, 3), feats (B, N/2, width))``."""

    def __init__(self, in_dim: int, width: int, blocks: int, k: int, norm: NormMode, alpha: float,
                 beta: float) -> None:
        super().__init__()
        self.width, self.k, self.norm, self.alpha, self.beta = width, k, norm, alpha, beta
        self.expand = nn.Sequential(nn.Conv2d(2 * in_dim, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[ResidualBlock(width, width // 2) for _ in range(blocks)])

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        centre_idx, centres, nbr_idx, offsets = sample_and_group(xyz, self.k, self.norm)
        nbr = group(feats, nbr_idx)
        x = torch.cat([nbr, gather(feats, centre_idx).unsqueeze(2).expand_as(nbr)], dim=-1)
        x = self.expand(x.permute(0, 3, 1, 2))  # (B, width, G, k)
        pe = sincos_embedding(offsets, self.width, self.alpha, self.beta).permute(0, 3, 1, 2).to(x.dtype)
        x = self.blocks((x + pe) * pe)
        return centres, (x.amax(dim=-1) + x.mean(dim=-1)).transpose(1, 2)


@MODELS.register()
class PointPN(nn.Module):
    """Point-PN, the 3D-only network of Point-NN's paper, trained from scratch (module docstring).

    Args:
        num_classes: number of classes.
        embed_dim: the stem's width (a multiple of 6 divided by the first expansion, so that every
            stage's width takes the sin/cos encoding whole).
        expansions: each stage's width is the previous one times its expansion (1 or 2).
        blocks: residual blocks per stage.
        k: neighbours per group.
        norm: the neighbour offsets' normalisation (``scan``: per-axis max over each group;
            ``mn40``: std per sample; ``mn40_batch``: std over the batch, as the release's ModelNet40
            code did).
        alpha, beta: the sin/cos encoding's base and scale.
        head_widths, head_dropout: the classification head's hidden widths and dropout.
    """

    def __init__(self, num_classes: PositiveInt, embed_dim: PositiveInt = 36,
                 expansions: Sequence[PositiveInt] = (2, 2, 2, 1), blocks: Sequence[PositiveInt] = (2, 1, 1, 1),
                 k: PositiveInt = 40, norm: NormMode = "scan", alpha: PositiveFloat = 1000.0,
                 beta: PositiveFloat = 100.0, head_widths: Sequence[PositiveInt] = (512, 256),
                 head_dropout: Fraction = 0.5) -> None:
        super().__init__()
        if len(expansions) != len(blocks) or not blocks:
            raise ConfigError(f"Point-PN expansions {list(expansions)} and blocks {list(blocks)} must give one value "
                              f"per stage (at least one)")
        if norm not in NormMode.__args__:
            raise ConfigError(f"Point-PN norm must be one of {NormMode.__args__}, got '{norm}'")
        widths, width = [], embed_dim
        for expansion in expansions:
            if expansion not in (1, 2):
                raise ConfigError(f"Point-PN expansions must be 1 or 2, got {list(expansions)}")
            width *= expansion
            widths.append(width)
        if any(w % 6 for w in widths):
            raise ConfigError(f"Point-PN stage widths {widths} must be multiples of 6 (sin and cos of 3 axes); "
                              f"change embed_dim")
        self.stem = nn.Sequential(nn.Conv1d(3, embed_dim, 1, bias=False), nn.BatchNorm1d(embed_dim),
                                  nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(LocalGeometryStage(c_in, c_out, n, k, norm, alpha, beta)
                                    for c_in, c_out, n in zip([embed_dim] + widths[:-1], widths, blocks))
        self.head = ClassificationHead(widths[-1], head_widths, num_classes, head_dropout)

    def forward(self, points: Tensor) -> Tensor:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Point-PN expects points of shape (B, N, 3), got {tuple(points.shape)}")
        xyz = points.contiguous()
        feats = self.stem(xyz.transpose(1, 2)).transpose(1, 2)
        for stage in self.stages:
            xyz, feats = stage(xyz, feats)
        return self.head(feats.amax(dim=1) + feats.mean(dim=1))
