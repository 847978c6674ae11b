"""Point-PEFT's released fine-tuned Point-MAE: its run and the map of its keys onto our Point-PEFT model
(read and converted by the machinery of :mod:`any2point.convert.any2point`)."""
from __future__ import annotations

import re
from typing import Optional

from any2point.convert.any2point import _DRIVE, Mapper, OfficialRun, Target, swap_halves

#: Point-PEFT's released fine-tuned Point-MAE (the official README's "Ckpt Release" / "Fine-tuning",
#: MAE ``ckpt-best.pth``); its model is rebuilt by our Point-PEFT config, not a deviation preset.
POINT_PEFT_RUNS: dict[str, OfficialRun] = {run.name: run for run in (
    OfficialRun("point_peft_scanobjectnn_point_mae", "ckpt-best.pth", "pointmae",
                _DRIVE.format("1HnxCjLtuSMRintUPDjpCnpSbpLIzjdRW"), "cfgs/point_peft/scanobjectnn_point_mae.yaml",
                other_paper_oa=89.1),
)}

_PP_BLOCK_PARTS = {"adapter.ln1": "ffn_adapter.down", "adapter.ln2": "ffn_adapter.up",
                   "adapter1.ln1": "token_adapter.down", "adapter1.ln2": "token_adapter.up",
                   "out_transform.0": "pool_norm"}
_PP_SOURCE_BIASES = ("norm1.bias", "norm2.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")


def point_peft_mapper(prompt_depth: int) -> Mapper:
    """The key map of Point-PEFT's released ``PointTransformer_best`` (``module.``-prefixed keys under
    ``base_model``) onto our :class:`~any2point.models.point_peft.tuner.PointPEFT` model whose first
    ``prompt_depth`` blocks carry prompts; see :func:`convert_state` for the return value."""

    def mapper(key: str) -> tuple[Optional[Target], Optional[str], bool]:
        key = key[len("module."):] if key.startswith("module.") else key
        if key in ("cls_token", "cls_pos"):
            return Target("cls_token" if key == "cls_token" else "cls_pos_embed"), None, False
        if key == "prompt_cor":
            return None, ("learnable prompt coordinates: the released adapter groups the prompts with them, "
                          "indexing rows of other samples; ours groups point tokens only"), False
        m = re.fullmatch(r"cls_head_finetune\.(0|1|4|5|8)\.(.+)", key)
        if m:
            ours = f"head.{m.group(1)}.{m.group(2)}"
            return Target(ours, transform=swap_halves if ours == "head.0.weight" else None), None, False
        if re.fullmatch(r"norm\.(weight|bias)", key):
            return Target(f"source.{key}"), None, False
        if key.startswith(("encoder.", "pos_embed.")):
            return Target(f"source.{key}"), None, True
        m = re.fullmatch(r"blocks\.(attn1\.(?:qkv|proj)|norm3)\.(weight|bias)", key)
        if m:
            part = "norm" if m.group(1) == "norm3" else m.group(1).split(".")[1]
            return Target(f"tuner.group_attention.{part}.{m.group(2)}"), None, False
        m = re.fullmatch(r"blocks\.blocks\.(\d+)\.(.+)", key)
        if not m:
            return None, None, False
        block, inner = int(m.group(1)), m.group(2)
        if inner in _PP_SOURCE_BIASES:
            return Target(f"source.blocks.{block}.{inner}"), None, False
        if re.fullmatch(r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", inner):
            return Target(f"source.blocks.{block}.{inner}"), None, True
        if inner == "ad_gate":
            return None, "a gate the released block defines and never uses", False
        prompted = block < prompt_depth
        if inner == "prompt_embeddings":
            if not prompted:
                return None, "prompts of a block the released code runs without prompts", False
            return Target("tuner.prompts", row=block), None, False
        m = re.fullmatch(r"cp_adapter\.(ln1|ln2)\.(weight|bias)", inner)
        if m:
            if not prompted:
                return None, "cache bottleneck of a block the released code runs without prompts", False
            side = "down" if m.group(1) == "ln1" else "up"
            return Target(f"tuner.cache_adapters.{block}.{side}.{m.group(2)}"), None, False
        for theirs, ours in _PP_BLOCK_PARTS.items():
            if inner.startswith(theirs + "."):
                return Target(f"tuner.blocks.{block}.{ours}{inner[len(theirs):]}"), None, False
        return None, None, False

    return mapper
