"""Evaluation and voting against a brute-force reference; the results record."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from any2point import build_dataset, build_model
from any2point.engine.evaluate import VotingDataset, eval_loader, evaluate, vote_epoch, voting_dataset
from any2point.engine.records import results_record, write_results
from any2point.engine.tasks import build_task

MODEL = {"type": "PointNet", "num_classes": 4, "widths": [16, 32], "head_width": 16, "dropout": 0.0, "norm": "none"}
DATA = {"type": "SyntheticShapes", "num_points": 64, "train_size": 16, "val_size": 4, "test_size": 24,
        "classes": ["sphere", "box", "cone", "torus"],
        "transforms": {"train": [{"type": "RandomScale", "low": 0.5, "high": 1.5},
                                 {"type": "Jitter", "sigma": 0.05, "clip": 0.1}]}}
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL).eval()


def test_voting_averages_logits_of_augmented_passes() -> None:
    net = model()
    data = voting_dataset(DATA, "test", passes=3, seed=5)
    assert len(data.base.transform.transforms) == 2  # the training augmentations, on the test split
    task = build_task(data.base)
    m = evaluate(net, eval_loader(data, 7, 0, CPU), task, CPU, bf16=False)
    # brute force: each pass item by item with its own augmentation epoch; mean logits; arg-max
    base = build_dataset({**DATA, "transforms": {"test": DATA["transforms"]["train"]}}, "test")
    logits = np.zeros((3, len(base), 4))
    with torch.no_grad():
        for v in range(3):
            base.set_epoch(vote_epoch(5, v))
            for i in range(len(base)):
                logits[v, i] = net(base[i]["points"][None])[0].numpy()
    labels = base.labels()
    assert m.oa == pytest.approx(100 * np.mean(logits.mean(0).argmax(-1) == labels))
    assert m.pass_scores == pytest.approx([100 * np.mean(p.argmax(-1) == labels) for p in logits])
    assert m.count == len(base) and np.array(m.confusion).sum() == len(base)
    # the passes differ (augmented), and the same seed reproduces the number
    assert not np.allclose(logits[0], logits[1])
    again = evaluate(net, eval_loader(voting_dataset(DATA, "test", 3, 5), 24, 0, CPU), task, CPU, bf16=False)
    assert again.oa == m.oa and again.pass_scores == m.pass_scores


def test_vote_transforms_replace_training_transforms() -> None:
    cfg = {**DATA, "transforms": {**DATA["transforms"], "vote": [{"type": "ShufflePoints"}]}}
    data = voting_dataset(cfg, "test", passes=2, seed=0)
    assert [type(t).__name__ for t in data.base.transform.transforms] == ["ShufflePoints"]
    a, b = data[3]
    assert a["label"] == b["label"] and not torch.equal(a["points"], b["points"])
    assert torch.equal(a["points"].sort(0).values, b["points"].sort(0).values)  # same points, reordered


def test_single_pass_equals_plain_evaluation() -> None:
    net = model()
    test = build_dataset(DATA, "test")
    task = build_task(test)
    plain = evaluate(net, eval_loader(test, 8, 0, CPU), task, CPU, bf16=False)
    no_aug = {**DATA, "transforms": {"vote": []}}
    one = evaluate(net, eval_loader(voting_dataset(no_aug, "test", 1, 0), 8, 0, CPU), task, CPU, bf16=False)
    assert one.oa == plain.oa and one.per_class == plain.per_class and plain.pass_scores == []


def test_voting_arguments_checked() -> None:
    with pytest.raises(ValueError, match="--vote"):
        VotingDataset(build_dataset(DATA, "test"), 0, 0)


def test_results_record_is_json_with_provenance(tmp_path) -> None:
    test = build_dataset(DATA, "test")
    task = build_task(test)
    m = evaluate(model(), eval_loader(test, 8, 0, CPU), task, CPU, bf16=False)
    m.per_class[1] = math.nan  # an absent class
    cfg = {"model": MODEL, "dataset": DATA, "experiment": {"name": "x", "seed": 3}}
    record = results_record(m, cfg, task.class_names, split="test", protocol="honest",
                            voting={"passes": 1, "seed": 0})
    path = write_results(record, tmp_path / "results.json")
    back = json.loads(path.read_text())
    assert back["metrics"]["OA"] == pytest.approx(m.oa, abs=1e-4) and back["per_class"]["box"] is None
    assert back["seed"] == 3 and back["protocol"] == "honest" and back["voting"]["passes"] == 1
    assert len(back["config_hash"]) == 16 and back["git"]["commit"]
    other_seed = results_record(m, {**cfg, "experiment": {"name": "y", "seed": 4}}, task.class_names,
                                split="test", protocol="honest", voting={"passes": 1, "seed": 0})
    assert other_seed["group_hash"] == back["group_hash"] and other_seed["config_hash"] != back["config_hash"]


def test_main_test_votes_and_writes_results(tiny_run, capsys) -> None:
    import main as entry

    ckpt = str(tiny_run / "ckpt-best.pth")
    final = json.loads((tiny_run / "results.json").read_text())  # written by the training's final test
    assert final["voting"] == {"passes": 1, "pass_OA": []} and final["protocol"] == "honest"
    assert final["class_names"] == ["sphere", "box", "torus"] and final["split"] == "test"
    assert entry.main(["--test", "--ckpt", ckpt, "--vote", "3", "--results", "voted.json"]) == 0
    err = capsys.readouterr().err
    voted = json.loads((tiny_run / "voted.json").read_text())
    assert f"test OA {voted['metrics']['OA']:.2f}" in err and "voting 3 (single passes OA" in err
    assert voted["voting"]["passes"] == 3 and voted["voting"]["transforms"] == "train"
    assert len(voted["voting"]["pass_OA"]) == 3 and voted["metrics"]["count"] == 48
    assert voted["config_hash"] == final["config_hash"] and voted["epoch"] == final["epoch"]
    assert entry.main(["--test", "--ckpt", ckpt, "--vote", "3", "--results", "again.json"]) == 0
    assert json.loads((tiny_run / "again.json").read_text())["voting"] == voted["voting"]  # seeded
    with pytest.raises(SystemExit):
        entry.main(["--config", "cfgs/demo.yaml", "--vote", "3"])
    assert "model selection never votes" in capsys.readouterr().err


def test_main_test_applies_overrides_to_the_checkpoints_config(tiny_run, capsys) -> None:
    """Without --config, overrides apply to the checkpoint's own config (they were ignored)."""
    import main as entry

    ckpt = str(tiny_run / "ckpt-best.pth")
    assert entry.main(["--test", "--ckpt", ckpt, "train.batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert entry.main(["--test", "--ckpt", ckpt, "train.no_such_key=1"]) == 2
    assert "train.no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_vote_seed_outside_the_seed_range_is_refused(seed, capsys) -> None:
    import main as entry

    with pytest.raises(SystemExit):
        entry.parse_args(["--test", "--ckpt", "x.pth", "--vote", "2", "--vote-seed", seed])
    assert "--vote-seed in [0, 4294967295]" in capsys.readouterr().err
    assert entry.parse_args(["--test", "--ckpt", "x.pth", "--vote-seed", str(2**32 - 1)]).vote_seed == 2**32 - 1
