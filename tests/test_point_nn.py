"""Point-NN (encoder against a loop implementation, bank against a brute force, no trainable
parameter, the memory pass, few-shot, plug-and-play), Point-PN (its size, tiny runs of the paper
configs) and K-fold cross-validation on a PointFolder."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import main as entry
from any2point.config import load_config
from any2point.datasets import build_dataset
from any2point.datasets.base import fold_of_each
from any2point.engine import checkpoint
from any2point.engine.evaluate import evaluate_checkpoint
from any2point.engine.trainer import BEST, Trainer
from any2point.errors import ConfigError
from any2point.extensions import furthest_point_sample
from any2point.models import build_model
from any2point.models.point_nn.bank import EmptyBankError, MemoryBank
from any2point.models.point_nn.point_nn import PointNN, PointNNEncoder
from tests import tiny
from tests.test_datasets_real import clouds, write_episode, write_resampled, write_scanobjectnn
from tools.collect_results import main as collect_main
from tools.count_params import count_params

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Point-NN's encoder and bank against direct implementations
# ------------------------------------------------------------------------------------------------

def pos_enc(v: list[float], dim: int, alpha: float, beta: float) -> torch.Tensor:
    """Point-NN's equations for one point: per axis and frequency m, sin then cos of beta x / alpha^(m / F)."""
    freqs, out = dim // 6, []
    for x in v:
        for m in range(freqs):
            angle = beta * x / alpha ** (m / freqs)
            out += [math.sin(angle), math.cos(angle)]
    return torch.tensor(out)


def loop_encoder(cloud: torch.Tensor, enc: PointNNEncoder) -> torch.Tensor:
    """One cloud ``(N, 3)`` through the encoder, point by point and group by group."""
    xyz = cloud.double()
    feats = torch.stack([pos_enc(p.tolist(), enc.embed_dim, enc.alpha, enc.beta) for p in xyz]).double()
    for _ in range(enc.stages):
        centres = furthest_point_sample(xyz[None].float(), xyz.shape[0] // 2)[0].tolist()
        groups = []
        for c in centres:
            dist = [float(((xyz[j] - xyz[c]) ** 2).sum()) for j in range(xyz.shape[0])]
            nbrs = sorted(range(xyz.shape[0]), key=lambda j: dist[j])[:enc.k]
            groups.append((c, nbrs))
        offsets = torch.stack([xyz[j] - xyz[c] for c, nbrs in groups for j in nbrs])
        diffs = torch.stack([feats[j] - feats[c] for c, nbrs in groups for j in nbrs])
        xyz_std, feat_std = offsets.std() + 1e-5, diffs.std() + 1e-5  # over the whole cloud (norm mn40)
        new = []
        for c, nbrs in groups:
            rows = []
            for j in nbrs:
                x = torch.cat([(feats[j] - feats[c]) / feat_std, feats[c]])
                pe = pos_enc(((xyz[j] - xyz[c]) / xyz_std).tolist(), x.shape[0], enc.alpha, enc.beta).double()
                rows.append((x + pe) * pe)
            rows = torch.stack(rows)
            new.append(F.gelu(rows.max(dim=0).values + rows.mean(dim=0)))
        xyz, feats = xyz[centres], torch.stack(new)
    return feats.max(dim=0).values + feats.mean(dim=0)


def test_encoder_matches_a_loop_implementation() -> None:
    torch.manual_seed(0)
    enc = PointNNEncoder(stages=2, embed_dim=12, k=5, alpha=1000.0, beta=100.0, norm="mn40")
    points = torch.rand(2, 24, 3) * torch.tensor([1.0, 2.0, 0.5])
    out = enc(points)
    assert out.shape == (2, 48) and enc.dim == 48
    for b in range(2):
        torch.testing.assert_close(out[b].double(), loop_encoder(points[b], enc), rtol=1e-4, atol=1e-4)
    # a cloud's feature does not depend on the others of its batch (per-sample statistics)
    torch.testing.assert_close(enc(points[:1]), out[:1])


def test_bank_votes_match_a_brute_force() -> None:
    torch.manual_seed(1)
    bank = MemoryBank(num_classes=3, dim=5, gamma=4.0)
    keys, labels = torch.randn(9, 5), torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0])
    bank.add(keys[:4], labels[:4])
    bank.add(keys[4:], labels[4:])
    bank.finish()
    queries = torch.randn(4, 5)
    votes = bank(queries)
    for q in range(4):
        brute = torch.zeros(3)
        for i in range(9):
            cos = float(queries[q] @ keys[i] / (queries[q].norm() * keys[i].norm()))
            brute[labels[i]] += math.exp(-4.0 * (1.0 - cos))
        torch.testing.assert_close(votes[q], brute / brute.sum())
    # a sharp gamma gives the nearest key's class; the arg-max never underflows to a tie of zeros
    sharp = bank.votes(bank.similarity(queries), gamma=1e6)
    nearest = labels[(F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).t()).argmax(dim=1)]
    assert torch.equal(sharp.argmax(dim=1), nearest) and torch.isfinite(sharp).all()


