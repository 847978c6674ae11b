"""Trust, runs and folders: a run deletes and writes nothing outside its experiment folder, never saves
or reports a diverged model, tests a checkpoint only with its own model config, reports a full disk in
one line, releases its folder when it dies or fails, and resumes after its folder was moved."""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from any2point.config import load_config
from any2point.engine import checkpoint
from any2point.engine import experiment as experiment_module
from any2point.engine.experiment import ExperimentLock
from any2point.engine.trainer import BEST, LAST, Trainer
from any2point.errors import DivergenceError, ExperimentError
from tests.test_engine import ROOT, tiny_config
from tests.test_reliability import assert_one_line_error, run_main

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def env_for_subprocess() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def finite_state(ckpt: dict) -> bool:
    return all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------- where a run writes

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config whose output_dir holds a finished run, next to a sibling folder of someone else's files."""
    root = tmp_path_factory.mktemp("two_runs")
    cfg_path = tiny_config(root, "kept", train={"epochs": 1})
    assert run_main_quiet(cfg_path) == 0
    sibling = root / "sibling"
    sibling.mkdir()
    (sibling / "thesis.tex").write_text("not a run\n")
    return cfg_path, root


def run_main_quiet(cfg_path: Path, *argv: str) -> int:
    import main as entry

    return entry.main(["--config", str(cfg_path), *argv])


@pytest.mark.parametrize("name", ["..", "", ".", "/ABS", "a/../..", "kept/../.."])
@pytest.mark.parametrize("overwrite", [True, False])
def test_experiment_name_outside_output_dir_is_refused_and_nothing_changes(
        name: str, overwrite: bool, two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    cfg_path, root = two_runs
    capsys.readouterr()
    name = name.replace("/ABS", str(root / "sibling"))
    before = snapshot(root)
    code, err = run_main(capsys, "--config", str(cfg_path), f"experiment.name={name or repr(name)}",
                         *(["--overwrite"] if overwrite else []))
    assert code == 2
    assert_one_line_error(err, f"experiment.name={name!r}", "relative folder name below experiment.output_dir")
    assert snapshot(root) == before


def test_overwrite_deletes_only_a_folder_of_run_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "run", train={"epochs": 1})
    exp = tmp_path / "exp/run"
    assert run_main_quiet(cfg_path) == 0
    for foreign in (exp / "notes.txt", exp / "tb/plots/curve.png", exp / "data/train.h5"):
        foreign.parent.mkdir(exist_ok=True)
        foreign.write_text("not written by a run\n")
        before = snapshot(tmp_path)
        code, err = run_main(capsys, "--config", str(cfg_path), "--overwrite")
        assert code == 2
        assert_one_line_error(err, "--overwrite deletes only what runs write", str(exp),
                              foreign.relative_to(exp).parts[0])
        assert snapshot(tmp_path) == before
        shutil.rmtree(foreign.parent) if foreign.parent != exp else foreign.unlink()
    (exp / "results-vote10.json").write_text("{}")  # results of a --test: a run's own file
    code, err = run_main(capsys, "--config", str(cfg_path), "--overwrite")
    assert code == 0, err
    assert not (exp / "results-vote10.json").exists() and (exp / LAST).is_file()


def test_nested_experiment_names_stay_allowed(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, "run", train={"epochs": 1})
    assert run_main_quiet(cfg_path, "experiment.name=group/seed1") == 0
    assert (tmp_path / "exp/group/seed1" / LAST).is_file()


# ------------------------------------------------------------------------------- divergence

