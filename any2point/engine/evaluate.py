"""Evaluation: one pass or test-time voting over a split, and the ``results.json`` of a test.

**Voting** (``--vote N``) runs N passes over the split, each with its own draw of augmentations
(the dataset's ``transforms.vote`` list if it has one, else its training transforms, applied to the
raw test clouds), and averages the N logits of every sample before taking the arg-max. It is not
the best of N accuracies. Pass ``v`` of voting with seed ``s`` draws its augmentations from the
dataset's stream of epoch :func:`vote_epoch` ``(s, v)``, so a voted number is reproducible from its
seed, whatever the number of loader workers or processes. Voting is for reporting a test number
only; model selection never votes.

Each test writes a JSON record (:func:`results_record`) with the task's metrics (classification:
OA, mAcc, per-class accuracy and the confusion matrix; part segmentation: instance and class mIoU,
point accuracy, per-category mIoU and shape counts), protocol, voting, every seed of the training run
(:mod:`any2point.engine.seeds`), config hash, source identity, time and git commit, so a number in a
table can be traced to the run that produced it.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import subprocess
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from any2point.config import config_changes, validate
from any2point.datasets import PointDataset, build_dataset
from any2point.engine import checkpoint, distributed
from any2point.engine.log import setup_logging
from any2point.engine.metrics import Metrics, SegmentationMetrics, json_number
from any2point.engine.seeds import run_seeds, seed_globals
from any2point.engine.tasks import Task, build_task
from any2point.errors import CheckpointError
from any2point.models import build_model
from any2point.registry import ConfigError

logger = logging.getLogger("any2point")

#: Voting draws from epochs far beyond any training run's, so its augmentations never repeat one.
VOTE_EPOCH_BASE = 1 << 40
MAX_VOTES = 1024
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = "results.json"


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; a device this machine
    does not have is a :class:`ConfigError` naming ``key`` (the config key or the flag that asked)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}='{name}' is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine; "
                              f"use {key}=cpu or {key}=auto")
        if device.index is None:
            device = torch.device("cuda", distributed.local_rank())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{key}={name}: only auto, cpu and cuda devices are supported")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; full precision on CPU (no fast bf16 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, amp: bool,
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
                with autocast(device, amp):
                    outputs.append(task.forward(model, b, device).float())
            for meter, out, b in zip(single, outputs, batches):
                meter.add(out, b)
            voted.add(task.combine(outputs, batches), batches[0])
    metrics = voted.compute()
    metrics.pass_scores = [task.score(m.compute()) for m in single]
    return metrics


# ------------------------------------------------------------------------------------------- results
def config_hash(config: Any, drop_experiment: bool = False) -> str:
    """sha256 (16 hex digits) of a resolved config's canonical JSON; ``drop_experiment`` leaves out
    the ``experiment`` section (name, folder, seed), so runs that differ only in seed share it."""
    tree = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else copy.deepcopy(config)
    if drop_experiment:
        tree.pop("experiment", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The code's git commit and whether its work tree had changes (``None`` outside a git checkout)."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def results_record(metrics: Metrics | SegmentationMetrics, config: Any, class_names: list[str], *, split: str,
                   protocol: Optional[str], voting: dict[str, Any], checkpoint: Optional[str] = None, epoch: Optional[int] = None,
                   source: Optional[dict[str, Any]] = None, task: str = "classification",
                   seeds: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The JSON record of one test: metrics, where they came from and how they were measured.
    ``seeds``: every seed of the training run (:func:`any2point.engine.seeds.run_seeds`)."""
    tree = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    return {
        "experiment": tree.get("experiment", {}).get("name"),
        "task": task,
        "split": split,
        **metrics.record(class_names),
        "class_names": list(class_names),
        "voting": {**voting, f"pass_{metrics.score_name}": [json_number(x) for x in metrics.pass_scores]},
        "protocol": protocol,
        "seed": tree.get("experiment", {}).get("seed"),
        "seeds": seeds,
        "config_hash": config_hash(tree),
        "group_hash": config_hash(tree, drop_experiment=True),
        "source": source,
        "checkpoint": checkpoint,
        "epoch": epoch,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "config": tree,
    }


