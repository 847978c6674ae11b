"""Shape classification: one label per cloud, cross-entropy, OA / mAcc / per-class accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.engine import distributed
from any2point.engine.tasks.base import Batch, Predict, Task
from any2point.engine.metrics import Metrics, confusion_matrix
from any2point.errors import ConfigError, UserError
from any2point.registry import TASKS


@TASKS.register(name="classification")
class ClassificationTask(Task):
    """Shape classification: ``batch["points"] (B, N, 3) -> logits (B, K)``, cross-entropy against
    ``batch["label"] (B,)``; metrics OA / mAcc / per-class accuracy; model selection on OA.

    Args:
        num_classes: K.
        class_names: the K class names, in label order (for logs and result files).
        label_smoothing: of the cross-entropy (0 = plain, the paper's recipe).
    """

    name = "classification"
    #: The name of :meth:`score`, the number model selection maximises (logs, results, checkpoints).
    score_name = "OA"
    table_metrics = ("OA", "mAcc")
    figures = ("confusion",)

    def __init__(self, num_classes: int, class_names: Sequence[str] = (), label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names) or [str(i) for i in range(num_classes)]
        self.label_smoothing = label_smoothing

    @classmethod
    def from_dataset(cls, dataset: Any, label_smoothing: float = 0.0) -> "ClassificationTask":
        """The task of a classification dataset (its classes)."""
        return cls(dataset.num_classes, dataset.class_names, label_smoothing)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], dataset: Callable[[], Any]) -> "ClassificationTask":
        names = list(state.get("class_names") or dataset().class_names)
        return cls(len(names), names)

    def predictor(self, files: Sequence[tuple[Path, Path]], top_k: int, category: Optional[str],
                  out: Path) -> Predict:
        """The ``top_k`` classes of a cloud with their softmax probabilities."""
        if category is not None:
            raise UserError("--category is for part-segmentation checkpoints; this one classifies shapes")

        @torch.no_grad()
        def predict(model: nn.Module, points: Tensor, index: int) -> dict[str, Any]:
            device = next(model.parameters()).device
            probs = model(points[None].to(device)).float().softmax(-1)[0].cpu()
            values, labels = probs.topk(min(top_k, len(self.class_names)))
            return {"predictions": [{"class": self.class_names[i], "label": int(i), "probability": round(float(p), 6)}
                                    for p, i in zip(values.tolist(), labels.tolist())]}

        return predict

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        best = "  ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in record["predictions"])
        return f"{record['file']}: {best}"


    def forward(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        """The model's logits ``(B, K)`` for a batch."""
        return model(batch["points"].to(device, non_blocking=True))

    def target(self, batch: Batch, device: torch.device) -> Tensor:
        return batch["label"].to(device, non_blocking=True)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs.float(), self.target(batch, outputs.device),
                               label_smoothing=self.label_smoothing)

    def meter(self, device: torch.device) -> "ClassificationMeter":
        return ClassificationMeter(self, device)

    @staticmethod
    def combine(outputs: list[Tensor], batches: list[Batch]) -> Tensor:
        """Test-time voting: the mean of the passes' outputs."""
        return torch.stack(outputs).mean(0)

    def check_model(self, model_cfg: Any, dataset_type: str) -> None:
        """Refuse a model config whose output size does not fit the dataset."""
        expected = model_cfg.get("num_classes")
        if expected is not None and expected != self.num_classes:
            raise ConfigError(f"model.num_classes={expected} but dataset {dataset_type} has "
                              f"{self.num_classes} classes")

    @staticmethod
    def score(metrics: Metrics) -> float:
        """The number model selection maximises."""
        return metrics.oa

    @staticmethod
    def scalars(metrics: Metrics) -> dict[str, float]:
        """The numbers logged per evaluation (log line and TensorBoard)."""
        return {"OA": metrics.oa, "mAcc": metrics.macc}


class ClassificationMeter:
    """Accumulates the confusion matrix of a task's outputs over batches; :meth:`compute`
    all-reduces it over processes, so every sample of the split counts once."""

    def __init__(self, task: ClassificationTask, device: torch.device) -> None:
        self.task = task
        self.cm = torch.zeros(task.num_classes, task.num_classes, dtype=torch.int64, device=device)

    def add(self, outputs: Tensor, batch: Batch) -> None:
        labels = self.task.target(batch, self.cm.device)
        self.cm += confusion_matrix(outputs.argmax(-1).to(self.cm.device), labels, self.task.num_classes)

    def compute(self) -> Metrics:
        return Metrics.from_confusion(distributed.all_reduce_sum(self.cm).cpu())
