"""ImageBind's audio encoder as a frozen 2D source (paper sec. 3; docs/method.md "The SourceTransformer
contract"), written here after ImageBind (Girdhar et al. 2023).

ImageBind embeds a 128 mel x 204 frame spectrogram with a 16 x 16 convolution of stride 10 into a
12 x 19 grid of patches (mel rows x time columns), adds a class token and a learned positional
table (1, 1 + 228, 768), and runs 12 pre-LN blocks of width 768 whose attention has learned key and
value bias tokens (``nn.MultiheadAttention(add_bias_kv=True)``); its head starts with a LayerNorm,
used here as the final norm. The virtual plane of the 2D projection is 192 x 304 px: the grid with
one 16 px cell per patch. ImageBind's stochastic depth (rate 0.1) is left out (the identity in eval
mode, where a frozen source runs).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from any2point.utils.attention import attention
from any2point.models.sources.base import (AttentionWeight, ResidualHook, SourceTransformer, fused_qkv,
                                             read_state_dict, residual, single)
from any2point.registry import SOURCES
from any2point.errors import ConfigError

WEIGHTS_SOURCE = "Meta (https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth)"

_RENAMES = (
    (r"^modality_preprocessors\.audio\.cls_token$", "cls_token"),
    (r"^modality_preprocessors\.audio\.pos_embedding_helper\.pos_embed$", "pos_embed"),
    (r"^modality_trunks\.audio\.blocks\.", "blocks."),
    (r"^modality_heads\.audio\.0\.", "norm."),
)
_UNUSED = (
    # Spectrogram patchifier (conv + LayerNorm): the 3D tokenizer produces the tokens instead.
    r"^modality_preprocessors\.audio\.rgbt_stem\.",
    # Projection of the class token into ImageBind's joint space: replaced by the method's head.
    r"^modality_heads\.audio\.2\.weight$",
    # L2 normalisation and fixed logit scale of ImageBind's contrastive loss.
    r"^modality_postprocessors\.audio\.",
    # The other modalities' encoders.
    r"^modality_(preprocessors|trunks|heads|postprocessors)\.(vision|text|depth|thermal|imu)\.",
)


def convert_imagebind_audio_state_dict(state: dict[str, Tensor], grid_size: tuple[int, int]) -> dict[str, Tensor]:
    """ImageBind keys (``imagebind_huge.pth``, or an audio-only extract of it) -> this source's keys.

    ``modality_trunks.audio.blocks.N.*`` -> ``blocks.N.*``, ``modality_heads.audio.0.*`` (the head's
    LayerNorm) -> ``norm.*``, the preprocessor's ``cls_token`` -> ``cls_token`` and its ``pos_embed``
    (1, 1 + H*W, C) -> ``cls_pos_embed`` (1, 1, C) and ``pos_embed_2d`` (H, W, C) in ImageBind's
    row-major order (mel rows, time columns), ``(H, W) = grid_size``. Keys matching ``_UNUSED`` are
    dropped; any other key is kept as it is, so strict loading reports it as unexpected.
    """
    out = {}
    for key, value in state.items():
        if any(re.match(pattern, key) for pattern in _UNUSED):
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        if key == "pos_embed":
            height, width = grid_size
            if value.ndim != 3 or value.shape[:2] != (1, 1 + height * width):
                raise ConfigError(f"ImageBind audio 'pos_embed' of shape {tuple(value.shape)} does not hold a "
                                 f"class position and a {height} x {width} grid "
                                 f"(expected (1, {1 + height * width}, C))")
            out["cls_pos_embed"] = value[:, :1]
            out["pos_embed_2d"] = value[0, 1:].reshape(height, width, -1)
            continue
        out[key] = value
    return out


class BiasKVAttention(nn.Module):
    """Multi-head self-attention with a learned key and value appended to every sequence, as
    ``nn.MultiheadAttention(dim, num_heads, add_bias_kv=True)`` (same parameter names), batch-first:
    (B, T, C) -> (B, T, C); each query attends over the T tokens of its sample and the bias token.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
        self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_normal_(self.bias_k)
        nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: Tensor, plain_qkv: bool = False) -> Tensor:
        """(B, T, C) -> (B, T, C); ``plain_qkv`` leaves the bias key and value out."""
        batch, tokens, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if not plain_qkv:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(batch, 1, dim)], dim=1)  # k may be autocast
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(batch, 1, dim)], dim=1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class ImageBindBlock(nn.Module):
    """ImageBind's pre-LN transformer block (``BlockWithMasking`` without layer scale), batch-first:
    (B, T, C) -> (B, T, C). Child names follow ImageBind's checkpoint keys."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, plain_qkv: bool = False) -> None:
        from timm.layers import Mlp

        super().__init__()
        self.plain_qkv = plain_qkv
        self.attn = BiasKVAttention(dim, num_heads)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """(B, T, C) -> (B, T, C); the hooks replace the residual adds of the attention and the FFN."""
        x = residual(attn_hook, x, self.attn(self.norm_1(x), self.plain_qkv))
        return residual(ffn_hook, x, self.mlp(self.norm_2(x)))


@SOURCES.register()
class ImageBindAudioSource(SourceTransformer):
    """ImageBind's audio trunk, frozen: (B, T, C) tokens -> (B, T, C); table ``pos_embed_2d``
    (mel rows, time columns, C) = (12, 19, 768) at the paper's size.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: the trunk (ImageBind: 768, 12, 12, 4).
        num_mel_bins, target_len, kernel_size, stride: the spectrogram and its patchifier, which set
            the grid ``((num_mel_bins - kernel_size) // stride + 1, (target_len - kernel_size) //
            stride + 1)``; ``kernel_size`` is also the cell side on the virtual plane.
        pretrained: path of ``imagebind_huge.pth`` (or an extract holding its audio keys); ``None``
            builds at random init.
        official_plain_qkv: attention without the learned bias key and value, as the released
            Any2Point code ran ImageBind's blocks (docs/method.md deviation 8); off by default.
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_mel_bins: int = 128, target_len: int = 204, kernel_size: int = 16, stride: int = 10,
                 pretrained: Optional[str] = None, official_plain_qkv: bool = False) -> None:
        super().__init__()
        height = (num_mel_bins - kernel_size) // stride + 1
        width = (target_len - kernel_size) // stride + 1
        if height < 1 or width < 1:
            raise ConfigError(f"a {num_mel_bins} x {target_len} spectrogram is smaller than the "
                             f"{kernel_size} px patch")
        self.name = "ImageBindAudioSource"
        self.dim = embed_dim
        self.depth = depth
        self.patch_size = kernel_size
        self.plane_size = (height * kernel_size, width * kernel_size)
        self.blocks = nn.ModuleList(ImageBindBlock(embed_dim, num_heads, mlp_ratio, official_plain_qkv)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        # ImageBind's ("openclip"-style) init of the class token and positional table.
        scale = embed_dim ** -0.5
        self.register_buffer("pos_embed_2d", torch.randn(height, width, embed_dim) * scale, persistent=False)
        self.cls_pos_embed = torch.randn(1, 1, embed_dim) * scale
        self.cls_token = torch.randn(1, 1, embed_dim) * scale
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def _init_weights(self) -> None:
        """ImageBind's trunk init: Xavier-uniform linear weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Block ``index`` on (B, T, C) -> (B, T, C); the hooks replace the residual adds."""
        return self.blocks[index](x, ffn_hook, attn_hook)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """:class:`BiasKVAttention`: fused ``in_proj_weight`` and ``out_proj.weight``."""
        return [fused_qkv("attn", "in_proj_weight", self.dim), single("attn", "out_proj.weight", "o", self.dim)]

    def load_pretrained(self, path: str | Path) -> None:
        """Load the audio encoder out of ImageBind's checkpoint through its key converter."""
        file = self.resolve_weights(str(path), "the ImageBind audio encoder", WEIGHTS_SOURCE)
        grid = tuple(self.pos_embed_2d.shape[:2])
        state = convert_imagebind_audio_state_dict(read_state_dict(file, "ImageBind weights"), grid)
        self.load_converted(state, f"ImageBind audio weights '{file}'")
        self.record_weights(file)
