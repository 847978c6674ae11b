"""Evaluation: one pass or test-time voting over a split, and the ``results.json`` of a test.

**Voting** (``--vote N``) runs N passes over the split, each with its own draw of augmentations
(the dataset's ``transforms.vote`` list if it has one, else its training transforms, applied to the
raw test clouds), and averages the N logits of every sample before taking the arg-max. It is not
the best of N accuracies. Pass ``v`` of voting with seed ``s`` draws its augmentations from the
dataset's stream of epoch :func:`vote_epoch` ``(s, v)``, so a voted number is reproducible from its
seed, whatever the number of loader workers or processes. Voting is for reporting a test number
only; model selection never votes.

Each test writes a JSON record (:func:`any2point.engine.records.results_record`) with the task's metrics (classification:
OA, mAcc, per-class accuracy and the confusion matrix; part segmentation: instance and class mIoU,
point accuracy, per-category mIoU and shape counts), protocol, voting, every seed of the training run
(:mod:`any2point.engine.seeds`), config hash, source identity, time and git commit, so a number in a
table can be traced to the run that produced it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from any2point.datasets import PointDataset, build_dataset
from any2point.engine import distributed
from any2point.engine.loading import load_model
from any2point.engine.log import setup_logging
from any2point.engine.metrics import Metrics, SegmentationMetrics
from any2point.engine.records import RESULTS, results_record, write_results
from any2point.engine.runtime import autocast, pick_device, precision_note, uses_bf16
from any2point.engine.seeds import run_seeds
from any2point.engine.tasks import Task, build_task
from any2point.errors import ConfigError

logger = logging.getLogger("any2point")

#: Voting draws from epochs far beyond any training run's, so its augmentations never repeat one.
VOTE_EPOCH_BASE = 1 << 40
MAX_VOTES = 1024


def vote_epoch(seed: int, vote_pass: int) -> int:
    """The augmentation epoch of pass ``vote_pass`` of voting with ``seed``."""
    return VOTE_EPOCH_BASE + seed * MAX_VOTES + vote_pass


class VotingDataset(Dataset):
    """Item ``i`` is the list of the ``passes`` augmented copies of item ``i`` of ``base``."""

    def __init__(self, base: PointDataset, passes: int, seed: int) -> None:
        if not 1 <= passes <= MAX_VOTES:
            raise ConfigError(f"--vote must be between 1 and {MAX_VOTES}, got {passes}")
        if seed < 0:
            raise ConfigError(f"the voting seed must be >= 0, got {seed}")
        self.base, self.passes, self.seed = base, passes, seed
        self.split = base.split

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        items = []
        for v in range(self.passes):
            self.base.set_epoch(vote_epoch(self.seed, v))
            items.append(self.base[index])
        return items


def collate_passes(items: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Collate voting items into one batch per pass."""
    return [default_collate([item[v] for item in items]) for v in range(len(items[0]))]


def voting_dataset(dataset_cfg: Any, split: str, passes: int, seed: int) -> VotingDataset:
    """``split`` of a dataset whose evaluation transforms are its voting (or training) transforms."""
    cfg = copy.deepcopy(OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig)
                        else dataset_cfg)
    transforms = cfg.setdefault("transforms", {}) or {}
    vote = transforms.pop("vote", None)
    transforms["test"] = vote if vote is not None else transforms.get("train", [])
    cfg["transforms"] = transforms
    return VotingDataset(build_dataset(cfg, split), passes, seed)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """This process's share of ``dataset`` in order, every sample once over all processes."""
    sampler = distributed.EpochSampler(len(dataset), False, 0, distributed.rank(), distributed.world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda",
                      collate_fn=collate_passes if isinstance(dataset, VotingDataset) else None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, bf16: bool,
             desc: str = "eval") -> Metrics | SegmentationMetrics:
    """The task's metrics over the loader's split (all processes' shares all-reduced).

    With a :class:`VotingDataset` the task combines (averages) the outputs of the passes per sample,
    and the metrics' ``pass_scores`` holds the task's score of each single pass, for comparison."""
    model.eval()
    passes = getattr(loader.dataset, "passes", 1)
    voted, single = task.meter(device), [task.meter(device) for _ in range(passes if passes > 1 else 0)]
    # the bar is closed (its line cleared) before an error propagates: the error gets a line of its own
    with tqdm(loader, desc=desc, leave=False, disable=None if distributed.is_main() else True) as bar:
        for batch in bar:
            batches = batch if isinstance(batch, list) else [batch]
            outputs = []
            for b in batches:
                with autocast(device, bf16):
                    outputs.append(task.forward(model, b, device).float())
            for meter, out, b in zip(single, outputs, batches):
                meter.add(out, b)
            voted.add(task.combine(outputs, batches), batches[0])
    metrics = voted.compute()
    metrics.pass_scores = [task.score(m.compute()) for m in single]
    return metrics


