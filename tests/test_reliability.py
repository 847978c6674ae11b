"""Trust: safe checkpoints, one run per experiment folder, honest resume, one-line user errors,
TensorBoard without repeated steps, light imports, and no citation of documents outside the repo."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import warnings
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import yaml

import main as entry
from any2point.config import load_config
from any2point.engine import checkpoint
from any2point.engine.evaluate import evaluate_checkpoint
from any2point.engine.loading import check_source
from any2point.engine.trainer import BEST, LAST, Trainer
from any2point.errors import CheckpointError, ConfigError, ExperimentError
from any2point.utils.cpu_memory import NO_THREAD_CACHE, is_glibc
from tests.test_engine import ROOT, tiny_config

MARKER_ENV = "ANY2POINT_TEST_MARKER"

pytestmark = pytest.mark.usefixtures("one_thread")


class CodeCarrier:
    """Unpickling this runs code: it writes the file named in the environment."""

    def __reduce__(self):
        return exec, (f"open(__import__('os').environ['{MARKER_ENV}'], 'w').write('ran')",)


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``main.py argv`` in this process: its exit code and its stderr."""
    try:
        code = entry.main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error:" in last, err
    for needle in needles:
        assert needle in last, (needle, last)


# ------------------------------------------------------------------------------- checkpoints

def test_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path: Path, monkeypatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": {}, "payload": CodeCarrier()}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth: it calls 'exec'"):
        checkpoint.load(evil)
    code, err = run_main(capsys, "--test", "--ckpt", str(evil))
    assert code == 2
    assert_one_line_error(err, str(evil), "refusing")
    assert not marker.exists()
    # the writer refuses to produce such a file in the first place
    with pytest.raises(TypeError, match="CodeCarrier"):
        checkpoint.save_atomic({"model": {}, "payload": CodeCarrier()}, tmp_path / "x.pth")
    assert list(tmp_path.glob("*.tmp")) == [] and not (tmp_path / "x.pth").exists()


def test_corrupt_truncated_and_mismatched_checkpoints_are_one_line_errors(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "run", train={"epochs": 1})
    Trainer(load_config(cfg_path)).fit()
    exp = tmp_path / "exp/run"
    data = (exp / BEST).read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    # garbage that starts like a pickle of protocol 109: torch warns, the one-line error is enough
    (tmp_path / "protocol.pth").write_bytes(b"\x80m" + bytes(range(256)) * 4)
    for name in ("truncated.pth", "random.pth", "empty.pth", "protocol.pth"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(tmp_path / name))
        assert code == 2, name
        assert not [w for w in caught if "pickle protocol" in str(w.message)], name  # no warning on top of the error
        assert_one_line_error(err, str(tmp_path / name), "not a readable checkpoint")
    # a checkpoint of another model: the changed config keys are named, and if the change is allowed,
    # the state keys that do not fit
    code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(exp / BEST),
                         "model.widths=[16,32,64]")
    assert code == 2
    assert_one_line_error(err, str(exp / BEST), "model.widths: [16, 32] -> [16, 32, 64]")
    code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(exp / BEST),
                         "model.widths=[16,32,64]", "--allow-config-change")
    assert code == 2
    assert_one_line_error(err, str(exp / BEST), "does not match the model", "missing keys")


def test_corrupt_last_checkpoint_points_to_best_and_resume_from(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "run")
    assert Trainer(load_config(cfg_path)).fit(stop_after=2) is None
    exp = tmp_path / "exp/run"
    (exp / LAST).write_bytes((exp / LAST).read_bytes()[:100])
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume")
    assert code == 2
    assert_one_line_error(err, str(exp / LAST), f"--resume-from {exp / BEST}")
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume-from", str(exp / BEST))
    assert code == 0, err
    assert checkpoint.load(exp / LAST)["epoch"] == 2


