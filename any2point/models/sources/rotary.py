"""Rotary sources: the part of the SourceTransformer contract for models whose positions are rotations
(decoder LLMs, ModernBERT, DINOv3 / EVA-02 / RoPE ViTs; docs/method.md "Rotary sources").

A rotary source has no position table to sample. The virtual projection gives every point token its
position in each of the M views (a row on the virtual line, or a (row, col) patch coordinate on the
virtual plane) and the source turns them into its own rotations, ``cos`` / ``sin`` of shape
``(B, V, T, D_r)`` for the whole sequence (``V`` = M views, or 1 for ``rotary: mean_position``;
``D_r <= D`` the rotated part of a head, the rest passes unrotated).

Multiview attention is exact: with ``R_v(p)`` the rotation at view ``v``'s position,

    ``q_i . k_j`` over the widened heads ``= mean_v (R_v(p_i) q_i) . (R_v(p_j) k_j)
    = mean_v q_i R(p_j^v - p_i^v) k_j``,

because each query and key is rotated once per view and the ``V`` rotated copies are concatenated
along the head dimension, each scaled by ``1 / sqrt(V)`` (:func:`multiview_qk`). Scaled dot-product
attention then runs on heads ``V`` times wider for queries and keys, with the values unchanged and
the source's own softmax scale given explicitly. With ``V = 1`` it is the source's own rotary
attention.

:class:`RotaryPositions` is what a rotary source's blocks get besides the tokens; the class token
(and the prompt tokens of prompt tuning) sit at a fixed position before the point tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from any2point.utils.attention import attention
from any2point.models.sources.base import Embedded, SourceTransformer

Pairing = Literal["half", "interleaved"]
RotaryMode = Literal["multiview", "mean_position"]
AttentionKind = Literal["bidirectional", "causal"]


def rotate_pairs(x: Tensor, pairing: Pairing) -> Tensor:
    """The 90-degree partner of every channel pair: ``half`` pairs channel ``i`` with ``i + D/2``
    (Hugging Face, DINOv3) -> ``[-x2, x1]``; ``interleaved`` pairs ``2i`` with ``2i + 1`` (EVA-02)."""
    if pairing == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, pairing: Pairing, rest_scale: float = 1.0) -> Tensor:
    """Rotate the first ``D_r = cos.shape[-1]`` channels of ``x (..., D)`` by the angles whose
    cosines and sines are ``cos`` / ``sin`` (broadcast to ``x``'s lead dims); the rest pass, times
    ``rest_scale``."""
    rotated = cos.shape[-1]
    head, rest = x[..., :rotated], x[..., rotated:]
    out = head * cos + rotate_pairs(head, pairing) * sin
    if not rest.shape[-1]:
        return out
    rest = rest * rest_scale if rest_scale != 1.0 else rest
    return torch.cat([out, rest.expand(*out.shape[:-1], rest.shape[-1])], dim=-1)


def multiview_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, pairing: Pairing) -> tuple[Tensor, Tensor]:
    """Queries ``(B, H, T, D)`` and keys ``(B, H_kv, T, D)`` rotated once per view with ``cos`` /
    ``sin`` ``(B, V, T, D_r)`` and concatenated along the head dimension -> ``(B, H, T, V*D)`` and
    ``(B, H_kv, T, V*D)``, each copy scaled by ``1 / sqrt(V)``, so that the dot product of a query
    and a key is the mean over the views of their rotated dot products."""
    views = cos.shape[1]
    # (B, 1, T, V, D_r), the 1/sqrt(V) folded in; the rotated copies come out as (B, H, T, V, D), whose
    # last two dimensions flatten to the widened head without a copy.
    cos, sin = (t.transpose(1, 2).unsqueeze(1) * views ** -0.5 for t in (cos, sin))

    def widen(x: Tensor) -> Tensor:
        return rotate(x.unsqueeze(3), cos.to(x.dtype), sin.to(x.dtype), pairing, views ** -0.5).flatten(-2)

    return widen(q), widen(k)


def rotary_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                     pairing: Pairing, scale: float, mask: Optional[Tensor] = None, dropout: float = 0.0) -> Tensor:
    """Multiview rotary attention: ``q (B, H, T, D)``, ``k`` / ``v (B, H_kv, T, D)`` (grouped-query
    when ``H_kv < H``: each key head serves ``H / H_kv`` consecutive query heads), rotated by ``cos`` /
    ``sin (B, V, T, D_r)`` (``None``: not rotated) -> ``(B, H, T, D)``.
    ``mask``: boolean ``(B, 1, T, T)``, true where a query may attend (``None``: everywhere)."""
    if cos is not None:
        q, k = multiview_qk(q, k, cos, sin, pairing)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def line_order_mask(rank: Tensor) -> Tensor:
    """The causal mask of tokens ordered by ``rank (B, T)`` (distinct values): ``(B, 1, T, T)``,
    true where the key's rank does not exceed the query's."""
    return (rank[:, None, :] <= rank[:, :, None]).unsqueeze(1)


@dataclass
class RotaryPositions:
    """A batch's rotary positions, handed to every block of a rotary source.

    Attributes:
        points: the point tokens' positions ``(B, V, G, A)`` in the source's units (``A = 1``: rows
            of the virtual line; ``A = 2``: (row, col) patch coordinates of the virtual plane); ``None``
            puts every token at the same position (no rotation: the ``pe`` ablations).
        order: each point token's rank on the virtual line ``(B, G)`` for causal attention.
        cache: the ``(cos, sin)`` a source computed for a sequence length and layer kind, reused by the
            blocks of one forward pass.
    """

    points: Optional[Tensor]
    order: Tensor
    cache: dict = field(default_factory=dict)


class RotarySource(SourceTransformer):
    """Base class of rotary sources: no table; the virtual projection's positions feed the source's
    rotary embedding (:meth:`block_context`), and each block gets them with the tokens.

    Attributes set by subclasses: ``rotary_dim`` (1 for a virtual line, 2 for a virtual plane),
    ``line_length`` (1D: rows of the virtual line) or ``plane_size`` and ``patch_size`` (2D),
    ``attention`` (``bidirectional`` or ``causal``).
    """

    rotary_dim: int = 1
    line_length: Optional[int] = None
    attention: AttentionKind = "bidirectional"

    @property
    def modality_dim(self) -> int:
        """1 for a virtual line (language models), 2 for a virtual plane (rotary ViTs)."""
        return self.rotary_dim

    @property
    def position_table(self) -> Optional[Tensor]:
        """A rotary source may keep an absolute table too (EVA-02): ``pos_embed_2d``, else ``None``."""
        return getattr(self, "pos_embed_1d", None) if self.rotary_dim == 1 else getattr(self, "pos_embed_2d", None)

    def block_context(self, embedded: Embedded) -> RotaryPositions:
        """The batch's rotary positions from the virtual projection's output (``projected.rotary``,
        ``(B, V, G)`` rows or ``(B, V, G, 2)`` pixels; ``None`` without rotary positions)."""
        positions = embedded.projected.rotary
        centres = embedded.centres
        if positions is None:
            order = torch.arange(centres.shape[1], device=centres.device).expand(centres.shape[0], -1)
            return RotaryPositions(None, order)
        points = self.rotary_coordinates(positions)
        # Causal order: along the (mean) first coordinate, ties by token index.
        key = points[..., 0].mean(dim=1)
        order = torch.argsort(torch.argsort(key, dim=-1, stable=True), dim=-1)
        return RotaryPositions(points, order)

    def rotary_coordinates(self, positions: Tensor) -> Tensor:
        """Projection positions -> the source's rotary coordinates ``(B, V, G, A)``: rows of the line
        as they are (1D), pixels ``(row, col)`` as patch coordinates ``pixel / patch - 1/2`` (2D: the
        centre of patch ``i`` is at coordinate ``i``)."""
        if self.rotary_dim == 1:
            return positions.unsqueeze(-1)
        return positions / self.patch_size - 0.5

    def attention_mask(self, context: Optional[RotaryPositions], length: int) -> Optional[Tensor]:
        """``None`` (bidirectional), or the causal mask ``(B, 1, T, T)`` of a sequence of ``length``
        tokens: the prefix (class and prompt tokens) first, then the point tokens in line order."""
        if self.attention == "bidirectional" or context is None:
            return None
        order = context.order
        prefix = length - order.shape[1]
        rank = torch.cat([torch.arange(prefix, device=order.device).expand(order.shape[0], -1), order + prefix], 1)
        return line_order_mask(rank)

    def first_sample_context(self, context: RotaryPositions) -> RotaryPositions:
        points = None if context.points is None else context.points[:1]
        return RotaryPositions(points, context.order[:1])

    def forward_block(self, index: int, x: Tensor, ffn_hook=None, attn_hook=None,
                      context: Optional[RotaryPositions] = None) -> Tensor:
        """Block ``index`` on ``x (B, T, C)`` with the batch's rotary positions ``context`` (``None``:
        every token at the prefix position)."""
        raise NotImplementedError
