"""A run's seed drives every random stream (init, data order, augmentation, dropout, loader workers)
unless the config pins one; results.json records every seed."""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

import main as entry
from any2point.config import load_config
from any2point.engine import checkpoint
from any2point.engine.evaluate import evaluate_checkpoint
from any2point.engine.seeds import STREAMS, derive_seed, run_seeds, stream_seed
from any2point.engine.trainer import BEST, Trainer, seed_workers
from any2point.errors import ConfigError

TINY = {
    "model": {"type": "PointNet", "num_classes": 3, "widths": [16, 32], "head_width": 16, "dropout": 0.5,
              "norm": "none"},
    "dataset": {"type": "SyntheticShapes", "num_points": 32, "train_size": 48, "val_size": 6, "test_size": 6,
                "classes": ["sphere", "box", "torus"],
                "transforms": {"train": [{"type": "RandomScale", "low": 0.8, "high": 1.2},
                                         {"type": "Jitter", "sigma": 0.01, "clip": 0.02}]}},
    "optimizer": {"type": "AdamW", "lr": 3e-3},
    "scheduler": {"type": "CosineWarmup", "warmup_epochs": 0},
    "train": {"epochs": 1, "batch_size": 16, "num_workers": 0},
}


def config(tmp_path: Path, name: str, **experiment) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "experiment": {"name": name, "output_dir": str(tmp_path / "exp"),
                                                           **experiment}}))
    return path


def streams(tmp_path: Path, name: str, **experiment) -> dict[str, object]:
    """What each stream produced in a freshly built run: initial weights, epoch-0 order, the
    augmented first batch, and the global generator state that dropout draws from."""
    trainer = Trainer(load_config(config(tmp_path, name, **experiment)))
    trainer.close()
    dropout_state = torch.get_rng_state()
    trainer.train_set.set_epoch(0)
    trainer.train_loader.sampler.set_epoch(0)
    order = list(trainer.train_loader.sampler)
    return {"init": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "order": order,
            "augment": torch.stack([trainer.train_set[i]["points"] for i in range(4)]),
            "batch": next(iter(trainer.train_loader))["points"],
            "dropout": dropout_state}


def same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_stream_seeds_are_derived_per_stream_and_pins_are_kept() -> None:
    zero, one = run_seeds({"seed": 0}), run_seeds({"seed": 1})
    assert zero == run_seeds({"seed": 0, "augment_seed": None}) and zero["pinned"] == []
    assert len({zero[s] for s in STREAMS}) == len(STREAMS)  # the streams are not one seed
    assert all(zero[s] != one[s] for s in STREAMS)
    for s in STREAMS:
        expected = int(np.random.SeedSequence([1, zlib.crc32(s.encode())]).generate_state(1)[0])
        assert one[s] == stream_seed(1, s) == expected
    pinned = run_seeds({"seed": 5, "augment_seed": 3})
    assert pinned["augment"] == 3 and pinned["pinned"] == ["augment"] and pinned["init"] == stream_seed(5, "init")
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "shuffle")