def log_test(m: Metrics | SegmentationMetrics, class_names: list[str], votes: int, where: str) -> None:
    """The test line (with its voting) and the per-class accuracies (segmentation: per-category mIoU)."""
    passes = m.pass_scores
    voting = f"voting {votes}" + (f" (single passes {m.score_name} {min(passes):.2f}-{max(passes):.2f})"
                                  if passes else "")
    logger.info("test %s  %s  [%s]", m.summary(), voting, where)
    for name, acc in zip(class_names, m.per_class):
        logger.info("  %-16s %6.2f", name, acc)


def evaluate_checkpoint(cfg: DictConfig, ckpt_path: str | Path, vote: int = 1, vote_seed: int = 0,
                        results: str = RESULTS, ignore_source_mismatch: bool = False,
                        allow_model_change: bool = False) -> Metrics | SegmentationMetrics:
    """Test a checkpoint on the test split of ``cfg``'s dataset, with ``vote``-pass voting when
    ``vote > 1``; log the number with its voting and write ``results`` next to the checkpoint.
    ``ignore_source_mismatch``: see :func:`check_source`; ``allow_model_change``: see :func:`load_model`."""
    device = pick_device(cfg.train.device)
    distributed.init(device)
    setup_logging()
    model, cfg, ckpt = load_model(ckpt_path, cfg, device, ignore_source_mismatch, allow_model_change)
    world = distributed.world_size()
    test = (voting_dataset(cfg.dataset, "test", vote, vote_seed) if vote > 1
            else build_dataset(cfg.dataset, "test"))
    base = test.base if vote > 1 else test
    task = build_task(base, cfg.train.label_smoothing)
    if ckpt.get("class_names") and list(ckpt["class_names"]) != task.class_names:
        raise ConfigError(f"checkpoint {ckpt_path} was trained on classes {ckpt['class_names']} but the "
                          f"config's dataset has {task.class_names}")
    loader = eval_loader(test, max(1, (cfg.train.test_batch_size or cfg.train.batch_size) // world),
                         cfg.train.num_workers, device)
    logger.info("device %s, %s", device, precision_note(device, cfg.train))
    m = evaluate(model, loader, task, device, uses_bf16(device, cfg.train), "test")
    epoch = ckpt.get("epoch", -1) + 1
    log_test(m, task.class_names, vote, f"checkpoint {ckpt_path}, epoch {epoch}, protocol {ckpt.get('protocol')}")
    transforms = (cfg.dataset.get("transforms") or {})
    voting = {"passes": vote} if vote == 1 else {
        "passes": vote, "seed": vote_seed, "averaged": "logits",
        "transforms": "vote" if transforms.get("vote") is not None else "train"}
    source = getattr(model, "source_identity", None)
    record = results_record(m, cfg, task.class_names, split="test", protocol=ckpt.get("protocol"), voting=voting,
                            checkpoint=str(ckpt_path), epoch=epoch, source=source() if source else None,
                            task=task.name, seeds={**run_seeds(cfg.experiment), "dataset": base.seed})
    logger.info("results: %s", write_results(record, Path(ckpt_path).parent / results))
    return m
