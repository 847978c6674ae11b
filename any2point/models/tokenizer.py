"""The 3D tokenizer: a 3-stage Point-PN (paper sec. 3, "Tokenization in 3D space";
docs/method.md, "The method").

``points (B, N, 3) -> (centres (B, N / 2^S, 3), tokens (B, N / 2^S, C))``: 1024 points become 128
tokens of the source's width C. A stem (Conv1d 3 -> C0, no bias, + BN + ReLU) embeds each point;
each stage halves the points by furthest point sampling, groups k nearest neighbours, normalises
their offsets, concatenates ``[neighbour feature, centre feature]`` (2 C_prev = C_stage), adds a
non-parametric sin/cos embedding of the normalised offsets, runs residual 1x1-conv blocks and takes
the max over the neighbours. In the paper's configuration (C = 768, k = 81 or 64, blocks 2/1/1,
widths 192/384/768, mids 96/192/32) it has exactly 276,672 parameters.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from any2point.extensions import furthest_point_sample, gather, group, knn
from any2point.registry import MODELS, ConfigError

NormMode = Literal["scan", "mn40", "mn40_batch"]


def sincos_embedding(xyz: Tensor, dim: int, alpha: float = 1000.0, beta: float = 100.0) -> Tensor:
    """Non-parametric sin/cos embedding of coordinates ``(..., 3) -> (..., dim)`` (Point-NN's PosE).

    Per axis, ``F = dim // 6`` frequencies ``beta * x / alpha^(i / F)``; channels are laid out axis by
    axis, each as ``[sin_0..sin_F-1, cos_0..cos_F-1]``; the last ``dim - 6 F`` channels are zero.
    """
    freqs = dim // 6
    if freqs == 0:
        raise ValueError(f"the sin/cos embedding needs dim >= 6, got {dim}")
    steps = torch.arange(freqs, device=xyz.device, dtype=xyz.dtype) / freqs
    angles = beta * xyz.unsqueeze(-1) / alpha ** steps
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    pad = dim - emb.shape[-1]
    return nn.functional.pad(emb, (0, pad)) if pad else emb


class ResidualBlock(nn.Module):
    """``relu(BN(conv(relu(BN(conv(x))))) + x)`` with 1x1 Conv2d C -> mid -> C: ``(B, C, G, k)``."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.net2 = nn.Sequential(nn.Conv2d(mid, channels, 1), nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.net2(self.net1(x)) + x)


class PointPNStage(nn.Module):
    """One stage: FPS to half the points, kNN grouping, normalisation, [neighbour, centre] features
    plus sin/cos embedding, residual blocks, max over neighbours.

    ``(xyz (B, N, 3), feats (B, N, C/2)) -> (xyz (B, N/2, 3), feats (B, N/2, C))``.
    """

    def __init__(self, width: int, mid: int, num_blocks: int, k: int, norm: NormMode,
                 alpha: float, beta: float) -> None:
        super().__init__()
        self.width, self.k, self.norm, self.alpha, self.beta = width, k, norm, alpha, beta
        self.blocks = nn.Sequential(*[ResidualBlock(width, mid) for _ in range(num_blocks)])

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        n = xyz.shape[1]
        if n < self.k:
            raise ValueError(f"a tokenizer stage groups k={self.k} neighbours but has only {n} points; "
                             f"give more input points or a smaller k")
        centre_idx = furthest_point_sample(xyz, n // 2)
        centres = gather(xyz, centre_idx)
        _, nbr_idx = knn(centres, xyz, self.k)
        offsets = self._normalize(group(xyz, nbr_idx, centres))
        nbr_feats = group(feats, nbr_idx)
        centre_feats = gather(feats, centre_idx).unsqueeze(2).expand_as(nbr_feats)
        x = torch.cat([nbr_feats, centre_feats], dim=-1)
        x = x + sincos_embedding(offsets, self.width, self.alpha, self.beta)
        x = self.blocks(x.permute(0, 3, 1, 2))
        return centres, x.amax(dim=-1).transpose(1, 2)

    def _normalize(self, offsets: Tensor) -> Tensor:
        """``scan``: divide each axis by its max |offset| over the k neighbours of the group;
        ``mn40``: divide by the std of all offsets of the sample; ``mn40_batch``: by the std of all
        offsets of the whole batch, as the released ModelNet40 code did (docs/method.md deviation 9)."""
        if self.norm == "scan":
            return offsets / offsets.abs().amax(dim=2, keepdim=True).clamp_min(1e-8)
        if self.norm == "mn40_batch":
            return offsets / (offsets.std() + 1e-5)
        std = offsets.flatten(1).std(dim=1)
        return offsets / (std[:, None, None, None] + 1e-5)


@MODELS.register()
class PointPNTokenizer(nn.Module):
    """Point-PN tokenizer ``points (B, N, 3) -> (centres (B, G, 3), tokens (B, G, dim))``.

    Args:
        dim: the source's width (injected); the last stage's width.
        k: neighbours per group (81 or 64 in the paper's runs).
        widths: stage widths; each must be twice the previous (the [neighbour, centre]
            concatenation) and the last must equal ``dim``. Default ``[dim/4, dim/2, dim]``.
        blocks: residual blocks per stage.
        mids: hidden width of each stage's residual blocks; default half the stage width, and 32 for
            the last stage.
        norm: neighbour normalisation, ``scan`` (per-axis max over each group, ScanObjectNN),
            ``mn40`` (std per sample, ModelNet40) or ``mn40_batch`` (std over the whole batch, the
            released ModelNet40 code's; off by default).
        alpha, beta: the sin/cos embedding's base and scale.
    """

    injected_args = ("dim",)

    def __init__(self, dim: int, k: int = 81, widths: Optional[Sequence[int]] = None,
                 blocks: Sequence[int] = (2, 1, 1), mids: Optional[Sequence[int]] = None,
                 norm: NormMode = "scan", alpha: float = 1000.0, beta: float = 100.0) -> None:
        super().__init__()
        widths = list(widths) if widths is not None else [dim // 4, dim // 2, dim]
        if widths[-1] != dim:
            raise ConfigError(f"tokenizer widths must end with the source width {dim}, got {widths}")
        if any(w % 2 for w in widths) or any(b != 2 * a for a, b in zip(widths, widths[1:])):
            raise ConfigError(f"tokenizer widths must be even and each twice the previous, got {widths}")
        if len(blocks) != len(widths):
            raise ConfigError(f"tokenizer blocks {list(blocks)} must give one count per stage "
                              f"({len(widths)} stages)")
        mids = list(mids) if mids is not None else [w // 2 for w in widths[:-1]] + [32]
        if len(mids) != len(widths):
            raise ConfigError(f"tokenizer mids {mids} must give one width per stage ({len(widths)} stages)")
        if k < 1:
            raise ConfigError(f"tokenizer k must be positive, got {k}")
        if norm not in NormMode.__args__:
            raise ConfigError(f"tokenizer norm must be one of {NormMode.__args__}, got '{norm}'")
        self.dim, self.k = dim, k
        self.stem = nn.Sequential(nn.Conv1d(3, widths[0] // 2, 1, bias=False),
                                  nn.BatchNorm1d(widths[0] // 2), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(PointPNStage(w, m, b, k, norm, alpha, beta)
                                    for w, m, b in zip(widths, mids, blocks))

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"the tokenizer expects points of shape (B, N, 3), got {tuple(points.shape)}")
        xyz = points.contiguous()
        feats = self.stem(xyz.transpose(1, 2)).transpose(1, 2)
        for stage in self.stages:
            xyz, feats = stage(xyz, feats)
        return xyz, feats
