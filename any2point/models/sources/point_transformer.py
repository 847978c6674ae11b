"""3D-pretrained sources: the Point-MAE and Point-BERT encoders (Point-PEFT, Tang et al. AAAI 2024,
sec. 3.1; Pang et al. ECCV 2022; Yu et al. CVPR 2022), behind the same source contract as the 1D/2D
sources so every tuner (full fine-tuning, frozen, LoRA, Point-PEFT's prompt and adapter) runs on
them.

A point source tokenizes its own points, with pretrained weights, in place of Point-PN and the
virtual projection (:attr:`~any2point.models.sources.base.SourceTransformer.modality_dim` is 3):

- :meth:`PointTransformerSource.tokenize`: ``points (B, N, 3) -> centres (B, G, 3), tokens (B, G, C)``:
  FPS picks G centres, each groups its ``group_size`` nearest points (kNN, the centre included)
  relative to the centre, and a mini-PointNet (Conv1d 3->128->256, max, concatenate the max to each
  point, Conv1d 512->512->E, max) embeds each group; Point-BERT then maps E = 256 to C with a Linear;
- :meth:`PointTransformerSource.embed_positions`: an MLP of the centres (3 -> 128 -> GELU -> C),
  added before every block as the pretrained encoder did;
- 12 pre-norm blocks x 384 (6 heads, qkv without bias, MLP ratio 4, GELU) and a final LayerNorm.

Point-BERT's encoder carries a pretrained class token and its position; Point-MAE's has none.
:meth:`PointTransformerSource.forward` is the pretrained encoder on its own: tokens (+ PE before
every block) -> blocks -> norm -> max over tokens, the global feature ``(B, C)`` Point-PEFT's
memory bank holds.

Weights are the released ``pre-train.pth`` files (``{"base_model": ..., ...}``, keys with or without
a DataParallel ``module.`` prefix): Point-MAE's encoder is ``MAE_encoder.*``, Point-BERT's
``transformer_q.*``. The converters map every encoder key, drop the pretraining-only parts by an
explicit list (decoders, mask tokens, heads, the momentum encoder, the dVAE) and fail on anything
else. Point-M2AE's encoder is hierarchical (three stages of different widths and token counts,
joined by its own up-sampling), so it has no single ``dim`` and ``blocks`` list: it does not fit the
contract and is not provided.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.utils.attention import attention
from any2point.errors import CheckpointError, ConfigError
from any2point.extensions import furthest_point_sample, group, knn
from any2point.models.sources.base import (AttentionWeight, Embedded, ResidualHook, SourceTransformer, fused_qkv,
                                          residual, single)
from any2point.registry import SOURCES
from any2point.utils.safe_load import load_torch_file

logger = logging.getLogger("any2point")

WEIGHTS_SOURCE = {
    "point_mae": "https://github.com/Pang-Yatian/Point-MAE (pretrain.pth) or "
                 "https://github.com/Ivan-Tang-3D/Point-PEFT (pre-train.pth)",
    "point_bert": "https://github.com/lulutang0608/Point-BERT (Point-BERT.pth)",
}


class MiniPointNet(nn.Module):
    """The group encoder of Point-BERT / Point-MAE: ``(B, G, K, 3) -> (B, G, E)``."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, out_dim, 1))

    def forward(self, groups: Tensor) -> Tensor:
        b, g, k, _ = groups.shape
        f = self.first_conv(groups.reshape(b * g, k, 3).transpose(1, 2))  # (BG, 256, K)
        f = torch.cat([f.amax(dim=2, keepdim=True).expand(-1, -1, k), f], dim=1)
        f = self.second_conv(f).amax(dim=2)
        return f.reshape(b, g, -1)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv without bias, scale ``head_dim ** -0.5``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(N1(x))``, then ``x + MLP(N2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))


