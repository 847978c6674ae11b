"""The assembled Any2Point classifier (paper sec. 3).

``points (B, N, 3) -> logits (B, num_classes)``: Point-PN tokens ``(B, G, C)`` + the averaged
virtual-projection PE (a 3D-pretrained source instead embeds its own groups of points and their
centres, :mod:`any2point.models.sources.point_transformer`) -> prepend the cls token (+ its PE)
and the tuner's prompt tokens, if any -> the source's blocks, adapted by the tuner -> the source's
final norm -> ``[max over point tokens, cls]`` (2C) -> head (2C -> 256 -> 256 -> classes, BN + ReLU +
dropout).

Trainable: the tokenizer, the projection's own parameters, the classifier's cls token and its PE
(initialised from the source's when it has them), the tuner's modules and whatever the tuner
trains inside the source (its final norm always; everything for full fine-tuning), and the head.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from any2point.models.any2point.head import ClassificationHead
from any2point.models.point_nn.point_nn import PointNNPlugIn
from any2point.models.sources.base import SourceTransformer
from any2point.models.tuners.base import Tuner
from any2point.registry import MODELS, PROJECTIONS, SOURCES, TOKENIZERS, TUNERS, Slot, build_from_cfg, check_kwargs
from any2point.errors import ConfigError
from any2point.utils.activation_checkpoint import checkpoint, saved_bytes

logger = logging.getLogger("any2point")


PEInjection = Literal["once", "every_block", "every_block_plus_initial"]
BlockCheckpointing = Union[bool, Literal["auto"]]


def set_layer_norm_eps(module: nn.Module, eps: float, what: str) -> None:
    """Set the ``eps`` of every ``nn.LayerNorm`` inside ``module`` (a :class:`ConfigError` if none)."""
    norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        raise ConfigError(f"model {what}: the source has no LayerNorm there")
    for norm in norms:
        norm.eps = eps


def _init_token(source_value: Optional[Tensor], dim: int) -> nn.Parameter:
    """A trainable (1, 1, C) token: a copy of the source's, or N(0, 0.02) when it has none."""
    if source_value is not None:
        return nn.Parameter(source_value.detach().clone().float().reshape(1, 1, dim))
    return nn.Parameter(torch.randn(1, 1, dim) * 0.02)


@dataclass
class Encoded:
    """What the encoder gives for one batch of clouds.

    Attributes:
        centres: the token centres ``(B, G, 3)``.
        cls: the class token after the final norm ``(B, C)``.
        tokens: the point tokens after the final norm ``(B, G, C)`` (prompt tokens dropped).
        levels: the point tokens after each block asked for (``encode(points, levels)``), each
            through the final norm ``(B, G, C)``, in the order asked.
    """

    centres: Tensor
    cls: Tensor
    tokens: Tensor
    levels: list[Tensor] = field(default_factory=list)