def test_an_empty_bank_says_how_to_fill_it() -> None:
    with pytest.raises(EmptyBankError, match="memory pass"):
        MemoryBank(num_classes=2, dim=4, gamma=1.0)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="labels"):
        MemoryBank(num_classes=2, dim=4).add(torch.randn(2, 4), torch.tensor([0, 2]))


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, classes, count", [("scanobjectnn", 15, 762_083), ("modelnet40", 40, 768_508)])
def test_point_pn_has_the_paper_size_and_point_nn_none(dataset: str, classes: int, count: int) -> None:
    pn = count_params(str(ROOT / f"cfgs/{dataset}/point_pn.yaml"))
    assert pn["trainable"] == pn["total"] == count
    assert abs(count - 0.8e6) / 0.8e6 <= 0.1
    # head: 288 -> 512 -> 256 -> classes with BN
    assert pn["trainable"] - pn["trainable_without_head"] == 288 * 512 + 512 + 1024 + 512 * 256 + 256 + 512 + \
        256 * classes + classes
    assert count_params(str(ROOT / f"cfgs/{dataset}/point_nn.yaml")) == {"total": 0, "trainable": 0,
                                                                         "trainable_without_head": 0}


def test_point_pn_shares_the_tokenizer_code_and_checks_its_widths() -> None:
    from any2point.models.any2point import tokenizer
    from any2point.models.point_nn import point_pn

    assert point_pn.ResidualBlock is tokenizer.ResidualBlock and point_pn.sample_and_group is tokenizer.sample_and_group
    with pytest.raises(ConfigError, match="multiples of 6"):
        build_model({"type": "PointPN", "num_classes": 3, "embed_dim": 4})
    with pytest.raises(ConfigError, match="one value per stage"):
        build_model({"type": "PointPN", "num_classes": 3, "blocks": [1, 1]})


# ------------------------------------------------------------------------------------------------
# Tiny runs of the paper configs
# ------------------------------------------------------------------------------------------------

SMALL_DATA = ["dataset.fps_cache=false", "dataset.transforms={train: [{type: FPSResample, num_fps: 80, "
              "num_keep: 64}], test: [{type: FPSResample, num_fps: 64}]}"]
SMALL_RUN = ["train.epochs=1", "train.batch_size=8", "train.num_workers=0", "train.amp=false"]
SMALL_MODEL = {"point_pn": ["model.embed_dim=6", "model.k=8", "model.head_widths=[16, 16]"],
               "point_nn": ["model.embed_dim=6", "model.k=8"]}


def write_data(dataset: str, tmp_path: Path) -> list[str]:
    if dataset == "scanobjectnn":
        write_scanobjectnn(tmp_path / "so", "main_split", "objectdataset_augmentedrot_scale75", points=128)
        return [f"dataset.root={tmp_path / 'so'}"]
    write_resampled(tmp_path / "mn", points=128)  # three of ModelNet40's classes
    return [f"dataset.root={tmp_path / 'mn'}", "dataset.num_points=128", "model.num_classes=3",
            "train.batch_size=4"]


