"""Scaled dot-product attention as the package's transformer attentions run it (the guided adapter's
attention within cells has its own, :func:`any2point.models.any2point.adapter.pair_attention`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NARROW = (torch.bfloat16, torch.float16)


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``, except that on the CPU with bf16 or
    fp16 inputs (autocast) it computes in float32 and returns the inputs' dtype: there the narrow
    attention's backward took two to three times fp32's (docs/speed_and_memory.md, the CPU demo).
    On other devices, or in float32, it is PyTorch's own call."""
    if q.device.type != "cpu" or q.dtype not in NARROW:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
