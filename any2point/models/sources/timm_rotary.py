"""timm's rotary Vision Transformers as frozen 2D sources: DINOv3, EVA-02 and the RoPE ViTs
(``vit_*_rope_*``), all timm ``Eva`` models with 2D axial rotary embeddings (docs/sources.md,
"Rotary sources").

The virtual plane is the model's image plane (``img_size``, a grid of ``patch_size`` patches); the
projection gives every point token its pixel in each of the M views, and the pixel becomes a
continuous patch coordinate (row, col) whose rotation is the model's own: timm's rotary angles are
linear in the row and the column of a patch (DINOv3 normalises the grid to [-1, 1], EVA-02 rescales
it to its pretraining grid, the RoPE ViTs use patch indices), so they are read off the model's
embedding on its grid, as ``angle = a0 + row * a_row + col * a_col`` per channel, and checked against
that embedding on the whole grid when the source is built. RoPE-Mixed ViTs (learned frequencies per
head and block) have no such rule and are refused.

The class token is not rotated, as timm leaves its prefix tokens; nor are prompt tokens. Register
tokens (DINOv3 has 4) are not used: the sequence is the class token and the point tokens. A model
that also has an absolute table (EVA-02, ``*_rope_ape_*``) gives it as ``pos_embed_2d``, sampled by
the projection as for a table source, on top of the rotation.

Blocks (timm ``EvaBlock``, pre-norm; the post-norm variant is refused) run with the adapter hook on
the FFN branch: ``x + g_1 Attn(N_1(x))``, then ``x + g_2 MLP(N_2(x))`` (layer-scale gammas where the
model has them). The attention runs the module's own projections, q/k norms, output norm, gate and
projection around the multiview rotary attention (:mod:`any2point.models.sources.rotary`), in a
parameter-free ``rotary_attention`` module added to each block.

Weights (``pretrained``) are a timm checkpoint file, a folder holding one, or a timm hub id already
in the local Hugging Face cache, loaded strictly through timm's converter for the family (Meta's
DINOv3 files included); nothing is downloaded.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.errors import ConfigError
from any2point.models.sources.base import (AttentionWeight, ResidualHook, check_state_dict_keys,
                                           check_state_dict_shapes, fused_qkv, residual, single)
from any2point.models.sources.hf_encoder import hf_download_hint, resolve_pretrained
from any2point.models.sources.rotary import Pairing, RotaryPositions, RotarySource, rotary_attention
from any2point.models.sources.timm_vit import read_timm_checkpoint, timm_weight_file
from any2point.registry import SOURCES

# Checkpoint keys of a timm rotary ViT that do not apply to 3D tokens.
_UNUSED_PREFIXES = ("patch_embed.", "head.", "attn_pool.", "reg_token", "rope.")
#: Largest difference allowed between timm's rotary embedding and the linear rule read off it.
ROPE_FIT_TOLERANCE = 1e-4
#: Largest step per patch (rad) read off a grid: integer patches cannot tell a step from the step plus
#: a whole turn, so steps are read only where they are far below half a turn (on the models' own
#: grids the fastest channel turns by at most about 1 rad per patch).
MAX_ROPE_STEP = math.pi / 2


def _wrap(angle: Tensor) -> Tensor:
    """Angles folded into ``(-pi, pi]``."""
    return torch.atan2(angle.sin(), angle.cos())


def fit_axial_rope(sin: Tensor, cos: Tensor, grid: tuple[int, int], what: str) -> tuple[Tensor, Tensor]:
    """The linear rule of a 2D axial rotary embedding given on a ``grid = (H, W)`` of patches, row-major
    (``sin``, ``cos``: ``(H*W, D_r)``): the angles at patch (0, 0) ``(D_r,)`` and their steps per row
    and per column ``(2, D_r)``. A :class:`ConfigError` when a step exceeds :data:`MAX_ROPE_STEP`
    or the rule does not reproduce the embedding on the whole grid (within :data:`ROPE_FIT_TOLERANCE`)."""
    height, width = grid
    if height < 2 or width < 2:
        raise ConfigError(f"{what}: the patch grid {grid} is too small to read the rotary rule off (2 x 2 at least)")
    sin, cos = sin.double(), cos.double()
    angle = torch.atan2(sin, cos)
    base = angle[0]
    steps = torch.stack([_wrap(angle[width] - base), _wrap(angle[1] - base)])
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    if steps.abs().max() > MAX_ROPE_STEP + 1e-3:
        raise ConfigError(f"{what}: a channel of its rotary embedding turns by {steps.abs().max().item():.2f} rad "
                          f"per patch on the {grid} grid; above {MAX_ROPE_STEP:.2f} its rule cannot be read off "
                          f"the grid unambiguously; use a larger img_size (the model's own grid)")
    fitted = base + rows.reshape(-1, 1) * steps[0] + cols.reshape(-1, 1) * steps[1]
    error = max((fitted.cos() - cos).abs().max().item(), (fitted.sin() - sin).abs().max().item())
    if not math.isfinite(error) or error > ROPE_FIT_TOLERANCE:
        raise ConfigError(f"{what}: its rotary embedding is not linear in the patch row and column (off by "
                          f"{error:.2g}), e.g. learned per-head frequencies (RoPE-Mixed); it cannot be given "
                          f"continuous positions")
    return base.float(), steps.float()


def eva_attention(attn: nn.Module, x: Tensor, rotations: Optional[tuple[Tensor, Tensor]], pairing: Pairing) -> Tensor:
    """timm ``EvaAttention`` / ``AttentionRope`` on ``x (B, T, C)`` with multiview rotations
    ``(cos, sin) (B, V, T, D)`` (``None``: no rotation) -> ``(B, T, C)``."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        qkv = attn.qkv(x)
        if getattr(attn, "q_bias", None) is not None:
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", None) or attn.num_heads
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rotations if rotations is not None else (None, None)
    out = rotary_attention(q, k, v, cos, sin, pairing, attn.scale, None, attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class RotaryAttention(nn.Module):
    """:func:`eva_attention` as a module without parameters, one per block (``block.rotary_attention``):
    ``forward(attn, x, rotations)``. A module call, so forward hooks on a block's attention modules
    (the attention figure, ``tools/visualize.py``) see it."""

    def __init__(self, pairing: Pairing) -> None:
        super().__init__()
        self.pairing = pairing

    def forward(self, attn: nn.Module, x: Tensor, rotations: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        return eva_attention(attn, x, rotations, self.pairing)


@SOURCES.register()
class TimmRotarySource(RotarySource):
    """A timm rotary ViT by name, frozen, on a virtual plane: (B, T, C) -> (B, T, C).

    Args:
        model_name: timm model name (``vit_base_patch16_dinov3``, ``eva02_base_patch14_224``,
            ``vit_base_patch16_rope_224``, ...).
        img_size: side of the square virtual plane in pixels (default: the model's); the grid is
            ``img_size // patch_size``.
        embed_dim, depth, num_heads: override the model's width, blocks and heads (tiny test models).
        pretrained: a timm weight file, a folder holding one, or a timm hub id in the local Hugging
            Face cache; never downloaded. ``None`` builds the model at random init.
    """

    rotary_dim = 2

    def __init__(self, model_name: str = "vit_base_patch16_dinov3", img_size: Optional[int] = None,
                 embed_dim: Optional[int] = None, depth: Optional[int] = None, num_heads: Optional[int] = None,
                 pretrained: Optional[str] = None) -> None:
        from timm.models.eva import Eva, EvaBlock

        super().__init__()
        self.model_name = model_name
        self._create_args = {k: v for k, v in dict(img_size=img_size, embed_dim=embed_dim, depth=depth,
                                                     num_heads=num_heads).items() if v is not None}
        vit = self._create()
        what = f"timm model '{model_name}'"
        if not isinstance(vit, Eva) or getattr(vit, "rope", None) is None:
            raise ConfigError(f"{what} is not a timm rotary ViT (an Eva model with rotary embeddings); use "
                              f"TimmViTSource for ViTs with an absolute table")
        if getattr(vit, "rope_mixed", False):
            raise ConfigError(f"{what} learns its rotary frequencies per head and block (RoPE-Mixed); it cannot "
                              f"be given continuous positions")
        kinds = {type(block) for block in vit.blocks}
        if kinds != {EvaBlock}:
            raise ConfigError(f"{what} has blocks {sorted(k.__name__ for k in kinds)}; this source runs EvaBlock")
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ConfigError(f"{what} has non-square patches {tuple(patch)}")
        self.name = f"TimmRotarySource:{model_name}"
        self.dim = vit.embed_dim
        self.blocks = vit.blocks
        self.depth = len(self.blocks)
        self.norm_pre = vit.norm_pre
        self._norm_name = "fc_norm" if isinstance(vit.norm, nn.Identity) else "norm"
        self.norm = getattr(vit, self._norm_name)
        self.patch_size = patch[0]
        self.grid = tuple(vit.patch_embed.grid_size)
        self.plane_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.pairing: Pairing = "half" if getattr(vit.blocks[0].attn, "rotate_half", False) else "interleaved"
        for block in self.blocks:
            block.rotary_attention = RotaryAttention(self.pairing)
        self.rope = vit.rope.eval()
        self.register_buffer("rope_base", None, persistent=False)
        self.register_buffer("rope_steps", None, persistent=False)
        if not any(t.is_meta for t in self.rope.buffers()):  # a meta build (parameter counts) reads it later
            self._read_rope(what)
        self.has_cls = vit.cls_token is not None
        tables = self._tables(vit)
        for name, value in tables.items():
            if name == "pos_embed_2d":
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)
        if pretrained is not None:
            fetch = f"{hf_download_hint(pretrained)}, or fetch the weight file named in the model's timm pretrained_cfg"
            self.load_pretrained(resolve_pretrained(pretrained, f"TimmRotarySource '{model_name}'", fetch))

    def _create(self) -> nn.Module:
        """The full timm model at random init (never downloads: ``pretrained=False``)."""
        import timm

        return timm.create_model(self.model_name, pretrained=False, num_classes=0, **self._create_args)

    @torch.no_grad()
    def _read_rope(self, what: str) -> None:
        """Read the linear rule of the model's rotary embedding off its grid (:func:`fit_axial_rope`)."""
        embed = self.rope.get_embed(shape=list(self.grid))
        sin, cos = embed.float().cpu().chunk(2, dim=-1)
        base, steps = fit_axial_rope(sin, cos, self.grid, what)
        device = next(self.rope.buffers(), embed).device
        self.rope_base, self.rope_steps = base.to(device), steps.to(device)

    def _tables(self, vit: nn.Module) -> dict[str, Tensor]:
        """The absolute table ``pos_embed_2d`` (H, W, C) if the model has one, and the class token with
        its absolute position (zeros when it has none)."""
        tables: dict[str, Tensor] = {}
        pos_embed = getattr(vit, "pos_embed", None)
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        if pos_embed is not None:
            tables["pos_embed_2d"] = pos_embed[0, prefix:].detach().reshape(*self.grid, -1).clone()
        if vit.cls_token is not None:
            tables["cls_token"] = vit.cls_token.detach().clone()
            tables["cls_pos_embed"] = (pos_embed[:, :1].detach().clone() if pos_embed is not None and prefix
                                       else torch.zeros_like(tables["cls_token"]))
        return tables

    def _rotations(self, context: Optional[RotaryPositions], length: int) -> Optional[tuple[Tensor, Tensor]]:
        """``cos, sin (B, V, T, D)``: the prefix unrotated, the point tokens at their patch coordinates."""
        if context is None or context.points is None:
            return None
        if length not in context.cache:
            if self.rope_base is None:
                self._read_rope(self.name)
            points = context.points  # (B, V, G, 2) patch (row, col)
            angle = self.rope_base + points.float() @ self.rope_steps
            b, v, g, d = angle.shape
            cos = torch.cat([angle.new_ones(b, v, length - g, d), angle.cos()], dim=2)
            sin = torch.cat([angle.new_zeros(b, v, length - g, d), angle.sin()], dim=2)
            context.cache[length] = (cos, sin)
        return context.cache[length]

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None,
                      context: Optional[RotaryPositions] = None) -> Tensor:
        """Block ``index`` on ``x (B, T, C)`` with the batch's rotary positions; block 0 first applies
        ``norm_pre``. The hooks replace the residual adds of the attention and the FFN."""
        if index == 0:
            x = self.norm_pre(x)
        block = self.blocks[index]
        a = block.rotary_attention(block.attn, block.norm1(x), self._rotations(context, x.shape[1]))
        x = residual(attn_hook, x, block.drop_path1(a if block.gamma_1 is None else block.gamma_1 * a))
        f = block.mlp(block.norm2(x))
        return residual(ffn_hook, x, block.drop_path2(f if block.gamma_2 is None else block.gamma_2 * f))

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """A fused ``qkv`` Linear, or ``q_proj`` / ``k_proj`` / ``v_proj`` (grouped-query: fewer k, v
        rows), and ``proj``."""
        attn = self.blocks[index].attn
        if attn.qkv is not None:
            weights = [fused_qkv("attn.qkv", "weight", attn.qkv.out_features // 3)]
        else:
            weights = [single(f"attn.{t}_proj", "weight", t, getattr(attn, f"{t}_proj").out_features) for t in "qkv"]
        return weights + [single("attn.proj", "weight", "o", self.dim)]

    def load_pretrained(self, path: str | Path) -> None:
        """Load a timm checkpoint strictly through timm's converter for the family; the parts of
        ``_UNUSED_PREFIXES`` (patchifier, heads, register tokens, rotary buffers) do not apply."""
        file = timm_weight_file(Path(path))
        what = f"timm weights '{file}' for {self.model_name}"
        state = read_timm_checkpoint(file)
        vit = self._create()
        convert = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
        if convert is not None:
            state = convert(state, vit)
        state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
        expected = {k: v for k, v in vit.state_dict().items() if not k.startswith(_UNUSED_PREFIXES)}
        check_state_dict_keys(set(expected), set(state), what)
        check_state_dict_shapes(expected, state, what)
        vit.load_state_dict(state, strict=False)
        converted = {f"blocks.{k}": v for k, v in vit.blocks.state_dict().items()}
        converted.update({f"norm_pre.{k}": v for k, v in vit.norm_pre.state_dict().items()})
        converted.update({f"norm.{k}": v for k, v in getattr(vit, self._norm_name).state_dict().items()})
        converted.update({f"rope.{k}": v for k, v in self.rope.state_dict().items()})
        converted.update(self._tables(vit))
        self.load_converted(converted, what)
        self.record_weights(file)

    def extra_repr(self) -> str:
        return (f"name={self.name}, dim={self.dim}, depth={self.depth}, plane={self.plane_size}, "
                f"patch={self.patch_size}, pairing={self.pairing}")
