"""gather and group, against per-sample NumPy indexing and a looped autograd reference."""

import numpy as np
import pytest
import torch

from any2point.extensions import gather, group

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gather_reference(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.stack([x[b][idx[b]] for b in range(x.shape[0])])


@pytest.mark.parametrize(
    "x_shape,idx_shape",
    [((3, 10, 4), (3, 6)), ((2, 9, 5), (2, 4, 7)), ((1, 6), (1, 6)), ((2, 8, 2, 3), (2, 5, 2)), ((2, 5, 3), (2, 0))],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gather_matches_reference(x_shape, idx_shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(dtype)
    idx = rng.integers(0, x_shape[1], size=idx_shape)  # repeats included
    out = gather(torch.from_numpy(x), torch.from_numpy(idx).int())
    np.testing.assert_array_equal(out.numpy(), gather_reference(x, idx))


def test_group_matches_reference_with_and_without_center():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 12, 3))
    idx = rng.integers(0, 12, size=(2, 4, 5))
    center = rng.normal(size=(2, 4, 3))
    grouped = group(torch.from_numpy(x), torch.from_numpy(idx))
    np.testing.assert_array_equal(grouped.numpy(), gather_reference(x, idx))
    relative = group(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(center))
    np.testing.assert_array_equal(relative.numpy(), gather_reference(x, idx) - center[:, :, None])


def test_gather_and_group_gradients_match_looped_autograd():
    rng = np.random.default_rng(2)
    idx = torch.from_numpy(rng.integers(0, 7, size=(3, 4, 6)))  # repeated indices accumulate
    upstream = torch.from_numpy(rng.normal(size=(3, 4, 6, 5)))
    x = torch.from_numpy(rng.normal(size=(3, 7, 5))).requires_grad_()
    center = torch.from_numpy(rng.normal(size=(3, 4, 5))).requires_grad_()
    (group(x, idx, center) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    center_ref = center.detach().clone().requires_grad_()
    looped = torch.stack([x_ref[b][idx[b]] - center_ref[b][:, None] for b in range(3)])
    (looped * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(center.grad, center_ref.grad, rtol=1e-12, atol=1e-12)


def test_gather_bf16_and_autocast():
    x = torch.randn(2, 9, 4).to(torch.bfloat16).requires_grad_()
    idx = torch.randint(0, 9, (2, 3, 2))
    out = gather(x, idx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.stack([x[b][idx[b]] for b in range(2)]), rtol=0, atol=0)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    linear = torch.nn.Linear(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = linear(torch.randn(2, 9, 4))
        pooled = group(feats, idx)
    assert pooled.dtype == feats.dtype == torch.bfloat16
    pooled.float().sum().backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: gather(torch.rand(2, 5, 3), torch.tensor([[0, 5]] * 2)),
            r"idx values must lie in \[0, 5\), got values in \[0, 5\]",
        ),
        (lambda: gather(torch.rand(2, 5, 3), torch.tensor([[-1, 0]] * 2)), r"idx values must lie in \[0, 5\)"),
        (lambda: gather(torch.rand(2, 5, 3), torch.zeros(3, 2, dtype=torch.long)), "same batch size"),
        (lambda: gather(torch.rand(2, 5, 3), torch.zeros(2, 2)), "idx must be an integer tensor"),
        (lambda: gather(torch.rand(5), torch.zeros(5, 1, dtype=torch.long)), r"x must have shape \(B, N, ...\)"),
        (lambda: group(torch.rand(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)), r"idx must have shape \(B, M, k\)"),
        (lambda: group(torch.rand(2, 5), torch.zeros(2, 4, 3, dtype=torch.long)), r"x must have shape \(B, N, C\)"),
        (
            lambda: group(torch.rand(2, 5, 3), torch.zeros(2, 4, 3, dtype=torch.long), torch.rand(2, 3, 3)),
            r"center must have shape \(B, M, C\) = \(2, 4, 3\)",
        ),
    ],
)
def test_gather_and_group_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@requires_cuda
def test_gather_and_group_cuda_match_cpu():
    x = torch.randn(3, 11, 6)
    idx = torch.randint(0, 11, (3, 5, 4))
    center = torch.randn(3, 5, 6)
    torch.testing.assert_close(group(x.cuda(), idx.cuda(), center.cuda()).cpu(), group(x, idx, center))
    x_cuda = x.cuda().requires_grad_()
    gather(x_cuda, idx.cuda()).sum().backward()
    x_cpu = x.clone().requires_grad_()
    gather(x_cpu, idx).sum().backward()
    torch.testing.assert_close(x_cuda.grad.cpu(), x_cpu.grad)
