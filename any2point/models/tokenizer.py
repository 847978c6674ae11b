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
from any2point.registry import MODELS, ConfigError

NormMode = Literal["scan", "mn40", "mn40_batch"]


def sincos_embedding(xyz: Tensor, dim: int, alpha: float = 1000.0, beta: float = 100.0) -> Tensor:
    """Non-parametric sin/cos embedding of coordinates ``(..., 3) -> (..., dim)`` (Point-NN's PosE).

    Per axis, ``F = dim // 6`` frequencies ``beta * x / alpha^(i / F)``; channels are laid out axis by
    axis, each as ``[sin_0..sin_F-1, cos_0..cos_F-1]``; the last ``dim - 6 F`` channels are zero.
    """
    freqs = dim // 6
    if freqs == 0:
        raise ValueError(f"the sin/cos embedding needs dim >= 6, got {dim}")
    steps = torch.arange(freqs, device=xyz.device, dtype=xyz.dtype) / freqs
    angles = beta * xyz.unsqueeze(-1) / alpha ** steps
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    pad = dim - emb.shape[-1]
    return nn.functional.pad(emb, (0, pad)) if pad else emb


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


class _FusedBlocks(torch.autograd.Function):
    """A stage's grouping and residual blocks in training mode, as matmuls over ``M = B G k`` rows,
    keeping for backward only each block's first pre-norm activation ``(M, mid)``; the grouped
    input, the blocks' outputs and second activations are recomputed.

    ``(feats (B, N, C/2), nbr_idx (B, G, k), centre_idx (B, G), offsets (B, G, k, 3)) -> (B, G, C)``,
    the max over the k neighbours of the last block's output. BatchNorm uses batch statistics and
    updates the running ones exactly as ``nn.BatchNorm2d`` does.
    """

    @staticmethod
    def forward(ctx, stage: "PointPNStage", feats: Tensor, nbr_idx: Tensor,
                centre_idx: Tensor, offsets: Tensor, *params: Tensor) -> Tensor:
        x = stage.grouped_input(feats, nbr_idx, centre_idx, offsets)
        stats, pre_norms = [], []
        for block in stage.blocks:
            w1, b1, g1, beta1, w2, b2, g2, beta2 = _block_params(block)
            bn1, bn2 = block.net1[1], block.net2[1]
            z1 = torch.addmm(b1, x, w1.flatten(1).t())
            a1, mean1, rstd1 = torch.native_batch_norm(z1, g1, beta1, bn1.running_mean, bn1.running_var, True,
                                                       _bn_momentum(bn1), bn1.eps)
            z2 = torch.addmm(b2, a1.relu_(), w2.flatten(1).t())
            del a1
            y, mean2, rstd2 = torch.native_batch_norm(z2, g2, beta2, bn2.running_mean, bn2.running_var, True,
                                                      _bn_momentum(bn2), bn2.eps)
            del z2
            x = y.add_(x).relu_()
            pre_norms.append(z1)
            stats += [mean1, rstd1, mean2, rstd2]
        values, argmax = x.unflatten(0, nbr_idx.shape).max(dim=2)
        ctx.stage = stage
        ctx.save_for_backward(feats, nbr_idx, centre_idx, offsets, values, argmax, *pre_norms, *stats, *params)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        stage, num = ctx.stage, len(ctx.stage.blocks)
        feats, nbr_idx, centre_idx, offsets, values, argmax, *rest = ctx.saved_tensors
        pre_norms, stats, params = rest[:num], rest[num:5 * num], rest[5 * num:]
        x = stage.grouped_input(feats, nbr_idx, centre_idx, offsets)
        # Recompute each block's input and its second pre-norm activation.
        inputs, hidden, second = [x], [], []
        for j, block in enumerate(stage.blocks):
            w1, b1, g1, beta1, w2, b2, g2, beta2 = params[8 * j:8 * j + 8]
            mean1, rstd1, mean2, rstd2 = stats[4 * j:4 * j + 4]
            scale1 = g1 * rstd1
            a1 = torch.addcmul(beta1 - mean1 * scale1, pre_norms[j], scale1).relu_()
            z2 = torch.addmm(b2, a1, w2.flatten(1).t())
            hidden.append(a1)
            second.append(z2)
            if j + 1 < num:
                scale2 = g2 * rstd2
                inputs.append(torch.addcmul(beta2 - mean2 * scale2, z2, scale2).add_(inputs[j]).relu_())
        grad = torch.zeros_like(inputs[-1]).unflatten(0, nbr_idx.shape)
        grad.scatter_(2, argmax.unsqueeze(2), (grad_out * (values > 0)).unsqueeze(2))
        grad = grad.flatten(0, 2)
        grads: list[Optional[Tensor]] = [None] * len(params)
        for j in reversed(range(num)):
            block = stage.blocks[j]
            w1, b1, g1, beta1, w2, b2, g2, beta2 = params[8 * j:8 * j + 8]
            mean1, rstd1, mean2, rstd2 = stats[4 * j:4 * j + 4]
            bn1, bn2 = block.net1[1], block.net2[1]
            if j + 1 < num:
                grad.mul_(inputs.pop() > 0)
            x, a1, z2 = inputs[j], hidden.pop(), second.pop()
            gz2, dg2, dbeta2 = torch.ops.aten.native_batch_norm_backward(
                grad, z2, g2, bn2.running_mean, bn2.running_var, mean2, rstd2, True, bn2.eps, [True, True, True])
            del z2
            dw2 = (gz2.t() @ a1).view_as(w2)
            db2 = gz2.sum(0)
            ga1 = gz2 @ w2.flatten(1)
            del gz2
            ga1.mul_(a1 > 0)
            del a1
            gz1, dg1, dbeta1 = torch.ops.aten.native_batch_norm_backward(
                ga1, pre_norms[j], g1, bn1.running_mean, bn1.running_var, mean1, rstd1, True, bn1.eps,
                [True, True, True])
            del ga1
            dw1 = (gz1.t() @ x).view_as(w1)
            db1 = gz1.sum(0)
            grad.addmm_(gz1, w1.flatten(1))
            del gz1
            grads[8 * j:8 * j + 8] = [dw1, db1, dg1, dbeta1, dw2, db2, dg2, dbeta2]
        del inputs
        grad_feats = stage.grouped_input_backward(grad, feats, nbr_idx, centre_idx) if ctx.needs_input_grad[1] else None
        return (None, grad_feats, None, None, None, *grads)


