"""Hugging Face ``transformers`` rotary models as frozen 1D sources: decoder LLMs (Llama 3.x, SmolLM,
Qwen2 / Qwen3, Mistral, Gemma 3, Phi-3, OLMo 2) and ModernBERT (docs/sources.md, "Rotary sources").

These models have no position table: the virtual projection gives every point token its row on a
virtual line of ``line_length`` rows in each of the M views, and the model's own rotary embedding
(``rotary_emb``, with its frequencies, scaling rule and, for Gemma 3 and ModernBERT, one rule per
layer kind) turns the rows into rotations (:mod:`any2point.models.sources.rotary`). The class token
(the BOS token of a decoder, ModernBERT's ``[CLS]``) and any prompt tokens sit at row
``cls_position`` (default -1: just before the line, where a prompt's first token precedes its text).

The layers' own modules run, so every family's norms, MLP (SwiGLU, GeGLU) and attention (grouped
queries, q/k norms, biases) are the model's; this source calls them in the layer's order with the
residual adds where the tuners hook, recognised by the layer's children, not its class name:

- pre-norm (Llama, Qwen2/3, Mistral, Phi-3, SmolLM): ``x + Attn(N_in(x))``, then ``x + MLP(N_post(x))``;
- sandwich (Gemma 3): ``x + N_post_attn(Attn(N_in(x)))``, then ``x + N_post_ffn(MLP(N_pre_ffn(x)))``;
- post-norm (OLMo 2): ``x + N_post_attn(Attn(x))``, then ``x + N_post_ffn(MLP(x))``;
- ModernBERT: ``x + Attn(N_attn(x))``, then ``x + MLP(N_mlp(x))``; the embeddings' LayerNorm runs
  before layer 1, as on the text path.

The attention module computes its projections; its own rotation is given the identity, and the
attention function registered with transformers under ``any2point_rotary`` rotates queries and keys
with the batch's positions (once per view: multiview) and runs scaled dot-product attention.
Attention is bidirectional by default (3D tokens have no order); ``attention: causal`` keeps a
decoder's causal mask with the point tokens in their order on the line. Sliding windows (Mistral,
Gemma 3's local layers, ModernBERT's local layers) are off: every layer attends globally, as the
point tokens' rows say where they project, not which tokens are near in 3D.

Where the weights come from (``pretrained``): a local model folder or a hub id already in the local
Hugging Face cache, as for :class:`~any2point.models.sources.hf_encoder.HFEncoderSource`; nothing is
downloaded. ``dtype: bfloat16`` keeps the frozen weights in bfloat16 (the residual stream, the final
norm and every trainable part stay float32).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.errors import ConfigError
from any2point.models.sources.base import AttentionWeight, ResidualHook, residual, single
from any2point.models.sources.hf_encoder import (hf_attention_weights, hf_config, hf_download_hint, hf_weight_file,
                                                 load_hf_model, resolve_pretrained)
from any2point.models.sources.rotary import AttentionKind, Pairing, RotaryPositions, RotarySource, rotary_attention
from any2point.registry import SOURCES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "any2point_rotary"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Attend = Callable[[nn.Module, Tensor], Tensor]


def rotary_attention_function(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, any2point_rotary: Optional[tuple] = None,
                              **_: object) -> tuple[Tensor, None]:
    """The attention function transformers calls inside the layers of a rotary source: ``query``
    ``(B, H, T, D)`` and ``key`` / ``value`` ``(B, H_kv, T, D)`` as the module projected them (its own
    rotation was the identity), rotated here with ``any2point_rotary = (cos, sin, pairing)`` ->
    ``(B, T, H, D)``. Other keyword arguments (a sliding window) are ignored: every layer is global."""
    cos, sin, pairing = any2point_rotary if any2point_rotary is not None else (None, None, "half")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = rotary_attention(query, key, value, cos, sin, pairing, scale, attention_mask, dropout)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, rotary_attention_function)


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


Call = Callable[[nn.Module, Tensor], Tensor]


def _run_pre_norm(layer: nn.Module, x: Tensor, attend: Attend, call: Call, ffn_hook: Optional[ResidualHook],
                  attn_hook: Optional[ResidualHook]) -> Tensor:
    """Llama-style: ``x + Attn(N_in(x))``, then ``x + MLP(N_post(x))`` (Phi-3's residual dropouts)."""
    a = attend(layer.self_attn, call(layer.input_layernorm, x))
    x = residual(attn_hook, x, call(layer.resid_attn_dropout, a) if hasattr(layer, "resid_attn_dropout") else a)
    f = call(layer.mlp, call(layer.post_attention_layernorm, x))
    return residual(ffn_hook, x, call(layer.resid_mlp_dropout, f) if hasattr(layer, "resid_mlp_dropout") else f)


def _run_sandwich(layer: nn.Module, x: Tensor, attend: Attend, call: Call, ffn_hook: Optional[ResidualHook],
                  attn_hook: Optional[ResidualHook]) -> Tensor:
    """Gemma 3: norms before and after both the attention and the MLP."""
    a = attend(layer.self_attn, call(layer.input_layernorm, x))
    x = residual(attn_hook, x, call(layer.post_attention_layernorm, a))
    f = call(layer.mlp, call(layer.pre_feedforward_layernorm, x))
    return residual(ffn_hook, x, call(layer.post_feedforward_layernorm, f))


def _run_post_norm(layer: nn.Module, x: Tensor, attend: Attend, call: Call, ffn_hook: Optional[ResidualHook],
                   attn_hook: Optional[ResidualHook]) -> Tensor:
    """OLMo 2: ``x + N(Attn(x))``, then ``x + N(MLP(x))``."""
    x = residual(attn_hook, x, call(layer.post_attention_layernorm, attend(layer.self_attn, x)))
    return residual(ffn_hook, x, call(layer.post_feedforward_layernorm, call(layer.mlp, x)))


def _run_modernbert(layer: nn.Module, x: Tensor, attend: Attend, call: Call, ffn_hook: Optional[ResidualHook],
                    attn_hook: Optional[ResidualHook]) -> Tensor:
    """ModernBERT: ``x + Attn(N_attn(x))``, then ``x + MLP(N_mlp(x))``."""
    x = residual(attn_hook, x, attend(layer.attn, call(layer.attn_norm, x)))
    return residual(ffn_hook, x, call(layer.mlp, call(layer.mlp_norm, x)))


def layer_runner(layer: nn.Module, what: str) -> tuple[Callable, str]:
    """The function running a decoder (or ModernBERT) layer, and the name of its attention module."""
    if _has(layer, "attn_norm", "attn", "mlp_norm", "mlp"):
        return _run_modernbert, "attn"
    if _has(layer, "input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "mlp"):
        return _run_sandwich, "self_attn"
    if _has(layer, "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        return _run_pre_norm, "self_attn"
    if _has(layer, "self_attn", "post_attention_layernorm", "post_feedforward_layernorm", "mlp"):
        return _run_post_norm, "self_attn"
    raise ConfigError(f"{what}: transformers layer {type(layer).__name__} has none of the layouts this source "
                      f"runs (pre-norm: Llama, Qwen, Mistral, Phi-3; sandwich: Gemma 3; post-norm: OLMo 2; "
                      f"ModernBERT)")


def _parts(model: nn.Module) -> dict[str, Optional[nn.Module]]:
    """The modules of a decoder (``layers``, ``norm``, ``embed_tokens``) or of ModernBERT
    (``layers``, ``final_norm``, ``embeddings.tok_embeddings``, ``embeddings.norm``)."""
    embeddings = getattr(model, "embeddings", None)
    if embeddings is not None:
        return dict(layers=model.layers, norm=model.final_norm, words=embeddings.tok_embeddings,
                    embed_norm=embeddings.norm, rotary=model.rotary_emb)
    return dict(layers=model.layers, norm=model.norm, words=model.embed_tokens, embed_norm=None,
                rotary=model.rotary_emb)


@SOURCES.register()
class HFRotarySource(RotarySource):
    """A Hugging Face decoder LLM or ModernBERT, frozen, on a virtual line: (B, T, C) -> (B, T, C).

    Args:
        pretrained: a local model folder or a hub id in the local Hugging Face cache (never
            downloaded); ``None`` builds ``architecture`` at random init (tests, parameter counts).
        architecture: transformers config fields, ``model_type`` first (``qwen3``, ``llama``,
            ``gemma3_text``, ``modernbert``, ...); required without ``pretrained``; with it, each field
            must match the model's config.
        line_length: rows of the virtual line the projection maps the views onto (a rotary model
            has no table length: the row spacing sets how far apart, in token positions, the
            two ends of the object are).
        cls_position: the row of the class token and of prompt tokens (default -1, before the line).
        cls_token_id: the vocabulary row whose embedding initialises the class token; ``None`` takes
            the config's ``bos_token_id`` (decoders) or ``cls_token_id`` (ModernBERT), else the
            classifier learns its own.
        attention: ``bidirectional`` (default) or ``causal`` (point tokens in line order).
        dtype: ``float32`` or ``bfloat16`` for the frozen layers.
    """

    def __init__(self, pretrained: Optional[str] = None, architecture: Optional[dict] = None,
                 line_length: int = 77, cls_position: float = -1.0, cls_token_id: Optional[int] = None,
                 attention: AttentionKind = "bidirectional",
                 dtype: Literal["float32", "bfloat16"] = "float32") -> None:
        super().__init__()
        what = f"HFRotarySource '{pretrained}'" if pretrained else f"HFRotarySource (random init of {architecture})"
        if line_length < 2:
            raise ConfigError(f"{what}: line_length must be at least 2, got {line_length}")
        if attention not in AttentionKind.__args__:
            raise ConfigError(f"{what}: attention must be one of {AttentionKind.__args__}, got '{attention}'")
        if dtype not in DTYPES:
            raise ConfigError(f"{what}: dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
        folder = resolve_pretrained(pretrained, what, hf_download_hint(pretrained)) if pretrained else None
        config = hf_config(folder, architecture, what)
        if getattr(config, "attn_logit_softcapping", None):
            raise ConfigError(f"{what}: attention logit soft-capping is not supported")
        from transformers import AutoModel

        _register_attention()
        model = AutoModel.from_config(config, attn_implementation=ATTENTION_NAME)
        if not hasattr(model, "rotary_emb") or not hasattr(model, "layers"):
            raise ConfigError(f"{what}: {type(model).__name__} is not a rotary decoder or ModernBERT "
                              f"(no rotary_emb / layers); use HFEncoderSource for encoders with a position table")
        parts = _parts(model)
        self.name = f"HFRotarySource:{pretrained or config.model_type + ' (random init)'}"
        self.line_length, self.cls_position, self.attention = line_length, float(cls_position), attention
        self.dim = config.hidden_size
        self.blocks = parts["layers"]
        self.depth = len(self.blocks)
        self._run_layer, self._attn_name = layer_runner(self.blocks[0], what)
        self.norm = parts["norm"]
        self.embed_norm = parts["embed_norm"]
        self.rotary_emb = parts["rotary"]
        self._by_layer_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.depth)
        self.pairing: Pairing = "half"
        self.head_dim = self._attention(0).head_dim
        if cls_token_id is None:
            cls_token_id = getattr(config, "cls_token_id", None) if self.embed_norm is not None else None
            cls_token_id = cls_token_id if cls_token_id is not None else getattr(config, "bos_token_id", None)
        vocab = parts["words"].num_embeddings
        if cls_token_id is not None and not 0 <= cls_token_id < vocab:
            raise ConfigError(f"{what}: cls_token_id {cls_token_id} is outside the vocabulary (0..{vocab - 1})")
        self.cls_token_id = cls_token_id
        self._set_cls(parts["words"])
        if folder is not None:
            self.load_pretrained(folder)
        self.dtype = DTYPES[dtype]
        self.blocks.to(self.dtype)
        if self.embed_norm is not None:
            self.embed_norm.to(self.dtype)

    def _attention(self, index: int) -> nn.Module:
        return getattr(self.blocks[index], self._attn_name)

    @torch.no_grad()
    def _set_cls(self, words: nn.Module) -> None:
        """The class token from the word embedding of ``cls_token_id`` (with the model's embedding
        scale, e.g. Gemma's sqrt(C)); its position is rotary, so its additive position is zero."""
        if self.cls_token_id is None:
            return
        token = words(torch.tensor([self.cls_token_id], device=words.weight.device)).float().reshape(1, 1, -1)
        self.cls_token = token.clone()
        self.cls_pos_embed = torch.zeros_like(token)

    def _rotations(self, context: Optional[RotaryPositions], length: int, index: int
                   ) -> Optional[tuple[Tensor, Tensor]]:
        """``cos, sin (B, V, T, D_r)`` of layer ``index``'s rotary rule for a sequence of ``length``
        tokens: the prefix at ``cls_position``, the point tokens at their rows; ``None`` without
        positions."""
        if context is None or context.points is None:
            return None
        layer_type = self.layer_types[index] if self._by_layer_type else "all"
        key = (length, layer_type)
        if key not in context.cache:
            points = context.points[..., 0]  # (B, V, G) rows
            b, v, g = points.shape
            prefix = points.new_full((b, v, length - g), self.cls_position)
            rows = torch.cat([prefix, points], dim=-1).reshape(b * v, length)
            probe = rows.new_zeros(1, dtype=torch.float32)
            args = (layer_type,) if self._by_layer_type else ()
            cos, sin = self.rotary_emb(probe, rows.float(), *args)
            context.cache[key] = (cos.reshape(b, v, length, -1), sin.reshape(b, v, length, -1))
        return context.cache[key]

    def embed_input(self, x: Tensor) -> Tensor:
        """ModernBERT normalises its embedded sequence before layer 1 (the identity for decoders)."""
        return self.embed_norm(x.to(self.dtype)).to(x.dtype) if self.embed_norm is not None else x

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None,
                      context: Optional[RotaryPositions] = None) -> Tensor:
        """Layer ``index`` on ``x (B, T, C)`` with the batch's rotary positions; the hooks replace the
        residual adds after the attention and the MLP. The layer runs in the source's dtype; the
        residual stream keeps ``x``'s."""
        if index == 0:
            x = self.embed_input(x)
        length = x.shape[1]
        rotations = self._rotations(context, length, index)
        mask = self.attention_mask(context, length)
        rotary = None if rotations is None else (*rotations, self.pairing)
        dtype = x.dtype

        def attend(attn: nn.Module, h: Tensor) -> Tensor:
            h = h.to(self.dtype)
            identity = (h.new_ones(1, length, self.head_dim), h.new_zeros(1, length, self.head_dim))
            out = attn(hidden_states=h, position_embeddings=identity, attention_mask=mask,
                       any2point_rotary=rotary)[0]
            return out.to(dtype)

        def call(module: nn.Module, t: Tensor) -> Tensor:
            return module(t.to(self.dtype)).to(dtype)

        return self._run_layer(self.blocks[index], x, attend, call, ffn_hook, attn_hook)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """The layer's ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` Linears (grouped-query: the
        k and v rows are fewer), or ModernBERT's fused ``Wqkv`` and ``Wo``."""
        layer = self.blocks[index]
        attn = self._attention(index)
        if self._attn_name == "attn":
            width = attn.Wqkv.out_features // 3
            return [AttentionWeight("attn.Wqkv", "weight", {"q": (0, width), "k": (width, 2 * width),
                                                             "v": (2 * width, 3 * width)}),
                    single("attn.Wo", "weight", "o", self.dim)]
        if isinstance(getattr(attn, "qkv_proj", None), nn.Linear):  # Phi-3: fused q, k, v rows
            q = attn.config.num_attention_heads * self.head_dim
            kv = (attn.qkv_proj.out_features - q) // 2
            return [AttentionWeight("self_attn.qkv_proj", "weight", {"q": (0, q), "k": (q, q + kv),
                                                                      "v": (q + kv, q + 2 * kv)}),
                    single("self_attn.o_proj", "weight", "o", self.dim)]
        weights = []
        for found in hf_attention_weights(layer, self.dim):
            module = layer.get_submodule(found.module)
            target = next(iter(found.rows))
            weights.append(single(found.module, "weight", target, module.out_features))
        return weights

    def load_pretrained(self, path: str | Path) -> None:
        """Load a saved transformers model folder (offline), strictly for the parts this source keeps."""
        folder = Path(path)
        what = f"HFRotarySource weights '{folder}'"
        weights = hf_weight_file(folder, what)

        def used(model: PreTrainedModel) -> list[nn.Module]:
            parts = _parts(model)
            return [m for name, m in parts.items() if m is not None and name != "rotary"]

        model = load_hf_model(folder, used, what)
        parts = _parts(model)
        state = {f"blocks.{k}": v for k, v in parts["layers"].state_dict().items()}
        state.update({f"norm.{k}": v for k, v in parts["norm"].state_dict().items()})
        if parts["embed_norm"] is not None:
            state.update({f"embed_norm.{k}": v for k, v in parts["embed_norm"].state_dict().items()})
        if self.cls_token_id is not None:
            words = parts["words"]
            token = words(torch.tensor([self.cls_token_id])).float().reshape(1, 1, -1)
            state.update(cls_token=token, cls_pos_embed=torch.zeros_like(token))
        self.load_converted({k: v.detach() for k, v in state.items()}, what)
        self.record_weights(weights)

    def extra_repr(self) -> str:
        return (f"name={self.name}, dim={self.dim}, depth={self.depth}, line_length={self.line_length}, "
                f"attention={self.attention}, dtype={str(self.dtype).removeprefix('torch.')}")

