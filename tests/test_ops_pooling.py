"""segment_reduce, scatter_back and voxel_ids, against brute-force NumPy and looped autograd references."""

import numpy as np
import pytest
import torch

from any2point.extensions import scatter_back, segment_reduce, voxel_ids

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def segment_reduce_reference(values: np.ndarray, segment_id: np.ndarray, num_segments: int, reduce: str):
    """One segment at a time; empty segments stay zero."""
    batch, _, channels = values.shape
    out = np.zeros((batch, num_segments, channels), dtype=np.float64)
    counts = np.zeros((batch, num_segments), dtype=np.int64)
    for b in range(batch):
        for s in range(num_segments):
            members = values[b][segment_id[b] == s].astype(np.float64)
            counts[b, s] = len(members)
            if len(members):
                out[b, s] = members.mean(0) if reduce == "mean" else members.max(0)
    return out, counts


def segment_reduce_autograd_reference(values: torch.Tensor, segment_id: torch.Tensor, num_segments: int, reduce: str):
    rows = []
    for b in range(values.shape[0]):
        for s in range(num_segments):
            members = values[b][segment_id[b] == s]
            if len(members) == 0:
                rows.append(values.new_zeros(values.shape[2]))
            else:
                rows.append(members.mean(0) if reduce == "mean" else members.amax(0))
    return torch.stack(rows).view(values.shape[0], num_segments, values.shape[2])


