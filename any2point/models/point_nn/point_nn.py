"""Point-NN: a training-free point-cloud classifier (Zhang et al., "Parameter is not all you need",
CVPR 2023: the non-parametric encoder and the point-memory bank).

``points (B, N, 3) -> votes (B, classes)``. The encoder has no learnable weight: the raw points are
embedded by the sin/cos positional encoding (``embed_dim`` channels); each of ``stages`` stages
samples half the points by FPS and groups their k nearest neighbours (the grouping of Any2Point's
Point-PN tokenizer, :func:`~any2point.models.any2point.tokenizer.sample_and_group`), normalises the
neighbour features (their offsets from the centre's feature divided by their std) and coordinates,
concatenates ``[neighbour feature, centre feature]`` (2C channels), weighs it with the sin/cos
encoding ``pe`` of the normalised coordinates, ``(x + pe) * pe``, and pools max + mean over the
neighbours, then a GELU. The cloud's feature is the max + mean over the last stage's points
(``embed_dim * 2^stages`` channels). The classifier is the memory bank of
:mod:`~any2point.models.point_nn.bank`, filled by one pass over the training set.

Differences from the release: normalisation statistics are per sample (``norm: mn40``) rather than
over the batch (``norm: mn40_batch``), so a prediction does not depend on its batch; the pooling's
batch norm, which the release runs in eval mode at its initial statistics (a scale of
``1 / sqrt(1 + 1e-5)``), is left out; ``gamma`` is chosen on the selection split
(:mod:`any2point.engine.memory`), where the release searched it on the test set.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.errors import ConfigError
from any2point.extensions import gather, group
from any2point.models.any2point.tokenizer import NormMode, normalize_offsets, sample_and_group, sincos_embedding
from any2point.models.point_nn.bank import MemoryBank
from any2point.registry import MODELS, NonNegativeFloat, PositiveFloat, PositiveInt

#: The grid of ``gamma`` the memory pass chooses from (on the selection split) when none is set.
GAMMAS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
#: The grid of the plug-in's weight: 0 (the bank does not help) and up to 16 times the votes, which
#: lie in [0, 1] while a trained classifier's logits span a few units.
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class PointNNEncoder(nn.Module):
    """The non-parametric encoder ``points (B, N, 3) -> features (B, embed_dim * 2^stages)``.

    Args:
        stages: the number of FPS / kNN / pooling stages (each halves the points).
        embed_dim: the width of the raw points' sin/cos embedding (a multiple of 6).
        k: neighbours per group.
        alpha, beta: the sin/cos embedding's base and scale.
        norm: the coordinate normalisation of the groups (see
            :func:`~any2point.models.any2point.tokenizer.normalize_offsets`); features are divided
            by their std per sample (per batch with ``mn40_batch``).
    """

    def __init__(self, stages: int = 4, embed_dim: int = 72, k: int = 90, alpha: float = 1000.0,
                 beta: float = 100.0, norm: NormMode = "mn40") -> None:
        super().__init__()
        if embed_dim % 6:
            raise ConfigError(f"Point-NN embed_dim must be a multiple of 6 (sin and cos of 3 axes), got {embed_dim}")
        if norm not in NormMode.__args__:
            raise ConfigError(f"Point-NN norm must be one of {NormMode.__args__}, got '{norm}'")
        self.stages, self.embed_dim, self.k, self.alpha, self.beta, self.norm = stages, embed_dim, k, alpha, beta, norm
        self.dim = embed_dim * 2 ** stages

    def forward(self, points: Tensor) -> Tensor:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Point-NN expects points of shape (B, N, 3), got {tuple(points.shape)}")
        xyz = points.float().contiguous()
        feats = sincos_embedding(xyz, self.embed_dim, self.alpha, self.beta, interleave=True)
        feature_norm = "mn40_batch" if self.norm == "mn40_batch" else "mn40"
        for _ in range(self.stages):
            centre_idx, xyz, nbr_idx, offsets = sample_and_group(xyz, self.k, self.norm)
            centre = gather(feats, centre_idx).unsqueeze(2)
            nbr = normalize_offsets(group(feats, nbr_idx) - centre, feature_norm)
            x = torch.cat([nbr, centre.expand_as(nbr)], dim=-1)
            pe = sincos_embedding(offsets, x.shape[-1], self.alpha, self.beta, interleave=True)
            x = (x + pe) * pe
            feats = F.gelu(x.amax(dim=2) + x.mean(dim=2))
        return feats.amax(dim=1) + feats.mean(dim=1)


@MODELS.register()
class PointNN(nn.Module):
    """Point-NN: the non-parametric encoder and the memory-bank classifier (no learnable weight).

    ``points (B, N, 3) -> votes (B, num_classes)`` (normalised to sum to one; the arg-max is the
    class). The trainer fills the bank in one pass over the training set instead of training.

    Args:
        num_classes: number of classes.
        stages, embed_dim, k, alpha, beta, norm: the encoder's (:class:`PointNNEncoder`); the paper's
            are 4 stages, 72 channels, k = 90, alpha 1000, beta 100.
        gamma: the vote's sharpness; ``null`` chooses it from ``gammas`` on the selection split.
        gammas: the grid to choose ``gamma`` from.
    """

    def __init__(self, num_classes: PositiveInt, stages: PositiveInt = 4, embed_dim: PositiveInt = 72,
                 k: PositiveInt = 90, alpha: PositiveFloat = 1000.0, beta: PositiveFloat = 100.0,
                 norm: NormMode = "mn40", gamma: Optional[PositiveFloat] = None,
                 gammas: Sequence[PositiveFloat] = GAMMAS) -> None:
        super().__init__()
        if not gammas:
            raise ConfigError("Point-NN gammas must list at least one value")
        self.encoder = PointNNEncoder(stages, embed_dim, k, alpha, beta, norm)
        self.bank = MemoryBank(num_classes, self.encoder.dim, gamma)
        self.gamma_fixed = gamma is not None
        self.gammas = [float(g) for g in gammas]

    def encode(self, points: Tensor) -> Tensor:
        """``points (B, N, 3) -> features (B, D)``, the bank's keys and queries."""
        return self.encoder(points)

    def forward(self, points: Tensor) -> Tensor:
        return self.bank(self.encode(points))