@MODELS.register()
class Any2Point(nn.Module):
    """Any2Point: a source transformer of any modality, adapted by a tuner, as a point-cloud classifier.

    Args:
        num_classes: number of output classes.
        source: ``type:`` mapping of a registered :class:`SourceTransformer`.
        tokenizer: ``type:`` mapping of the 3D tokenizer (default ``PointPNTokenizer``); gets ``dim``.
        projection: ``type:`` mapping of the virtual projection (default ``VirtualProjection``);
            gets ``source``.
        tuner: ``type:`` mapping of the :class:`~any2point.models.tuners.base.Tuner` that adapts the
            source (default ``GuidedAdapter``, Any2Point's own); gets what it names in
            ``injected_args`` of ``dim``, ``depth``, ``num_views`` and ``projection``.
        head_widths: hidden widths of the classification head.
        head_dropout: dropout after each hidden layer of the head.
        checkpoint_blocks: in training, keep only each source block's input for backward and run
            the block (with what the tuner put in it) again there (activation checkpointing): less
            memory for one more forward pass of the blocks. Not with a tuner holding ``nn`` batch
            norms (Point-PEFT's adapter), whose running statistics would move twice. ``auto`` (the
            default): checkpoint the blocks of a training batch when what they would keep for
            backward exceeds ``block_memory_gb`` (see :meth:`block_activation_bytes`); never with
            such a tuner.
        block_memory_gb: the budget of ``checkpoint_blocks: auto``, in GiB (2^30 bytes) of the
            activations the source blocks keep for backward over a whole batch. The default 1.2
            leaves the paper configurations' batches of 8 and 16 as they are (0.36-0.50 and
            0.71-0.99 GiB by the estimate) and checkpoints their batches of 32 (1.42-1.99 GiB),
            which then fit in 6 GB on the CPU.

    The released code's behaviour (docs/method.md, "Where the official code differs from the
    paper"), each switch off by default:

        head_hidden_bias: ``False`` drops the biases of the head's hidden Linears (deviation 7).
        pe_injection: ``once`` (the default but for 3D-pretrained sources: the PE is added to the tokens,
            and the cls position to the cls token, before the first block), ``every_block`` (the default
            for 3D-pretrained sources, as they were pretrained) (``[cls position, PE]`` added before
            every block instead) or ``every_block_plus_initial`` (both, so the first block sees it
            twice) (deviation 3).
        random_cls_pos: the cls token's position starts random (N(0, 0.02)) instead of the source's
            own (deviation 8; matters for training only).
        final_norm_eps, block_norm_eps: override the ``eps`` of the source's final LayerNorm and of
            the LayerNorms in its blocks (the released code built its own norms: 1e-6 or 1e-5
            where the source used the other; deviation 10).

    Point-NN beside it (off by default):

        point_nn: the keys of :class:`~any2point.models.point_nn.point_nn.PointNNPlugIn`: a
            training-free Point-NN whose bank, filled after training, adds its weighted votes to the
            logits (docs/point_nn.md, "Plug-and-play"); no trainable parameter.
    """

    config_slots = {"source": Slot(SOURCES), "tokenizer": Slot(TOKENIZERS), "projection": Slot(PROJECTIONS),
                    "tuner": Slot(TUNERS)}

    def __init__(self, num_classes: int, source: dict, tokenizer: Optional[dict] = None,
                 projection: Optional[dict] = None, tuner: Optional[dict] = None,
                 head_widths: Sequence[int] = (256, 256), head_dropout: float = 0.5,
                 head_hidden_bias: bool = True, pe_injection: Optional[PEInjection] = None,
                 random_cls_pos: bool = False,
                 final_norm_eps: Optional[float] = None, block_norm_eps: Optional[float] = None,
                 checkpoint_blocks: BlockCheckpointing = "auto", block_memory_gb: float = 1.2,
                 point_nn: Optional[dict] = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if pe_injection is not None and pe_injection not in PEInjection.__args__:
            raise ConfigError(f"model pe_injection must be one of {PEInjection.__args__}, got '{pe_injection}'")
        for key, eps in (("final_norm_eps", final_norm_eps), ("block_norm_eps", block_norm_eps)):
            if eps is not None and eps <= 0:
                raise ConfigError(f"model {key} must be positive, got {eps}")
        if not block_memory_gb > 0:
            raise ConfigError(f"model block_memory_gb must be a positive number of GiB, got {block_memory_gb}")
        self.checkpoint_blocks, self.block_memory_gb = checkpoint_blocks, block_memory_gb
        self._sample_block_bytes: dict[tuple, int] = {}
        self.source = build_from_cfg(source, SOURCES)
        if not isinstance(self.source, SourceTransformer):
            raise ConfigError(f"model source '{source['type']}' is not a SourceTransformer")
        self.pe_injection = pe_injection or self.source.default_pe_injection
        dim = self.source.dim
        if final_norm_eps is not None:
            set_layer_norm_eps(self.source.norm, final_norm_eps, "final_norm_eps")
        if block_norm_eps is not None:
            set_layer_norm_eps(self.source.blocks, block_norm_eps, "block_norm_eps")
        # The source's point embedding: Point-PN + the virtual projection onto its table, or (a
        # 3D-pretrained source) nothing here, as it embeds its own points.
        self.tokenizer, self.projection = self.source.build_point_embedding(tokenizer, projection)
        self.tuner = self._build_tuner(tuner or {"type": "GuidedAdapter"})
        norms = [name for name, m in self.tuner.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms and checkpoint_blocks is True:
            raise ConfigError(f"model checkpoint_blocks: the tuner's BatchNorm '{norms[0]}' would update its "
                              "running statistics again when a block is recomputed; set it false")
        if norms:
            self.checkpoint_blocks = False
        self.cls_token = _init_token(self.source.cls_token, dim)
        self.cls_pos_embed = _init_token(None if random_cls_pos else self.source.cls_pos_embed, dim)
        self.head = self._build_head(dim, num_classes, head_widths, head_dropout, head_hidden_bias)
        self.point_nn = None
        if point_nn is not None:
            check_kwargs(PointNNPlugIn, point_nn, "model.point_nn", injected=PointNNPlugIn.injected_args)
            self.point_nn = PointNNPlugIn(num_classes, **point_nn)
        self.tuner.attach(self.source)
        self.train()
        counts = self.parameter_counts()
        logger.info("Any2Point(%s, tuner %s): trainable / total parameters: %s / %s; without the head: %s / %s",
                    self.source.name, type(self.tuner).__name__, f"{counts['trainable']:,}", f"{counts['total']:,}",
                    f"{counts['trainable_without_head']:,}", f"{counts['total'] - counts['head']:,}")
        if self.tuner.trains_source:
            logger.info("the source trains: checkpoints hold the whole source (%s parameters)",
                        f"{sum(p.numel() for p in self.source.parameters()):,}")

    def _build_tuner(self, cfg: dict) -> Tuner:
        """Build the tuner of ``cfg`` with the sizes and modules it asks for injected."""
        available = {"dim": self.source.dim, "depth": self.source.depth}
        if self.projection is not None:
            available.update(num_views=self.projection.num_views, projection=self.projection)
        target = TUNERS.get(cfg["type"])
        if not (isinstance(target, type) and issubclass(target, Tuner)):
            raise ConfigError(f"model tuner '{cfg['type']}' is not a Tuner")
        if any(k not in available for k in target.injected_args):
            fitting = [name for name in TUNERS.names() if all(k in available for k in TUNERS.get(name).injected_args)]
            raise ConfigError(f"model tuner '{cfg['type']}' needs the virtual projection, which the 3D-pretrained "
                              f"source '{self.source.name}' does not have; with it use {', '.join(fitting)}")
        return build_from_cfg(cfg, TUNERS, **{k: available[k] for k in target.injected_args})

    def _build_head(self, dim: int, num_classes: int, widths: Sequence[int], dropout: float,
                    hidden_bias: bool) -> nn.Module:
        """The task head (a subclass's own head replaces the classification head here)."""
        return ClassificationHead(2 * dim, widths, num_classes, dropout, hidden_bias)

    def train(self, mode: bool = True) -> "Any2Point":
        """Set the mode of every module; the tuner decides the source's (a frozen one stays in eval)."""
        super().train(mode)
        self.tuner.source_mode(self.source, mode)
        return self

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable``, ``head`` and ``trainable_without_head`` parameter counts."""
        return count_parameters(self, self.head)

    def source_identity(self) -> dict[str, Optional[str]]:
        """The source's name and weight-file hash (saved with checkpoints)."""
        return self.source.identity()

    def encode(self, points: Tensor, levels: Sequence[int] = ()) -> Encoded:
        """``points (B, N, 3)`` -> the normed class and point tokens and the token centres, and the
        normed point tokens after each block of ``levels`` (block numbers from 1 to depth)."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Any2Point expects points of shape (B, N, 3), got {tuple(points.shape)}")
        if any(not 1 <= k <= self.source.depth for k in levels):
            raise ValueError(f"levels {list(levels)} must be block numbers from 1 to {self.source.depth}")
        embedded = self.source.embed_points(points, self.tokenizer, self.projection)
        context = self.tuner.prepare(embedded)
        # What the blocks need from this batch besides the tokens (a rotary source's positions).
        block_context = self.source.block_context(embedded)
        extra = () if block_context is None else (block_context,)
        centres, tokens, pe = embedded.centres, embedded.tokens, embedded.pe
        b = tokens.shape[0]
        initial = self.pe_injection != "every_block"
        if initial and pe is not None:
            tokens = tokens + pe
        cls = self.cls_token + self.cls_pos_embed if initial else self.cls_token
        x = torch.cat([cls.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        count = tokens.shape[1]  # the point tokens stay last, whatever prompts a block carries
        after: dict[int, Tensor] = {}
        checkpoint_blocks = None if self.training and torch.is_grad_enabled() else False
        for index in range(self.source.depth):
            x = self.tuner.enter_block(index, x, context)
            if checkpoint_blocks is None:  # decided on the first block's input (prompts included)
                checkpoint_blocks = self.checkpoints_blocks(x, block_context)
            if self.pe_injection != "once":
                x = x + self._block_pe(pe, x)
            hooks = self.tuner.hooks(index, context)
            if checkpoint_blocks:
                x = checkpoint(self.source.forward_block, index, x, hooks.ffn, hooks.attn, *extra)
            else:
                x = self.source.forward_block(index, x, hooks.ffn, hooks.attn, *extra)
            if index + 1 in levels:
                after[index + 1] = self.source.norm(x[:, -count:])
        x = self.source.norm(x)
        return Encoded(centres=centres, cls=x[:, 0], tokens=x[:, 1 + self.tuner.num_prompts:],
                       levels=[after[k] for k in levels])

    def checkpoints_blocks(self, x: Tensor, block_context: Any = None) -> bool:
        """Whether a training batch whose first block gets ``x (B, T, C)`` runs its blocks
        checkpointed: ``checkpoint_blocks``, or with ``auto`` whether :meth:`block_activation_bytes`
        exceeds ``block_memory_gb``; ``block_context``: the source's (:meth:`SourceTransformer.block_context`)."""
        if self.checkpoint_blocks != "auto":
            return self.checkpoint_blocks
        return self.block_activation_bytes(x, block_context) > self.block_memory_gb * 2 ** 30

    def block_activation_bytes(self, x: Tensor, block_context: Any = None) -> int:
        """The bytes the source blocks keep for backward on tokens ``x (B, T, C)``, estimated as
        B x depth x what the first block keeps for one sample (measured once per token count, width,
        dtype and device, on a copy of the first sample's tokens, without the tuner's hooks; the
        random state is left as it was)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._sample_block_bytes:
            extra = () if block_context is None else (self.source.first_sample_context(block_context),)
            self._sample_block_bytes[key] = self._measure_block_bytes(x[:1].detach().clone().requires_grad_(), extra)
        return x.shape[0] * self.source.depth * self._sample_block_bytes[key]

    def _measure_block_bytes(self, sample: Tensor, extra: tuple) -> int:
        # Eager under torch.compile; the decorator is applied only there because importing it
        # (torch._dynamo) adds about 1.4 s to every start.
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self._measure_block_bytes_eagerly)(sample, extra)
        return self._measure_block_bytes_eagerly(sample, extra)

    def _measure_block_bytes_eagerly(self, sample: Tensor, extra: tuple) -> int:
        devices = [sample.device] if sample.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return saved_bytes(lambda: self.source.forward_block(0, sample, None, None, *extra),
                               exclude=[*self.parameters(), *self.buffers()])

    def _block_pe(self, pe: Optional[Tensor], x: Tensor) -> Tensor:
        """``[cls position, zeros for the prompt tokens, PE]`` ``(B, T, C)`` for tokens ``x (B, T, C)``."""
        b, t, c = x.shape
        parts = [self.cls_pos_embed.expand(b, -1, -1).to(x.dtype),
                 x.new_zeros(b, t - 1 - (0 if pe is None else pe.shape[1]), c)]
        if pe is not None:
            parts.append(pe.to(x.dtype))
        return torch.cat(parts, dim=1)

    def forward(self, points: Tensor) -> Tensor:
        """``points (B, N, 3) -> logits (B, num_classes)``."""
        encoded = self.encode(points)
        logits = self.head(torch.cat([encoded.tokens.amax(dim=1), encoded.cls], dim=-1))
        return logits if self.point_nn is None else self.point_nn.add_to(logits, points)


def count_parameters(model: nn.Module, head: Optional[nn.Module] = None) -> dict[str, int]:
    """``total``, ``trainable``, ``head`` and ``trainable_without_head`` parameter counts of ``model``
    (shared parameters once; works on the ``meta`` device)."""
    params = list(model.parameters())
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    head_count = sum(p.numel() for p in params if id(p) in head_ids)
    head_trainable = sum(p.numel() for p in params if id(p) in head_ids and p.requires_grad)
    return {"total": total, "trainable": trainable, "head": head_count,
            "trainable_without_head": trainable - head_trainable}
