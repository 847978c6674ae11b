"""Point-NN's point-memory bank classifier (Zhang et al., "Parameter is not all you need", CVPR 2023,
"Point-Memory Bank").

The bank holds the features of the training set as keys (each scaled to unit length) and their
one-hot labels as values. A query ``f (B, D)`` scaled to unit length is compared with every key,
``S = f K^T (B, M)`` (cosine similarity), and each training sample votes for its class with the
weight ``exp(-gamma (1 - S))``: ``votes = exp(-gamma (1 - S)) V (B, classes)``. Larger ``gamma``
sharpens the vote towards the nearest neighbours. The votes are returned normalised to sum to one
(the same arg-max; a bounded term to add to a trained model's logits), computed with the largest
similarity of each row factored out so that no weight underflows to zero, and in float32 whatever
the autocast (``gamma`` up to 10^4 times a bfloat16 rounding of the similarity would decide the
vote).

The bank is filled by a memory pass (:mod:`any2point.engine.memory`), never by gradients; its
tensors are buffers saved in checkpoints, sized by the data (``resizable_buffers``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class EmptyBankError(RuntimeError):
    """The bank was asked for votes before a memory pass filled it."""


class MemoryBank(nn.Module):
    """Training features (keys) and labels (values) with the similarity-weighted vote.

    Args:
        num_classes: the number of classes (the width of the one-hot values).
        dim: the width of the features.
        gamma: the sharpness of the vote; ``None`` until the memory pass selects it.
    """

    #: Buffers whose size comes from the data; a checkpoint's shapes replace them when it is loaded.
    resizable_buffers = ("keys", "labels")

    def __init__(self, num_classes: int, dim: int, gamma: Optional[float] = None) -> None:
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.register_buffer("keys", torch.zeros(0, dim))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("gamma", torch.tensor(float("nan") if gamma is None else float(gamma)))
        self._pending: list[tuple[Tensor, Tensor]] = []

    @property
    def size(self) -> int:
        """The number of stored training samples."""
        return self.keys.shape[0]

    def reset(self) -> None:
        """Empty the bank (a memory pass starts from nothing)."""
        self.keys = self.keys.new_zeros(0, self.dim)
        self.labels = self.labels.new_zeros(0)
        self._pending = []

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Queue ``features (B, D)`` with their ``labels (B,)``; :meth:`finish` stores them."""
        if features.ndim != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(f"the bank takes features (B, {self.dim}) and labels (B,), got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        self._pending.append((F.normalize(features.detach().float(), dim=-1), labels.detach().long()))

    def finish(self) -> None:
        """Append the queued features and labels to the stored ones."""
        if self._pending:
            keys, labels = zip(*self._pending)
            self.keys = torch.cat([self.keys, *(k.to(self.keys.device) for k in keys)])
            self.labels = torch.cat([self.labels, *(lab.to(self.labels.device) for lab in labels)])
            self._pending = []

    def similarity(self, features: Tensor) -> Tensor:
        """Cosine similarity of ``features (B, D)`` with every key: ``(B, M)``."""
        if self.size == 0:
            raise EmptyBankError("the memory bank is empty: a memory pass over the training set fills it (main.py "
                                 "runs one; see docs/point_nn.md)")
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize(features.float(), dim=-1) @ self.keys.t()

    def votes(self, similarity: Tensor, gamma: Optional[float] = None) -> Tensor:
        """Normalised class votes ``(B, classes)`` of similarities ``(B, M)`` with ``gamma`` (default:
        the bank's own)."""
        gamma = float(self.gamma) if gamma is None else gamma
        if gamma != gamma:
            raise EmptyBankError("the memory bank has no gamma: the memory pass selects it (or set gamma)")
        with torch.autocast(similarity.device.type, enabled=False):
            similarity = similarity.float()
            top = similarity.amax(dim=1, keepdim=True)
            weights = torch.exp(gamma * (similarity - top))  # exp(-gamma (1 - S)) / exp(-gamma (1 - max S))
            votes = weights @ F.one_hot(self.labels, self.num_classes).float()
            return votes / votes.sum(dim=1, keepdim=True)

    def forward(self, features: Tensor) -> Tensor:
        """``features (B, D) -> votes (B, classes)``."""
        return self.votes(self.similarity(features))
