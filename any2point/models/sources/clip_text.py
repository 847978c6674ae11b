"""CLIP text tower (open_clip) as a frozen 1D source (paper sec. 3; docs/method.md "The SourceTransformer
contract").

The paper's language source is the text encoder of OpenAI's CLIP ViT-L/14: 12 blocks of width 768
and a 77-row positional-embedding table. The 3D tokens (B, T, C) run through its resblocks with full
(bidirectional) attention within each sample: a causal mask orders words, and 3D tokens have no
order. The official Any2Point code also calls these blocks without a mask, but feeds batch-first
tokens into a sequence-first attention (docs/method.md deviation 1); ``official_seq_first_bug: true``
reproduces that for loading released checkpoints and ablations.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.utils.attention import attention
from any2point.models.sources.base import (AttentionWeight, ResidualHook, SourceTransformer, fused_qkv,
                                             read_state_dict, residual, single)
from any2point.errors import ConfigError
from any2point.models.sources.torchscript_archive import is_torchscript_archive, read_torchscript_state_dict
from any2point.registry import SOURCES

WEIGHTS_SOURCE = ("OpenAI (https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84"
                  "cd88be6f7c2e0eca1737a03836/ViT-L-14.pt) or an open_clip checkpoint of the same model")

# Keys of a CLIP checkpoint that do not apply to a text tower fed with 3D tokens.
_UNUSED_EXACT = frozenset({
    "token_embedding.weight",  # word embedding: the 3D tokenizer produces the tokens instead
    "text_projection",         # projection of the EOT feature into the joint space: replaced by the head
    "logit_scale",             # temperature of the contrastive loss
    "logit_bias",              # bias of the SigLIP-style contrastive loss
    "attn_mask",               # causal mask (TorchScript archives keep buffers): 3D tokens have no order
    # Scalar metadata stored in OpenAI's TorchScript archives (OpenAI's and open_clip's loaders pop them).
    "input_resolution",
    "context_length",
    "vocab_size",
})
_UNUSED_PREFIX = "visual."     # the image tower


def read_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an OpenAI TorchScript CLIP file (read as data: none of its code runs) or of an
    open_clip checkpoint (``module.`` prefixes of distributed training removed)."""
    if is_torchscript_archive(path):
        state = read_torchscript_state_dict(path, "CLIP weights")
    else:
        state = read_state_dict(path, "CLIP weights")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def convert_clip_text_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI / open_clip CLIP keys -> this source's keys.

    ``transformer.resblocks.N.*`` -> ``blocks.N.*``, ``ln_final.*`` -> ``norm.*``,
    ``positional_embedding`` (L, C) -> ``pos_embed_1d``. The image tower and the keys of
    ``_UNUSED_EXACT`` are dropped; any other key is kept as it is, so strict loading reports it as
    unexpected.
    """
    out = {}
    for key, value in state.items():
        if key in _UNUSED_EXACT or key.startswith(_UNUSED_PREFIX):
            continue
        if key == "positional_embedding":
            key = "pos_embed_1d"
        key = re.sub(r"^transformer\.resblocks\.", "blocks.", key)
        key = re.sub(r"^ln_final\.", "norm.", key)
        out[key] = value
    return out


class SelfAttention(nn.MultiheadAttention):
    """open_clip's block attention (a batch-first ``nn.MultiheadAttention``) with a faster
    self-attention.

    Called as a block calls it, ``attn(x, x, x, need_weights=False)`` on ``x (B, T, C)`` without
    mask or dropout, it runs the fused in-projection, ``scaled_dot_product_attention`` and the
    out-projection: 1.3x faster forward + backward on CPU than the module's own path, whose
    batch-first layout turns the projections into broadcast batched matmuls. Any other call (attention
    weights asked for, a mask, separate key or value) is the module's own. The parameters and their
    names are the module's, so weights load, LoRA substitutes them (``functional_call``) and forward
    hooks see the module as before.
    """

    @classmethod
    def of(cls, attn: nn.MultiheadAttention) -> "SelfAttention":
        """A :class:`SelfAttention` holding ``attn``'s parameters (the same tensors)."""
        fast = cls(attn.embed_dim, attn.num_heads, dropout=attn.dropout, batch_first=attn.batch_first,
                   bias=attn.in_proj_bias is not None, add_bias_kv=attn.bias_k is not None, device="meta")
        for name, param in attn.named_parameters(recurse=False):
            setattr(fast, name, param)
        fast.out_proj = attn.out_proj
        return fast

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        plain = (query is key is value and query.dim() == 3 and self.batch_first and self._qkv_same_embed_dim
                 and not need_weights and attn_mask is None and key_padding_mask is None and not is_causal
                 and self.bias_k is None and (self.dropout == 0.0 or not self.training))
        if not plain:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        b, t, c = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, c // self.num_heads)).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.out_proj(out), None


