"""Classification metrics from a confusion matrix: OA, mAcc and per-class accuracy."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = prediction."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class Metrics:
    """Overall accuracy (OA), mean class accuracy (mAcc, over classes present), per-class accuracy
    and the confusion matrix (row = true class, column = prediction) they come from; with test-time
    voting, ``pass_oa`` holds the OA of each single pass."""

    oa: float
    macc: float
    per_class: list[float] = field(default_factory=list)
    count: int = 0
    confusion: list[list[int]] = field(default_factory=list)
    pass_oa: list[float] = field(default_factory=list)

    @classmethod
    def from_confusion(cls, cm: torch.Tensor) -> "Metrics":
        cm = cm.double()
        total = cm.sum().item()
        support = cm.sum(1)
        correct = cm.diag()
        per_class = torch.where(support > 0, correct / support.clamp(min=1), torch.full_like(support, float("nan")))
        present = support > 0
        oa = correct.sum().item() / total if total else float("nan")
        macc = per_class[present].mean().item() if present.any() else float("nan")
        return cls(oa=100.0 * oa, macc=100.0 * macc, per_class=(100.0 * per_class).tolist(), count=int(total),
                   confusion=cm.long().tolist())

    def summary(self) -> str:
        return f"OA {self.oa:.2f}  mAcc {self.macc:.2f}  (n={self.count})"