def test_failed_write_leaves_no_temporary_and_reports_a_full_disk(tmp_path: Path, monkeypatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(ExperimentError, match="no space left on device"):
        checkpoint.save_atomic({"model": {}}, tmp_path / "c.pth")
    assert list(tmp_path.iterdir()) == []
    cfg_path = tiny_config(tmp_path, "full", train={"epochs": 1})
    code, err = run_main(capsys, "--config", str(cfg_path))
    assert code == 2
    assert_one_line_error(err, "cannot write checkpoint: no space left on device", str(tmp_path / "exp/full" / BEST))
    assert not list((tmp_path / "exp/full").glob(".*.tmp"))


# ------------------------------------------------------------------------------- experiment folder

def test_second_concurrent_run_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    """Two real processes: the second fails fast (exit 2) naming the folder and the first one's PID;
    after the first is killed, its lock is gone and a new run starts (--overwrite)."""
    cfg_path = tiny_config(tmp_path, "shared", train={"epochs": 100000})
    exp = tmp_path / "exp/shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path)], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (exp / LAST).is_file():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path), "--resume"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr[-2000:]
        assert_one_line_error(second.stderr, str(exp), f"PID {first.pid}", "in use")
    finally:
        first.kill()
        first.wait()
    third = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path), "--overwrite",
                            "train.epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-2000:]
    assert checkpoint.load(exp / LAST)["config"]["train"]["epochs"] == 1


def test_used_folder_is_refused_unless_overwritten_and_temporaries_are_cleared(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, "used", train={"epochs": 2})
    exp = tmp_path / "exp/used"
    exp.mkdir(parents=True)
    (exp / "notes.txt").write_text("not written by a run\n")
    with pytest.raises(ExperimentError, match=r"not empty \(notes.txt\).*--overwrite"):
        Trainer(load_config(cfg_path))
    (exp / "notes.txt").unlink()
    (exp / "log.txt").write_text("an earlier start that failed\n")
    assert Trainer(load_config(cfg_path), overwrite=True).fit(stop_after=1) is None
    assert "an earlier start" not in (exp / "log.txt").read_text()
    stale = exp / f".{LAST}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(ExperimentError, match="already holds a run"):
        Trainer(load_config(cfg_path))
    assert not stale.exists()  # removed at the next start, whatever that start then decides
    stale.write_bytes(b"half a checkpoint")
    Trainer(load_config(cfg_path), resume=True).fit()
    assert not stale.exists()


# ------------------------------------------------------------------------------- resume

def test_resume_refuses_a_changed_config_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "lr")  # AdamW 3e-3, 1 warm-up epoch of 3, min_lr 1e-6
    assert Trainer(load_config(cfg_path)).fit(stop_after=1) is None
    exp = tmp_path / "exp/lr"
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.003 -> 0\.03.*--allow-config-change"):
        Trainer(load_config(cfg_path, ["optimizer.lr=0.03"]), resume=True)
    code, err = run_main(capsys, "--config", str(cfg_path), "--resume", "optimizer.lr=0.03", "train.epochs=4")
    assert code == 2
    assert_one_line_error(err, "optimizer.lr: 0.003 -> 0.03", "train.epochs: 3 -> 4")
    assert checkpoint.load(exp / LAST)["epoch"] == 0  # nothing was trained

    trainer = Trainer(load_config(cfg_path, ["optimizer.lr=0.03"]), resume=True, allow_config_change=True)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.03)  # the new schedule, after warm-up
    trainer.fit()
    final = checkpoint.load(exp / LAST)
    assert final["config"]["optimizer"]["lr"] == 0.03
    assert all(g["lr"] == pytest.approx(1e-6) for g in final["optimizer"]["param_groups"])  # the floor
    saved = (exp / "config.yaml").read_text()
    assert "# history: resumed at epoch 1" in saved and "optimizer.lr: 0.003 -> 0.03" in saved
    assert load_config(exp / "config.yaml").optimizer.lr == 0.03
    assert "--allow-config-change" in (exp / "log.txt").read_text()


