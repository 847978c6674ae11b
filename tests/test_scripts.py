"""Every scripts/*.sh with --dry-run: valid commands whose configs load with their overrides, the
launcher chosen by GPUS, voting by VOTE, and a final table over exactly the runs trained."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

import main as entry
from any2point.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.sh") if p.name not in ("lib.sh", "ablation.sh", "gpu_check.sh"))
TABLES = sorted(p.name for p in (ROOT / "cfgs/paper").glob("table*") if p.is_dir())
CASES = [(name, []) for name in SCRIPTS] + [("ablation.sh", ["4"])]


def test_every_ablation_table_has_a_script() -> None:
    assert TABLES and {f"{t}.sh" for t in TABLES} <= set(SCRIPTS)


def dry_run(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args, "--dry-run"], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, "OUT": "exp_dry", **env})


def main_args(command: list[str]) -> list[str]:
    """The arguments of main.py in a python or torchrun command line."""
    return command[command.index("main.py") + 1:]


@pytest.mark.parametrize("script,args,gpus,vote", [(*case, "1", "1") for case in CASES] + [
    ("modelnet40_dinov2.sh", [], "2", "3"), ("demo_all.sh", [], "2", "3"), ("ablation.sh", ["4"], "2", "3")])
def test_dry_run_commands_are_valid(script: str, args: list[str], gpus: str, vote: str) -> None:
    proc = dry_run(script, args, SEEDS="0 1", GPUS=gpus, VOTE=vote, EXTRA="train.epochs=1 train.num_workers=0",
                   FOLDS="0 1")
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("python -c")]
    trained, tested, tables, banks = [], [], [], []
    for command in lines:
        if "main.py" in command:
            assert command[0] == ("python" if gpus == "1" else "torchrun")
            if gpus != "1":
                assert f"--nproc_per_node={gpus}" in command
            args_ = entry.parse_args(main_args(command))
            if args_.test:
                tested.append((args_.ckpt, args_.vote, args_.results))
            else:
                assert not banks or banks[-1] == args_.config or "_full" in args_.config
                cfg = load_config(args_.config, args_.overrides)
                assert cfg.train.epochs == 1 and cfg.experiment.output_dir == "exp_dry"
                trained.append(f"exp_dry/{cfg.experiment.name}")
        elif command[1] == "tools/collect_results.py":
            tables.append(command)
        elif command[1] == "tools/build_memory_bank.py":  # Point-PEFT's bank, of the config trained next
            banks.append(command[command.index("--config") + 1])
        else:  # the demo's predict and figures, on the checkpoint it trained
            assert command[1] in ("tools/predict.py", "tools/visualize.py"), command
            assert command[command.index("--ckpt") + 1] == f"{trained[0]}/ckpt-best.pth"
    assert trained and len(tables) == 1
    assert tables[0][2:2 + len(trained)] == trained  # the table covers exactly the runs trained
    if script != "demo_all.sh":
        assert {t[0] for t in tested} == ({f"{run}/ckpt-best.pth" for run in trained} if vote != "1" else set())
        assert all(t[1:] == (int(vote), f"results_vote{vote}.json") for t in tested)
        assert len({name.rsplit("_seed", 1)[1] for name in trained}) == 2  # both seeds
    else:
        assert (f"{trained[0]}/ckpt-best.pth", 3, "results_vote3.json") in tested


def test_fewshot_runs_every_episode_and_groups_by_way_and_shot() -> None:
    proc = dry_run("fewshot.sh", [])
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "main.py" in line]
    assert len(runs) == 2 * 2 * 10
    cfg = load_config("cfgs/modelnet40_fewshot/any2point_dinov2.yaml",
                      main_args(shlex.split(runs[-1]))[2:])
    assert (cfg.dataset.type, cfg.dataset.way, cfg.dataset.shot, cfg.dataset.fold) == ("ModelNetFewShot", 10, 20, 9)
    assert cfg.model.num_classes == 10 and "num_category" not in cfg.dataset  # the few-shot base replaced ModelNet40's
    assert "--group-by dataset.way\\,dataset.shot" in proc.stdout.splitlines()[-1]


def test_bad_arguments_are_one_line() -> None:
    proc = dry_run("scanobjectnn_clip_text.sh", [], GPUS="two")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: GPUS must be a positive integer, got 'two'"
    proc = dry_run("ablation.sh", ["999"])
    assert proc.returncode == 2 and "no configs in cfgs/paper/table999/" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "scripts/modelnet40_dinov2.sh"), "--fast"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
