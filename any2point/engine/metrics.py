"""Evaluation metrics: classification (OA, mAcc and per-class accuracy from a confusion matrix) and
part segmentation (instance and class mIoU, per-category mIoU).

Each metrics class has ``score_name`` (the number model selection maximises), ``pass_scores`` (with
test-time voting, that number for each single pass), :meth:`summary` (the log line) and
:meth:`record` (its part of ``results.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = prediction."""
    idx = target.long().flatten() * num_classes + pred.long().flatten()
    # index_add_, not bincount: bincount sizes its output from the data (a wait for a GPU).
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=idx.device)
    return counts.index_add_(0, idx, torch.ones_like(idx)).view(num_classes, num_classes)


@dataclass
class Metrics:
    """Overall accuracy (OA), mean class accuracy (mAcc, over classes present), per-class accuracy
    and the confusion matrix (row = true class, column = prediction) they come from; with test-time
    voting, ``pass_scores`` holds the OA of each single pass."""

    score_name = "OA"

    oa: float
    macc: float
    per_class: list[float] = field(default_factory=list)
    count: int = 0
    confusion: list[list[int]] = field(default_factory=list)
    pass_scores: list[float] = field(default_factory=list)

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

    def record(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The metrics' entries of a results record."""
        return {"metrics": {"OA": json_number(self.oa), "mAcc": json_number(self.macc), "count": self.count},
                "per_class": {name: json_number(acc) for name, acc in zip(class_names, self.per_class)},
                "confusion": self.confusion}


def json_number(x: float) -> Optional[float]:
    """``x`` rounded for a JSON record; NaN (an absent class) becomes ``None``."""
    return None if x != x else round(x, 4)


# --------------------------------------------------------------------------------- part segmentation
def category_part_mask(category_parts: Sequence[Sequence[int]], num_parts: int,
                       device: Optional[torch.device] = None) -> Tensor:
    """``(K, P)`` bool: ``mask[k, p]`` when part ``p`` belongs to category ``k``."""
    mask = torch.zeros(len(category_parts), num_parts, dtype=torch.bool, device=device)
    for k, parts in enumerate(category_parts):
        mask[k, list(parts)] = True
    return mask


def restricted_prediction(logits: Tensor, category: Tensor, mask: Tensor) -> Tensor:
    """Per-point part predictions ``(B, N)`` from logits ``(B, N, P)``, restricted to the parts of
    each shape's category ``(B,)`` (``mask``: :func:`category_part_mask`); ties go to the lowest
    part index."""
    allowed = mask[category].unsqueeze(1)  # (B, 1, P)
    return logits.masked_fill(~allowed, float("-inf")).argmax(-1)


def shape_part_iou(pred: Tensor, target: Tensor, category: Tensor, mask: Tensor) -> Tensor:
    """The mIoU of each shape ``(B,)`` (float64): the mean over its category's parts of the IoU of
    ``pred`` and ``target`` ``(B, N)``, where a part absent from both counts as IoU 1."""
    num_parts = mask.shape[1]
    parts = torch.arange(num_parts, device=pred.device)
    in_pred = pred.unsqueeze(-1) == parts  # (B, N, P)
    in_target = target.unsqueeze(-1) == parts
    inter = (in_pred & in_target).sum(1).double()
    union = (in_pred | in_target).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    allowed = mask[category].double()
    return (iou * allowed).sum(1) / allowed.sum(1)


@dataclass
class SegmentationMetrics:
    """Part segmentation: instance mIoU (the mean of every shape's mIoU), class mIoU (the mean over
    categories of their shapes' mean mIoU, categories with shapes only), per-category mIoU
    (``per_class``, NaN for a category without shapes) and its shape counts, and the point
    accuracy. With test-time voting, ``pass_scores`` holds the instance mIoU of each single pass."""

    score_name = "instance_mIoU"

    instance_miou: float
    class_miou: float
    accuracy: float
    per_class: list[float] = field(default_factory=list)
    per_class_count: list[int] = field(default_factory=list)
    count: int = 0
    pass_scores: list[float] = field(default_factory=list)

    @classmethod
    def from_sums(cls, iou_sum: Tensor, shapes: Tensor, correct: int, points: int) -> "SegmentationMetrics":
        """From the per-category sums of shape mIoUs ``(K,)``, shape counts ``(K,)`` and the point counts."""
        iou_sum, shapes = iou_sum.double(), shapes.double()
        total = shapes.sum().item()
        present = shapes > 0
        per_class = torch.where(present, iou_sum / shapes.clamp(min=1), torch.full_like(shapes, float("nan")))
        instance = iou_sum.sum().item() / total if total else float("nan")
        class_miou = per_class[present].mean().item() if present.any() else float("nan")
        return cls(instance_miou=100.0 * instance, class_miou=100.0 * class_miou,
                   accuracy=100.0 * correct / points if points else float("nan"),
                   per_class=(100.0 * per_class).tolist(), per_class_count=shapes.long().tolist(), count=int(total))

    def summary(self) -> str:
        return (f"instance mIoU {self.instance_miou:.2f}  class mIoU {self.class_miou:.2f}  "
                f"point acc {self.accuracy:.2f}  (n={self.count})")

    def record(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The metrics' entries of a results record (per-category mIoU and shape counts)."""
        return {"metrics": {"instance_mIoU": json_number(self.instance_miou),
                            "class_mIoU": json_number(self.class_miou), "accuracy": json_number(self.accuracy),
                            "count": self.count},
                "per_class": {name: json_number(v) for name, v in zip(class_names, self.per_class)},
                "per_class_count": dict(zip(class_names, self.per_class_count))}
