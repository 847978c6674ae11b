"""Part segmentation: a part per point of a cloud of a known category, instance / class mIoU."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.engine import distributed
from any2point.engine.tasks.base import Batch, Predict, Task
from any2point.engine.metrics import SegmentationMetrics, category_part_mask, restricted_prediction, shape_part_iou
from any2point.errors import ConfigError, UserError
from any2point.registry import TASKS


@TASKS.register(name="part_segmentation")
class SegmentationTask(Task):
    """Part segmentation: ``(batch["points"] (B, N, 3), batch["label"] (B,) the category) -> part logits
    (B, N, P)``, per-point cross-entropy against ``batch["parts"] (B, N)``; metrics instance and
    class mIoU with per-category mIoU, predictions restricted to the category's parts; model
    selection on instance mIoU.

    Args:
        class_names: the K category names, in label order.
        category_parts: the part indices of each category (in ``[0, P)``).
        num_parts: P.
        label_smoothing: of the cross-entropy.
    """

    name = "part_segmentation"
    #: The name of :meth:`score`, the number model selection maximises (logs, results, checkpoints).
    score_name = "instance_mIoU"
    table_metrics = ("instance_mIoU", "class_mIoU")
    figures = ("parts",)
    per_class_words = ("mIoU", "class mIoU", "category")

    def __init__(self, class_names: Sequence[str], category_parts: Sequence[Sequence[int]], num_parts: int,
                 label_smoothing: float = 0.0) -> None:
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.category_parts = [sorted(parts) for parts in category_parts]
        self.num_parts = num_parts
        self.label_smoothing = label_smoothing
        self.mask = category_part_mask(self.category_parts, num_parts)
        self.part_names = [str(p) for p in range(num_parts)]

    @classmethod
    def from_dataset(cls, dataset: Any, label_smoothing: float = 0.0) -> "SegmentationTask":
        """The task of a part dataset (its categories, their parts and the part names)."""
        task = cls(dataset.class_names, dataset.category_parts, dataset.num_parts, label_smoothing)
        task.part_names = list(dataset.part_names) or task.part_names
        return task

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], dataset: Callable[[], Any]) -> "SegmentationTask":
        if state.get("class_names") and state.get("category_parts") and state.get("part_names"):
            parts = [list(p) for p in state["category_parts"]]
            task = cls(state["class_names"], parts, len(state["part_names"]))
            task.part_names = list(state["part_names"])
            return task
        return cls.from_dataset(dataset())

    def predictor(self, files: Sequence[tuple[Path, Path]], top_k: int, category: Optional[str],
                  out: Path) -> Predict:
        """Each point's part, the most likely of ``category``'s parts (the model is conditioned on
        it), written as ``x y z part`` lines to ``<out>/<name>.parts.txt``."""
        if category is None:
            raise UserError(f"this is a part-segmentation checkpoint: give the shapes' category with --category "
                            f"(one of {', '.join(self.class_names)})")
        if category not in self.class_names:
            raise UserError(f"--category '{category}' is not one of the checkpoint's categories: "
                            f"{', '.join(self.class_names)}")
        label = self.class_names.index(category)
        parts, targets = self.category_parts[label], output_paths(files, out)

        @torch.no_grad()
        def predict(model: nn.Module, points: Tensor, index: int) -> dict[str, Any]:
            device = next(model.parameters()).device
            logits = model(points[None].to(device), torch.tensor([label], device=device)).float()[0].cpu()
            allowed = torch.tensor(parts)
            labels = allowed[logits[:, allowed].argmax(-1)]
            target = targets[index]
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(target, np.column_stack([points.numpy(), labels.numpy()]), fmt=["%.6f"] * 3 + ["%d"])
            counts = {self.part_names[p]: int((labels == p).sum()) for p in parts}
            return {"category": category, "parts": counts, "output": str(target)}

        return predict

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        counts = "  ".join(f"{name} {count}" for name, count in record["parts"].items())
        return f"{record['file']}: {record['category']}: points per part: {counts} -> {record['output']}"

    def checkpoint_extras(self) -> dict[str, Any]:
        """What a checkpoint records of the task besides the model: the categories, their parts and
        the part names (read by predict and visualize)."""
        return {"task": self.name, "class_names": list(self.class_names),
                "category_parts": [list(p) for p in self.category_parts], "part_names": list(self.part_names)}

    def forward(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        """The model's part logits ``(B, N, P)`` for a batch."""
        return model(batch["points"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))

    def target(self, batch: Batch, device: torch.device) -> Tensor:
        return batch["parts"].to(device, non_blocking=True)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs.float().transpose(1, 2), self.target(batch, outputs.device),
                               label_smoothing=self.label_smoothing)

    def meter(self, device: torch.device) -> "SegmentationMeter":
        return SegmentationMeter(self, device)

    @staticmethod
    def combine(outputs: list[Tensor], batches: list[Batch]) -> Tensor:
        """Test-time voting: the mean of the passes' per-point outputs, which needs every pass to keep
        the points in place (voting transforms that move, not resample or reorder, points)."""
        first = batches[0]["parts"]
        if any(b["parts"].shape != first.shape or not torch.equal(b["parts"], first) for b in batches[1:]):
            raise ConfigError("part segmentation voting averages each point's outputs over the passes, so the "
                              "voting transforms (dataset.transforms.vote) must keep the points in place: no "
                              "resampling or shuffling")
        return torch.stack(outputs).mean(0)

    def check_model(self, model_cfg: Any, dataset_type: str) -> None:
        """Refuse a model config whose category or part count does not fit the dataset."""
        for key, value in (("num_classes", self.num_classes), ("num_parts", self.num_parts)):
            expected = model_cfg.get(key)
            if expected is not None and expected != value:
                raise ConfigError(f"model.{key}={expected} but dataset {dataset_type} has {value}")

    @staticmethod
    def score(metrics: SegmentationMetrics) -> float:
        """The number model selection maximises."""
        return metrics.instance_miou

    @staticmethod
    def scalars(metrics: SegmentationMetrics) -> dict[str, float]:
        """The numbers logged per evaluation (log line and TensorBoard)."""
        return {"ins_mIoU": metrics.instance_miou, "cls_mIoU": metrics.class_miou, "acc": metrics.accuracy}