class PointNNPlugIn(PointNN):
    """Point-NN beside a trained classifier (the paper's "plug-and-play" use): the classifier's
    logits plus ``weight`` times the bank's votes, once a memory pass has filled the bank (until
    then the classifier's logits alone). Set as ``model.point_nn`` of :class:`Any2Point`.

    Args:
        num_classes: injected by the classifier.
        weight: the votes' weight; ``null`` chooses it from ``weights`` with ``gamma`` on the selection
            split (0 is in the grid: the bank is left out where it does not help there).
        weights: the grid to choose ``weight`` from.
        stages, embed_dim, k, alpha, beta, norm, gamma, gammas: as for :class:`PointNN`.
    """

    injected_args = ("num_classes",)

    def __init__(self, num_classes: PositiveInt, weight: Optional[NonNegativeFloat] = None,
                 weights: Sequence[NonNegativeFloat] = WEIGHTS, stages: PositiveInt = 4,
                 embed_dim: PositiveInt = 72, k: PositiveInt = 90, alpha: PositiveFloat = 1000.0,
                 beta: PositiveFloat = 100.0, norm: NormMode = "mn40", gamma: Optional[PositiveFloat] = None,
                 gammas: Sequence[PositiveFloat] = GAMMAS) -> None:
        super().__init__(num_classes, stages, embed_dim, k, alpha, beta, norm, gamma, gammas)
        if not weights:
            raise ConfigError("model.point_nn.weights must list at least one value")
        self.register_buffer("weight", torch.tensor(float("nan") if weight is None else float(weight)))
        self.weight_fixed = weight is not None
        self.weights = [float(w) for w in weights]

    @property
    def ready(self) -> bool:
        """Whether a memory pass has filled the bank and set its gamma and weight."""
        return self.bank.size > 0 and bool(torch.isfinite(self.bank.gamma)) and bool(torch.isfinite(self.weight))

    def add_to(self, logits: Tensor, points: Tensor) -> Tensor:
        """``logits (B, classes)`` plus the weighted votes of ``points`` (the logits alone until ready)."""
        if not self.ready:
            return logits
        return logits + (self.weight * self(points)).to(logits.dtype)