class PointPNStage(nn.Module):
    """One stage: FPS to half the points, kNN grouping, normalisation, [neighbour, centre] features
    plus sin/cos embedding, residual blocks, max over neighbours.

    ``(xyz (B, N, 3), feats (B, N, C/2)) -> (xyz (B, N/2, 3), feats (B, N/2, C))``.

    The blocks run as matmuls over the ``M = B G k`` grouped rows ``(M, C)``. In training with
    ``recompute`` the grouping, blocks and max are one fused function that keeps only each block's
    ``(M, mid)`` first activation for backward and recomputes the rest; otherwise plain autograd
    keeps every activation.
    """

    def __init__(self, width: int, mid: int, num_blocks: int, k: int, norm: NormMode,
                 alpha: float, beta: float, recompute: bool = True) -> None:
        super().__init__()
        self.width, self.k, self.norm, self.alpha, self.beta = width, k, norm, alpha, beta
        self.recompute = recompute
        self.blocks = nn.Sequential(*[ResidualBlock(width, mid) for _ in range(num_blocks)])

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        n = xyz.shape[1]
        if n < self.k:
            raise ValueError(f"a tokenizer stage groups k={self.k} neighbours but has only {n} points; "
                             f"give more input points or a smaller k")
        centre_idx = furthest_point_sample(xyz, n // 2)
        centres = gather(xyz, centre_idx)
        _, nbr_idx = knn(centres, xyz, self.k)
        offsets = self._normalize(group(xyz, nbr_idx, centres))
        if self.training and self.recompute:
            params = [p for block in self.blocks for p in _block_params(block)]
            with torch.autocast(xyz.device.type, enabled=False):  # the fused function runs in fp32
                tokens = _FusedBlocks.apply(self, feats.float(), nbr_idx, centre_idx, offsets.float(), *params)
            return centres, tokens
        x = self.grouped_input(feats, nbr_idx, centre_idx, offsets)
        for block in self.blocks:
            x = self._block(block, x)
        # max, not amax: its backward scatters the gradient to one neighbour instead of building a
        # tie mask of the whole (B, G, k, C) input; ties only occur at ReLU's zeros (no gradient there)
        # or between identical rows (the same parameter gradients).
        return centres, x.unflatten(0, nbr_idx.shape).max(dim=2).values

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

    def _normalize(self, offsets: Tensor) -> Tensor:
        """``scan``: divide each axis by its max |offset| over the k neighbours of the group;
        ``mn40``: divide by the std of all offsets of the sample; ``mn40_batch``: by the std of all
        offsets of the whole batch, as the released ModelNet40 code did (docs/method.md deviation 9)."""
        if self.norm == "scan":
            return offsets / offsets.abs().amax(dim=2, keepdim=True).clamp_min(1e-8)
        if self.norm == "mn40_batch":
            return offsets / (offsets.std() + 1e-5)
        std = offsets.flatten(1).std(dim=1)
        return offsets / (std[:, None, None, None] + 1e-5)



@MODELS.register()
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
        recompute: in training, keep only each block's ``(B G k, mid)`` first activation for
            backward and recompute the rest (lean memory for about 1.2x the blocks' matmuls);
            ``false`` keeps every activation (plain autograd).
    """

    injected_args = ("dim",)

    def __init__(self, dim: int, k: int = 81, widths: Optional[Sequence[int]] = None,
                 blocks: Sequence[int] = (2, 1, 1), mids: Optional[Sequence[int]] = None,
                 norm: NormMode = "scan", alpha: float = 1000.0, beta: float = 100.0,
                 recompute: bool = True) -> None:
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
        if norm not in NormMode.__args__:
            raise ConfigError(f"tokenizer norm must be one of {NormMode.__args__}, got '{norm}'")
        self.dim, self.k = dim, k
        self.stem = nn.Sequential(nn.Conv1d(3, widths[0] // 2, 1, bias=False),
                                  nn.BatchNorm1d(widths[0] // 2), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(PointPNStage(w, m, b, k, norm, alpha, beta, recompute)
                                    for w, m, b in zip(widths, mids, blocks))

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"the tokenizer expects points of shape (B, N, 3), got {tuple(points.shape)}")
        xyz = points.contiguous()
        feats = self.stem(xyz.transpose(1, 2)).transpose(1, 2)
        for stage in self.stages:
            xyz, feats = stage(xyz, feats)
        return xyz, feats
