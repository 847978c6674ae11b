"""Trust in what the user hands in: weight files never run code, YAML is read with limits, config
numbers are checked on load, damaged data and bad flags are one-line errors naming the file, key or
flag, and tools/predict.py never overwrites one output with another.

A case about the process (its exit status, its single ``error:`` line, a file that code in a weight
file would have written) runs in a subprocess; the rest run in this process.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Tuple

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import main as entry
from any2point.config import MAX_YAML_NODES, load_config, parse_yaml
from any2point.datasets.io import DataError, read_h5
from any2point.engine import checkpoint
from any2point.errors import CheckpointError
from any2point.models.sources.torchscript_archive import read_torchscript_state_dict
from any2point.errors import ConfigError
from any2point.registry import MAX_POINTS, MAX_SEED, Range
from tests.conftest import train_once
from tests.test_engine import ROOT, tiny_config
from tests.test_partseg import SEG_RUN

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")]


def run_process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python argv`` from ``cwd`` with the repository importable, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ANY2POINT_DEBUG", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """stderr holds no traceback and ends with one ``error:`` line holding every needle; that line."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last, stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``main.py argv`` in this process: its exit code and its stderr."""
    try:
        code = entry.main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def tree(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- TorchScript weight files

class _Block(nn.Module):
    """A CLIP text block in miniature: attention and an MLP, with a causal-mask buffer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width, bias=False))
        self.register_buffer("attn_mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _TinyCLIPText(nn.Module):
    """OpenAI's CLIP text tower layout at width 8: fp32 and fp16 parameters, buffers, nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(4, 8))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(_Block(8), _Block(8))
        self.ln_final = nn.LayerNorm(8)
        self.text_projection = nn.Parameter(torch.randn(8, 6).half())
        self.register_buffer("context_length", torch.tensor(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer.resblocks(x + self.positional_embedding)
        return self.ln_final(x) @ self.text_projection.float()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_is_read_as_data_with_the_tensors_of_jit_load(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    module = _TinyCLIPText()
    for p in module.parameters():
        nn.init.normal_(p)  # no all-ones / all-zeros tensors that a misplaced read could match
    archive = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(4, 1, 8))
    path = tmp_path / "tiny.pt"
    torch.jit.save(archive, str(path))
    ours = read_torchscript_state_dict(path, "test weights")
    theirs = torch.jit.load(str(path)).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert ours["text_projection"].dtype == torch.float16 and "transformer.resblocks.1.mlp.2.bias" not in ours


class _WritesOnLoad(nn.Module):
    """A module whose scripted ``__setstate__`` creates the file named by its ``path`` attribute
    (``torch.from_file(..., shared=True)`` creates it): ``torch.jit.load`` runs that code."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.weight, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.path, self.training = state
        self.weight = self.weight + 0 * torch.from_file(state[1], True, 2)


class _Carrier(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.inner = _WritesOnLoad(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_torchscript_archive_with_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    torch.jit.save(torch.jit.script(_Carrier(str(probe))), str(tmp_path / "probe.pt"))
    torch.jit.load(str(tmp_path / "probe.pt"))
    assert probe.exists()  # the crafted archive does run code under torch.jit.load

    marker = tmp_path / "marker"
    evil = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(_Carrier(str(marker))), str(evil))
    with pytest.raises(CheckpointError, match=r"refusing to load the TorchScript archive .*ViT-L-14\.pt.*__setstate__"):
        read_torchscript_state_dict(evil, "CLIP weights")
    assert not marker.exists()

    work = tmp_path / "work"
    work.mkdir()
    config = work / "run.yaml"
    model = {**SEG_RUN["model"], "source": {**SEG_RUN["model"]["source"], "pretrained": str(evil)}}
    config.write_text(yaml.safe_dump({**SEG_RUN, "model": model, "experiment": {"name": "evil", "output_dir": "exp"}}))
    result = run_process(str(ROOT / "main.py"), "--config", str(config), cwd=work)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, str(evil), "__setstate__")
    assert not marker.exists()
    assert {p.parts[0] for p in tree(work)} <= {"run.yaml", "exp"}


def test_damaged_torchscript_archive_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(_TinyCLIPText()), str(path))
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo("tiny/data.pkl").header_offset
    name_len, extra_len = struct.unpack("<HH", raw[header + 26:header + 30])
    start = header + 30 + name_len + extra_len  # the pickle's first byte
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(raw[:start + 20] + bytes(40) + raw[start + 60:])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[:len(raw) // 2])
    for bad in (damaged, truncated):
        with pytest.raises(CheckpointError, match=rf"CLIP weights: cannot read the TorchScript archive '{bad}'"):
            read_torchscript_state_dict(bad, "CLIP weights")


# ------------------------------------------------------------------------------------ YAML limits

def alias_bomb(levels: int) -> str:
    """YAML of ``10 ** levels`` leaves in about 60 bytes per level (each level lists the last ten times)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_fails_fast_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))  # 10^9 leaves in 600 bytes
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"bomb\.yaml: the YAML expands to more than {MAX_YAML_NODES} values"):
        load_config(bomb)
    assert time.perf_counter() - start < 1.0
    result = run_process(str(ROOT / "main.py"), "--config", str(bomb), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, str(bomb), "expands to more than")
    assert tree(tmp_path) == {Path("bomb.yaml")}