@pytest.mark.parametrize("dataset", ["scanobjectnn", "modelnet40"])
@pytest.mark.parametrize("model", ["point_pn", "point_nn"])
def test_the_paper_configs_run(tmp_path: Path, dataset: str, model: str) -> None:
    overrides = SMALL_DATA + SMALL_RUN + SMALL_MODEL[model] + write_data(dataset, tmp_path) + [
        f"experiment.output_dir={tmp_path / 'exp'}", "experiment.name=run"]
    cfg = load_config(ROOT / f"cfgs/{dataset}/{model}.yaml", overrides)
    metrics = Trainer(cfg).fit()
    record = json.loads((tmp_path / "exp/run/results.json").read_text())
    assert record["metrics"]["OA"] == pytest.approx(metrics.oa, abs=0.01) and record["run_seconds"] > 0
    if model == "point_nn":
        assert record["parameters"]["trainable"] == 0 and record["epoch"] == 1
        train = len(build_dataset(cfg.dataset, "trainval"))
        assert record["memory"]["bank_size"] == train  # train + val: the whole training set
        state = checkpoint.load(tmp_path / "exp/run" / BEST)
        assert state["optimizer"] is None and state["model"]["bank.keys"].shape[0] == train
        # the checkpoint alone gives the same test (the bank is in it)
        again = evaluate_checkpoint(load_config(ROOT / f"cfgs/{dataset}/{model}.yaml", overrides),
                                    tmp_path / "exp/run" / BEST, results="again.json")
        assert again.oa == metrics.oa
    else:
        assert record["parameters"]["trainable"] > 0


def test_point_nn_runs_a_few_shot_episode_without_training(tmp_path: Path) -> None:
    write_episode(tmp_path / "fs", way=5, shot=4, queries=2, points=32)
    cfg = load_config(ROOT / "cfgs/modelnet40_fewshot/point_nn.yaml", [
        f"dataset.root={tmp_path / 'fs'}", "dataset.shot=4", "dataset.fold=3", "dataset.fps_cache=false",
        "dataset.transforms={train: [], test: []}", "model.stages=2", "model.embed_dim=6", "model.k=4",
        *SMALL_RUN[1:], "train.batch_size=4", f"experiment.output_dir={tmp_path / 'exp'}", "experiment.name=fs"])
    Trainer(cfg).fit()
    record = json.loads((tmp_path / "exp/fs/results.json").read_text())
    assert record["memory"]["bank_size"] == 20 and sum(map(sum, record["confusion"])) == 10


def test_a_fixed_gamma_is_kept_and_the_grid_picks_the_best_on_val(tmp_path: Path) -> None:
    from any2point.engine.memory import fill_bank

    torch.manual_seed(0)
    model = PointNN(num_classes=2, stages=1, embed_dim=6, k=4, gammas=[1.0, 1e4])
    # two classes: points near the origin or far; val = the train set, so a sharp gamma is exact
    near, far = torch.rand(4, 16, 3) * 0.1, torch.rand(4, 16, 3) * 0.1 + torch.tensor([0.0, 0.0, 5.0])
    points = torch.cat([near, far])
    loader = [{"points": points, "label": torch.tensor([0] * 4 + [1] * 4)}]
    info = fill_bank(model, model, loader, loader, torch.device("cpu"), add_selection=False)
    assert info["select_OA"] == 100.0 and info["bank_size"] == 8 and float(model.bank.gamma) == info["gamma"]
    fixed = PointNN(num_classes=2, stages=1, embed_dim=6, k=4, gamma=3.0)
    assert fill_bank(fixed, fixed, loader, loader, torch.device("cpu"), add_selection=True)["gamma"] == 3.0
    assert fixed.bank.size == 16  # the selection split joined the bank


