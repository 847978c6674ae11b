"""The 3D tokenizer: a 3-stage Point-PN (paper sec. 3, "Tokenization in 3D space";
docs/method.md, "The method").

``points (B, N, 3) -> (centres (B, N / 2^S, 3), tokens (B, N / 2^S, C))``: 1024 points become 128
tokens of the source's width C. A stem (Conv1d 3 -> C0, no bias, + BN + ReLU) embeds each point;
each stage halves the points by furthest point sampling, groups k nearest neighbours, normalises
their offsets, concatenates ``[neighbour feature, centre feature]`` (2 C_prev = C_stage), adds a
non-parametric sin/cos embedding of the normalised offsets, runs residual 1x1-conv blocks and takes
the max over the neighbours. In the paper's configuration (C = 768, k = 81 or 64, blocks 2/1/1,
widths 192/384/768, mids 96/192/32) it has exactly 276,672 parameters.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.extensions import furthest_point_sample, gather, group, knn
from any2point.registry import TOKENIZERS
from any2point.errors import ConfigError

NormMode = Literal["scan", "mn40", "mn40_batch"]


def sincos_embedding(xyz: Tensor, dim: int, alpha: float = 1000.0, beta: float = 100.0,
                     interleave: bool = False) -> Tensor:
    """Non-parametric sin/cos embedding of coordinates ``(..., 3) -> (..., dim)`` (Point-NN's PosE).

    Per axis, ``F = dim // 6`` frequencies ``beta * x / alpha^(i / F)``; channels are laid out axis by
    axis, each as ``[sin_0..sin_F-1, cos_0..cos_F-1]`` (with ``interleave``,
    ``[sin_0, cos_0, sin_1, cos_1, ...]``, the order of Point-NN's equations); the last ``dim - 6 F``
    channels are zero.
    """
    freqs = dim // 6
    if freqs == 0:
        raise ValueError(f"the sin/cos embedding needs dim >= 6, got {dim}")
    steps = torch.arange(freqs, device=xyz.device, dtype=xyz.dtype) / freqs
    angles = beta * xyz.unsqueeze(-1) / alpha ** steps
    pairs = [angles.sin(), angles.cos()]
    per_axis = torch.stack(pairs, dim=-1).flatten(-2) if interleave else torch.cat(pairs, dim=-1)
    emb = per_axis.flatten(-2)
    pad = dim - emb.shape[-1]
    return nn.functional.pad(emb, (0, pad)) if pad else emb


def normalize_offsets(offsets: Tensor, norm: NormMode) -> Tensor:
    """Normalise the neighbour offsets ``(B, G, k, 3)`` of a grouping: ``scan`` divides each axis by
    its max |offset| over the k neighbours of the group; ``mn40`` divides by the std of all offsets of
    the sample; ``mn40_batch`` by the std of all offsets of the whole batch, as the released
    ModelNet40 code did (docs/method.md deviation 9)."""
    if norm == "scan":
        return offsets / offsets.abs().amax(dim=2, keepdim=True).clamp_min(1e-8)
    if norm == "mn40_batch":
        return offsets / (offsets.std() + 1e-5)
    std = offsets.flatten(1).std(dim=1)
    return offsets / (std[:, None, None, None] + 1e-5)


def sample_and_group(xyz: Tensor, k: int, norm: NormMode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The grouping of one Point-PN stage: furthest point sampling of half the points, their k
    nearest neighbours and the normalised neighbour offsets.

    ``xyz (B, N, 3) -> (centre_idx (B, N/2), centres (B, N/2, 3), nbr_idx (B, N/2, k),
    offsets (B, N/2, k, 3))``.
    """
    n = xyz.shape[1]
    if n < k:
        raise ValueError(f"a stage groups k={k} neighbours but has only {n} points; give more input points "
                         f"or a smaller k")
    centre_idx = furthest_point_sample(xyz, n // 2)
    centres = gather(xyz, centre_idx)
    _, nbr_idx = knn(centres, xyz, k)
    return centre_idx, centres, nbr_idx, normalize_offsets(group(xyz, nbr_idx, centres), norm)


class ResidualBlock(nn.Module):
    """``relu(BN(conv(relu(BN(conv(x))))) + x)`` with 1x1 Conv2d C -> mid -> C on ``(B, C, G, k)``.

    This is the block's straightforward form (any layout works: ``(M, C, 1, 1)`` makes it a
    matrix product per layer). :class:`PointPNStage` runs the same parameters as matmuls on
    ``(B G k, C)`` rows and, in training, through a fused function that keeps little for backward.
    """

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.net2 = nn.Sequential(nn.Conv2d(mid, channels, 1), nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.net2(self.net1(x)) + x)


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """Count one training batch on ``bn`` and return the running-statistics factor it would use."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _block_params(block: ResidualBlock) -> tuple[Tensor, ...]:
    conv1, bn1, conv2, bn2 = block.net1[0], block.net1[1], block.net2[0], block.net2[1]
    return conv1.weight, conv1.bias, bn1.weight, bn1.bias, conv2.weight, conv2.bias, bn2.weight, bn2.bias


def _norm(z: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Batch norm with given statistics: ``(z - mean) * rstd * weight + bias``."""
    scale = weight * rstd
    return torch.addcmul(bias - mean * scale, z, scale)


def _update_running(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> Tensor:
    """Update ``bn``'s running statistics from a training batch's mean and biased variance over
    ``count`` rows, exactly as ``nn.BatchNorm2d`` does; return ``1 / sqrt(var + eps)``."""
    momentum = _bn_momentum(bn)
    bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
    return (var + bn.eps).rsqrt()


def _pack_bits(mask: Tensor) -> Tensor:
    """A boolean ``(rows, C)`` mask as ``(rows, ceil(C / 8))`` bytes, eight values per byte."""
    pad = -mask.shape[1] % 8
    bits = F.pad(mask, (0, pad)).view(mask.shape[0], -1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(dim=-1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, width: int) -> Tensor:
    """:func:`_pack_bits` undone: ``(rows, ceil(C / 8))`` bytes -> a boolean ``(rows, width)`` mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :width]


class _Moments:
    """Mean and biased variance over the rows of ``(rows, C)`` chunks, per column or, with
    ``covariance``, as the full ``(C, C)`` covariance; each chunk's are taken about its own mean and
    combined in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, covariance: bool = False) -> None:
        self.covariance, self.count = covariance, 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        n, mean = x.shape[0], x.mean(dim=0)
        centred = x - mean
        m2 = (centred.t() @ centred if self.covariance else centred.square_().sum(dim=0)).double()
        mean = mean.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total, delta = self.count + n, mean - self.mean
        spread = torch.outer(delta, delta) if self.covariance else delta.square()
        self.m2 = self.m2 + m2 + spread * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.m2 / self.count


class _LeanStage:
    """A stage's grouping, residual blocks and max over neighbours in training mode, run over
    chunks of whole groups so that no ``(B G k, C)`` tensor of the whole batch is kept from the
    forward to the backward pass.

    Kept for backward: each block's first pre-norm activation ``z1 (M, mid)`` (``M = B G k`` rows)
    and the mean and covariance of its first activation after the ReLU ``a1`` (``mid x mid``);
    everything else is rebuilt chunk by chunk, except that the block inputs ``x_j (M, C)`` (the
    grouped input ``x_0`` first) are held within the forward pass, and again within the backward
    pass, as far as the stage's ``cache_mb`` allows. A batch norm needs the statistics of all rows before
    its output exists, and its gradient two sums over all rows, hence passes over the chunks:

    - forward, per block: one through the chain for its ``z1`` (so its first norm's statistics),
      one over the kept ``z1`` for the moments of ``a1``, from which those of the second product
      ``z2 = a1 W2^T + b2`` follow (mean ``W2 mu + b2``, variance ``diag(W2 Cov W2^T)``); then one
      through the chain for the output and the max;
    - backward, per block from the last: one through the chain for the second norm's two sums and
      ``P^T a1`` (with the moments of ``a1`` these give ``W2``'s gradient without the per-row
      gradient of ``z2``), one over the kept ``z1`` for the first norm's two sums; the next pass
      through the chain takes ``W1``'s gradient and passes the gradient down (to the grouped input
      after the first block).

    The formulas are those of ``nn.BatchNorm2d`` and of the matrix products; the tests compare the
    results with the Conv2d modules.
    """

    def __init__(self, stage: "PointPNStage", feats: Tensor, nbr_idx: Tensor, centre_idx: Tensor,
                 offsets: Tensor, chunk_rows: int, params: Sequence[Tensor]) -> None:
        batch, num_points, self.half = feats.shape
        base = torch.arange(batch, device=feats.device) * num_points
        self.stage, self.params = stage, params
        self.feats = feats.reshape(batch * num_points, self.half)
        self.nbr = (nbr_idx + base[:, None, None]).flatten(0, 1)
        self.centre = (centre_idx + base[:, None]).flatten()
        self.offsets = offsets.flatten(0, 1)
        self.k, groups = nbr_idx.shape[-1], self.nbr.shape[0]
        self.num_rows, step = groups * self.k, max(1, chunk_rows // self.k)
        self.chunks = [slice(s, min(s + step, groups)) for s in range(0, groups, step)]
        self.z1s: list[Tensor] = []
        self.masks: list[Tensor] = []
        # Per block: mean1, rstd1, mean2, rstd2, and the mean (mid,) and covariance (mid, mid) of a1.
        self.stats: list[tuple[Tensor, ...]] = []
        # Block inputs x_0, x_1, ... of the whole stage, held during the forward or the backward
        # pass while they fit in the stage's cache_mb (MiB); a cached input is written by the first pass
        # over the chunks that computes it (complete after that pass) and read by the later ones.
        self.cache_bytes = int(stage.cache_mb * 2 ** 20)
        self.cache: list[Tensor] = []
        self.complete: list[bool] = []

    def block(self, j: int) -> tuple[Tensor, ...]:
        """Block ``j``'s parameters, the products' weights as ``(out, in)`` matrices."""
        w1, b1, g1, beta1, w2, b2, g2, beta2 = self.params[8 * j:8 * j + 8]
        return w1.flatten(1), b1, g1, beta1, w2.flatten(1), b2, g2, beta2

    def rows(self, groups: slice) -> slice:
        return slice(groups.start * self.k, groups.stop * self.k)

    def grouped(self, groups: slice) -> Tensor:
        """``[neighbour feature, centre feature] + sincos(offset)`` of the chunk's rows."""
        nbr = self.feats[self.nbr[groups]]
        x = torch.cat([nbr, self.feats[self.centre[groups]].unsqueeze(1).expand_as(nbr)], dim=-1)
        stage = self.stage
        return x.add_(sincos_embedding(self.offsets[groups], stage.width, stage.alpha, stage.beta)).flatten(0, 1)

    def hidden(self, j: int, rows: slice) -> Tensor:
        """Block ``j``'s ``a1`` on ``rows``, from the kept ``z1``."""
        _, _, g1, beta1 = self.block(j)[:4]
        mean1, rstd1 = self.stats[j][:2]
        return _norm(self.z1s[j][rows], mean1, rstd1, g1, beta1).relu_()

    def start_caching(self, inputs: int) -> None:
        """Hold up to ``inputs`` block inputs ``(M, C)`` of the stage, as many as ``cache_bytes`` allows."""
        size = self.num_rows * self.stage.width * self.feats.element_size()
        count = min(inputs, self.cache_bytes // size) if size else 0
        self.cache = [self.feats.new_empty(self.num_rows, self.stage.width) for _ in range(count)]
        self.complete = [False] * count

    def stop_caching(self) -> None:
        self.cache, self.complete = [], []

    def passed(self, upto: int) -> None:
        """A pass over all chunks that built the inputs ``x_0 .. x_upto`` has ended."""
        for j in range(min(upto + 1, len(self.cache))):
            self.complete[j] = True

    def chain(self, groups: slice, upto: int) -> list[Tensor]:
        """The chunk's block inputs ``x_0 .. x_upto``, from the cache where it holds them; call
        :meth:`passed` after each pass over all chunks."""
        rows, xs = self.rows(groups), []
        for j in range(upto + 1):
            cached = j < len(self.cache)
            if cached and self.complete[j]:
                xs.append(self.cache[j][rows])
                continue
            if j == 0:
                x = self.grouped(groups)
            else:
                _, _, _, _, w2, b2, g2, beta2 = self.block(j - 1)
                mean2, rstd2 = self.stats[j - 1][2:4]
                z2 = torch.addmm(b2, self.hidden(j - 1, rows), w2.t())
                x = _norm(z2, mean2, rstd2, g2, beta2).add_(xs[-1]).relu_()
            if cached:
                self.cache[j][rows] = x
            xs.append(x)
        return xs

    def forward(self) -> tuple[Tensor, Tensor]:
        """Set ``z1s`` and ``stats`` (updating the running statistics); return the max over the
        neighbours of the last block's output and its indices, ``(B G, C)`` each."""
        num = len(self.stage.blocks)
        self.start_caching(num)
        for j, block in enumerate(self.stage.blocks):
            w1, b1, _, _, w2, b2, _, _ = self.block(j)
            z1, moments1 = self.feats.new_empty(self.num_rows, w1.shape[0]), _Moments()
            for groups in self.chunks:
                out = z1[self.rows(groups)]
                torch.addmm(b1, self.chain(groups, j)[-1], w1.t(), out=out)
                moments1.add(out)
            self.passed(j)
            mean1, var1 = (t.to(z1.dtype) for t in moments1.result())
            self.z1s.append(z1)
            self.stats.append((mean1, _update_running(block.net1[1], mean1, var1, self.num_rows)))
            moments_a = _Moments(covariance=True)
            for groups in self.chunks:
                moments_a.add(self.hidden(j, self.rows(groups)))
            mean_a, cov_a = moments_a.result()
            w2d = w2.double()
            mean2 = (w2d @ mean_a + b2.double()).to(z1.dtype)
            var2 = ((w2d @ cov_a) * w2d).sum(dim=1).to(z1.dtype)
            rstd2 = _update_running(block.net2[1], mean2, var2, self.num_rows)
            self.stats[j] += (mean2, rstd2, mean_a, cov_a)
        width = self.stage.width
        values = self.feats.new_empty(self.nbr.shape[0], width)
        argmax = torch.empty(self.nbr.shape[0], width, dtype=torch.long, device=values.device)
        # The ReLU masks of the outputs of every block but the last, one bit per value.
        self.masks = [torch.empty(self.num_rows, -(-width // 8), dtype=torch.uint8, device=values.device)
                      for _ in range(num - 1)]
        for groups in self.chunks:
            xs = self.chain(groups, num)
            for j, mask in enumerate(self.masks):
                mask[self.rows(groups)] = _pack_bits(xs[j + 1] > 0)
            torch.max(xs[-1].unflatten(0, (-1, self.k)), dim=1, out=(values[groups], argmax[groups]))
        self.stop_caching()
        return values, argmax

    def backward(self, grad_out: Tensor, values: Tensor, argmax: Tensor,
                 need_feats: bool) -> tuple[Optional[Tensor], list[Tensor]]:
        """Gradients of the features ``(B N, C/2)`` (or None) and of the parameters from that of the
        max ``(B G, C)``."""
        num, m = len(self.stage.blocks), self.num_rows
        top = grad_out * (values > 0)  # through the last ReLU, at the maxima
        dparams = [torch.zeros_like(p) for p in self.params]
        gz1s: list[Tensor] = [torch.empty(0)] * num
        self.start_caching(num - 1)  # x_0 .. x_num-2 are read again in backward, x_num-1 only once

        def upper(groups: slice, j: int) -> Tensor:
            """``P_j``, the gradient of block ``j``'s sum before its ReLU, on the chunk's rows: from
            the max down through the later blocks' kept ``gz1`` and output masks."""
            rows, size = self.rows(groups), groups.stop - groups.start
            grad = top.new_zeros(size, self.k, top.shape[1])
            grad = grad.scatter_(1, argmax[groups].unsqueeze(1), top[groups].unsqueeze(1)).flatten(0, 1)
            for i in range(num - 1, j, -1):
                grad.addmm_(gz1s[i][rows], self.block(i)[0]).mul_(_unpack_bits(self.masks[i - 1][rows], grad.shape[1]))
            return grad

        for p in range(num - 1, -1, -1):
            w1, b1, g1, beta1, w2, b2, g2, beta2 = self.block(p)
            mean1, rstd1, mean2, rstd2, mean_a, cov_a = self.stats[p]
            c2 = g2 * rstd2
            s1, pa1 = torch.zeros_like(b2), torch.zeros_like(w2)
            q = self.feats.new_empty(m, w1.shape[0])
            for groups in self.chunks:
                rows = self.rows(groups)
                grad, a1 = upper(groups, p), self.hidden(p, rows)
                s1 += grad.sum(dim=0)
                pa1.addmm_(grad.t(), a1)
                torch.mm(grad.mul_(c2), w2, out=q[rows])
                if p + 1 < num:  # the later block's W1 gradient, now that its gz1 is complete
                    w1_next = self.block(p + 1)[0]
                    dparams[8 * (p + 1)].view_as(w1_next).addmm_(gz1s[p + 1][rows].t(), self.chain(groups, p + 1)[-1])
            if p + 1 < num:
                self.passed(p + 1)
            # Second norm and product. Row by row gz2 = c2 (P - s1 / m - xh2 s2 / m) with
            # xh2 = (a1 W2^T + b2 - mean2) rstd2: s2 = sum P xh2 and gz2^T a1 follow from P^T a1 and
            # the moments of a1, without a per-row z2.
            s2 = rstd2 * ((pa1 * w2).sum(dim=1) + (b2 - mean2) * s1)
            sum_a = mean_a.to(w2.dtype) * m
            sum_aa = ((cov_a + torch.outer(mean_a, mean_a)) * m).to(w2.dtype)
            xh2_a = rstd2[:, None] * (w2 @ sum_aa + torch.outer(b2 - mean2, sum_a))
            sum_xh2 = rstd2 * (w2 @ sum_a + m * (b2 - mean2))
            dparams[8 * p + 4].view_as(w2).copy_(c2[:, None] * (pa1 - torch.outer(s1 / m, sum_a) - (s2 / m)[:, None] * xh2_a))
            dparams[8 * p + 5].copy_(-c2 * s2 * sum_xh2 / m)
            dparams[8 * p + 6].copy_(s2)
            dparams[8 * p + 7].copy_(s1)
            # First norm: q holds (c2 P) W2; the gradient of a1 is gz2 W2 where a1 > 0, i.e.
            # q - shift - a1 K with K = W2^T diag(rstd2 scale) W2 (mid x mid).
            scale = c2 * s2 / m
            shift = (c2 * s1 / m + (b2 - mean2) * rstd2 * scale) @ w2
            kmat = (w2.t() * (rstd2 * scale)) @ w2
            t1, t2 = torch.zeros_like(b1), torch.zeros_like(b1)
            for groups in self.chunks:
                rows = self.rows(groups)
                a1 = self.hidden(p, rows)
                ga1 = q[rows].sub_(shift).sub_(a1 @ kmat).mul_(a1 > 0)
                t1 += ga1.sum(dim=0)
                t2 += (ga1 * (self.z1s[p][rows] - mean1).mul_(rstd1)).sum(dim=0)
            c1 = g1 * rstd1
            for groups in self.chunks:
                rows = self.rows(groups)
                xh1 = (self.z1s[p][rows] - mean1).mul_(rstd1 * t2 / m)
                gz1 = q[rows].sub_(t1 / m).sub_(xh1).mul_(c1)
                dparams[8 * p + 1] += gz1.sum(dim=0)
            dparams[8 * p + 2].copy_(t2)
            dparams[8 * p + 3].copy_(t1)
            gz1s[p] = q
        # The first block's W1 gradient and the gradient of the grouped input.
        grad_feats = self.feats.new_zeros(self.feats.shape) if need_feats else None
        w1 = self.block(0)[0]
        for groups in self.chunks:
            rows = self.rows(groups)
            dparams[0].view_as(w1).addmm_(gz1s[0][rows].t(), self.chain(groups, 0)[0])
            if need_feats:
                grad = upper(groups, 0).addmm_(gz1s[0][rows], w1)
                grad_feats.index_add_(0, self.nbr[groups].flatten(), grad[:, :self.half])
                grad_feats.index_add_(0, self.centre[groups], grad[:, self.half:].unflatten(0, (-1, self.k)).sum(dim=1))
        self.stop_caching()
        return grad_feats, dparams


class _FusedBlocks(torch.autograd.Function):
    """:class:`_LeanStage` as an autograd function ``(feats (B, N, C/2), nbr_idx (B, G, k),
    centre_idx (B, G), offsets (B, G, k, 3)) -> (B, G, C)``."""

    @staticmethod
    def forward(ctx, stage: "PointPNStage", feats: Tensor, nbr_idx: Tensor, centre_idx: Tensor,
                offsets: Tensor, chunk_rows: int, *params: Tensor) -> Tensor:
        run = _LeanStage(stage, feats, nbr_idx, centre_idx, offsets, chunk_rows, params)
        values, argmax = run.forward()
        ctx.stage, ctx.chunk_rows = stage, chunk_rows
        ctx.save_for_backward(feats, nbr_idx, centre_idx, offsets, values, argmax, *run.z1s, *run.masks,
                              *(t for stats in run.stats for t in stats), *params)
        return values.unflatten(0, nbr_idx.shape[:2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        feats, nbr_idx, centre_idx, offsets, values, argmax, *rest = ctx.saved_tensors
        num = len(ctx.stage.blocks)
        run = _LeanStage(ctx.stage, feats, nbr_idx, centre_idx, offsets, ctx.chunk_rows, rest[8 * num - 1:])
        run.z1s, run.masks = rest[:num], rest[num:2 * num - 1]
        run.stats = [tuple(rest[2 * num - 1 + 6 * j:2 * num + 5 + 6 * j]) for j in range(num)]
        grad_feats, dparams = run.backward(grad_out.flatten(0, 1), values, argmax, ctx.needs_input_grad[1])
        if grad_feats is not None:
            grad_feats = grad_feats.view_as(feats)
        return (None, grad_feats, None, None, None, None, *dparams)


class PointPNStage(nn.Module):
    """One stage: FPS to half the points, kNN grouping, normalisation, [neighbour, centre] features
    plus sin/cos embedding, residual blocks, max over neighbours.

    ``(xyz (B, N, 3), feats (B, N, C/2)) -> (xyz (B, N/2, 3), feats (B, N/2, C))``.

    The blocks run as matmuls over the ``M = B G k`` grouped rows ``(M, C)``. In training with
    ``recompute`` (the lean path) the grouping, blocks and max are one function that works on
    chunks of ``chunk_mb`` of rows and keeps only each block's ``(M, mid)`` first activation, one bit
    per value of the inner blocks' outputs and small statistics for backward (:class:`_LeanStage`);
    otherwise plain autograd keeps every activation. The lean path holds the stage's block inputs
    during its forward and its backward pass as far as ``cache_mb`` allows.
    """

    def __init__(self, width: int, mid: int, num_blocks: int, k: int, norm: NormMode,
                 alpha: float, beta: float, recompute: bool = True, chunk_mb: Optional[float] = None,
                 cache_mb: float = 512.0) -> None:
        super().__init__()
        self.width, self.k, self.norm, self.alpha, self.beta = width, k, norm, alpha, beta
        self.recompute, self.chunk_mb, self.cache_mb = recompute, chunk_mb, cache_mb
        self.blocks = nn.Sequential(*[ResidualBlock(width, mid) for _ in range(num_blocks)])

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        centre_idx, centres, nbr_idx, offsets = sample_and_group(xyz, self.k, self.norm)
        if self.training and self.recompute:
            params = [p for block in self.blocks for p in _block_params(block)]
            with torch.autocast(xyz.device.type, enabled=False):  # the fused function runs in fp32
                tokens = _FusedBlocks.apply(self, feats.float(), nbr_idx, centre_idx, offsets.float(),
                                             self.chunk_rows(xyz.device), *params)
            return centres, tokens
        if not self.training and not torch.is_grad_enabled():
            return centres, self._inference(feats, nbr_idx, centre_idx, offsets)
        x = self.grouped_input(feats, nbr_idx, centre_idx, offsets)
        for block in self.blocks:
            x = self._block(block, x)
        # max, not amax: its backward scatters the gradient to one neighbour instead of building a
        # tie mask of the whole (B, G, k, C) input; ties only occur at ReLU's zeros (no gradient there)
        # or between identical rows (the same parameter gradients).
        return centres, x.unflatten(0, nbr_idx.shape).max(dim=2).values

    def _inference(self, feats: Tensor, nbr_idx: Tensor, centre_idx: Tensor, offsets: Tensor) -> Tensor:
        """Eval mode without a gradient (``--test``): the grouping, blocks and max over the chunks
        of :meth:`chunk_rows` (a chunk's work stays in the caches, and no ``(B G k, C)`` tensor of
        the whole batch is built), each batch norm folded into the product before it
        (``BN(x W^T + b) = x (s W)^T + s (b - mean) + beta``, ``s = weight / sqrt(var + eps)``)."""
        folded = []
        for block in self.blocks:
            w1, b1, g1, beta1, w2, b2, g2, beta2 = _block_params(block)
            for w, b, g, beta, bn in ((w1, b1, g1, beta1, block.net1[1]), (w2, b2, g2, beta2, block.net2[1])):
                scale = g * (bn.running_var + bn.eps).rsqrt()
                folded.append((w.flatten(1) * scale[:, None], (b - bn.running_mean) * scale + beta))
        run = _LeanStage(self, feats, nbr_idx, centre_idx, offsets, self.chunk_rows(feats.device), ())
        out: Optional[Tensor] = None
        for groups in run.chunks:
            x = run.grouped(groups)
            for (w1, b1), (w2, b2) in zip(folded[::2], folded[1::2]):
                x = torch.addmm(b2, torch.addmm(b1, x, w1.t()).relu_(), w2.t()).add_(x).relu_()
            if out is None:  # the products' dtype (bf16 under CUDA autocast, as on the plain path)
                out = x.new_empty(run.nbr.shape[0], self.width)
            torch.amax(x.unflatten(0, (-1, self.k)), dim=1, out=out[groups])
        return out.unflatten(0, nbr_idx.shape[:2])

    def chunk_rows(self, device: torch.device) -> int:
        """Grouped rows per chunk of the lean path: ``chunk_mb`` of fp32 rows, by default 2 MB on
        the CPU (a chunk's work stays in the caches) and 256 MB elsewhere (fewer, larger kernels)."""
        chunk_mb = self.chunk_mb if self.chunk_mb is not None else (2.0 if device.type == "cpu" else 256.0)
        return max(1, int(chunk_mb * 2 ** 20 / (4 * self.width)))

    def _block(self, block: ResidualBlock, x: Tensor) -> Tensor:
        """:class:`ResidualBlock` on ``(M, C)`` rows with plain autograd (same parameters, buffers
        and running-statistics updates)."""
        w1, b1, g1, beta1, w2, b2, g2, beta2 = _block_params(block)
        bn1, bn2 = block.net1[1], block.net2[1]
        m1 = _bn_momentum(bn1) if self.training else 0.0
        h = F.batch_norm(F.linear(x, w1.flatten(1), b1), bn1.running_mean, bn1.running_var, g1, beta1,
                         self.training, m1, bn1.eps).relu_()
        m2 = _bn_momentum(bn2) if self.training else 0.0
        h = F.batch_norm(F.linear(h, w2.flatten(1), b2), bn2.running_mean, bn2.running_var, g2, beta2,
                         self.training, m2, bn2.eps)
        return (h + x).relu_()

    def grouped_input(self, feats: Tensor, nbr_idx: Tensor, centre_idx: Tensor, offsets: Tensor) -> Tensor:
        """``[neighbour feature, centre feature] + sincos(offset)`` as ``(B G k, C)`` rows."""
        nbr_feats = group(feats, nbr_idx)
        centre_feats = gather(feats, centre_idx).unsqueeze(2).expand_as(nbr_feats)
        x = torch.cat([nbr_feats, centre_feats], dim=-1)
        return x.add_(sincos_embedding(offsets, self.width, self.alpha, self.beta)).flatten(0, 2)

    @staticmethod
    def grouped_input_backward(grad: Tensor, feats: Tensor, nbr_idx: Tensor, centre_idx: Tensor) -> Tensor:
        """The gradient of :meth:`grouped_input` w.r.t. ``feats`` from that of its rows ``(M, C)``."""
        batch, num_points, half = feats.shape
        rows = torch.arange(batch, device=feats.device) * num_points
        grad_feats = feats.new_zeros(batch * num_points, half)
        grad_feats.index_add_(0, (nbr_idx + rows[:, None, None]).flatten(), grad[:, :half])
        centre_grad = grad[:, half:].unflatten(0, nbr_idx.shape).sum(dim=2)
        grad_feats.index_add_(0, (centre_idx + rows[:, None]).flatten(), centre_grad.flatten(0, 1))
        return grad_feats.view_as(feats)



@TOKENIZERS.register()
class PointPNTokenizer(nn.Module):
    """Point-PN tokenizer ``points (B, N, 3) -> (centres (B, G, 3), tokens (B, G, dim))``.

    Args:
        dim: the source's width (injected); the last stage's width.
        k: neighbours per group (81 or 64 in the paper's runs).
        widths: stage widths; each must be twice the previous (the [neighbour, centre]
            concatenation) and the last must equal ``dim``. Default ``[dim/4, dim/2, dim]``.
        blocks: residual blocks per stage.
        mids: hidden width of each stage's residual blocks; default half the stage width, and 32 for
            the last stage.
        norm: neighbour normalisation, ``scan`` (per-axis max over each group, ScanObjectNN),
            ``mn40`` (std per sample, ModelNet40) or ``mn40_batch`` (std over the whole batch, the
            released ModelNet40 code's; off by default).
        alpha, beta: the sin/cos embedding's base and scale.
        recompute: in training, run each stage over chunks of groups and keep only each block's
            ``(B G k, mid)`` first activation (and one bit per value of the inner blocks' outputs)
            for backward: the lean path, about 1.2x plain autograd's time on the CPU in the paper's
            configuration for an eighth of its memory (1.3 vs 10 GB at batch 8); ``false`` keeps
            every activation (faster on small clouds, as in the demo).
        chunk_mb: the lean path's chunk, in MB of fp32 grouped rows; default 2 on the CPU and 256
            on other devices.
        cache_mb: the lean path holds a stage's block inputs ``(B G k, C)`` (the grouped input
            first) for the duration of its forward pass and of its backward pass, as many as fit in
            this many MiB (0: none, every pass rebuilds them); nothing more is kept for backward.
            The default 512 holds them all up to batch 8 in the paper's configuration (243 MiB
            each) and none at batch 32 (972 MiB each: held, they raised the step's peak resident
            memory from 6.1 to 8.1 GB).
    """

    injected_args = ("dim",)

    def __init__(self, dim: int, k: int = 81, widths: Optional[Sequence[int]] = None,
                 blocks: Sequence[int] = (2, 1, 1), mids: Optional[Sequence[int]] = None,
                 norm: NormMode = "scan", alpha: float = 1000.0, beta: float = 100.0,
                 recompute: bool = True, chunk_mb: Optional[float] = None, cache_mb: float = 512.0) -> None:
        super().__init__()
        widths = list(widths) if widths is not None else [dim // 4, dim // 2, dim]
        if widths[-1] != dim:
            raise ConfigError(f"tokenizer widths must end with the source width {dim}, got {widths}")
        if any(w % 2 for w in widths) or any(b != 2 * a for a, b in zip(widths, widths[1:])):
            raise ConfigError(f"tokenizer widths must be even and each twice the previous, got {widths}")
        if len(blocks) != len(widths):
            raise ConfigError(f"tokenizer blocks {list(blocks)} must give one count per stage "
                              f"({len(widths)} stages)")
        mids = list(mids) if mids is not None else [w // 2 for w in widths[:-1]] + [32]
        if len(mids) != len(widths):
            raise ConfigError(f"tokenizer mids {mids} must give one width per stage ({len(widths)} stages)")
        if k < 1:
            raise ConfigError(f"tokenizer k must be positive, got {k}")
        if chunk_mb is not None and not chunk_mb > 0:
            raise ConfigError(f"tokenizer chunk_mb must be positive (MB of rows per chunk), got {chunk_mb}")
        if not cache_mb >= 0:
            raise ConfigError(f"tokenizer cache_mb must be >= 0 (MiB of block inputs held per stage), got {cache_mb}")
        if norm not in NormMode.__args__:
            raise ConfigError(f"tokenizer norm must be one of {NormMode.__args__}, got '{norm}'")
        self.dim, self.k = dim, k
        self.stem = nn.Sequential(nn.Conv1d(3, widths[0] // 2, 1, bias=False),
                                  nn.BatchNorm1d(widths[0] // 2), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(PointPNStage(w, m, b, k, norm, alpha, beta, recompute, chunk_mb, cache_mb)
                                    for w, m, b in zip(widths, mids, blocks))

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"the tokenizer expects points of shape (B, N, 3), got {tuple(points.shape)}")
        xyz = points.contiguous()
        feats = self.stem(xyz.transpose(1, 2)).transpose(1, 2)
        for stage in self.stages:
            xyz, feats = stage(xyz, feats)
        return xyz, feats
