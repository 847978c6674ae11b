"""DINOv2 ViT-B/14 (timm) as a frozen 2D source (paper sec. 3; docs/method.md "The SourceTransformer
contract").

The paper's vision source is Meta's DINOv2 ViT-B/14 at 518 px: 12 blocks of width 768 with
LayerScale, a 37 x 37 grid of 14 px patches. Only what the method uses is kept: the blocks, the
final norm, the class token and the positional table, split into the class position (1, 1, C) and
the patch grid (37, 37, C) in timm's row-major order (row = image y, column = image x).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import Tensor

from any2point.models.backbones.base import FFNHook, SourceTransformer, read_state_dict
from any2point.registry import MODELS

WEIGHTS_SOURCE = "Meta (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth)"

# Keys of Meta's DINOv2 checkpoint that do not apply to a ViT fed with 3D tokens.
_UNUSED_EXACT = frozenset({
    "mask_token",              # iBOT's masked-patch token, used only in self-supervised pretraining
    "patch_embed.proj.weight",  # image patchifier: the 3D tokenizer produces the tokens instead
    "patch_embed.proj.bias",
})


def convert_dinov2_state_dict(state: dict[str, Tensor], grid_size: tuple[int, int]) -> dict[str, Tensor]:
    """Meta's DINOv2 keys (timm's names for blocks and norm) -> this source's keys.

    ``pos_embed`` (1, 1 + H*W, C) -> ``cls_pos_embed`` (1, 1, C) and ``pos_embed_2d`` (H, W, C), with
    ``(H, W) = grid_size``; ``cls_token`` -> ``cls_token``; ``blocks.*`` and ``norm.*`` unchanged.
    The keys of ``_UNUSED_EXACT`` are dropped; any other key is kept as it is, so strict loading
    reports it as unexpected.
    """
    out = {}
    for key, value in state.items():
        if key in _UNUSED_EXACT:
            continue
        if key == "pos_embed":
            height, width = grid_size
            if value.ndim != 3 or value.shape[:2] != (1, 1 + height * width):
                raise ValueError(f"DINOv2 'pos_embed' of shape {tuple(value.shape)} does not hold a class "
                                 f"position and a {height} x {width} grid (expected (1, {1 + height * width}, C))")
            out["cls_pos_embed"] = value[:, :1]
            out["pos_embed_2d"] = value[0, 1:].reshape(height, width, -1)
            continue
        out[key] = value
    return out


@MODELS.register()
class DINOv2Source(SourceTransformer):
    """A timm DINOv2 ViT, frozen: (B, T, C) tokens -> (B, T, C); table ``pos_embed_2d`` (H, W, C).

    Args:
        model_name: timm model name (a ViT with one class token and no register tokens).
        img_size: side of the square image plane in pixels; the grid is ``img_size // patch_size``.
        embed_dim, depth, num_heads: override the timm model's width, number of blocks and heads
            (tiny models for tests); ``None`` keeps the model's value.
        pretrained: path of Meta's ``dinov2_vitb14_pretrain.pth``; ``None`` builds at random init.
    """

    def __init__(self, model_name: str = "vit_base_patch14_dinov2", img_size: int = 518,
                 embed_dim: Optional[int] = None, depth: Optional[int] = None,
                 num_heads: Optional[int] = None, pretrained: Optional[str] = None) -> None:
        import timm
        from timm.models.vision_transformer import Block, VisionTransformer

        super().__init__()
        overrides = {k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items()
                     if v is not None}
        vit = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0, **overrides)
        if not isinstance(vit, VisionTransformer) or not all(type(b) is Block for b in vit.blocks):
            raise ValueError(f"timm model '{model_name}' is not a VisionTransformer of timm's Block, "
                             f"which forward_block runs")
        if not vit.has_class_token or vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError(f"timm model '{model_name}' must have exactly one class token sharing the "
                             f"positional table (no register tokens)")
        height, width = vit.patch_embed.grid_size
        self.name = f"DINOv2Source:{model_name}"
        self.dim = vit.embed_dim
        self.depth = len(vit.blocks)
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.patch_size = vit.patch_embed.patch_size[0]
        self.plane_size = (height * self.patch_size, width * self.patch_size)
        pos_embed = vit.pos_embed.detach()
        self.register_buffer("pos_embed_2d", pos_embed[0, 1:].reshape(height, width, -1).clone(), persistent=False)
        self.cls_pos_embed = pos_embed[:, :1].clone()
        self.cls_token = vit.cls_token.detach().clone()
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self.freeze()

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[FFNHook] = None) -> Tensor:
        """timm ``Block`` ``index`` on (B, T, C) -> (B, T, C); ``ffn_hook(x, f)`` replaces the FFN's
        residual add, with ``f`` the LayerScale-d FFN output."""
        block = self.blocks[index]
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        f = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return ffn_hook(x, f) if ffn_hook is not None else x + f

    def load_pretrained(self, path: str | Path) -> None:
        """Load Meta's DINOv2 checkpoint (its keys, the positional table split into class + grid)."""
        file = self.resolve_weights(str(path), "DINOv2", WEIGHTS_SOURCE)
        grid = tuple(self.pos_embed_2d.shape[:2])
        state = convert_dinov2_state_dict(read_state_dict(file, "DINOv2 weights"), grid)
        self.load_converted(state, f"DINOv2 weights '{file}'")
        self.record_weights(file)

