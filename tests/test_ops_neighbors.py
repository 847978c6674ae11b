"""kNN and three-nearest-neighbour interpolation, against brute-force NumPy references."""

import numpy as np
import pytest
import torch

from any2point.extensions import knn, neighbors, three_nn_interpolate

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def squared_distances_reference(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    diff = query[:, :, None, :] - ref[:, None, :, :]
    return (diff[..., 0] ** 2 + diff[..., 1] ** 2) + diff[..., 2] ** 2


def knn_reference(query: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All distances, stable sort: ascending distance, equal distances in ascending index."""
    dist = squared_distances_reference(query, ref)
    idx = np.argsort(dist, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(dist, idx, axis=-1), idx


def make_pair(kind: str, batch: int, num_queries: int, num_ref: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        ref = rng.normal(size=(batch, num_ref, 3))
        query = rng.normal(size=(batch, num_queries, 3))
    elif kind == "duplicates":  # every reference point repeated, queries on the points themselves
        base = rng.normal(size=(batch, num_ref // 4 + 1, 3))
        ref = np.take_along_axis(base, rng.integers(0, base.shape[1], (batch, num_ref, 1)), axis=1)
        query = ref[:, rng.integers(0, num_ref, num_queries)]
    elif kind == "grid":  # lattice: many equal distances
        ref = rng.integers(0, 3, size=(batch, num_ref, 3)).astype(np.float64)
        query = rng.integers(0, 3, size=(batch, num_queries, 3)).astype(np.float64)
    elif kind == "lattice":  # wider lattice: duplicates and equal distances, fewer per distance than "grid"
        ref = rng.integers(0, 8, size=(batch, num_ref, 3)).astype(np.float64)
        query = rng.integers(0, 8, size=(batch, num_queries, 3)).astype(np.float64)
    elif kind == "equal":
        ref = np.full((batch, num_ref, 3), -1.25)
        query = np.zeros((batch, num_queries, 3))
    elif kind == "far":  # tight cluster far from the origin: the |q|^2 - 2q.r + |r|^2 trap
        ref = 1000.0 + 1e-2 * rng.normal(size=(batch, num_ref, 3))
        query = 1000.0 + 1e-2 * rng.normal(size=(batch, num_queries, 3))
    else:
        raise AssertionError(kind)
    return query.astype(dtype), ref.astype(dtype)


CASES = [
    ("random", 3, 20, 50, 8),
    ("random", 1, 7, 30, 30),  # B = 1, k == N
    ("duplicates", 2, 15, 40, 12),
    ("grid", 2, 25, 60, 20),
    ("equal", 2, 4, 9, 9),
    ("far", 2, 16, 64, 10),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,batch,num_queries,num_ref,k", CASES)
def test_knn_matches_reference(kind, batch, num_queries, num_ref, k, dtype):
    query, ref = make_pair(kind, batch, num_queries, num_ref, dtype)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), k)
    ref_dist, ref_idx = knn_reference(query, ref, k)
    assert idx.dtype == torch.long and dist.dtype == torch.from_numpy(query).dtype
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)


def test_knn_chunked_queries_match_reference(monkeypatch):
    monkeypatch.setitem(neighbors._CHUNK_ELEMENTS, "cpu", 2 * 3 * 40)  # 3 queries per chunk
    query, ref = make_pair("grid", 2, 17, 40, np.float32)
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), 6)
    ref_dist, ref_idx = knn_reference(query, ref, 6)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)


# N >= 8k: the float32 CPU selection among pre-filtered candidates (neighbors._smallest_k_prefiltered).
PREFILTER_CASES = [
    ("random", 2, 40, 256, 16),
    ("duplicates", 2, 40, 300, 12),
    ("lattice", 2, 40, 512, 16),
    ("lattice", 3, 33, 512, 64),
    ("far", 2, 40, 200, 8),
]


@pytest.mark.parametrize("chunk_queries", [None, 7])
@pytest.mark.parametrize("kind,batch,num_queries,num_ref,k", PREFILTER_CASES)
def test_knn_prefiltered_matches_reference(monkeypatch, kind, batch, num_queries, num_ref, k, chunk_queries):
    if chunk_queries is not None:
        monkeypatch.setitem(neighbors._CHUNK_ELEMENTS, "cpu", batch * chunk_queries * num_ref)
    query, ref = make_pair(kind, batch, num_queries, num_ref, np.float32)
    block = neighbors._squared_distances(torch.from_numpy(query), torch.from_numpy(ref))
    assert neighbors._smallest_k_prefiltered(block, k) is not None  # the path under test is taken
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), k)
    ref_dist, ref_idx = knn_reference(query, ref, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)


@pytest.mark.parametrize("kind,num_ref,k", [("equal", 100, 4), ("grid", 512, 4)])
def test_knn_prefilter_flooded_by_ties_falls_back(kind, num_ref, k):
    query, ref = make_pair(kind, 2, 20, num_ref, np.float32)
    block = neighbors._squared_distances(torch.from_numpy(query), torch.from_numpy(ref))
    assert neighbors._smallest_k_prefiltered(block, k) is None  # too many candidates tie with the bound
    dist, idx = knn(torch.from_numpy(query), torch.from_numpy(ref), k)
    ref_dist, ref_idx = knn_reference(query, ref, k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)


def test_knn_mixed_and_half_precision():
    query, ref = make_pair("random", 2, 10, 30, np.float32)
    dist, idx = knn(torch.from_numpy(query).to(torch.bfloat16), torch.from_numpy(ref).double(), 5)
    assert dist.dtype == torch.float64
    rounded = torch.from_numpy(query).to(torch.bfloat16).double().numpy()
    ref_dist, ref_idx = knn_reference(rounded, ref.astype(np.float64), 5)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)


def three_nn_reference(xyz: np.ndarray, known_xyz: np.ndarray, feats: np.ndarray, eps: float) -> np.ndarray:
    out = np.zeros((xyz.shape[0], xyz.shape[1], feats.shape[2]))
    k = min(3, known_xyz.shape[1])
    for b in range(xyz.shape[0]):
        for i in range(xyz.shape[1]):
            dist = np.sqrt(((known_xyz[b] - xyz[b, i]) ** 2).sum(-1))
            near = np.argsort(dist, kind="stable")[:k]
            weight = 1.0 / (dist[near] + eps)
            out[b, i] = (weight[:, None] * feats[b, near]).sum(0) / weight.sum()
    return out


@pytest.mark.parametrize("num_known", [1, 2, 12])
def test_three_nn_interpolate_matches_reference(num_known):
    rng = np.random.default_rng(num_known)
    xyz = rng.normal(size=(2, 9, 3))
    known = rng.normal(size=(2, num_known, 3))
    xyz[:, 0] = known[:, 0]  # a target exactly on a known point
    feats = rng.normal(size=(2, num_known, 5))
    out = three_nn_interpolate(torch.from_numpy(xyz), torch.from_numpy(known), torch.from_numpy(feats))
    np.testing.assert_allclose(out.numpy(), three_nn_reference(xyz, known, feats, 1e-8), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out[:, 0].numpy(), feats[:, 0], rtol=1e-6, atol=1e-6)


def test_three_nn_interpolate_gradient_and_bf16():
    rng = np.random.default_rng(0)
    xyz = torch.from_numpy(rng.normal(size=(2, 6, 3)))
    known = torch.from_numpy(rng.normal(size=(2, 8, 3)))
    feats = torch.from_numpy(rng.normal(size=(2, 8, 4))).requires_grad_()
    upstream = torch.from_numpy(rng.normal(size=(2, 6, 4)))
    (three_nn_interpolate(xyz, known, feats) * upstream).sum().backward()
    # The map is linear in feats: its gradient is W^T upstream with W from the reference.
    weights = three_nn_reference(xyz.numpy(), known.numpy(), np.eye(8)[None].repeat(2, 0), 1e-8)
    expected = np.einsum("bnm,bnc->bmc", weights, upstream.numpy())
    np.testing.assert_allclose(feats.grad.numpy(), expected, rtol=1e-10, atol=1e-10)
    out16 = three_nn_interpolate(xyz.float(), known.float(), feats.detach().to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16
    ref16 = three_nn_reference(xyz.numpy(), known.numpy(), feats.detach().to(torch.bfloat16).double().numpy(), 1e-8)
    np.testing.assert_allclose(out16.double().numpy(), ref16, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.rand(2, 5, 3), torch.rand(3, 8, 3), 2), "same batch size"),
        ((torch.rand(2, 5, 2), torch.rand(2, 8, 3), 2), r"query must have shape \(B, N, 3\)"),
        ((torch.rand(2, 5, 3), torch.rand(2, 8), 2), r"ref must have shape \(B, N, 3\)"),
        ((torch.rand(2, 5, 3), torch.rand(2, 8, 3), 9), r"k must be in \[1, 8\], got 9"),
        ((torch.rand(2, 5, 3), torch.rand(2, 8, 3), 0), r"k must be in \[1, 8\]"),
        ((torch.full((2, 5, 3), float("nan")), torch.rand(2, 8, 3), 2), "query holds non-finite"),
        ((torch.rand(2, 5, 3), torch.full((2, 8, 3), float("-inf")), 2), "ref holds non-finite"),
    ],
)
def test_knn_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        knn(*args)


@pytest.mark.parametrize(
    "feats,eps,message",
    [
        (torch.rand(2, 7, 4), 1e-8, r"known_feats must have shape \(B, M, C\)"),
        (torch.ones(2, 8, 4, dtype=torch.long), 1e-8, "known_feats must be a floating-point"),
        (torch.rand(2, 8, 4), 0.0, "eps must be a positive number"),
    ],
)
def test_three_nn_rejects_bad_input(feats, eps, message):
    with pytest.raises(ValueError, match=message):
        three_nn_interpolate(torch.rand(2, 5, 3), torch.rand(2, 8, 3), feats, eps=eps)


@requires_cuda
@pytest.mark.parametrize("kind", ["random", "duplicates", "grid", "equal", "far"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knn_cuda_matches_cpu(kind, dtype):
    query, ref = (torch.from_numpy(a) for a in make_pair(kind, 3, 40, 70, dtype))
    dist, idx = knn(query, ref, 16)
    dist_cuda, idx_cuda = knn(query.cuda(), ref.cuda(), 16)
    torch.testing.assert_close(idx_cuda.cpu(), idx, rtol=0, atol=0)
    torch.testing.assert_close(dist_cuda.cpu(), dist, rtol=0, atol=0)
    feats = torch.randn(3, 70, 5, dtype=query.dtype)
    out = three_nn_interpolate(query.cuda(), ref.cuda(), feats.cuda())
    torch.testing.assert_close(out.cpu(), three_nn_interpolate(query, ref, feats))