def test_two_seeds_differ_in_every_stream_and_one_seed_repeats(tmp_path: Path, one_thread) -> None:
    a, b, c = (streams(tmp_path, name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for key in a:
        assert same(a[key], b[key]), key
        assert not same(a[key], c[key]), key


def test_pinned_streams_stay_across_experiment_seeds(tmp_path: Path, one_thread) -> None:
    pins = {"augment_seed": 7, "dropout_seed": 8}
    a, b = streams(tmp_path, "a", seed=0, **pins), streams(tmp_path, "b", seed=1, **pins)
    assert same(a["augment"], b["augment"]) and same(a["dropout"], b["dropout"])
    assert not same(a["init"], b["init"]) and a["order"] != b["order"]  # unpinned streams still follow the seed
    # the same items in another order: a pinned augmentation does not depend on when an item is drawn
    assert not same(a["batch"], b["batch"])
    c = streams(tmp_path, "c", seed=1, init_seed=0, order_seed=0)
    d = streams(tmp_path, "d", seed=2, init_seed=0, order_seed=0)
    assert same(c["init"], d["init"]) and c["order"] == d["order"]
    assert not same(c["augment"], d["augment"])


class WorkerDraws(Dataset):
    """Each item: what the worker's global generators give (Python, NumPy, torch) and the worker id."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        return torch.tensor([random.random(), np.random.random(), torch.rand(()).item(), info.id], dtype=torch.float64)


def worker_draws(epochs: list[int], seed: int) -> list[torch.Tensor]:
    """The draws of each epoch in ``epochs`` (in that order) from one loader with two workers."""
    loader = DataLoader(WorkerDraws(), batch_size=1, num_workers=2, generator=torch.Generator())
    out = []
    for epoch in epochs:
        seed_workers(loader, seed, epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_loader_workers_draw_distinct_seed_derived_streams() -> None:
    straight = worker_draws([0, 1], seed=3)
    resumed = worker_draws([1], seed=3)[0]  # a resumed run starts at epoch 1 with a new loader
    assert torch.equal(straight[1], resumed)
    for draws in straight:
        by_worker = [draws[draws[:, 3] == w, :3] for w in (0, 1)]
        assert len(by_worker[0]) == len(by_worker[1]) == 4
        assert not torch.isin(by_worker[0], by_worker[1]).any()  # the workers' streams differ
    assert not torch.isin(straight[0][:, :3], straight[1][:, :3]).any()  # so do the epochs'
    assert not torch.isin(worker_draws([1], seed=4)[0][:, :3], resumed[:, :3]).any()  # and the seeds'
    # worker w of an epoch is seeded with (base + w), the base drawn from the seeded loader generator
    generator = torch.Generator().manual_seed(derive_seed(3, 1, 0))
    base = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
    assert straight[1][0, 0].item() == random.Random(base).random()


def test_results_record_every_seed(tmp_path: Path, one_thread) -> None:
    path = config(tmp_path, "run", seed=4, augment_seed=2)
    Trainer(load_config(path)).fit()
    exp = tmp_path / "exp/run"
    expected = {**run_seeds({"seed": 4, "augment_seed": 2}), "dataset": 0}
    assert expected["pinned"] == ["augment"]
    assert json.loads((exp / "results.json").read_text())["seeds"] == expected
    assert "seeds: experiment 4: init" in (exp / "log.txt").read_text()
    evaluate_checkpoint(load_config(path), exp / BEST, results="retest.json")
    assert json.loads((exp / "retest.json").read_text())["seeds"] == expected
    assert checkpoint.load(exp / BEST)["config"]["experiment"]["augment_seed"] == 2


def test_negative_pin_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = config(tmp_path, "bad", dropout_seed=-1)
    with pytest.raises(ConfigError, match=r"experiment.dropout_seed must be in \[0, 4294967295\].*bad.yaml"):
        load_config(path)
    assert entry.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: experiment.dropout_seed must be in [0, 4294967295]")


def test_a_checkpoints_model_is_rebuilt_with_its_init_seed(tmp_path: Path, one_thread) -> None:
    """A frozen source at random init is not in the checkpoint: testing rebuilds the trained one."""
    from any2point.engine.loading import load_model
    from any2point.engine.trainer import LAST

    bert = {"type": "HFEncoderSource", "pretrained": None, "cls_token_id": 1,
            "architecture": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
                             "vocab_size": 16}}
    path = config(tmp_path, "a2p", seed=6)
    data = yaml.safe_load(path.read_text())
    data["model"] = {"type": "Any2Point", "num_classes": 3, "source": bert,
                     "tokenizer": {"type": "PointPNTokenizer", "k": 8},
                     "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "cell_size": 8}}
    path.write_text(yaml.safe_dump(data))
    trainer = Trainer(load_config(path))
    trainer.save(LAST, trainer.state(0))
    trainer.close()
    torch.manual_seed(123)  # whatever the global generators hold before
    model = load_model(tmp_path / "exp/a2p" / LAST, device=torch.device("cpu"))[0]
    built = trainer.model.state_dict()
    assert any(not p.requires_grad for p in trainer.model.parameters())  # a frozen source to rebuild
    assert model.state_dict().keys() == built.keys()
    assert all(torch.equal(value, built[key]) for key, value in model.state_dict().items())
