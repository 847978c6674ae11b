"""Any timm Vision Transformer as a frozen 2D source (paper Table 6; docs/method.md "The SourceTransformer
contract", generic sources): DeiT, ViT (AugReg, CLIP-style with ``norm_pre``), DINOv2 variants
without register tokens, DeiT-III, EVA without rotary embeddings, ... by timm model name.

The patch grid of the absolute positional table is the 2D table (H, W, C) in timm's row-major
order (row = image y, column = image x); the class token and its position (when the model embeds
one; a zero position when it adds the table to the patches only) are the class token. Blocks run
with the adapter hook on the FFN branch output ``f``:

- pre-norm blocks (timm ``Block``; ``EvaBlock``): ``x = x + LS_1(Attn(N_1(x)))``,
  ``f = LS_2(MLP(N_2(x)))`` (LayerScale / EVA gamma included), the hook replaces ``x + f``;
- res-post-norm blocks (``ResPostBlock``, ``EvaBlockPostNorm``): ``x = x + N_1(Attn(x))``,
  ``f = N_2(MLP(x))``, the hook replaces ``x + f``.

Block 0 first applies the model's ``norm_pre`` (CLIP-style ViTs normalise the embedded sequence
before the blocks; the identity elsewhere). ``norm`` is the model's final norm, or its ``fc_norm``
when the final norm is the identity (average-pooled models). Models with tokens the method has no
slot for (register or distillation tokens), without an absolute table, or with rotary embeddings
(EVA-02, DINOv3, RoPE ViTs: :class:`~any2point.models.sources.timm_rotary.TimmRotarySource`) are rejected by name.

Weights (``pretrained``) are a timm checkpoint file (``model.safetensors`` / ``pytorch_model.bin``
as timm publishes them, or the original ``.pth`` files timm converts, e.g. DeiT's), a folder holding
one, or a timm hub id (``timm/deit_base_patch16_224.fb_in1k``) already in the local Hugging Face
cache. Nothing is downloaded; an absent one fails at once naming the id and how to fetch it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.models.sources.base import (AttentionWeight, ResidualHook, SourceTransformer,
                                             check_state_dict_keys, check_state_dict_shapes, fused_qkv,
                                             residual, single)
from any2point.models.sources.hf_encoder import hf_download_hint, resolve_pretrained
from any2point.errors import CheckpointError, ConfigError
from any2point.registry import SOURCES
from any2point.utils.safe_load import load_torch_file

BlockRunner = Callable[[nn.Module, Tensor, Optional[ResidualHook], Optional[ResidualHook]], Tensor]
# Checkpoint keys of a timm ViT that do not apply to 3D tokens.
_UNUSED_PREFIXES = (
    "patch_embed.",  # image patchifier: the 3D tokenizer produces the tokens instead
    "head.",         # the pretraining task's classifier: replaced by the method's head
    "attn_pool.",    # attention-pooling head (MAP) of the pretraining task
)
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def _run_pre_norm(block: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
                  attn_hook: Optional[ResidualHook]) -> Tensor:
    """timm ``Block``: ``x + LS_1(Attn(N_1(x)))``, then ``x + LS_2(MLP(N_2(x)))`` (hooks replace the adds)."""
    x = residual(attn_hook, x, block.drop_path1(block.ls1(block.attn(block.norm1(x)))))
    return residual(ffn_hook, x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def _run_eva(block: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
             attn_hook: Optional[ResidualHook]) -> Tensor:
    """timm ``EvaBlock`` (pre-norm, optional gammas): as :func:`_run_pre_norm`, without rotary embedding."""
    a = block.attn(block.norm1(x))
    x = residual(attn_hook, x, block.drop_path1(a if block.gamma_1 is None else block.gamma_1 * a))
    f = block.mlp(block.norm2(x))
    return residual(ffn_hook, x, block.drop_path2(f if block.gamma_2 is None else block.gamma_2 * f))


def _run_res_post_norm(block: nn.Module, x: Tensor, ffn_hook: Optional[ResidualHook],
                       attn_hook: Optional[ResidualHook]) -> Tensor:
    """``ResPostBlock`` / ``EvaBlockPostNorm``: ``x + N_1(Attn(x))``, then ``x + N_2(MLP(x))``."""
    x = residual(attn_hook, x, block.drop_path1(block.norm1(block.attn(x))))
    return residual(ffn_hook, x, block.drop_path2(block.norm2(block.mlp(x))))


def block_runners() -> dict[type, BlockRunner]:
    """Exact block types (subclasses may change the forward): the function that runs each."""
    from timm.models.eva import EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, ResPostBlock

    return {Block: _run_pre_norm, EvaBlock: _run_eva, ResPostBlock: _run_res_post_norm,
            EvaBlockPostNorm: _run_res_post_norm}


def timm_weight_file(path: Path) -> Path:
    """The weight file itself, or the one inside a folder (a timm hub snapshot)."""
    if not path.is_dir():
        return path
    for name in TIMM_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no timm weight file in '{path}' (expected one of {', '.join(TIMM_WEIGHT_FILES)})")


def read_timm_checkpoint(path: Path) -> dict[str, Tensor]:
    """The tensors of a timm weight file (safetensors or ``torch.save``), unwrapped from a ``model`` /
    ``state_dict`` entry and from DDP's ``module.`` prefixes."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_file(path, "timm weight file")
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"timm weights: '{path}' is not a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