def test_learning_rate_too_high_stops_before_a_nan_is_saved_or_reported(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "lr", train={"epochs": 4})
    exp = tmp_path / "exp/lr"
    assert Trainer(load_config(cfg_path)).fit(stop_after=1) is None
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume", "--allow-config-change", "optimizer.lr=2e3")
    assert code == 2
    assert_one_line_error(err, "training diverged in epoch", "optimizer.lr=2000.0 is likely too high",
                          f"{exp / LAST} holds epoch")
    failed_epoch = int(re.search(r"diverged in epoch (\d+)", err).group(1))
    last = checkpoint.load(exp / LAST)
    assert last["epoch"] == failed_epoch - 2 and finite_state(last)  # the epoch before the failure (0-based)
    assert finite_state(checkpoint.load(exp / BEST)) and not (exp / "results.json").exists()
    # the checkpoint from before the failure continues with a lower learning rate
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume", "--allow-config-change", "optimizer.lr=1e-3")
    assert code == 0, err
    oa = json.loads((exp / "results.json").read_text())["metrics"]["OA"]
    assert math.isfinite(oa)


@pytest.mark.parametrize("what", ["loss", "gradient", "gradient_without_clipping"])
def test_a_non_finite_step_names_its_epoch_and_step(what: str, tmp_path: Path, monkeypatch) -> None:
    """A NaN in epoch 2 at step 3 of 4: the loss itself, or a finite loss with NaN gradients (caught
    by the clipped norm). Without clipping, NaN gradients at the epoch's last step leave only the
    weights to tell (the NaN loss at the next step is never computed)."""
    clip = None if what == "gradient_without_clipping" else 1.0
    poisoned_step = 4 if clip is None else 3
    cfg_path = tiny_config(tmp_path, "nan", train={"epochs": 3, "grad_clip": clip})
    trainer = Trainer(load_config(cfg_path))
    calls = {"n": 0}
    loss_of = trainer.task.loss

    def poisoned(outputs, batch):
        loss = loss_of(outputs, batch)
        calls["n"] += 1
        if calls["n"] == 4 + poisoned_step:  # 4 steps per epoch
            # sqrt at 0: a finite value whose gradient is inf * 0 = NaN
            loss = loss * float("nan") if what == "loss" else loss + torch.sqrt(outputs.sum() * 0)
        return loss

    monkeypatch.setattr(trainer.task, "loss", poisoned)
    assert len(trainer.train_loader) == 4
    with pytest.raises(DivergenceError) as caught:
        trainer.fit()
    where = ("its last step: a weight is not finite" if what == "gradient_without_clipping"
             else "step 3 of 4: the loss or the gradient norm is not finite")
    assert f"training diverged in epoch 2, {where}" in str(caught.value)
    last = checkpoint.load(tmp_path / "exp/nan" / LAST)
    assert last["epoch"] == 0 and finite_state(last)


# ------------------------------------------------------------------------------- testing a checkpoint

def test_test_refuses_another_model_config_but_allows_other_keys(tiny_run: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    best = tiny_run / BEST
    cfg_path = tiny_run.parent / "tiny.yaml"
    before = json.loads((tiny_run / "results.json").read_text())["metrics"]["OA"]
    for argv in (["--config", str(cfg_path)], []):  # the checkpoint's own config when --config is absent
        code, err = run_main(capsys, *argv, "--test", "--ckpt", str(best), "model.dropout=0.5",
                             "model.head_width=48", "--results", "x.json")
        assert code == 2
        assert_one_line_error(err, str(best), "model.dropout: 0.0 -> 0.5", "model.head_width: 32 -> 48",
                              "--allow-config-change")
    # a model change that fits the weights, allowed: a warning names it
    code, err = run_main(capsys, "--test", "--ckpt", str(best), "model.dropout=0.5", "--allow-config-change",
                         "--results", "changed.json")
    assert code == 0 and "model.dropout: 0.0 -> 0.5" in err
    # batch size, data and voting are not the model's: no question asked
    code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(best), "train.batch_size=7",
                         "train.num_workers=1", "dataset.test_size=48", "--vote", "2", "--results", "vote.json")
    assert code == 0, err
    assert json.loads((tiny_run / "vote.json").read_text())["metrics"]["OA"] >= 0
    assert json.loads((tiny_run / "changed.json").read_text())["metrics"]["OA"] == before  # dropout is off in eval
    for name in ("changed.json", "vote.json"):
        (tiny_run / name).unlink()


