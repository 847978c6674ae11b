"""Shared pytest fixtures."""
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny

#: The three paper sources at tiny sizes, as ``model.source`` mappings (random init).
TINY_SOURCES = {name: tiny.source(name) for name in tiny.PAPER_SOURCES}

#: A tiny PointNet that learns SyntheticShapes' sphere / box / torus in a few seconds (100% test OA).
TINY_RUN = {
    "model": {"type": "PointNet", "num_classes": 3, "widths": [32, 64], "head_width": 32, "dropout": 0.0,
              "norm": "none"},
    "dataset": {"type": "SyntheticShapes", "num_points": 128, "train_size": 384, "val_size": 32, "test_size": 48,
                "classes": ["sphere", "box", "torus"], "rotation": "up",
                "transforms": {"train": [{"type": "RandomScale", "low": 0.8, "high": 1.2}]}},
    "optimizer": {"type": "AdamW", "lr": 0.01},
    "scheduler": {"type": "CosineWarmup", "warmup_epochs": 1},
    "train": {"epochs": 12, "batch_size": 32, "num_workers": 0, "grad_clip": 1.0},
}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_once(root: Path, name: str, config: dict) -> tuple[Path, Any]:
    """Write ``config`` (experiment ``name`` under ``root``) and train it on one thread: the config
    file and the final test metrics."""
    import yaml

    from any2point.config import load_config
    from any2point.engine.trainer import Trainer

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "experiment": {"name": name, "output_dir": str(root)}}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return path, Trainer(load_config(path)).fit()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment folder of a trained :data:`TINY_RUN` (checkpoints, config, log, TensorBoard)."""
    root = tmp_path_factory.mktemp("tiny_run")
    train_once(root, "tiny", TINY_RUN)
    return root / "tiny"