def make_segments(batch: int, num_points: int, channels: int, num_segments: int, seed: int = 0, ties: bool = False):
    """Ids drawn from the even segments only, so every odd segment is empty.

    ``ties``: values in {-2, -1, 0}, so maxima are shared and often exactly 0.
    """
    rng = np.random.default_rng(seed)
    segment_id = 2 * rng.integers(0, (num_segments + 1) // 2, size=(batch, num_points))
    values = (
        rng.integers(-2, 1, size=(batch, num_points, channels))
        if ties
        else rng.normal(size=(batch, num_points, channels))
    )
    return values, segment_id


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch,num_points,channels,num_segments", [(3, 20, 4, 7), (1, 5, 2, 9), (12, 16, 3, 5)])
def test_segment_reduce_matches_reference(reduce, dtype, batch, num_points, channels, num_segments):
    values, segment_id = make_segments(batch, num_points, channels, num_segments)
    values = values.astype(dtype)
    pooled, counts = segment_reduce(
        torch.from_numpy(values), torch.from_numpy(segment_id), num_segments, reduce=reduce, return_counts=True
    )
    ref, ref_counts = segment_reduce_reference(values, segment_id, num_segments, reduce)
    assert pooled.dtype == torch.from_numpy(values).dtype and pooled.shape == (batch, num_segments, channels)
    np.testing.assert_array_equal(counts.numpy(), ref_counts)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(pooled.numpy(), ref, rtol=rtol, atol=rtol)
    assert (pooled.numpy()[ref_counts == 0] == 0).all()


def test_segment_reduce_all_points_in_one_segment():
    values = torch.randn(2, 6, 3, dtype=torch.float64)
    segment_id = torch.full((2, 6), 2)
    for reduce, expected in (("mean", values.mean(1)), ("max", values.amax(1))):
        pooled = segment_reduce(values, segment_id, 3, reduce=reduce)
        torch.testing.assert_close(pooled[:, 2], expected)
        assert (pooled[:, :2] == 0).all()


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_segment_reduce_gradient_matches_looped_autograd(reduce):
    values, segment_id = make_segments(3, 24, 5, 6, seed=1, ties=True)  # ties: the max gradient is shared
    segment_id = torch.from_numpy(segment_id)
    upstream = torch.randn(3, 6, 5, dtype=torch.float64)
    x = torch.from_numpy(values.astype(np.float64)).requires_grad_()
    (segment_reduce(x, segment_id, 6, reduce=reduce) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (segment_reduce_autograd_reference(x_ref, segment_id, 6, reduce) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_scatter_back_matches_reference_and_gradient():
    rng = np.random.default_rng(3)
    pooled = torch.from_numpy(rng.normal(size=(4, 6, 3))).requires_grad_()
    segment_id = torch.from_numpy(rng.integers(0, 6, size=(4, 10)))
    upstream = torch.from_numpy(rng.normal(size=(4, 10, 3)))
    out = scatter_back(pooled, segment_id)
    expected = np.stack([pooled.detach().numpy()[b][segment_id.numpy()[b]] for b in range(4)])
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    (out * upstream).sum().backward()
    grad_ref = np.zeros((4, 6, 3))
    for b in range(4):
        np.add.at(grad_ref[b], segment_id.numpy()[b], upstream.numpy()[b])
    np.testing.assert_allclose(pooled.grad.numpy(), grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_segment_reduce_bf16_values(reduce):
    values, segment_id = make_segments(2, 30, 8, 5, seed=4)
    values16 = torch.from_numpy(values).to(torch.bfloat16)
    pooled = segment_reduce(values16, torch.from_numpy(segment_id), 5, reduce=reduce)
    assert pooled.dtype == torch.bfloat16
    ref, _ = segment_reduce_reference(values16.double().numpy(), segment_id, 5, reduce)
    expected = torch.from_numpy(ref).to(torch.bfloat16)
    tol = 0 if reduce == "max" else 1e-2
    torch.testing.assert_close(pooled, expected, rtol=tol, atol=tol)


def test_pooling_under_bf16_autocast_is_differentiable():
    linear = torch.nn.Linear(4, 8)
    segment_id = torch.randint(0, 5, (6, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = linear(torch.randn(6, 12, 4))
        pooled = segment_reduce(feats, segment_id, 5, "mean") + segment_reduce(feats, segment_id, 5, "max")
        out = scatter_back(pooled, segment_id)
    assert feats.dtype == pooled.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: segment_reduce(torch.rand(2, 5, 3), torch.full((2, 5), 4), 4),
            r"segment_id values must lie in \[0, 4\)",
        ),
        (
            lambda: segment_reduce(torch.rand(2, 5, 3), torch.full((2, 5), -1), 4),
            r"segment_id values must lie in \[0, 4\)",
        ),
        (
            lambda: segment_reduce(torch.rand(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), 4),
            r"segment_id must have shape \(B, N\)",
        ),
        (
            lambda: segment_reduce(torch.rand(2, 5), torch.zeros(2, 5, dtype=torch.long), 4),
            r"values must have shape \(B, N, C\)",
        ),
        (lambda: segment_reduce(torch.rand(2, 5, 3), torch.zeros(2, 5), 4), "segment_id must be an integer tensor"),
        (
            lambda: segment_reduce(torch.ones(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), 4),
            "values must be a floating-point",
        ),
        (
            lambda: segment_reduce(torch.rand(2, 5, 3), torch.zeros(2, 5, dtype=torch.long), 0),
            "num_segments must be in",
        ),
        (
            lambda: segment_reduce(torch.rand(2, 5, 3), torch.zeros(2, 5, dtype=torch.long), 4, "sum"),
            "reduce must be 'mean' or 'max'",
        ),
        (lambda: scatter_back(torch.rand(2, 4, 3), torch.full((2, 5), 4)), r"segment_id values must lie in \[0, 4\)"),
        (
            lambda: scatter_back(torch.rand(2, 4), torch.zeros(2, 5, dtype=torch.long)),
            r"pooled must have shape \(B, S, C\)",
        ),
        (lambda: scatter_back(torch.rand(2, 4, 3), torch.zeros(3, 5, dtype=torch.long)), "same batch size"),
        (lambda: voxel_ids(torch.rand(2, 5, 3), 0.0), "size must be a positive finite number"),
        (lambda: voxel_ids(torch.rand(2, 5, 3), float("nan")), "size must be a positive finite number"),
        (lambda: voxel_ids(torch.rand(2, 5, 3), True), "size must be a positive finite number"),
        (lambda: voxel_ids(torch.tensor([[[0.0, 0.0, 0.0], [1e6, 0.0, 0.0]]]), 1e-4), "size=0.0001 is too small"),
        (lambda: voxel_ids(torch.full((2, 5, 3), float("nan")), 0.1), "xyz holds non-finite"),
    ],
)
def test_pooling_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def voxel_ids_reference(xyz: np.ndarray, size: float) -> np.ndarray:
    grid = np.floor((xyz - xyz.min(axis=1, keepdims=True)) / xyz.dtype.type(size)).astype(np.int64)
    return np.stack([np.unique(grid[b], axis=0, return_inverse=True)[1].reshape(-1) for b in range(xyz.shape[0])])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kind,batch,num_points,size",
    [
        ("random", 3, 40, 0.3),
        ("random", 1, 25, 0.08),
        ("lattice", 2, 30, 0.25),
        ("equal", 2, 6, 0.1),
        ("offset", 2, 20, 0.5),
    ],
)
def test_voxel_ids_match_reference(kind, batch, num_points, size, dtype):
    rng = np.random.default_rng(5)
    if kind == "random":
        xyz = rng.normal(size=(batch, num_points, 3))
    elif kind == "lattice":  # exact multiples of the voxel size and its half: points on voxel faces
        xyz = rng.integers(-4, 4, size=(batch, num_points, 3)) * 0.125
    elif kind == "equal":
        xyz = np.full((batch, num_points, 3), 7.0)
    else:  # samples at very different positions: ids are per sample
        xyz = rng.random((batch, num_points, 3)) + 100.0 * np.arange(batch)[:, None, None]
    xyz = xyz.astype(dtype)
    ids = voxel_ids(torch.from_numpy(xyz), size)
    assert ids.dtype == torch.long
    np.testing.assert_array_equal(ids.numpy(), voxel_ids_reference(xyz, size))


def test_voxel_ids_feed_segment_reduce():
    xyz = torch.rand(4, 32, 3)
    ids = voxel_ids(xyz, 0.4)
    num_voxels = ids.amax(1) + 1
    _, counts = segment_reduce(xyz, ids, int(num_voxels.max()), return_counts=True)
    occupied = counts > 0
    assert torch.equal(occupied.sum(1), num_voxels)  # ids are 0..V_b-1 with no gap
    assert torch.equal(counts.sum(1), torch.full((4,), 32))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pooling_cuda_matches_cpu(dtype):
    values = torch.randn(12, 40, 16).to(dtype)
    segment_id = torch.randint(0, 9, (12, 40))
    for reduce in ("mean", "max"):
        pooled, counts = segment_reduce(values, segment_id, 11, reduce, return_counts=True)
        pooled_cuda, counts_cuda = segment_reduce(values.cuda(), segment_id.cuda(), 11, reduce, return_counts=True)
        torch.testing.assert_close(pooled_cuda.cpu(), pooled)
        assert torch.equal(counts_cuda.cpu(), counts)
        torch.testing.assert_close(scatter_back(pooled_cuda, segment_id.cuda()).cpu(), scatter_back(pooled, segment_id))
    xyz = (torch.randint(-8, 8, (3, 50, 3)) * 0.1).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    assert torch.equal(voxel_ids(xyz.cuda(), 0.2).cpu(), voxel_ids(xyz, 0.2))
