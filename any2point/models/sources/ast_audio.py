"""The Audio Spectrogram Transformer (``transformers`` AST) as a frozen 2D audio source (paper
Table 6, its SSAST row; docs/method.md "The SourceTransformer contract").

AST (Gong et al. 2021) cuts a ``num_mel_bins`` x ``max_length`` log-mel spectrogram into 16 x 16
patches with strides ``frequency_stride`` x ``time_stride`` (10 x 10: a 12 x 101 grid for 128 mel
bins x 1024 frames), prepends a class and a distillation token, adds a learned table
(1, 2 + F*T, C) and runs ViT-style pre-LN layers (``layernorm_before``, ``attention``,
``layernorm_after``, ``mlp``; run by :mod:`hf_encoder`, the adapter hook on the MLP output), then a
final LayerNorm (``norm``). The table's patch rows, in AST's row-major (frequency, time) order, are
``pos_embed_2d`` (F, T, C): mel rows x time columns, as ImageBind's audio table. The class token and
its position are the class token; the distillation token (AST averages its output with the class
token's) has no slot in the method and is left out. The virtual plane has one 16 px cell per patch:
``(F * 16, T * 16)`` px.

The paper's SSAST weights are self-supervised AST weights; the transformers hub hosts AST
checkpoints (e.g. ``MIT/ast-finetuned-audioset-10-10-0.4593``) and this source loads any of them,
offline, from a local folder or the local Hugging Face cache (see :mod:`hf_encoder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch.nn as nn
from torch import Tensor

from any2point.models.sources.base import AttentionWeight, ResidualHook, SourceTransformer
from any2point.models.sources.hf_encoder import (build_hf_model, find_layers, hf_attention_weights, hf_config,
                                                   hf_download_hint, hf_weight_file, layer_runner, load_hf_model,
                                                   resolve_pretrained)
from any2point.registry import SOURCES
from any2point.errors import ConfigError

if TYPE_CHECKING:  # the model library loads only when a source is built
    from transformers import PreTrainedModel

AST_MODEL_TYPE = "audio-spectrogram-transformer"


@SOURCES.register()
class ASTSource(SourceTransformer):
    """A transformers AST encoder, frozen: (B, T, C) tokens -> (B, T, C); table ``pos_embed_2d``
    (frequency rows, time columns, C) = (12, 101, 768) for AST-base on 128 mel bins x 1024 frames.

    Args:
        pretrained: a local AST model folder, ``package:NAME[/SUBDIR]``, or a hub id in the local
            Hugging Face cache; never downloaded. ``None`` builds ``architecture`` at random init.
        architecture: ``ASTConfig`` fields (``model_type: audio-spectrogram-transformer`` plus sizes,
            ``num_mel_bins``, ``max_length``, ``patch_size``, strides); required without
            ``pretrained``; with it, each field must match the model's config.
    """

    def __init__(self, pretrained: Optional[str] = None, architecture: Optional[dict] = None) -> None:
        super().__init__()
        what = f"ASTSource '{pretrained}'"
        folder = resolve_pretrained(pretrained, what, hf_download_hint(pretrained)) if pretrained else None
        config = hf_config(folder, architecture, what)
        if config.model_type != AST_MODEL_TYPE:
            raise ConfigError(f"{what}: model_type is '{config.model_type}', not '{AST_MODEL_TYPE}'")
        model = build_hf_model(config)
        self.name = f"ASTSource:{pretrained or 'random init'}"
        self.dim = config.hidden_size
        self.blocks = find_layers(model, what)
        self.depth = len(self.blocks)
        self._run_layer = layer_runner(self.blocks, what)
        self.norm = model.layernorm
        self.grid = tuple(model.embeddings.get_shape(config))
        self.patch_size = config.patch_size
        self.plane_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        tables = self._tables(model)
        self.register_buffer("pos_embed_2d", tables.pop("pos_embed_2d"), persistent=False)
        self.cls_token, self.cls_pos_embed = tables["cls_token"], tables["cls_pos_embed"]
        if folder is not None:
            self.load_pretrained(folder)

    def _tables(self, model: PreTrainedModel) -> dict[str, Tensor]:
        """AST's table (1, 2 + F*T, C) -> class position (1, 1, C) and grid (F, T, C); its class token."""
        table = model.embeddings.position_embeddings.detach()
        return {"pos_embed_2d": table[0, 2:].reshape(*self.grid, -1).clone(),
                "cls_pos_embed": table[:, :1].clone(),
                "cls_token": model.embeddings.cls_token.detach().clone()}

    @staticmethod
    def _used(model: PreTrainedModel) -> list[nn.Module | Tensor]:
        """What this source keeps of a loaded AST (for strict loading)."""
        return [find_layers(model, "AST"), model.layernorm, model.embeddings.position_embeddings,
                model.embeddings.cls_token]

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Layer ``index`` on (B, T, C) -> (B, T, C); the hooks replace the residual adds."""
        return self._run_layer(self.blocks[index], x, ffn_hook, attn_hook)

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """The layer's q / k / v / output Linears, by name."""
        return hf_attention_weights(self.blocks[index], self.dim)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a saved transformers AST folder (offline; its classifier head is not used)."""
        folder = Path(path)
        what = f"AST weights '{folder}'"
        weights = hf_weight_file(folder, what)
        model = load_hf_model(folder, self._used, what)
        state = {f"blocks.{k}": v for k, v in find_layers(model, what).state_dict().items()}
        state.update({f"norm.{k}": v for k, v in model.layernorm.state_dict().items()})
        state.update(self._tables(model))
        self.load_converted(state, what)
        self.record_weights(weights)