class PointTransformerSource(SourceTransformer):
    """A Point-BERT-style 3D encoder as a source (see the module docstring); built as
    :class:`PointMAESource` or :class:`PointBERTSource`.

    Args:
        pretrained: the released ``pre-train.pth``, or ``None`` for random init.
        layout: ``point_mae`` or ``point_bert``: which released key layout ``pretrained`` has, and
            whether the encoder has a class token and a 256-wide group encoder.
        dim, depth, heads, mlp_ratio: the transformer (384, 12, 6, 4 in both releases).
        num_groups, group_size: G centres of K points each (the releases: 64 x 32 for ModelNet40,
            128 x 32 for ScanObjectNN).
        group_dim: E, the group encoder's width (Point-MAE: ``dim``; Point-BERT: 256, then a Linear to C).
    """

    def __init__(self, pretrained: Optional[str] = None, layout: str = "point_mae", dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0, num_groups: int = 64, group_size: int = 32,
                 group_dim: int = 384) -> None:
        super().__init__()
        if layout not in WEIGHTS_SOURCE:
            raise ConfigError(f"model source layout must be one of {sorted(WEIGHTS_SOURCE)}, got '{layout}'")
        for key, value in (("dim", dim), ("depth", depth), ("heads", heads), ("num_groups", num_groups),
                           ("group_size", group_size)):
            if value < 1:
                raise ConfigError(f"model source {key} must be positive, got {value}")
        if dim % heads:
            raise ConfigError(f"model source dim {dim} is not divisible by heads {heads}")
        self.layout = layout
        self.name = layout
        self.dim, self.depth = dim, depth
        self.num_groups, self.group_size = num_groups, group_size
        self.encoder = MiniPointNet(group_dim)
        self.reduce_dim = nn.Linear(group_dim, dim) if layout == "point_bert" else None
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        if layout == "point_bert":
            self.cls_token = torch.randn(1, 1, dim) * 0.02
            self.cls_pos_embed = torch.randn(1, 1, dim) * 0.02
        path = self.resolve_weights(pretrained, f"the {layout} encoder", WEIGHTS_SOURCE[layout])
        if path is not None:
            self.load_pretrained(path)

    #: Pretrained with the centres' embedding added before every block.
    default_pe_injection = "every_block"

    @property
    def modality_dim(self) -> int:
        """3: the source embeds 3D points itself (no virtual projection)."""
        return 3

    def build_point_embedding(self, tokenizer: Optional[dict], projection: Optional[dict]) -> tuple[None, None]:
        """Nothing to build: the source's own group tokenizer and centre embedding embed the points."""
        for key, value in (("tokenizer", tokenizer), ("projection", projection)):
            if value is not None:
                raise ConfigError(f"model {key}: source '{type(self).__name__}' tokenizes its own points (pretrained "
                                  f"group tokenizer and centre PE); remove the key")
        return None, None

    def embed_points(self, points: Tensor, tokenizer: None = None, projection: None = None) -> Embedded:
        """``points (B, N, 3)`` -> the source's own tokens, their centres and the centres' embedding."""
        centres, tokens = self.tokenize(points)
        return Embedded(centres, tokens, self.embed_positions(centres), self)

    def tokenize(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``points (B, N, 3) -> centres (B, G, 3), tokens (B, G, C)`` (FPS + kNN + mini-PointNet)."""
        if points.shape[1] < max(self.num_groups, self.group_size):
            raise ConfigError(f"model.source groups num_groups x group_size = {self.num_groups} x {self.group_size} "
                              f"points; a cloud of {points.shape[1]} points is too small")
        centres, groups = group_points(points, self.num_groups, self.group_size)
        tokens = self.encoder(groups)
        if self.reduce_dim is not None:
            tokens = self.reduce_dim(tokens)
        return centres, tokens

    def embed_positions(self, centres: Tensor) -> Tensor:
        """``centres (B, G, 3) -> (B, G, C)``: the positional embedding added before every block."""
        return self.pos_embed(centres)

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        block = self.blocks[index]
        x = residual(attn_hook, x, block.attn(block.norm1(x)))
        return residual(ffn_hook, x, block.mlp(block.norm2(x)))

    def forward(self, tokens: Tensor, pe: Tensor) -> Tensor:
        """The pretrained encoder alone: ``tokens, pe (B, G, C) -> (B, C)``, the max over its normed tokens."""
        x = tokens
        for index in range(self.depth):
            x = self.forward_block(index, x + pe)
        return self.norm(x).amax(dim=1)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        return [fused_qkv("attn", "qkv.weight", self.dim), single("attn", "proj.weight", "o", self.dim)]

    def load_pretrained(self, path: str | Path) -> None:
        """Load a released ``pre-train.pth`` strictly through the layout's key converter."""
        what = f"{self.layout} weights '{path}'"
        state, dropped = CONVERTERS[self.layout](read_pretrain_file(path, what), what)
        self.load_converted(state, what)
        self.record_weights(path)
        logger.info("%s: loaded %d tensors; dropped %d of pretraining only (%s)", what, len(state), len(dropped),
                    ", ".join(sorted({k.split(".")[0] for k in dropped})))

    def extra_repr(self) -> str:
        return (f"name={self.name}, dim={self.dim}, depth={self.depth}, groups={self.num_groups}x"
                f"{self.group_size}")


def group_points(points: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """``points (B, N, 3) -> centres (B, G, 3), groups (B, G, K, 3)``: FPS centres (starting at point
    0), each with its K nearest points (itself included) relative to it."""
    centres_idx = furthest_point_sample(points, num_groups)
    centres = torch.gather(points, 1, centres_idx.unsqueeze(-1).expand(-1, -1, 3))
    _, idx = knn(centres, points, group_size)
    return centres, group(points, idx, centres)


@SOURCES.register()
class PointMAESource(PointTransformerSource):
    """The Point-MAE encoder (12 x 384, 6 heads; no class token)."""

    def __init__(self, pretrained: Optional[str] = None, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, num_groups: int = 64, group_size: int = 32) -> None:
        super().__init__(pretrained, "point_mae", dim, depth, heads, mlp_ratio, num_groups, group_size, dim)


@SOURCES.register()
class PointBERTSource(PointTransformerSource):
    """The Point-BERT encoder (12 x 384, 6 heads; 256-wide groups mapped to 384 by a Linear; a class token)."""

    def __init__(self, pretrained: Optional[str] = None, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, num_groups: int = 64, group_size: int = 32, group_dim: int = 256) -> None:
        super().__init__(pretrained, "point_bert", dim, depth, heads, mlp_ratio, num_groups, group_size, group_dim)


def read_pretrain_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a Point-BERT-style checkpoint: its ``base_model`` entry (or the file itself when it
    is a bare state dict), the DataParallel ``module.`` prefix removed."""
    obj = load_torch_file(path, f"{what} checkpoint")
    if isinstance(obj, Mapping) and isinstance(obj.get("base_model"), Mapping):
        obj = obj["base_model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: not a checkpoint with a 'base_model' state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


_BLOCK = r"blocks\.blocks\.(\d+)\.(.+)"


def _convert(state: Mapping[str, Tensor], what: str, prefix: str, renames: Mapping[str, str],
             dropped: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    """Map ``prefix``-ed encoder keys to ours, drop the keys starting with ``dropped``, fail on others."""
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key.startswith(dropped):
            skipped.append(key)
            continue
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        rest = key[len(prefix):]
        block = re.fullmatch(_BLOCK, rest)
        if block:
            out[f"blocks.{block.group(1)}.{block.group(2)}"] = value
        elif rest in renames:
            out[renames[rest]] = value
        elif rest.split(".")[0] in ("encoder", "pos_embed", "norm", "reduce_dim"):
            out[rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{what}: keys the converter does not know ({len(unknown)}): "
                              + ", ".join(sorted(unknown)[:20]))
    return out, skipped


def convert_point_mae_state_dict(state: Mapping[str, Tensor], what: str = "Point-MAE weights"
                                 ) -> tuple[dict[str, Tensor], list[str]]:
    """Point-MAE's ``pre-train.pth`` (``MAE_encoder.*``) -> ours, and the keys dropped (decoder side)."""
    return _convert(state, what, "MAE_encoder.", {},
                    ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim."))


def convert_point_bert_state_dict(state: Mapping[str, Tensor], what: str = "Point-BERT weights"
                                  ) -> tuple[dict[str, Tensor], list[str]]:
    """Point-BERT's ``Point-BERT.pth`` (``transformer_q.*``) -> ours, and the keys dropped (the momentum
    encoder, the dVAE, the MoCo queue, the mask token and the pretraining heads)."""
    return _convert(state, what, "transformer_q.", {"cls_token": "cls_token", "cls_pos": "cls_pos_embed"},
                    ("transformer_k.", "dvae.", "queue", "transformer_q.mask_token", "transformer_q.lm_head.",
                     "transformer_q.cls_head."))


CONVERTERS: dict[str, Callable[..., tuple[dict[str, Tensor], list[str]]]] = {
    "point_mae": convert_point_mae_state_dict, "point_bert": convert_point_bert_state_dict}