@SOURCES.register()
class CLIPTextSource(SourceTransformer):
    """The text transformer of an open_clip model, frozen: (B, T, C) tokens -> (B, T, C).

    Args:
        model_name: open_clip model config whose ``text_cfg`` sets the tower; ``ViT-L-14-quickgelu``
            is OpenAI's ViT-L/14 (QuickGELU activations, as OpenAI trained it).
        width, depth, heads: override the config's text width, number of blocks and heads (tiny
            models for tests); ``None`` keeps the config's value.
        pretrained: path of OpenAI's ``ViT-L-14.pt`` or of an open_clip checkpoint; ``None`` builds
            the tower at random init.
        official_seq_first_bug: reproduce the official code's attention across the batch at each
            token position (docs/method.md deviation 1) instead of across the tokens of each sample.
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", width: Optional[int] = None,
                 depth: Optional[int] = None, heads: Optional[int] = None,
                 pretrained: Optional[str] = None, official_seq_first_bug: bool = False) -> None:
        import open_clip
        from open_clip.model import CLIPTextCfg
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        super().__init__()
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ConfigError(f"unknown open_clip model '{model_name}' (see open_clip.list_models())")
        text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
        custom_block = text_cfg.block_type not in (None, "default") or any((
            text_cfg.qk_norm, text_cfg.scaled_cosine_attn, text_cfg.scale_heads, text_cfg.scale_attn_inner,
            text_cfg.scale_attn, text_cfg.scale_fc))
        if text_cfg.hf_model_name or text_cfg.embed_cls or custom_block:
            raise ConfigError(f"open_clip model '{model_name}' has no plain CLIP text transformer (one of "
                             f"open_clip's ResidualAttentionBlock, which forward_block runs): "
                             f"text_cfg {model_cfg['text_cfg']}")
        act_layer = QuickGELU if model_cfg.get("quick_gelu", False) else nn.GELU
        tower = TextTransformer(
            context_length=text_cfg.context_length, vocab_size=text_cfg.vocab_size,
            width=text_cfg.width if width is None else width,
            heads=text_cfg.heads if heads is None else heads,
            layers=text_cfg.layers if depth is None else depth,
            mlp_ratio=text_cfg.mlp_ratio, ls_init_value=text_cfg.ls_init_value, output_dim=None,
            act_layer=partial(act_layer, **(text_cfg.act_kwargs or {})),
            norm_layer=partial(LayerNorm, **(text_cfg.norm_kwargs or {})))
        self.name = f"CLIPTextSource:{model_name}"
        self.dim = tower.width
        self.depth = len(tower.transformer.resblocks)
        self.blocks = tower.transformer.resblocks
        for block in self.blocks:
            block.attn = SelfAttention.of(block.attn)
        self.norm = tower.ln_final
        self.register_buffer("pos_embed_1d", tower.positional_embedding.detach().clone(), persistent=False)
        self.official_seq_first_bug = official_seq_first_bug
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Block ``index`` on (B, T, C) -> (B, T, C), without attention mask; the hooks replace the
        residual adds of the attention and the FFN."""
        block = self.blocks[index]
        h = block.ln_1(x)
        if self.official_seq_first_bug:
            # (B, T, C) read as (sequence, batch, C): attention over the batch at each position.
            a = block.attention(h.transpose(0, 1)).transpose(0, 1)
        else:
            a = block.attention(h)  # SelfAttention's fast path
        x = residual(attn_hook, x, block.ls_1(a))
        return residual(ffn_hook, x, block.ls_2(block.mlp(block.ln_2(x))))

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """open_clip's ``nn.MultiheadAttention``: fused ``in_proj_weight`` and ``out_proj.weight``."""
        return [fused_qkv("attn", "in_proj_weight", self.dim), single("attn", "out_proj.weight", "o", self.dim)]

    def load_pretrained(self, path: str | Path) -> None:
        """Load the text tower out of an OpenAI TorchScript file or an open_clip checkpoint."""
        file = self.resolve_weights(str(path), "the CLIP text tower", WEIGHTS_SOURCE)
        state = convert_clip_text_state_dict(read_clip_state_dict(file))
        self.load_converted(state, f"CLIP text tower weights '{file}'")
        self.record_weights(file)