def test_tensorboard_steps_do_not_repeat_after_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg_path = tiny_config(tmp_path, "tb")
    exp = tmp_path / "exp/tb"
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<writer counter>. Real
    # resumes are new processes seconds apart; in one test process the counter can pass 9 -> 10
    # within a second and sort out of order, so the runs here start in different seconds.
    Trainer(load_config(cfg_path)).fit(stop_after=1)
    after_one = (exp / LAST).read_bytes()
    time.sleep(1.1)
    Trainer(load_config(cfg_path), resume=True).fit(stop_after=1)
    (exp / LAST).write_bytes(after_one)  # epoch 2 logged, then killed before its checkpoint
    time.sleep(1.1)
    Trainer(load_config(cfg_path), resume=True).fit()
    events = EventAccumulator(str(exp / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val/OA")] == [1, 2, 3]


# ------------------------------------------------------------------------------- source identity

def tiny_clip_weights(path: Path) -> Path:
    torch.manual_seed(1)
    clip = open_clip.CLIP(embed_dim=32, quick_gelu=True,
                          vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=100, width=64, heads=4, layers=2))
    torch.save(clip.state_dict(), path)
    return path


def test_checkpoint_refuses_another_source_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tiny_clip_weights(tmp_path / "tiny-clip.pt")
    model = {"type": "Any2Point", "num_classes": 4,
             "source": {"type": "CLIPTextSource", "width": 64, "depth": 2, "heads": 4, "pretrained": str(weights)},
             "tokenizer": {"type": "PointPNTokenizer", "k": 16},
             "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "voxel_size": 0.5}}
    cfg_path = tiny_config(tmp_path, "src", train={"epochs": 1}, dataset={"train_size": 32})
    data = yaml.safe_load(cfg_path.read_text())
    data["model"] = model
    cfg_path.write_text(yaml.safe_dump(data))
    Trainer(load_config(cfg_path)).fit()
    best = tmp_path / "exp/src" / BEST
    sha = checkpoint.load(best)["source"]["sha256"]
    # trained on real weights, evaluated at random init: refused, naming the file and its sha256
    code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(best),
                         "model.source.pretrained=null")
    assert code == 2
    assert_one_line_error(err, str(weights), sha, "random init", "--ignore-source-mismatch")
    code, err = run_main(capsys, "--config", str(cfg_path), "--test", "--ckpt", str(best),
                         "model.source.pretrained=null", "--ignore-source-mismatch")
    assert code == 0 and "continuing anyway" in err
    # resuming checks it too (after the config check, which sees the changed path first)
    random_source = load_config(cfg_path, ["model.source.pretrained=null"])
    with pytest.raises(CheckpointError, match=f"{sha}.*random init"):
        Trainer(random_source, resume=True, allow_config_change=True)
    # the other way: a checkpoint of a random-init source refuses real weights
    saved = checkpoint.load(best)["source"]
    with pytest.raises(CheckpointError, match="at random init.*pretrained=null"):
        check_source({**saved, "weights": None, "sha256": None}, _with_identity(saved), best)
    with pytest.raises(CheckpointError, match=f"{sha}.*other.pt"):
        check_source(saved, _with_identity({**saved, "weights": "other.pt", "sha256": "0" * 64}), best)
    check_source(saved, _with_identity(saved), best)
    assert evaluate_checkpoint(load_config(cfg_path), best).oa >= 0


def _with_identity(identity: dict) -> nn.Module:
    module = nn.Module()
    module.source_identity = lambda: identity
    return module


# ------------------------------------------------------------------------------- user errors

@pytest.mark.parametrize("case", ["yaml", "batch_size", "cuda", "ckpt_without_test", "unknown_type",
                                  "read_only", "debug_env"])
def test_user_errors_are_one_line_with_exit_code_2(case: str, tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg_path = tiny_config(tmp_path, "err", train={"epochs": 1})
    exp = tmp_path / "exp/err"
    argv, needles = ["--config", str(cfg_path)], []
    if case == "yaml":
        cfg_path.write_text(cfg_path.read_text() + "train: {epochs: [1,\n")
        needles = [str(cfg_path), "YAML syntax error", "line "]
    elif case == "batch_size":
        argv.append("train.batch_size=0")
        needles = ["train.batch_size must be at least 1"]
    elif case == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv.append("train.device=cuda")
        needles = ["train.device=cuda", "CUDA is not available"]
    elif case == "ckpt_without_test":
        argv += ["--ckpt", str(tmp_path / "x.pth")]
        needles = ["--ckpt is only read with --test"]
    elif case == "unknown_type":
        data = yaml.safe_load(cfg_path.read_text())
        data["dataset"]["transforms"]["train"].append({"type": "RandomWarp"})
        cfg_path.write_text(yaml.safe_dump(data))
        needles = ["unknown transform type 'RandomWarp'", "dataset.transforms.train[2]", str(cfg_path), "RandomScale"]
    elif case == "read_only":
        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(self))

        monkeypatch.setattr(Path, "mkdir", read_only)
        needles = ["read-only file system", str(exp)]
    elif case == "debug_env":
        argv.append("train.batch_size=0")
        monkeypatch.setenv("ANY2POINT_DEBUG", "1")
        with pytest.raises(ConfigError, match="batch_size"):
            entry.main(argv)
        with pytest.raises(ConfigError, match="batch_size"):
            entry.main(argv[:-1] + ["--debug", "train.batch_size=0"])
        return
    code, err = run_main(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, *needles)
    assert not exp.exists()  # found before anything was built or written


# ------------------------------------------------------------------------------- imports and docs

def test_package_imports_no_model_library_and_help_is_fast() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = ("import sys, any2point, any2point.extensions, any2point.models, any2point.config, "
             "any2point.engine.trainer; print(sorted(m for m in ('open_clip', 'timm', 'transformers') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for script in ("main.py", "tools/count_params.py"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], env=env,
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        assert proc.returncode == 0 and "usage:" in proc.stdout
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "torch" not in imported, script
        assert elapsed < 2.0, (script, elapsed)


def test_no_file_cites_documents_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in files if f != "tests/test_reliability.py" and (ROOT / f).is_file()
              and "DESIGN" + ".md" in (ROOT / f).read_text(errors="ignore")]
    assert citing == []
    method = (ROOT / "docs/method.md").read_text()
    for section in ("Tokenizer", "projection", "adapter", "Parameter", "official code"):
        assert section.lower() in method.lower(), section



@pytest.mark.parametrize("failure", [IndexError("list index out of range"), KeyError(7), TypeError("bad"),
                                     EOFError("Ran out of input")])
def test_any_unpickling_failure_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      failure: Exception) -> None:
    """Damaged bytes fail in many ways inside the weights-only unpickler (an IndexError was seen
    on random bytes); each one is a CheckpointError naming the file, never a traceback."""
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"not really a checkpoint")

    def failing_load(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError, match="damaged.pth"):
        checkpoint.load(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_kept_by_the_heap_is_released_on_request():
    """Under keep_freed_memory a freed 256 MB tensor stays resident; release_freed_memory (called by
    the trainer after each epoch on the CPU) hands it back."""
    code = textwrap.dedent("""
        import torch
        from any2point.utils.cpu_memory import keep_freed_memory, release_freed_memory
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        assert keep_freed_memory()
        x = torch.ones(64 * 2 ** 20)
        del x
        kept = rss()
        assert release_freed_memory()
        print(kept - rss())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout.strip()) > 200 * 2 ** 20


@pytest.mark.skipif(not is_glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("preset, restarts, expected", [
    (None, True, NO_THREAD_CACHE),
    ("glibc.malloc.check=0", True, f"glibc.malloc.check=0:{NO_THREAD_CACHE}"),
    ("glibc.malloc.tcache_count=7", False, "glibc.malloc.tcache_count=7"),
])
def test_restart_without_thread_cache_runs_the_program_again_once(preset, restarts, expected):
    """The program starts again in the same process with the same arguments and the tcache setting
    added to the environment, once; a tcache setting of the user's is left alone."""
    code = textwrap.dedent("""
        import os, sys
        from any2point.utils.cpu_memory import restart_without_thread_cache
        print("start", os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
        restart_without_thread_cache()
        print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if preset is not None:
        env["GLIBC_TUNABLES"] = preset
    out = subprocess.run([sys.executable, "-u", "-c", code, "a b", "--flag"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1], env=env).stdout.splitlines()
    starts = [line for line in out if line.startswith("start")]
    assert len(starts) == (2 if restarts else 1)
    pid = starts[0].split()[1]
    assert all(line.split()[1] == pid and "['a b', '--flag']" in line for line in starts)
    assert out[-1] == f"after {pid} {expected}" and len(out) == len(starts) + 1

