"""K-fold cross-validation on a small dataset (``main.py --config CFG --folds K``).

One split of tens of files is noise; K folds test every file exactly once. Fold ``i`` is a normal
run of the config with ``dataset.folds=K dataset.fold=i``, in the sub-folder ``fold<i>`` of the
experiment folder (its checkpoints, log and ``results.json``, and ``predictions.csv``: one line per
test file with its label and prediction). The experiment folder gets ``cv_results.json``: the OA of
each fold, their mean and sample standard deviation, and the pooled OA and mAcc over all files
(each file counted once, whatever the fold sizes); ``tools/collect_results.py`` reads it.
"""
from __future__ import annotations

import csv
import logging
import statistics
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from any2point.config import config_from_dict
from any2point.engine import distributed
from any2point.engine.experiment import experiment_folder
from any2point.engine.metrics import json_number
from any2point.engine.records import config_hash, git_commit, write_results
from any2point.engine.trainer import LAST, Trainer
from any2point.errors import ConfigError
from any2point.registry import DATASETS, constructor_keys

logger = logging.getLogger("any2point")

CV_RESULTS = "cv_results.json"
PREDICTIONS = "predictions.csv"


def fold_config(cfg: DictConfig, folds: int, fold: int) -> DictConfig:
    """The config of fold ``fold``: the dataset's fold and the run's folder ``<name>/fold<fold>``."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree["dataset"].update(folds=folds, fold=fold)
    tree["experiment"]["name"] = f"{tree['experiment']['name']}/fold{fold}"
    return config_from_dict(tree)


@torch.no_grad()
def predict_test(trainer: Trainer) -> list[dict[str, Any]]:
    """Each test item of a finished fold with its label and the model's prediction."""
    model, dataset = trainer.model.eval(), trainer.test_loader.dataset
    rows: list[dict[str, Any]] = []
    for batch in trainer.test_loader:
        logits = model(batch["points"].to(trainer.device))
        for label, prediction in zip(batch["label"].tolist(), logits.argmax(dim=1).tolist()):
            rows.append({"file": dataset.describe(len(rows)), "label": label, "prediction": prediction})
    return rows


def cross_validate(cfg: DictConfig, folds: int, resume: bool = False, overwrite: bool = False,
                   ignore_source_mismatch: bool = False) -> dict[str, Any]:
    """Run the K folds of ``cfg`` and write ``cv_results.json`` (see the module docstring); returns
    its record. ``resume`` continues the folds that have a ``ckpt-last.pth`` and starts the others."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if "folds" not in constructor_keys(DATASETS.get(cfg.dataset.type)):
        raise ConfigError(f"--folds needs a dataset that can be split into folds (PointFolder); "
                          f"dataset.type is {cfg.dataset.type}")
    if distributed.world_size() > 1:
        raise ConfigError("--folds runs the folds one after the other in one process; start it without torchrun")
    parent = experiment_folder(cfg.experiment)
    per_fold, predictions = [], []
    for fold in range(folds):
        fold_cfg = fold_config(cfg, folds, fold)
        folder = experiment_folder(fold_cfg.experiment)
        logger.info("cross-validation: fold %d of %d in %s", fold + 1, folds, folder)
        trainer = Trainer(fold_cfg, resume=resume and (folder / LAST).is_file(), overwrite=overwrite,
                          ignore_source_mismatch=ignore_source_mismatch)
        metrics = trainer.fit()
        rows = predict_test(trainer)
        with open(folder / PREDICTIONS, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "label", "prediction"])
            writer.writeheader()
            writer.writerows(rows)
        per_fold.append({"fold": fold, "folder": str(folder), "files": len(rows), "OA": metrics.oa})
        predictions += rows
    record = summarize(cfg, per_fold, predictions, trainer.task.class_names)
    path = write_results(record, parent / CV_RESULTS)
    cv = record["cross_validation"]
    logger.info("cross-validation, %d folds: OA %.2f ± %.2f over the folds; pooled over the %d files: OA %.2f, "
                "mAcc %.2f (%s)", folds, cv["fold_OA_mean"], cv["fold_OA_std"], cv["files"],
                record["metrics"]["OA"], record["metrics"]["mAcc"], path)
    return record


def summarize(cfg: DictConfig, per_fold: list[dict[str, Any]], predictions: list[dict[str, Any]],
              class_names: list[str]) -> dict[str, Any]:
    """The ``cv_results.json`` record, laid out as a test's ``results.json``: the pooled OA, mAcc,
    per-class accuracy and confusion matrix over every prediction, and per-fold OA with their mean
    and sample std."""
    files = [p["file"] for p in predictions]
    if len(set(files)) != len(files):
        raise RuntimeError("cross-validation tested a file twice: the folds overlap")
    labels = np.array([p["label"] for p in predictions])
    guesses = np.array([p["prediction"] for p in predictions])
    classes = len(class_names)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, guesses), 1)
    present = confusion.sum(axis=1) > 0
    per_class = np.where(present, np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1), np.nan) * 100
    oas = [f["OA"] for f in per_fold]
    tree = OmegaConf.to_container(cfg, resolve=True)
    return {
        "experiment": tree["experiment"]["name"],
        "task": "classification",
        "split": "test",
        "metrics": {"OA": json_number(100.0 * float((labels == guesses).mean())),
                    "mAcc": json_number(float(np.nanmean(per_class))), "count": len(predictions)},
        "per_class": {name: json_number(float(a)) for name, a in zip(class_names, per_class)},
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
        "cross_validation": {"folds": len(per_fold), "files": len(predictions), "fold_OA": oas,
                             "fold_OA_mean": statistics.fmean(oas), "fold_OA_std": statistics.stdev(oas),
                             "runs": per_fold, "data_seed": tree["dataset"].get("data_seed", 0)},
        "seed": tree["experiment"]["seed"],
        "config_hash": config_hash(tree),
        "group_hash": config_hash(tree, drop_experiment=True),
        "git": git_commit(),
        "config": tree,
    }

