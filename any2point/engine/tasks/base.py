"""The task contract: what the training and evaluation loops ask of a task."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

Batch = dict[str, Any]
#: ``predict(model, points (N, 3), index) -> record``: what ``tools/predict.py`` does for file ``index``.
Predict = Callable[[nn.Module, Tensor, int], dict[str, Any]]


class Task:
    """Base class of the tasks; a task module subclasses it and registers the subclass by name.

    Attributes:
        name: the registered name, which datasets declare (``PointDataset.task``).
        score_name: the name of :meth:`score` (``OA``, ``instance_mIoU``), in logs, results and
            checkpoints (``best_score``).
        class_names: the dataset's class (or category) names, in label order.
        table_metrics, figures, per_class_words: what the tools tabulate and draw for the task.
    """

    name: str
    score_name: str
    class_names: list[str]
    #: The two metrics ``tools/collect_results.py`` tabulates per group of runs (keys of results.json).
    table_metrics: tuple[str, str]
    #: The figures of ``tools/visualize.py`` that only this task's checkpoints can draw.
    figures: tuple[str, ...] = ()
    #: How the per-class figure names what it plots: (the metric, its mean, what a class is).
    per_class_words: tuple[str, str, str] = ("accuracy", "mAcc", "class")

    @classmethod
    def from_dataset(cls, dataset: Any, label_smoothing: float = 0.0) -> "Task":
        """The task for a dataset that declares it."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        """The model's outputs for a batch."""
        raise NotImplementedError

    def target(self, batch: Batch, device: torch.device) -> Tensor:
        """What the outputs are compared with."""
        raise NotImplementedError

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def meter(self, device: torch.device) -> Any:
        """An accumulator of outputs over batches whose ``compute()`` gives the metrics (all processes')."""
        raise NotImplementedError

    @staticmethod
    def combine(outputs: list[Tensor], batches: list[Batch]) -> Tensor:
        """Test-time voting: the outputs of the passes combined."""
        raise NotImplementedError

    def check_model(self, model_cfg: Any, dataset_type: str) -> None:
        """Refuse a model config whose outputs do not fit the dataset."""

    @staticmethod
    def score(metrics: Any) -> float:
        """The number model selection maximises."""
        raise NotImplementedError

    @staticmethod
    def scalars(metrics: Any) -> dict[str, float]:
        """The numbers logged per evaluation (log line and TensorBoard)."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        """What a checkpoint records of the task besides the model (read by the tools)."""
        return {"task": self.name, "class_names": list(self.class_names)}

    # ----------------------------------------------------------------- what the tools do for the task
    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], dataset: Callable[[], Any]) -> "Task":
        """The task of a checkpoint, from what it recorded (:meth:`checkpoint_extras`); ``dataset()``
        gives the config's test split for a checkpoint that recorded less (older ones)."""
        raise NotImplementedError

    def predictor(self, files: Sequence[tuple[Path, Path]], top_k: int, category: Optional[str],
                  out: Path) -> Predict:
        """What ``tools/predict.py`` does with each prepared cloud of ``files`` (path, name under the
        folder given), given its flags; a flag that does not fit the task is a user error."""
        raise NotImplementedError

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        """One printed line for a prediction record."""
        raise NotImplementedError
