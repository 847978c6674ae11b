"""Results records: the JSON of one test (``results.json``), with what it was measured on and how,
so a number in a table can be traced to the run that produced it."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from any2point.engine import distributed
from any2point.engine.metrics import Metrics, SegmentationMetrics, json_number

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = "results.json"


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