# ------------------------------------------------------------------------------------------------
# Plug-and-play
# ------------------------------------------------------------------------------------------------

def tiny_any2point_config(tmp_path: Path, point_nn: dict) -> Path:
    data = {
        "model": {"type": "Any2Point", "num_classes": 3, "source": tiny.source("clip_text", 32),
                  "tokenizer": {"type": "PointPNTokenizer", "k": 8, "recompute": False},
                  "tuner": tiny.TUNERS["frozen_source"], "head_widths": [16], "point_nn": point_nn},
        "dataset": {"type": "SyntheticShapes", "num_points": 64, "train_size": 24, "val_size": 9, "test_size": 12,
                    "classes": ["sphere", "box", "cone"]},
        "optimizer": {"type": "AdamW", "lr": 1e-3},
        "scheduler": {"type": "Constant"},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "amp": False},
        "experiment": {"name": "plug", "output_dir": str(tmp_path / "exp")},
    }
    path = tmp_path / "plug.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plug_and_play_adds_the_weighted_bank_to_a_trained_model(tmp_path: Path) -> None:
    cfg = load_config(tiny_any2point_config(tmp_path, {"stages": 2, "embed_dim": 6, "k": 4}))
    trainer = Trainer(cfg)
    assert trainer.counts["trainable"] == count_params(str(tmp_path / "plug.yaml"),
                                                       ["model.point_nn=null"])["trainable"]
    metrics = trainer.fit()
    record = json.loads((tmp_path / "exp/plug/results.json").read_text())
    memory = record["memory"]
    assert memory["bank_size"] == 33 and memory["weight"] in trainer.model.point_nn.weights
    model, points = trainer.model.eval(), torch.rand(4, 64, 3)
    with torch.no_grad():
        combined = model(points)
        model.point_nn.bank.reset()
        base = model(points)  # an empty bank leaves the classifier's logits alone
        assert not torch.equal(base, combined) or memory["weight"] == 0
    saved = checkpoint.load(tmp_path / "exp/plug" / BEST)["model"]
    assert saved["point_nn.bank.keys"].shape == (33, 24) and float(saved["point_nn.weight"]) == memory["weight"]
    loaded = evaluate_checkpoint(cfg, tmp_path / "exp/plug" / BEST, results="again.json")
    assert loaded.oa == metrics.oa
    loaded_model = build_model(cfg.model)
    checkpoint.load_trainable_state_dict(loaded_model, saved, "best")
    loaded_model.eval()
    with torch.no_grad():
        votes = loaded_model.point_nn(points)
        expected = loaded_model.head(torch.cat([(e := loaded_model.encode(points)).tokens.amax(dim=1), e.cls], dim=-1))
        torch.testing.assert_close(loaded_model(points), expected + memory["weight"] * votes)


def test_plug_and_play_keys_are_checked(tmp_path: Path) -> None:
    cfg = load_config(tiny_any2point_config(tmp_path, {"stages": 2, "shots": 3}))
    with pytest.raises(ConfigError, match="unknown key 'shots' for model.point_nn"):
        build_model(cfg.model)


# ------------------------------------------------------------------------------------------------
# K-fold cross-validation on a small folder
# ------------------------------------------------------------------------------------------------

def write_shapes(root: Path, per_class: dict[str, int]) -> list[str]:
    rng = np.random.default_rng(0)
    files = []
    for c, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            cloud = clouds(rng, 1, 40)[0] * (1.0 + c)
            np.save(root / name / f"{i}.npy", cloud)
            files.append(str(root / name / f"{i}.npy"))
    return files


def test_folds_are_stratified_and_cover_every_item_once() -> None:
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    fold = fold_of_each(labels, 5, seed=3)
    assert sorted(np.bincount(fold, minlength=5)) == [3, 3, 3, 3, 3]
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold, fold_of_each(labels, 5, seed=3))
    assert not np.array_equal(fold, fold_of_each(labels, 5, seed=4))
    with pytest.raises(ConfigError, match="at least 5 items"):
        fold_of_each(labels[:4], 5, seed=0)


