"""Point-PEFT (Tang et al., AAAI 2024): the point-prior prompt and the geometry-aware adapter on a frozen
3D-pretrained source, with the released code's settings.

**Point-prior prompt** (paper sec. 3.2). A memory bank holds the global features ``(M, C)`` of the
training set, extracted once by the frozen pretrained encoder (:mod:`any2point.models.point_peft.memory_bank`). Per
cloud, the frozen encoder's global feature ``f (B, C)`` queries the bank by parameter-free attention
(:func:`point_prior_attention`): similarities ``s = (f / |f|) F^T``, the top ``K = P - 2`` entries,
softmax weights over their similarities, their weighted sum ``a``; the *cache* is
``[f, a, F_top1, ..., F_topK]`` ``(B, P, C)``. Blocks ``0 .. prompt_depth - 1`` each carry ``P``
prompts: their own learnable ``(P, C)`` tokens (dropout) plus their own residual bottleneck (C -> 8 -> C,
QuickGELU) of the cache; the prompts sit between the class token and the point tokens, get no
positional embedding, and are dropped after block ``prompt_depth - 1`` (released: P = 10, 6 of 12
blocks). The prompt needs the pretrained encoder's own tokenizer, frozen (the bank's features are
its outputs), so it runs on 3D-pretrained sources only.

**Geometry-aware adapter** (paper sec. 3.3), in every block, in place of the FFN's residual add
(``f`` the FFN output, ``x`` the residual stream):

1. ``x = x + f + 0.7 * Up(Drop(QuickGELU(Down(f))))`` (bottleneck 16);
2. on the point tokens ``t (B, G, C)`` (class token and prompts aside): FPS picks ``S = G / 2`` of
   the token centres, each gathers its ``k = 16`` nearest tokens ``(B, S, k, C)``; a LayerNorm and a
   small multi-head attention inside each group (C -> 3 x 18, 6 heads of 3, 18 -> C, scale 18^-1/2,
   shared by all blocks) with a residual; max over the group, BN + GELU, plus ``0.3 x`` the sampled
   token's own feature: ``v (B, S, C)``; every token takes the inverse-squared-distance weighted
   mean of ``v`` over its ``n`` nearest sampled centres (released: all of them):
   ``t = t + 0.3 * interp(v)``;
3. ``x = x + Up(Drop(QuickGELU(Down(x))))`` on all tokens (bottleneck 16).

**What trains** (as released): the prompts, the cache bottlenecks, the adapters, the shared local
attention and its norm, and every bias inside the source's blocks (attention output, FFN Linears,
LayerNorms: bias tuning; :func:`block_biases`), besides what trains in every tuner (final norm; the classifier's class
token, its position and the head). The pretrained tokenizer and position MLP stay frozen.

Where this differs from the released code (each read there): the released blocks 0-5 gather the
prompt tokens into the adapter's groups through learnable prompt coordinates indexed with the point
count of another tensor (rows of the wrong sample), and the prompts leave the block anyway: here the
adapter works on the point tokens only and the coordinates do not exist; the released model keeps
prompts and cache bottlenecks in blocks 6-11 that nothing uses (half of them, 62k parameters) and an
unused gate per block: here they are not built; the frozen encoder is run in eval mode, without
stochastic depth and with its BatchNorms' running statistics (the released one trains with drop
path in the frozen blocks and batch statistics in the frozen group encoder); the global feature comes from
the same tokens as the classifier (the released code re-groups the cloud into 64 groups for it).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from any2point.utils.attention import attention
from any2point.extensions import furthest_point_sample, gather, knn
from any2point.models.point_peft.memory_bank import check_bank_source, read_memory_bank
from any2point.models.any2point.adapter import QuickGELU
from any2point.models.sources.base import Embedded, SourceTransformer
from any2point.models.tuners.base import BlockHooks, Tuner
from any2point.registry import TUNERS
from any2point.errors import ConfigError

logger = logging.getLogger("any2point")


def block_biases(source: SourceTransformer) -> list[tuple[str, nn.Parameter]]:
    """Every bias inside the source's blocks (a parameter whose own name contains ``bias``), named as
    in ``source.state_dict()``."""
    ids = {id(p) for name, p in source.blocks.named_parameters() if "bias" in name.rsplit(".", 1)[-1]}
    return [(name, p) for name, p in source.named_parameters() if id(p) in ids]


def point_prior_attention(feature: Tensor, bank: Tensor, k: int) -> Tensor:
    """The cache of the point-prior prompt: ``feature (B, C), bank (M, C) -> (B, k + 2, C)``.

    ``[feature, sum_j w_j F_j, F_1 .. F_k]`` with ``F_j`` the ``k`` bank entries most similar to the
    normalised feature (``F_j . f / |f|``) and ``w = softmax`` of those similarities.
    """
    sims = F.normalize(feature, dim=-1) @ bank.t()
    top, idx = sims.topk(k, dim=-1)
    retrieved = bank[idx]  # (B, k, C)
    mixed = torch.einsum("bk,bkc->bc", top.softmax(dim=-1), retrieved)
    return torch.cat([feature.unsqueeze(1), mixed.unsqueeze(1), retrieved], dim=1)


@dataclass
class Neighbourhoods:
    """The geometry-aware adapter's groups of one batch, shared by all blocks.

    Attributes:
        sampled: ``(B, S)`` the FPS-picked tokens (the group centres).
        members: ``(B, S, k)`` the tokens of each group (its k nearest, the centre included).
        weights: ``(B, G, S)`` each token's interpolation weights over the group centres (rows sum to 1;
            zero outside its ``n`` nearest).
    """

    sampled: Tensor
    members: Tensor
    weights: Tensor


def geometry_neighbourhoods(centres: Tensor, num_samples: int, k: int, num_interp: Optional[int] = None,
                            eps: float = 1e-8) -> Neighbourhoods:
    """Groups of the token centres ``(B, G, 3)``: FPS ``S`` centres, their ``k`` nearest tokens, and each
    token's weights ``1 / (d^2 + eps)`` over its ``num_interp`` nearest centres (all when ``None``),
    normalised."""
    sampled = furthest_point_sample(centres, num_samples)
    sampled_xyz = gather(centres, sampled)
    _, members = knn(sampled_xyz, centres, k)
    dist2, nearest = knn(centres, sampled_xyz, num_interp or num_samples)
    inverse = 1.0 / (dist2 + eps)
    weights = torch.zeros(*centres.shape[:2], num_samples, device=centres.device, dtype=inverse.dtype)
    weights.scatter_(2, nearest, inverse / inverse.sum(dim=-1, keepdim=True))
    return Neighbourhoods(sampled, members, weights)


class Bottleneck(nn.Module):
    """``(..., C) -> (..., C)``: ``Up(Drop(QuickGELU(Down(x))))``; Xavier weights, N(0, 1e-6) biases."""

    def __init__(self, dim: int, width: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(width, dim)
        for layer in (self.down, self.up):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.drop(self.act(self.down(x))))


class GroupAttention(nn.Module):
    """LayerNorm + multi-head attention inside each group: ``(N, k, C) -> (N, k, C)`` (no residual)."""

    def __init__(self, dim: int, width: int = 18, heads: int = 6) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"PointPEFT attn_width {width} is not divisible by attn_heads {heads}")
        self.heads, self.width = heads, width
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.proj = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, k, _ = x.shape
        q, key, v = self.qkv(self.norm(x)).reshape(n, k, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(q, key, v, scale=self.width ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(n, k, self.width))


class GeometryBlock(nn.Module):
    """One block's own parts of the geometry-aware adapter: the FFN and token bottlenecks, the BN."""

    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.ffn_adapter = Bottleneck(dim, bottleneck, dropout)
        self.pool_norm = nn.BatchNorm1d(dim)
        self.token_adapter = Bottleneck(dim, bottleneck, dropout)


