"""Trainer, checkpoints, schedule, metrics, sampler, resume equivalence and the 2-process DDP run."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import main as entry
from any2point.config import load_config
from any2point.engine import checkpoint
from any2point.engine.distributed import EpochSampler
from any2point.engine.metrics import Metrics, confusion_matrix
from any2point.engine.optim import build_optimizer, build_scheduler
from any2point.engine.seeds import stream_seed
from any2point.engine.evaluate import evaluate_checkpoint
from any2point.engine import trainer as trainer_module
from any2point.engine.trainer import BEST, LAST, Trainer
from any2point.utils.device_waits import DeviceWaits
from any2point.errors import CheckpointError, ConfigError, ExperimentError

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"type": "PointNet", "num_classes": 4, "widths": [16, 32], "head_width": 16, "dropout": 0.0,
              "norm": "none"},
    "dataset": {"type": "SyntheticShapes", "num_points": 64, "train_size": 64, "val_size": 16, "test_size": 24,
                "classes": ["sphere", "box", "cone", "torus"],
                "transforms": {"train": [{"type": "RandomScale", "low": 0.8, "high": 1.2},
                                         {"type": "Jitter", "sigma": 0.01, "clip": 0.02}]}},
    "optimizer": {"type": "AdamW", "lr": 3e-3},
    "scheduler": {"type": "CosineWarmup", "warmup_epochs": 1},
    "train": {"epochs": 3, "batch_size": 16, "num_workers": 0, "grad_clip": 1.0},
}


def tiny_config(tmp_path: Path, name: str, **extra: dict) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    data["experiment"] = {"name": name, "output_dir": str(tmp_path / "exp"), **data.get("experiment", {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    dropout = {"model": {"dropout": 0.5, "norm": "batch"}}  # exercise RNG and BN state across the resume
    straight = Trainer(load_config(tiny_config(tmp_path, "straight", **dropout)))
    m_straight = straight.fit()
    cfg = load_config(tiny_config(tmp_path, "resumed", **dropout))
    assert Trainer(cfg).fit(stop_after=1) is None
    assert checkpoint.load(tmp_path / "exp/resumed" / LAST)["epoch"] == 0
    m_resumed = Trainer(cfg, resume=True).fit()
    a = checkpoint.load(tmp_path / "exp/straight" / LAST)
    b = checkpoint.load(tmp_path / "exp/resumed" / LAST)
    assert states_equal(a["model"], b["model"])
    assert (a["best_epoch"], a["best_score"]) == (b["best_epoch"], b["best_score"])
    assert m_straight.oa == m_resumed.oa and m_straight.per_class == m_resumed.per_class
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_outputs_logs_and_test_mode(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, "run")
    metrics = Trainer(load_config(cfg_path)).fit()
    exp = tmp_path / "exp/run"
    for name in (LAST, BEST, "config.yaml", "log.txt"):
        assert (exp / name).is_file(), name
    assert any((exp / "tb").iterdir())
    log = (exp / "log.txt").read_text()
    assert "protocol honest" in log and "epoch 3/3" in log and "test OA" in log
    # the saved resolved config reloads to the same experiment
    assert load_config(exp / "config.yaml").train.epochs == 3
    # --test on the best checkpoint reproduces the final test metrics
    again = evaluate_checkpoint(load_config(cfg_path), exp / BEST)
    assert again.oa == metrics.oa and again.macc == metrics.macc
    assert entry.main(["--test", "--ckpt", str(exp / BEST)]) == 0
    # a second fresh run refuses to overwrite; --resume without a checkpoint is refused
    with pytest.raises(ExperimentError, match="--resume"):
        Trainer(load_config(cfg_path))
    with pytest.raises(ExperimentError, match="no checkpoint"):
        Trainer(load_config(tiny_config(tmp_path, "fresh")), resume=True)


def test_paper_protocol_selects_on_test(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, "paper", train={"protocol": "paper", "epochs": 1}))
    trainer = Trainer(cfg)
    assert trainer.train_set.split == "trainval" and trainer.select_loader.dataset.split == "test"
    trainer.fit()
    assert "protocol paper" in (tmp_path / "exp/paper/log.txt").read_text()


def test_experiment_seed_selects_the_augmentation_streams(tmp_path: Path) -> None:
    streams = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        trainer = Trainer(load_config(tiny_config(tmp_path, name, experiment={"seed": seed})))
        trainer.close()
        train_set = trainer.train_set
        assert train_set.augment_seed == stream_seed(seed, "augment") and train_set.transform.transforms
        streams[name] = torch.stack([train_set[i]["points"] for i in range(4)])
    assert torch.equal(streams["a"], streams["b"]) and not torch.equal(streams["a"], streams["c"])
    with pytest.raises(ConfigError, match=r"experiment.seed must be in \[0, 4294967295\], got -1"):
        load_config(tiny_config(tmp_path, "negative", experiment={"seed": -1}))


def test_main_reports_misspelt_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tiny_config(tmp_path, "typo", train={"epochz": 3})
    assert entry.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and str(path) in err


def test_num_classes_mismatch(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path, "nc", model={"num_classes": 5}))
    with pytest.raises(ValueError, match="num_classes=5"):
        Trainer(cfg)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    # SGD, not Adam: Adam's normalisation would amplify float summation-order noise in tiny gradients
    sgd = {"optimizer": {"type": "SGD", "lr": 0.05, "weight_decay": 1e-4}, "train": {"epochs": 2}}
    single = tiny_config(tmp_path, "single", **sgd)
    double = tiny_config(tmp_path, "double", **sgd)
    Trainer(load_config(single)).fit()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"), "--config",
                           str(double)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = checkpoint.load(tmp_path / "exp/single" / LAST)
    b = checkpoint.load(tmp_path / "exp/double" / LAST)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    assert len(b["rng"]) == 2
    init = checkpoint.trainable_state_dict(Trainer(load_config(tiny_config(tmp_path, "init", **sgd))).model)
    assert max((a["model"][k] - init[k]).abs().max().item() for k in init) > 1e-3  # far beyond the tolerance
    # evaluation is all-reduced: every test sample counted once, same accuracy
    log = (tmp_path / "exp/double/log.txt").read_text()
    assert "(n=24)" in log
    single_log = (tmp_path / "exp/single/log.txt").read_text()
    assert log.split("test OA")[1].split("(n=")[0] == single_log.split("test OA")[1].split("(n=")[0]


def test_epoch_sampler_shards_reassemble_the_global_batch() -> None:
    one = list(EpochSampler(50, True, seed=3))
    ranks = [list(EpochSampler(50, True, seed=3, rank=r, world=2)) for r in range(2)]
    batch = 8  # global batch; 4 per rank
    for i in range(len(one) // batch):
        shard = ranks[0][i * 4:(i + 1) * 4] + ranks[1][i * 4:(i + 1) * 4]
        assert sorted(shard) == sorted(one[i * batch:(i + 1) * batch])
    evals = [list(EpochSampler(11, False, rank=r, world=3)) for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(11))
    s = EpochSampler(20, True, seed=1)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first and sorted(list(s)) == list(range(20))


def test_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, 300)
    target[target == 4] = 3  # class 4 absent: excluded from mAcc
    pred = np.where(rng.random(300) < 0.6, target, rng.integers(0, 5, 300))
    m = Metrics.from_confusion(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5))
    assert m.oa == pytest.approx(100 * np.mean(pred == target))
    per = [100 * np.mean(pred[target == c] == c) for c in range(4)]
    assert m.macc == pytest.approx(np.mean(per))
    assert m.per_class[:4] == pytest.approx(per) and math.isnan(m.per_class[4])


def test_optimizer_groups_and_schedule() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].requires_grad_(False)
    opt = build_optimizer({"type": "AdamW", "lr": 1e-2, "weight_decay": 0.1}, model)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # bias, LN weight, LN bias
    sched = build_scheduler({"type": "CosineWarmup", "warmup_epochs": 2, "min_lr": 1e-5, "warmup_start_lr": 1e-4},
                            opt, epochs=10, iters_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(1e-4 + (1e-2 - 1e-4) * 5 / 10)     # linear warm-up, per iteration
    assert lrs[10] == pytest.approx(1e-2)                               # peak after 2 epochs
    assert lrs[30] == pytest.approx(1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * 20 / 40)))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)             # cosine reaches min_lr at the end
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_checkpoint_keeps_only_trainable_and_reports_mismatch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    state = checkpoint.trainable_state_dict(model)
    assert not any(k.startswith("0.") for k in state)
    assert "1.running_mean" in state and "2.weight" in state
    checkpoint.save_atomic({"model": state, "config": {}}, tmp_path / "c.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]          # no temporary file left behind
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    other[0].requires_grad_(False)
    checkpoint.load_trainable_state_dict(other, checkpoint.load(tmp_path / "c.pth")["model"], "c.pth")
    assert torch.equal(other[2].weight, model[2].weight)
    broken = dict(state)
    broken.pop("2.bias")
    broken["3.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"c\.pth does not match.*missing keys: 2\.bias.*unexpected keys: 3\.weight"):
        checkpoint.load_trainable_state_dict(other, broken, "c.pth")
    with pytest.raises(CheckpointError, match="nothere.pth"):
        checkpoint.load(tmp_path / "nothere.pth")


def test_compiled_training_equals_eager(tmp_path: Path) -> None:
    """``train.compile: true`` (torch.compile) trains an epoch to the same loss and weights as eager."""
    sizes = {"dataset": {"train_size": 48}}  # three batches of one shape: a single compilation
    eager = Trainer(load_config(tiny_config(tmp_path, "eager", **sizes)))
    compiled = Trainer(load_config(tiny_config(tmp_path, "compiled", train={"compile": True}, **sizes)))
    assert compiled.net is not compiled.model
    init = {k: v.clone() for k, v in checkpoint.trainable_state_dict(eager.model).items()}
    stats_eager, stats_compiled = eager.train_epoch(0), compiled.train_epoch(0)
    assert stats_compiled["loss"] == pytest.approx(stats_eager["loss"], rel=1e-4)
    a, b = checkpoint.trainable_state_dict(eager.model), checkpoint.trainable_state_dict(compiled.model)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a[key], init[key], atol=1e-3) for key in a)


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_heap_setting_follows_the_config(tmp_path: Path, monkeypatch, keep: bool) -> None:
    """``train.keep_freed_memory`` (CPU) sets the heap to keep freed memory and releases it after
    every epoch; false leaves malloc alone."""
    calls = {"keep": 0, "release": 0}
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.__setitem__("keep", calls["keep"] + 1))
    monkeypatch.setattr(trainer_module, "release_freed_memory",
                        lambda: calls.__setitem__("release", calls["release"] + 1))
    cfg = load_config(tiny_config(tmp_path, f"heap_{keep}", train={"keep_freed_memory": keep, "device": "cpu"}))
    Trainer(cfg).fit()
    epochs = cfg.train.epochs
    assert calls == ({"keep": 1, "release": epochs} if keep else {"keep": 0, "release": 0})


@pytest.mark.parametrize("cpu_amp,native", [(False, True), (True, False), ("auto", True), ("auto", False)])
def test_cpu_bf16_autocast_follows_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_amp,
                                              native: bool) -> None:
    """On the CPU ``train.amp`` (CUDA's switch) leaves training and evaluation in fp32;
    ``train.cpu_amp`` runs both under bf16 autocast, whose matmuls give bf16 outputs, and ``auto``
    does so exactly where the CPU has native bf16 matmuls; the log says which and why."""
    checks = {"_is_avx512_bf16_supported": native, "_is_amx_tile_supported": False}
    for name, value in checks.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    cfg = load_config(tiny_config(tmp_path, f"cpu_amp_{cpu_amp}_{native}", train={
        "amp": True, "cpu_amp": cpu_amp, "device": "cpu", "epochs": 1}))
    trainer = Trainer(cfg)
    seen: list[tuple[bool, bool, torch.dtype]] = []
    first = next(m for m in trainer.model.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
    first.register_forward_hook(lambda module, args, out: seen.append(
        (module.training, torch.is_autocast_enabled("cpu"), out.dtype)))
    trainer.fit()
    assert {training for training, _, _ in seen} == {True, False}  # training steps and evaluations
    bf16 = cpu_amp is True or (cpu_amp == "auto" and native)
    expected = (True, torch.bfloat16) if bf16 else (False, torch.float32)
    assert {(enabled, dtype) for _, enabled, dtype in seen} == {expected}
    note = next(line for line in (trainer.exp_dir / "log.txt").read_text().splitlines() if " device cpu, " in line)
    assert f" device cpu, {'bf16 autocast' if bf16 else 'float32'} (train.cpu_amp={cpu_amp}" in note
    assert ("native bf16" in note) == (cpu_amp == "auto")


def test_cpu_amp_takes_only_a_bool_or_auto(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpu_amp"):
        load_config(tiny_config(tmp_path, "cpu_amp_bad", train={"cpu_amp": "sometimes"}))


def test_device_waits_are_counted_and_the_training_loop_adds_none(tmp_path: Path) -> None:
    """The counter sees reads of values and data-dependent sizes; a step of the trainer's loop on a
    model without any (the tiny PointNet, SGD) makes no such call: the loss is summed on the device
    and the progress bar (off outside a terminal) reads nothing. (Adam reads its step count from a
    CPU tensor by design, and the epoch's metrics are read once after the loop.)"""
    x = torch.randn(12)
    with DeviceWaits() as waits:
        x.sum().item()
        x[x > 0]
        torch.unique(x)
        x.nonzero()
        x.tolist()
        (x * 2).sum()
    assert waits.counts == {"_local_scalar_dense": 1, "index (boolean mask)": 1, "_unique2": 1, "nonzero": 1,
                            "tolist": 1}
    cfg = tiny_config(tmp_path, "waits", train={"device": "cpu"}, optimizer={"type": "SGD", "lr": 0.01})
    trainer = Trainer(load_config(cfg))
    totals, call = [], trainer.call
    trainer.call = lambda event: (totals.append(waits.total) if event == "after_step" else None, call(event))
    try:
        with DeviceWaits() as waits:
            trainer.train_epoch(0)
    finally:
        trainer.close()
    assert len(totals) == 4 and totals[1:] == totals[:1] * 3, totals  # none between step ends