def test_five_folds_test_every_file_once_and_report_the_pooled_accuracy(tmp_path: Path, capsys) -> None:
    files = write_shapes(tmp_path / "shapes", {"a": 6, "b": 5, "c": 4})
    config = tmp_path / "folder.yaml"
    resample = [{"type": "FPSResample", "num_fps": 32}]
    config.write_text(yaml.safe_dump({
        "_base_": str(ROOT / "cfgs/_base_/datasets/point_folder.yaml"),
        "model": {"type": "PointNN", "num_classes": 3, "stages": 2, "embed_dim": 6, "k": 4},
        "dataset": {"root": str(tmp_path / "shapes"), "val_fraction": 0.0, "fps_cache": False,
                    "transforms": {"train": resample, "test": resample}},
        "train": {"batch_size": 2, "num_workers": 0},
        "experiment": {"name": "cv", "output_dir": str(tmp_path / "exp")}}))
    assert entry.main(["--config", str(config), "--folds", "5", "model.gamma=10.0"]) == 0
    predicted = []
    for fold in range(5):
        with open(tmp_path / f"exp/cv/fold{fold}/predictions.csv") as f:
            predicted += list(csv.DictReader(f))
        assert (tmp_path / f"exp/cv/fold{fold}/results.json").is_file()
    assert sorted(p["file"] for p in predicted) == sorted(files)  # every file, exactly once
    record = json.loads((tmp_path / "exp/cv/cv_results.json").read_text())
    pooled = 100.0 * np.mean([p["label"] == p["prediction"] for p in predicted])
    assert record["metrics"]["OA"] == pytest.approx(pooled, abs=1e-4) and record["metrics"]["count"] == 15
    cv = record["cross_validation"]
    assert cv["folds"] == 5 and cv["files"] == 15 and len(cv["fold_OA"]) == 5
    assert cv["fold_OA_mean"] == pytest.approx(np.mean(cv["fold_OA"]))
    assert cv["fold_OA_std"] == pytest.approx(np.std(cv["fold_OA"], ddof=1))
    assert sum(map(sum, record["confusion"])) == 15
    capsys.readouterr()
    assert collect_main([str(tmp_path / "exp")]) == 0
    table = capsys.readouterr().out
    assert "| cv | 1 |" in table and f"5: {cv['fold_OA_mean']:.2f} ± {cv['fold_OA_std']:.2f}" in table


def test_folds_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        entry.parse_args(["--test", "--ckpt", "x.pth", "--folds", "3"])
    cfg = load_config(ROOT / "cfgs/demo_point_nn.yaml")
    from any2point.engine.cross_validation import cross_validate

    with pytest.raises(ConfigError, match="PointFolder"):
        cross_validate(cfg, 3)
    (tmp_path / "shapes/train/a").mkdir(parents=True)
    (tmp_path / "shapes/test/a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cross-validation needs one folder per class"):
        build_dataset({"type": "PointFolder", "root": str(tmp_path / "shapes"), "folds": 3}, "train")


def test_run_seconds_carry_over_a_resume(tmp_path: Path) -> None:
    from tests.test_engine import tiny_config

    cfg = load_config(tiny_config(tmp_path, "timed"))
    assert Trainer(cfg).fit(stop_after=1) is None
    last = tmp_path / "exp/timed/ckpt-last.pth"
    state = checkpoint.load(last)
    assert 0 < state["run_seconds"] < 1000
    checkpoint.save_atomic({**state, "run_seconds": 1000.0}, last)  # as if the first session took 1000 s
    Trainer(cfg, resume=True).fit()
    record = json.loads((tmp_path / "exp/timed/results.json").read_text())
    assert 1000 < record["run_seconds"] < 1000 + 120
    assert record["parameters"]["trainable"] == record["parameters"]["total"] > 0