@SOURCES.register()
class TimmViTSource(SourceTransformer):
    """A timm ViT by name, frozen: (B, T, C) tokens -> (B, T, C); table ``pos_embed_2d`` (H, W, C).

    Args:
        model_name: timm model name, optionally with a pretrained tag (``deit_base_patch16_224``,
            ``vit_base_patch16_224.augreg_in21k``, ``vit_base_patch14_dinov2``, ...).
        img_size: side of the square image plane in pixels (default: the model's); the grid is
            ``img_size // patch_size``, and a checkpoint's table is resampled to it.
        embed_dim, depth, num_heads: override the model's width, number of blocks and heads (tiny
            models for tests); ``None`` keeps the model's value.
        pretrained: a timm weight file or a folder holding one, or a timm hub id in the local
            Hugging Face cache; never downloaded. ``None`` builds the model at random init.
    """

    def __init__(self, model_name: str = "deit_base_patch16_224", img_size: Optional[int] = None,
                 embed_dim: Optional[int] = None, depth: Optional[int] = None, num_heads: Optional[int] = None,
                 pretrained: Optional[str] = None) -> None:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        self.model_name = model_name
        self._create_args = {k: v for k, v in dict(img_size=img_size, embed_dim=embed_dim, depth=depth,
                                                     num_heads=num_heads).items() if v is not None}
        vit = self._create()
        what = f"timm model '{model_name}'"
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise ConfigError(f"{what} is a {type(vit).__name__}, not a timm VisionTransformer or Eva")
        kinds = {type(block) for block in vit.blocks}
        runners = block_runners()
        if len(kinds) != 1 or next(iter(kinds)) not in runners:
            raise ConfigError(f"{what} has blocks {sorted(k.__name__ for k in kinds)}; this source runs "
                             f"{', '.join(k.__name__ for k in runners)}")
        has_cls = vit.cls_token is not None
        if vit.num_prefix_tokens != int(has_cls):
            raise ConfigError(f"{what} has {vit.num_prefix_tokens} prefix tokens (register or distillation "
                             f"tokens); the method has a slot for one class token only")
        if vit.pos_embed is None:
            raise ConfigError(f"{what} has no absolute positional table to project onto")
        if getattr(vit, "rope", None) is not None:
            raise ConfigError(f"{what} uses rotary position embeddings, which this table source does not "
                             f"give 3D tokens; use TimmRotarySource")
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ConfigError(f"{what} has non-square patches {tuple(patch)}")
        height, width = vit.patch_embed.grid_size
        self.name = f"TimmViTSource:{model_name}"
        self.dim = vit.embed_dim
        self.blocks = vit.blocks
        self.depth = len(self.blocks)
        self._run_block = runners[next(iter(kinds))]
        self.norm_pre = vit.norm_pre
        self._norm_name = "fc_norm" if isinstance(vit.norm, nn.Identity) else "norm"
        self.norm = getattr(vit, self._norm_name)
        self.patch_size = patch[0]
        self.plane_size = (height * self.patch_size, width * self.patch_size)
        tables = self._tables(vit.pos_embed.detach(), vit.cls_token, vit.no_embed_class)
        self.register_buffer("pos_embed_2d", tables.pop("pos_embed_2d"), persistent=False)
        for name, value in tables.items():
            setattr(self, name, value)
        if pretrained is not None:
            fetch = f"{hf_download_hint(pretrained)}, or fetch the weight file named in the model's timm pretrained_cfg"
            self.load_pretrained(resolve_pretrained(pretrained, f"TimmViTSource '{model_name}'", fetch))

    def _create(self) -> nn.Module:
        """The full timm model at random init (never downloads: ``pretrained=False``)."""
        import timm

        return timm.create_model(self.model_name, pretrained=False, num_classes=0, **self._create_args)

    def _tables(self, pos_embed: Tensor, cls_token: Optional[Tensor], no_embed_class: bool) -> dict[str, Tensor]:
        """Split timm's ``pos_embed`` (1, [1 +] H*W, C) into ``pos_embed_2d`` (H, W, C) and the class
        position; with ``no_embed_class`` the class token has no position (zeros)."""
        height, width = (self.plane_size[0] // self.patch_size, self.plane_size[1] // self.patch_size)
        prefix = 0 if no_embed_class else int(cls_token is not None)
        tables = {"pos_embed_2d": pos_embed[0, prefix:].reshape(height, width, -1).clone()}
        if cls_token is not None:
            tables["cls_token"] = cls_token.detach().clone()
            tables["cls_pos_embed"] = pos_embed[:, :1].clone() if prefix else torch.zeros_like(tables["cls_token"])
        return tables

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Block ``index`` on (B, T, C) -> (B, T, C); block 0 first applies ``norm_pre``. The hooks
        replace the residual adds of the attention and the FFN."""
        if index == 0:
            x = self.norm_pre(x)
        return self._run_block(self.blocks[index], x, ffn_hook, attn_hook)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """timm attention: a fused ``qkv`` Linear (or EVA's ``q_proj`` / ``k_proj`` / ``v_proj``) and ``proj``."""
        attn = self.blocks[index].attn
        if getattr(attn, "qkv", None) is not None:
            weights = [fused_qkv("attn.qkv", "weight", self.dim)]
        else:
            weights = [single(f"attn.{t}_proj", "weight", t, self.dim) for t in "qkv"]
        return weights + [single("attn.proj", "weight", "o", self.dim)]

    def load_pretrained(self, path: str | Path) -> None:
        """Load a timm checkpoint (a file, or a folder holding one) strictly: timm's converter for the
        model family (original layouts, table resampling to this grid), then every key of the model
        must be present with its shape and no other key may appear, except the parts of
        ``_UNUSED_PREFIXES``, which do not apply to 3D tokens."""
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
        converted.update(self._tables(vit.pos_embed.detach(), vit.cls_token, vit.no_embed_class))
        self.load_converted(converted, what)
        self.record_weights(file)