def write_results(record: dict[str, Any], path: str | Path) -> Path:
    """Write a results record as JSON (rank 0 only); returns the path."""
    path = Path(path)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------- checkpoints
#: Model keys that may differ from the checkpoint's: where the source weights are read from (their
#: identity, the sha256, is checked by :func:`check_source`).
MODEL_LOCATION_KEYS = ("model.source.pretrained",)


def load_model(ckpt_path: str | Path, cfg: Optional[DictConfig] = None, device: Optional[torch.device] = None,
               ignore_source_mismatch: bool = False,
               allow_model_change: bool = False) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """The model of a checkpoint, in eval mode: built from ``cfg`` (default: the checkpoint's own
    config) with the run's init seed (so a frozen randomly initialised source is the one it trained
    with), its source checked against the saved identity, its trainable state loaded strictly.
    A ``cfg`` whose model section differs from the checkpoint's is refused, naming the keys (the
    weights could load into another model and give a wrong number), unless ``allow_model_change``."""
    ckpt = checkpoint.load(ckpt_path)
    if cfg is None:
        cfg = OmegaConf.create(ckpt["config"])
        validate(cfg)
    else:
        check_model_config(ckpt, cfg, ckpt_path, allow_model_change)
    device = device or pick_device(cfg.train.device)
    seed_globals(run_seeds(cfg.experiment)["init"])
    model = build_model(cfg.model).to(device)
    check_source(ckpt.get("source"), model, ckpt_path, ignore_source_mismatch)
    checkpoint.load_trainable_state_dict(model, ckpt["model"], str(ckpt_path))
    return model.eval(), cfg, ckpt


def check_model_config(ckpt: dict[str, Any], cfg: DictConfig, ckpt_path: str | Path, allow: bool) -> None:
    """Refuse (or with ``allow``, warn about) a ``cfg.model`` that differs from the checkpoint's."""
    saved = (ckpt.get("config") or {}).get("model")
    if saved is None:
        return
    changes = [c for c in config_changes({"model": saved}, {"model": OmegaConf.to_container(cfg.model, resolve=True)})
               if c.split(":", 1)[0] not in MODEL_LOCATION_KEYS]
    if not changes:
        return
    listed = "; ".join(changes)
    if not allow:
        raise ConfigError(f"the model config differs from the one {ckpt_path} was trained with: {listed}. Test with "
                          f"the checkpoint's model settings, or pass --allow-config-change to test it anyway")
    logger.warning("testing %s with a changed model config (--allow-config-change): %s", ckpt_path, listed)


def _describe_source(identity: dict[str, Any]) -> str:
    if not identity.get("sha256"):
        return f"{identity.get('name')} at random init (no weight file)"
    return f"{identity.get('name')} from {identity.get('weights')} (sha256 {identity['sha256']})"


def check_source(saved: Optional[dict[str, Any]], model: nn.Module, ckpt_path: str | Path,
                 ignore: bool = False) -> None:
    """Refuse a checkpoint whose source (name and weight-file sha256) differs from the model's, both
    ways: real weights vs random init, or another file. ``ignore`` turns the error into a warning."""
    identity = getattr(model, "source_identity", None)
    if saved is None or identity is None:
        return  # a model without a pretrained source (e.g. PointNet)
    now = identity()
    if (saved.get("name"), saved.get("sha256")) == (now.get("name"), now.get("sha256")):
        return
    message = (f"checkpoint {ckpt_path} was trained with source {_describe_source(saved)}, but the config builds "
               f"{_describe_source(now)}")
    if ignore:
        logger.warning("%s; continuing anyway (--ignore-source-mismatch)", message)
        return
    hint = (f"set model.source.pretrained to {saved.get('weights')}" if saved.get("sha256")
            else "set model.source.pretrained=null")
    raise CheckpointError(f"{message}; {hint}, or pass --ignore-source-mismatch")


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
    m = evaluate(model, loader, task, device, cfg.train.amp, "test")
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