# ------------------------------------------------------------------------------- full disk

def test_disk_full_in_torch_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """The write fails inside torch's own zip writer (as on a full disk), at the third checkpoint
    (epoch 1 wrote ckpt-best and ckpt-last)."""
    opened = {"n": 0}
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        opened["n"] += 1
        f = real_fdopen(fd, *args, **kwargs)
        return FullDisk(f) if opened["n"] >= 3 else f

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    cfg_path = tiny_config(tmp_path, "full", train={"epochs": 3})
    exp = tmp_path / "exp/full"
    code, err = run_main(capsys, "--config", str(cfg_path))
    monkeypatch.undo()
    assert code == 2
    assert_one_line_error(err, "cannot write checkpoint: no space left on device", str(exp))
    assert "enforce fail" not in err
    for name in (LAST, BEST):
        assert checkpoint.load(exp / name)["epoch"] == 0
    assert not list(exp.glob(".*.tmp"))


def test_file_size_limit_on_a_real_write_is_one_line(tmp_path: Path) -> None:
    """A real process whose file writes fail in the kernel (RLIMIT_FSIZE below a checkpoint's size)."""
    cfg_path = tiny_config(tmp_path, "small", train={"epochs": 1})

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    run = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path)], cwd=tmp_path,
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=300,
                         preexec_fn=limit_file_size)
    assert run.returncode == 2, run.stderr[-3000:]
    assert_one_line_error(run.stderr, "cannot write checkpoint: file too large", str(tmp_path / "exp/small" / BEST))
    assert not list((tmp_path / "exp/small").glob("*.pth"))
    assert not list((tmp_path / "exp/small").glob(".*.tmp"))


# ------------------------------------------------------------------------------- lock and late errors