def test_yaml_within_limits_keeps_its_aliases_and_other_abuse_is_one_error(tmp_path: Path) -> None:
    assert parse_yaml(alias_bomb(3), "ok.yaml")["a2"] == [[["x"] * 10] * 10] * 10  # 10^3 leaves: a fine config
    with pytest.raises(ConfigError, match="r.yaml: an alias refers to a node that contains it"):
        parse_yaml("a: &a [1, *a]", "r.yaml")
    with pytest.raises(ConfigError, match="deep.yaml: the YAML is nested too deeply"):
        parse_yaml("[" * 50_000 + "]" * 50_000, "deep.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"big\.yaml: more than \d+ characters of YAML"):
        load_config(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not a UTF-8 text file"):
        load_config(binary)


# -------------------------------------------------------------------------- config numbers on load

@pytest.mark.parametrize("override, message", [
    ("experiment.seed=99999999999999999999999", f"experiment.seed must be in [0, {MAX_SEED}]"),
    ("experiment.seed=-1", f"experiment.seed must be in [0, {MAX_SEED}], got -1"),
    ("dataset.num_points=10000000000000", f"dataset.num_points must be in [1, {MAX_POINTS}]"),
    ("dataset.num_points=0", f"dataset.num_points must be in [1, {MAX_POINTS}], got 0"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number, got nan"),
    ("optimizer.lr=.inf", "optimizer.lr must be a finite number, got inf"),
    ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1"),
    ("optimizer.lr=0", "optimizer.lr must be > 0, got 0"),
    ("optimizer.weight_decay=-0.01", "optimizer.weight_decay must be at least 0, got -0.01"),
    ("+optimizer.betas=[0.9,.nan]", "optimizer.betas[1] must be a finite number, got nan"),
    ("+optimizer.betas=[1.0,0.999]", "optimizer.betas[0] must be in [0, 1), got 1.0"),
    ("+scheduler.min_lr=.nan", "scheduler.min_lr must be a finite number"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.grad_clip=-.inf", "train.grad_clip must be a finite number"),
    ("train.label_smoothing=1.0", "train.label_smoothing must be in [0, 1), got 1.0"),
    ("dataset.train_size=100000000000", "dataset.train_size must be in [0, 10000000]"),
])
def test_impossible_numbers_are_refused_on_load_naming_key_and_origin(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      override: str, message: str) -> None:
    cfg_path = tiny_config(tmp_path, "numbers")
    code, err = run_main(capsys, "--config", str(cfg_path), override)
    assert code == 2
    assert_one_error_line(err, message, "(set in the command line)")
    assert tree(tmp_path) == {Path("numbers.yaml")}  # refused before anything was built or written


def test_impossible_number_in_a_file_names_the_file(tmp_path: Path) -> None:
    cfg_path = tiny_config(tmp_path, "lr", optimizer={"lr": float("nan")})
    with pytest.raises(ConfigError, match=rf"optimizer.lr must be a finite number, got nan \(set in {cfg_path}\)"):
        load_config(cfg_path)
    assert load_config(cfg_path, ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3


@pytest.mark.parametrize("bound, inside, outside, wanted", [
    (Range(gt=0), [1e-12, 5.0], [0, -1e-12], "> 0"),
    (Range(ge=0, lt=1), [0, 0.999], [1, -0.001], "in [0, 1)"),
    (Range(ge=1, le=3), [1, 3], [0, 4], "in [1, 3]"),
    (Range(gt=0, le=1), [1, 0.5], [0, 1.5], "in (0, 1]"),
    (Range(ge=2), [2, 10**30], [1.999], "at least 2"),
    (Range(le=2), [2, -10], [2.5], "at most 2"),
])
def test_range_accepts_exactly_its_interval(bound: Range, inside: list, outside: list, wanted: str) -> None:
    for value in inside:
        assert bound.problem(value) is None, value
    for value in outside:
        assert bound.problem(value) == f"must be {wanted}, got {value}"


# --------------------------------------------------------------------------- checkpoints and data

def test_checkpoint_without_config_is_one_error_naming_it(tmp_path: Path) -> None:
    ckpt = tmp_path / "model-only.pth"
    torch.save({"model": {}}, ckpt)
    with pytest.raises(CheckpointError, match=r"model-only\.pth is not an any2point checkpoint \(no 'config'"):
        checkpoint.load(ckpt)
    result = run_process(str(ROOT / "main.py"), "--test", "--ckpt", str(ckpt), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, str(ckpt), "no 'config' entry")
    torch.save({"model": {"w": [1, 2]}, "config": {}}, ckpt)
    with pytest.raises(CheckpointError, match="'model' entry is not a mapping of names to tensors"):
        checkpoint.load(ckpt)


def test_damaged_h5_chunk_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ply_data_test0.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rng.normal(size=(64, 256, 3)).astype(np.float32), chunks=(64, 256, 3),
                         compression="gzip")
        f.create_dataset("label", data=np.zeros((64, 1), dtype=np.uint8))
    assert read_h5(path, ["data", "label"])["data"].shape == (64, 256, 3)
    with h5py.File(path, "r") as f:
        offset = f["data"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 100:offset + 400] = bytes(300)  # the chunk's compressed stream, not the file's header
    path.write_bytes(bytes(data))
    with h5py.File(path, "r") as f:  # opening still works: the damage shows only when the chunk is read
        assert "data" in f
    with pytest.raises(DataError, match=rf"{path}: cannot read its data, the file is damaged"):
        read_h5(path, ["data", "label"])


# ------------------------------------------------------------------------------- tools/predict.py

@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch tiny Any2PointSeg (its tokenizer groups k=8 neighbours at each of its stages)."""
    root = tmp_path_factory.mktemp("seg_inputs")
    threads = torch.get_num_threads()
    train_once(root, "seg", {**SEG_RUN, "dataset": {**SEG_RUN["dataset"], "train_size": 8}})
    torch.set_num_threads(threads)
    return root / "seg" / "ckpt-best.pth"


def predict(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    from tools.predict import main as predict_main

    try:
        code = predict_main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_outputs_of_files_with_one_stem_are_named_by_their_paths(seg_ckpt: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    shapes, rng = tmp_path / "shapes", np.random.default_rng(0)
    clouds = {}
    for kind in ("sphere", "box"):
        (shapes / kind).mkdir(parents=True)
        clouds[kind] = rng.normal(size=(300, 3)).astype(np.float32)
        np.save(shapes / kind / "s0.npy", clouds[kind])
    out = tmp_path / "parts"
    code, printed, err = predict(capsys, "--ckpt", str(seg_ckpt), str(shapes), "--category", "mug", "--out", str(out))
    assert code == 0, err
    written = sorted(p.relative_to(out) for p in out.rglob("*.txt"))
    assert written == [Path("box/s0.parts.txt"), Path("sphere/s0.parts.txt")]
    rows = {kind: np.loadtxt(out / kind / "s0.parts.txt") for kind in clouds}
    assert not np.allclose(rows["box"][:, :3], rows["sphere"][:, :3])  # each file keeps its own output

    # two inputs that would still write one output: refused before anything is written
    np.save(tmp_path / "s0.npy", clouds["box"])
    again = tmp_path / "again"
    code, _, err = predict(capsys, "--ckpt", str(seg_ckpt), str(shapes / "box" / "s0.npy"), str(tmp_path / "s0.npy"),
                           "--category", "mug", "--out", str(again))
    assert code == 2
    assert_one_error_line(err, str(shapes / "box" / "s0.npy"), str(tmp_path / "s0.npy"),
                          str(again / "s0.parts.txt"))
    assert not again.exists()


def test_predict_cloud_too_small_for_the_tokenizer_names_the_file(seg_ckpt: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    sizes = (5, 17, 300)  # the tokenizer's stages group k=8 neighbours among 5 and 17 // 4 points
    for n in sizes:
        np.save(tmp_path / f"cloud{n}.npy", np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32))
    code, printed, err = predict(capsys, "--ckpt", str(seg_ckpt), *(str(tmp_path / f"cloud{n}.npy") for n in sizes),
                                 "--category", "mug", "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2
    for n, line in zip(sizes, lines):
        assert line.startswith(f"error: {tmp_path / f'cloud{n}.npy'}: its {n} prepared points: "), line
        assert "k=8 neighbours" in line, line
    assert "cloud300.npy: mug: points per part" in printed  # the other file is still labelled


@pytest.mark.parametrize("flags, needle", [
    (["--num-points", "-5"], "--num-points must be in [1, 1048576], got -5"),
    (["--num-points", "10000000000000"], "--num-points must be in [1, 1048576]"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--device", "tpu"], "--device='tpu' is not a device name (auto, cpu, cuda, cuda:N)"),
    (["--device", "meta"], "--device=meta: only auto, cpu and cuda devices are supported"),
])
def test_predict_bad_flags_fail_before_any_file_is_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        flags: list[str], needle: str) -> None:
    missing = tmp_path / "nothere.pth"  # never opened: the flags are checked first
    code, _, err = predict(capsys, "--ckpt", str(missing), str(tmp_path / "also-missing.npy"), *flags)
    assert code == 2
    assert_one_error_line(err, needle)


def test_predict_cuda_on_a_machine_without_it(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = predict(capsys, "--ckpt", str(tmp_path / "x.pth"), str(tmp_path), "--device", "cuda")
    assert code == 2
    assert_one_error_line(err, "--device=cuda but CUDA is not available on this machine")


def test_predict_bad_flag_is_one_error_in_a_real_process(tmp_path: Path) -> None:
    np.save(tmp_path / "cloud.npy", np.zeros((64, 3), dtype=np.float32))
    result = run_process(str(ROOT / "tools/predict.py"), "--ckpt", "missing.pth", "cloud.npy", "--num-points", "-5",
                         cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_error_line(result.stderr, "--num-points must be in [1, 1048576], got -5")
    assert "cloud.npy" not in result.stderr  # reported as a flag, not per file
