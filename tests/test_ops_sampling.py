"""Furthest point sampling and backend selection, against a brute-force NumPy FPS."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from any2point.extensions import backend, furthest_point_sample, sampling, set_backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _fresh_backend():
    set_backend(None)
    yield
    set_backend(None)


def fps_reference(xyz: np.ndarray, n: int, start: int) -> np.ndarray:
    """The classic algorithm, one point at a time; np.argmax breaks ties towards the lowest index."""
    batch, num_points, _ = xyz.shape
    out = np.empty((batch, n), dtype=np.int64)
    for b in range(batch):
        p = xyz[b]
        min_dist = np.full(num_points, np.inf, dtype=p.dtype)
        current = start
        for i in range(n):
            out[b, i] = current
            c = p[current]
            dist = ((p[:, 0] - c[0]) ** 2 + (p[:, 1] - c[1]) ** 2) + (p[:, 2] - c[2]) ** 2
            min_dist = np.minimum(min_dist, dist)
            current = int(np.argmax(min_dist))
    return out


def make_cloud(kind: str, batch: int, num_points: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Random clouds and adversarial ones full of exact distance ties."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(batch, num_points, 3)).astype(dtype)
    if kind == "grid":  # integer lattice: many equal distances
        cells = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return np.stack([rng.permutation(cells)[:num_points] for _ in range(batch)]).astype(dtype)
    if kind == "duplicates":  # every point appears twice or more
        base = rng.normal(size=(batch, num_points // 3 + 1, 3))
        pick = rng.integers(0, base.shape[1], size=(batch, num_points))
        return np.take_along_axis(base, pick[..., None], axis=1).astype(dtype)
    if kind == "equal":
        return np.full((batch, num_points, 3), 0.5, dtype=dtype)
    raise AssertionError(kind)


CASES = [
    ("random", 3, 50, 20, 0),
    ("random", 1, 40, 40, 7),  # B = 1, n == N
    ("grid", 2, 64, 64, 5),
    ("duplicates", 2, 30, 30, 3),
    ("equal", 2, 10, 6, 4),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,batch,num_points,n,start", CASES)
@pytest.mark.parametrize("mode", ["torch", "auto"])
def test_fps_matches_reference(mode, kind, batch, num_points, n, start, dtype):
    set_backend(mode)
    xyz = make_cloud(kind, batch, num_points, dtype)
    out = furthest_point_sample(torch.from_numpy(xyz), n, start=start)
    assert out.dtype == torch.long and out.shape == (batch, n)
    np.testing.assert_array_equal(out.numpy(), fps_reference(xyz, n, start))


def test_fps_all_equal_repeats_lowest_index():
    xyz = torch.zeros(1, 5, 3)
    assert furthest_point_sample(xyz, 4, start=3).tolist() == [[3, 0, 0, 0]]


def test_fps_half_precision_is_computed_in_float32():
    xyz = make_cloud("random", 2, 40, np.float32).astype(np.float16)
    out = furthest_point_sample(torch.from_numpy(xyz).to(torch.bfloat16), 10)
    ref_input = torch.from_numpy(xyz).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out.numpy(), fps_reference(ref_input, 10, 0))


@pytest.mark.parametrize(
    "kind,batch,num_points,n,start", CASES + [("random", 4, 300, 150, 11), ("grid", 3, 64, 40, 63)]
)
def test_fpsample_backend_equals_torch(kind, batch, num_points, n, start):
    pytest.importorskip("fpsample")
    xyz = torch.from_numpy(make_cloud(kind, batch, num_points, np.float32, seed=start))
    expected = sampling._fps_torch(xyz, n, start)
    set_backend("fpsample")
    np.testing.assert_array_equal(furthest_point_sample(xyz, n, start).numpy(), expected.numpy())


def _record_fpsample_calls(monkeypatch) -> list:
    calls = []
    original = sampling._fps_fpsample

    def recording(points, n, start):
        calls.append(tuple(points.shape))
        return original(points, n, start)

    monkeypatch.setattr(sampling, "_fps_fpsample", recording)
    return calls


def test_auto_uses_fpsample_for_cpu_float32_when_faster(monkeypatch):
    pytest.importorskip("fpsample")
    monkeypatch.setattr(backend, "FPSAMPLE_MAX_POINTS", 100)
    calls = _record_fpsample_calls(monkeypatch)
    set_backend("auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    furthest_point_sample(torch.rand(2, 50, 3), 5)
    furthest_point_sample(torch.rand(3, 50, 3), 5)  # too large for fpsample with 2 threads
    furthest_point_sample(torch.rand(2, 50, 3, dtype=torch.float64), 5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    furthest_point_sample(torch.rand(4, 50, 3), 5)  # any size with 1 thread
    assert calls == [(2, 50, 3), (4, 50, 3)]


def test_env_var_torch_disables_fpsample(monkeypatch):
    calls = _record_fpsample_calls(monkeypatch)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.get_backend() == "torch"
    furthest_point_sample(torch.rand(1, 20, 3), 5)
    assert calls == []


def test_env_var_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda_ext")
    with pytest.raises(ValueError, match="ANY2POINT_OPS_BACKEND must be one of auto, torch, fpsample"):
        furthest_point_sample(torch.rand(1, 20, 3), 5)


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="set_backend"):
        set_backend("fast")


@pytest.mark.parametrize("package", ["fpsample", "triton"])
def test_requesting_a_missing_package_is_an_error(monkeypatch, package):
    monkeypatch.setattr(backend, "package_installed", lambda name: False)
    monkeypatch.setenv(backend.ENV_VAR, package)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        backend.get_backend()
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    set_backend(None)
    assert backend.get_backend() == "torch"


def test_backend_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="any2point.extensions"):
        furthest_point_sample(torch.rand(1, 20, 3), 5)
        furthest_point_sample(torch.rand(1, 20, 3), 5)
    records = [r for r in caplog.records if r.name == "any2point.extensions"]
    assert len(records) == 1 and "point ops backend" in records[0].getMessage()


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.rand(2, 10, 2), 3), r"xyz must have shape \(B, N, 3\)"),
        ((torch.rand(10, 3), 3), r"xyz must have shape \(B, N, 3\)"),
        ((torch.rand(2, 0, 3), 1), "at least one sample and one point"),
        ((torch.ones(2, 10, 3, dtype=torch.long), 3), "floating-point"),
        ((torch.tensor([[[0.0, float("nan"), 0.0]]]), 1), "non-finite"),
        ((torch.tensor([[[0.0, float("inf"), 0.0]]]), 1), "non-finite"),
        ((torch.rand(2, 10, 3), 11), r"n must be in \[1, 10\], got 11"),
        ((torch.rand(2, 10, 3), 0), r"n must be in \[1, 10\]"),
        ((torch.rand(2, 10, 3), 2.0), "n must be an int"),
        ((torch.rand(2, 10, 3), 2, 10), r"start must be in \[0, 9\], got 10"),
        ((np.zeros((2, 10, 3)), 2), "xyz must be a torch.Tensor"),
    ],
)
def test_fps_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        furthest_point_sample(*args)


TRITON_INTERPRETER_SCRIPT = """
import sys
import numpy as np
import torch
from any2point.extensions import _triton_fps