@dataclass
class PointPEFTContext:
    """Per batch: the adapter's groups (``None`` without the adapter) and the prompt cache
    ``(B, P, C)`` (``None`` without the prompt)."""

    groups: Optional[Neighbourhoods]
    cache: Optional[Tensor]


@TUNERS.register()
class PointPEFT(Tuner):
    """Point-PEFT's tuner (see the module docstring): the point-prior prompt and the geometry-aware
    adapter, each switchable.

    Allowed sources: with ``prompt`` (the released method, or the prompt alone) a 3D-pretrained
    source (``PointMAESource``, ``PointBERTSource``); the adapter alone (``prompt: false``) any
    source: on a 1D/2D source it groups the Point-PN token centres.

    Args:
        dim, depth: the source's width and number of blocks (injected).
        prompt, adapter: use the point-prior prompt / the geometry-aware adapter.
        num_prompts: P, prompts per prompted block (the cache holds P - 2 bank entries).
        prompt_depth: how many blocks, from the first, carry prompts.
        prompt_dropout: dropout on the learnable prompts.
        cache_bottleneck: width of each block's cache bottleneck.
        memory_bank: the bank file (``tools/build_memory_bank.py``), or ``None``: the cache is then the
            global feature alone, in every prompt. A missing file is an error for a pretrained
            source; a random-init source (``pretrained: null``, tests and smoke runs) runs without it.
        bottleneck: width of the FFN and token bottlenecks.
        adapter_dropout: dropout inside every bottleneck.
        ffn_scale, centre_scale, propagate_scale: 0.7, 0.3, 0.3 as released.
        num_samples: S, group centres per cloud (``None``: half the tokens).
        group_size: k, tokens per group.
        num_interp: n, the nearest group centres each token interpolates from (``None``: all).
        attn_width, attn_heads: the shared group attention (18, 6).
        tune_biases: train every bias inside the source's blocks.
    """

    injected_args = ("dim", "depth")

    def __init__(self, dim: int, depth: int, prompt: bool = True, adapter: bool = True, num_prompts: int = 10,
                 prompt_depth: int = 6, prompt_dropout: float = 0.1, cache_bottleneck: int = 8,
                 memory_bank: Optional[str] = None, bottleneck: int = 16, adapter_dropout: float = 0.1,
                 ffn_scale: float = 0.7, centre_scale: float = 0.3, propagate_scale: float = 0.3,
                 num_samples: Optional[int] = None, group_size: int = 16, num_interp: Optional[int] = None,
                 attn_width: int = 18, attn_heads: int = 6, tune_biases: bool = True) -> None:
        super().__init__()
        if not (prompt or adapter):
            raise ConfigError("PointPEFT needs the prompt or the adapter (both are false); use FrozenSource "
                              "for neither")
        checks = {"num_prompts": num_prompts, "prompt_depth": prompt_depth, "cache_bottleneck": cache_bottleneck,
                  "bottleneck": bottleneck, "group_size": group_size}
        for key, value in checks.items():
            if value < 1:
                raise ConfigError(f"PointPEFT {key} must be positive, got {value}")
        if prompt and prompt_depth > depth:
            raise ConfigError(f"PointPEFT prompt_depth {prompt_depth} exceeds the source's {depth} blocks")
        self.use_prompt, self.use_adapter = prompt, adapter
        self.depth = depth
        self.prompt_count = num_prompts if prompt else 0
        self.prompt_depth = prompt_depth if prompt else 0
        self.memory_bank = memory_bank
        self.tune_biases = tune_biases
        self.ffn_scale, self.centre_scale, self.propagate_scale = ffn_scale, centre_scale, propagate_scale
        self.num_samples, self.group_size, self.num_interp = num_samples, group_size, num_interp
        if prompt:
            self.prompts = nn.Parameter(torch.empty(prompt_depth, num_prompts, dim))
            nn.init.trunc_normal_(self.prompts, std=0.02)
            self.prompt_drop = nn.Dropout(prompt_dropout)
            self.cache_adapters = nn.ModuleList(Bottleneck(dim, cache_bottleneck, adapter_dropout)
                                                for _ in range(prompt_depth))
        if adapter:
            self.group_attention = GroupAttention(dim, attn_width, attn_heads)
            self.blocks = nn.ModuleList(GeometryBlock(dim, bottleneck, adapter_dropout) for _ in range(depth))
        self.register_buffer("bank", None, persistent=False)
        self._frozen_bias_names: list[str] = []

    @property
    def num_prompts(self) -> int:  # type: ignore[override]
        """Prompts left after the last block: none once the prompted blocks end before it."""
        return self.prompt_count if self.prompt_depth == self.depth else 0

    def attach(self, source: SourceTransformer) -> None:
        super().attach(source)
        if self.use_prompt and source.modality_dim != 3:
            raise ConfigError(f"PointPEFT's point-prior prompt needs a 3D-pretrained source (PointMAESource, "
                              f"PointBERTSource), not '{source.name}'; set the tuner's prompt: false to use the "
                              f"geometry-aware adapter alone")
        if self.tune_biases:
            for name, param in block_biases(source):
                param.requires_grad_(True)
                self._frozen_bias_names.append(name)
        if self.use_prompt:
            # The global feature is the pretrained encoder's: keep the biases it had before tuning.
            state = source.state_dict()
            for i, name in enumerate(self._frozen_bias_names):
                self.register_buffer(f"frozen_bias_{i}", state[name].detach().clone(), persistent=False)
            self._load_bank(source)
        if self.use_prompt and self.bank is not None and self.bank.shape[1] != source.dim:
            raise ConfigError(f"PointPEFT memory_bank '{self.memory_bank}' holds {self.bank.shape[1]}-wide "
                              f"features; the source is {source.dim} wide")

    def _load_bank(self, source: SourceTransformer) -> None:
        if self.memory_bank is None:
            return
        path = Path(self.memory_bank).expanduser()
        if not path.exists():
            if source.weight_file is not None:
                raise FileNotFoundError(
                    f"PointPEFT memory bank '{path}' not found: build it with `python tools/build_memory_bank.py "
                    f"--config CFG` (or convert the released cache_shape.pt with its --released option)")
            logger.warning("PointPEFT: memory bank '%s' not found; a random-init source runs without it", path)
            return
        bank = read_memory_bank(path)
        check_bank_source(path, source.weight_sha256)
        if bank.shape[0] < self.prompt_count - 2:
            raise ConfigError(f"PointPEFT memory_bank '{path}' holds {bank.shape[0]} features; the prompt "
                              f"retrieves {self.prompt_count - 2}")
        self.bank = bank

    def _global_feature(self, source: SourceTransformer, tokens: Tensor, pe: Tensor) -> Tensor:
        """The pretrained encoder's global feature ``(B, C)``, with the biases it had before tuning."""
        originals = {name: getattr(self, f"frozen_bias_{i}") for i, name in enumerate(self._frozen_bias_names)}
        with torch.no_grad():
            return functional_call(source, originals, (tokens.detach(), pe.detach()))

    def _groups(self, centres: Tensor) -> Optional[Neighbourhoods]:
        if not self.use_adapter:
            return None
        g = centres.shape[1]
        samples = self.num_samples or max(1, g // 2)
        if self.group_size > g or samples > g:
            raise ConfigError(f"model.tuner (PointPEFT) groups num_samples x group_size = {samples} x "
                              f"{self.group_size} tokens; the clouds have {g} tokens")
        return geometry_neighbourhoods(centres, samples, self.group_size, self.num_interp)

    def prepare(self, embedded: Embedded) -> PointPEFTContext:
        """The batch's neighbourhoods of the token centres (in the projection's frame where the source
        has one) and, on a 3D-pretrained source with the prompt, the memory bank's attention to the
        frozen encoder's global feature (the point-prior cache)."""
        if embedded.projected is not None:
            return PointPEFTContext(self._groups(embedded.projected.xyz), None)
        cache = None
        if self.use_prompt:
            feature = self._global_feature(embedded.source, embedded.tokens, embedded.pe)
            if self.bank is not None:
                cache = point_prior_attention(feature, self.bank.to(feature.dtype), self.prompt_count - 2)
            else:
                cache = feature.unsqueeze(1).expand(-1, self.prompt_count, -1)
        return PointPEFTContext(self._groups(embedded.centres), cache)

    def enter_block(self, index: int, x: Tensor, context: PointPEFTContext) -> Tensor:
        if not self.use_prompt or index > self.prompt_depth:
            return x
        carried = 0 if index == 0 else self.prompt_count
        rest = x[:, 1 + carried:]
        if index == self.prompt_depth:
            return torch.cat([x[:, :1], rest], dim=1)
        prompts = self.prompt_drop(self.prompts[index]).to(x.dtype).expand(x.shape[0], -1, -1)
        if context.cache is not None:
            cache = context.cache.to(x.dtype)
            prompts = prompts + cache + self.cache_adapters[index](cache)
        return torch.cat([x[:, :1], prompts, rest], dim=1)

    def hooks(self, index: int, context: PointPEFTContext) -> BlockHooks:
        if not self.use_adapter:
            return BlockHooks()
        return BlockHooks(ffn=functools.partial(self._adapt, index, context.groups))

    def _adapt(self, index: int, groups: Neighbourhoods, x: Tensor, f: Tensor) -> Tensor:
        """Block ``index``'s FFN residual add with the geometry-aware adapter (steps 1-3)."""
        block = self.blocks[index]
        x = x + f + self.ffn_scale * block.ffn_adapter(f)
        start = x.shape[1] - groups.weights.shape[1]
        points = x[:, start:]
        x = torch.cat([x[:, :start], points + self.propagate_scale * self._aggregate(block, points, groups)], dim=1)
        return x + block.token_adapter(x)

    def _aggregate(self, block: GeometryBlock, points: Tensor, groups: Neighbourhoods) -> Tensor:
        """Step 2: ``points (B, G, C) -> (B, G, C)``, the group features interpolated back to every token."""
        members = gather(points, groups.members)  # (B, S, k, C)
        b, s, k, c = members.shape
        flat = members.reshape(b * s, k, c)
        pooled = (flat + self.group_attention(flat)).reshape(b, s, k, c).amax(dim=2)
        pooled = F.gelu(block.pool_norm(pooled.transpose(1, 2))).transpose(1, 2)
        pooled = pooled + self.centre_scale * gather(points, groups.sampled)
        return torch.bmm(groups.weights.to(pooled.dtype), pooled)

    def extra_repr(self) -> str:
        return (f"prompt={self.use_prompt} (P={self.prompt_count}, blocks={self.prompt_depth}, "
                f"bank={self.memory_bank}), adapter={self.use_adapter}, tune_biases={self.tune_biases}")
