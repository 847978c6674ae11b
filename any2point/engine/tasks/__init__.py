"""Tasks: what a model is trained and evaluated for.

The training loop and the evaluation loop never read a batch themselves: a task turns a batch into
the model's outputs (:meth:`ClassificationTask.forward`), the outputs into a loss
(:meth:`ClassificationTask.loss`) and, through a meter, into metrics; with test-time voting it
combines the outputs of the passes (:meth:`ClassificationTask.combine`). Part segmentation
(:class:`SegmentationTask`) is a class with the same members; the loops are the same.

A dataset declares its task by name (``PointDataset.task``); each task lives in its own module here
and registers itself in the task registry. It owns its metric names (``score_name``: the number
model selection maximises, logged and recorded as ``best_score`` with that name) and what a
checkpoint records of it (:meth:`checkpoint_extras`), and what the tools do for it (``predictor``,
``describe``, ``table_metrics``, ``figures``). Adding a task is one module here (imported, so
registered, by this package) plus a model and a dataset.
"""
from __future__ import annotations

from typing import Any

from any2point.engine.tasks.base import Task
from any2point.engine.tasks.classification import ClassificationMeter, ClassificationTask
from any2point.engine.tasks.part_segmentation import SegmentationMeter, SegmentationTask
from any2point.errors import ConfigError
from any2point.registry import TASKS
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)  # a task module added here registers itself

def build_task(dataset: Any, label_smoothing: float = 0.0) -> Task:
    """The task the dataset declares (``dataset.task``, a registered task name), for its labels."""
    name = getattr(dataset, "task", None)
    if name not in TASKS:
        raise ConfigError(f"dataset {type(dataset).__name__} declares task {name!r}; registered tasks: "
                          f"{', '.join(TASKS.names())}")
    return TASKS.get(name).from_dataset(dataset, label_smoothing)


__all__ = ["ClassificationMeter", "ClassificationTask", "SegmentationMeter", "SegmentationTask", "Task", "build_task"]