def test_lock_dies_with_the_run_while_its_dataloader_worker_lives(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from torch.utils.data import DataLoader
        from any2point.engine.experiment import ExperimentLock

        lock = ExperimentLock(Path(sys.argv[1]))
        lock.acquire()
        batches = iter(DataLoader(range(100), batch_size=1, num_workers=1))  # a forked worker
        next(batches)
        print(batches._workers[0].pid, flush=True)
        time.sleep(120)
    """)
    folder = tmp_path / "exp"
    run = subprocess.Popen([sys.executable, "-c", script, str(folder)], env=env_for_subprocess(),
                           stdout=subprocess.PIPE, text=True)
    worker = int(run.stdout.readline())
    try:
        with pytest.raises(ExperimentError, match=f"in use by another run \\(PID {run.pid}\\)"):
            ExperimentLock(folder).acquire()
        run.kill()
        run.wait()
        # the worker still lives (it notices its parent's death seconds later): not gone, not a zombie
        assert Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        lock = ExperimentLock(folder)
        lock.acquire()  # ... and does not hold the folder
        lock.release()
    finally:
        run.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_forked_children_let_go_of_the_lock_only_in_themselves(tmp_path: Path) -> None:
    lock = ExperimentLock(tmp_path)
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: its copy is gone, the parent's lock stays
            code = 0 if not experiment_module._held else 1
            os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        with pytest.raises(ExperimentError, match="in use"):
            ExperimentLock(tmp_path).acquire()
    finally:
        lock.release()


def fail_in_getitem(monkeypatch) -> None:
    from any2point.errors import DataError
    from any2point.datasets.synthetic import SyntheticShapes

    def broken(self, index):
        raise DataError(f"sample {index}: damaged")

    monkeypatch.setattr(SyntheticShapes, "__getitem__", broken)


@pytest.mark.parametrize("case", ["bad_data", "batch_too_large", "num_points", "missing_resume_from"])
def test_a_late_error_leaves_a_folder_the_corrected_rerun_reuses(case: str, tmp_path: Path, monkeypatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "late", train={"epochs": 1})
    exp = tmp_path / "exp/late"
    argv = {"bad_data": [], "batch_too_large": ["train.batch_size=1000"], "num_points": ["dataset.num_points=0"],
            "missing_resume_from": ["--resume-from", str(tmp_path / "missing.pth")]}[case]
    if case == "bad_data":
        fail_in_getitem(monkeypatch)
    code, err = run_main(capsys, "--config", str(cfg_path), *argv)
    assert code == 2
    assert_one_line_error(err)
    monkeypatch.undo()
    code, err = run_main(capsys, "--config", str(cfg_path))
    assert code == 0, err
    assert checkpoint.load(exp / LAST)["epoch"] == 0
    assert "damaged" not in (exp / "log.txt").read_text()  # the failed start's leftovers were cleared


def render_terminal(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: carriage returns go back to the line's start, and
    what follows overwrites (enough of a terminal for tqdm on one line)."""
    lines = []
    for raw in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r\n", "\n").split("\n"):
        shown: list[str] = []
        for part in raw.split("\r"):
            shown[:len(part)] = list(part)
        lines.append("".join(shown).rstrip())
    return lines


def test_a_data_error_in_a_worker_gets_its_own_line_on_a_terminal(tmp_path: Path) -> None:
    """A damaged sample read in a DataLoader worker: the bar is cleared first, the error is one line
    (not the worker's traceback torch wraps it in), and nothing is drawn after it."""
    cfg_path = tiny_config(tmp_path, "bar", train={"epochs": 1, "num_workers": 1})
    script = textwrap.dedent("""
        import sys
        from any2point.datasets.io import DataError
        from any2point.datasets.synthetic import SyntheticShapes
        from any2point.engine.trainer import Trainer
        import main

        real_item, real_epoch = SyntheticShapes.__getitem__, Trainer.train_epoch

        def broken(self, index, calls=[0]):  # the second batch of training holds a damaged sample
            calls[0] += 1
            if calls[0] > 20:
                raise DataError(f"sample {index}: damaged")
            return real_item(self, index)

        def train_epoch(self, epoch):
            SyntheticShapes.__getitem__ = broken
            return real_epoch(self, epoch)

        Trainer.train_epoch = train_epoch
        sys.exit(main.main(["--config", sys.argv[1]]))
    """)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    run = subprocess.Popen([sys.executable, "-c", script, str(cfg_path)], env=env_for_subprocess(),
                           stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert run.wait(timeout=300) == 2, text[-3000:]
    assert "epoch 1/1" in text  # the bar was drawn
    lines = [line for line in render_terminal(text) if line]
    errors = [i for i, line in enumerate(lines) if "error:" in line]
    assert len(errors) == 1 and re.fullmatch(r"error: sample \d+: damaged", lines[errors[0]]), lines[-5:]
    assert errors[0] == len(lines) - 1, lines[-5:]  # nothing drawn after it


# ------------------------------------------------------------------------------- moved runs

def test_a_moved_and_renamed_run_folder_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "first", train={"epochs": 2})
    assert Trainer(load_config(cfg_path)).fit(stop_after=1) is None
    shutil.move(tmp_path / "exp/first", tmp_path / "elsewhere/second")
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume", f"experiment.output_dir={tmp_path}/elsewhere",
                         "experiment.name=second")
    assert code == 0, err
    moved = tmp_path / "elsewhere/second"
    assert checkpoint.load(moved / LAST)["epoch"] == 1
    assert "history" not in (moved / "config.yaml").read_text()  # no config change recorded
    assert yaml.safe_load((moved / "config.yaml").read_text().split("# history")[0])["experiment"]["name"] == "second"
    # a change of what the run computes is still refused
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume", f"experiment.output_dir={tmp_path}/elsewhere",
                         "experiment.name=second", "experiment.seed=5")
    assert code == 2
    assert_one_line_error(err, "experiment.seed: 0 -> 5")