cases = np.load(sys.argv[1])
kernel = _triton_fps.build_kernel()
out = {}
for name in cases.files:
    if name.startswith("xyz"):
        _, n, start, key = name.split("_", 3)
        out[key] = _triton_fps.launch(kernel, torch.from_numpy(cases[name]), int(n), int(start)).numpy()
np.savez(sys.argv[2], **out)
"""


def test_triton_kernel_matches_reference_in_interpreter(tmp_path):
    """The kernel, run by Triton's CPU interpreter (which must be on before Triton is imported)."""
    pytest.importorskip("triton")
    cases = {}
    interpreted = [
        ("random", 1, 24, 24, 7),
        ("grid", 2, 64, 16, 5),
        ("duplicates", 2, 30, 12, 3),
        ("equal", 2, 10, 6, 4),
    ]
    for kind, batch, num_points, n, start in interpreted:
        for dtype in (np.float32, np.float64) if kind == "grid" else (np.float32,):
            cases[f"xyz_{n}_{start}_{kind}{batch}{np.dtype(dtype).name}"] = make_cloud(kind, batch, num_points, dtype)
    np.savez(tmp_path / "cases.npz", **cases)
    python_path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    command = [sys.executable, "-c", TRITON_INTERPRETER_SCRIPT, str(tmp_path / "cases.npz"), str(tmp_path / "out.npz")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = np.load(tmp_path / "out.npz")
    assert len(outputs.files) == len(cases)
    for name, xyz in cases.items():
        _, n, start, key = name.split("_", 3)
        np.testing.assert_array_equal(outputs[key], fps_reference(xyz, int(n), int(start)), err_msg=key)


def test_self_check_accepts_exact_kernels_and_rejects_others(caplog):
    def wrong(points, n, start):
        return sampling._fps_torch(points, n, start).flip(1)

    def broken(points, n, start):
        raise RuntimeError("no kernel image for this GPU")

    cpu = torch.device("cpu")
    assert sampling._self_check(sampling._fps_torch, cpu, torch.float32)
    with caplog.at_level(logging.WARNING, logger="any2point.extensions"):
        assert not sampling._self_check(wrong, cpu, torch.float32)
        assert not sampling._self_check(broken, cpu, torch.float64)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "disagrees with the torch path" in messages[0] and "no kernel image" in messages[1]


@requires_cuda
@pytest.mark.parametrize("mode", ["auto", "triton", "torch"])
@pytest.mark.parametrize("kind", ["random", "grid", "duplicates", "equal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fps_cuda_matches_cpu(mode, kind, dtype):
    if mode == "triton":
        pytest.importorskip("triton")
    set_backend(mode)
    xyz = torch.from_numpy(make_cloud(kind, 3, 64, np.float64)).to(dtype)
    expected = sampling._fps_torch(xyz, 32, 5)
    out = furthest_point_sample(xyz.cuda(), 32, start=5)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