class SegmentationMeter:
    """Accumulates, per category, the sum of the shapes' mIoU and their count, and the correctly
    labelled points; :meth:`compute` all-reduces them over processes."""

    def __init__(self, task: SegmentationTask, device: torch.device) -> None:
        self.task = task
        self.mask = task.mask.to(device)
        self.sums = torch.zeros(2, task.num_classes, dtype=torch.float64, device=device)  # mIoU sum, shapes
        self.points = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total

    def add(self, outputs: Tensor, batch: Batch) -> None:
        device = self.sums.device
        category = batch["label"].to(device)
        target = self.task.target(batch, device)
        pred = restricted_prediction(outputs.to(device), category, self.mask)
        iou = shape_part_iou(pred, target, category, self.mask)
        self.sums[0].index_add_(0, category, iou)
        self.sums[1].index_add_(0, category, torch.ones_like(iou))
        self.points[0] += (pred == target).sum()
        self.points[1] += target.numel()

    def compute(self) -> SegmentationMetrics:
        sums = distributed.all_reduce_sum(self.sums).cpu()
        points = distributed.all_reduce_sum(self.points).cpu()
        return SegmentationMetrics.from_sums(sums[0], sums[1], int(points[0]), int(points[1]))


def output_paths(files: Sequence[tuple[Path, Path]], out_dir: Path) -> list[Path]:
    """``<out_dir>/<name without suffix>.parts.txt`` for each file (path, name under the folder given);
    two files that would write the same output are an error naming both (nothing is overwritten)."""
    targets: dict[Path, Path] = {}
    for path, name in files:
        target = out_dir / name.with_suffix(".parts.txt")
        if target in targets:
            raise UserError(f"{targets[target]} and {path} would both write {target}; give them different names "
                            f"or folders, or run them separately with other --out folders")
        targets[target] = path
    return list(targets)
