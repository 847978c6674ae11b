"""The one table of tiny sources and tuners the tests build: every registered source family and
every registered tuner, at random init (nothing is downloaded). A test checks that each registered
name is here (tests/test_architecture.py)."""
from __future__ import annotations

#: The three sources of the paper's tables.
PAPER_SOURCES = ("clip_text", "dinov2", "imagebind_audio")
#: The rotary sources (no position table): a decoder LLM on a virtual line, a rotary ViT on a plane.
ROTARY_SOURCES = ("hf_qwen3", "timm_dinov3")
SOURCE_NAMES = (PAPER_SOURCES + ("hf_bert", "hf_clip_text", "timm_deit3", "ast", "point_mae", "point_bert")
                + ROTARY_SOURCES)


def source(name: str, width: int = 64) -> dict:
    """The ``model.source`` mapping of a tiny source of family ``name``, ``width`` channels wide."""
    hf = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width)
    points = dict(dim=width, depth=3, heads=2, num_groups=16, group_size=8)
    table = {
        "clip_text": dict(type="CLIPTextSource", width=width, depth=2, heads=4),
        "dinov2": dict(type="TimmViTSource", model_name="vit_base_patch14_dinov2", img_size=56, embed_dim=width,
                       depth=2, num_heads=4),
        # 36 mel x 56 frames, patch 16 stride 10 -> a 3 x 5 grid (not square: catches a transposed table).
        "imagebind_audio": dict(type="ImageBindAudioSource", embed_dim=width, depth=2, num_heads=4, num_mel_bins=36,
                                target_len=56),
        "hf_bert": dict(type="HFEncoderSource", cls_token_id=2,
                        architecture=dict(model_type="bert", vocab_size=99, max_position_embeddings=40, **hf)),
        "hf_clip_text": dict(type="HFEncoderSource",
                             architecture=dict(model_type="clip_text_model", vocab_size=99, max_position_embeddings=20,
                                               bos_token_id=0, eos_token_id=2, pad_token_id=1, **hf)),
        "timm_deit3": dict(type="TimmViTSource", model_name="deit3_small_patch16_224", img_size=48, embed_dim=width,
                           depth=2, num_heads=4),
        "ast": dict(type="ASTSource", architecture=dict(model_type="audio-spectrogram-transformer", num_mel_bins=36,
                                                        max_length=56, **hf)),
        # Grouped-query attention (4 query heads, 2 key/value heads) and q/k norms.
        "hf_qwen3": dict(type="HFRotarySource", line_length=16,
                         architecture=dict(model_type="qwen3", vocab_size=99, hidden_size=width, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                                           intermediate_size=2 * width, max_position_embeddings=64,
                                           bos_token_id=1)),
        # An 8 x 8 grid of 16 px patches (coarser grids turn DINOv3's fastest rotary channel by more than a
        # quarter turn per patch), 4 register tokens, half-split rotary pairs.
        "timm_dinov3": dict(type="TimmRotarySource", model_name="vit_base_patch16_dinov3", img_size=128,
                            embed_dim=width, depth=2, num_heads=4),
        "point_mae": dict(type="PointMAESource", **points),
        "point_bert": dict(type="PointBERTSource", **points),
    }
    return table[name]


#: Every tuner at a tiny size; Point-PEFT's geometry-aware adapter alone (its prompt needs a
#: 3D-pretrained source): bias tuning.
TUNERS = {
    "any2point": dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5),
    "full_finetune": dict(type="FullFinetune"),
    "frozen_source": dict(type="FrozenSource"),
    "prompt_tuning": dict(type="PromptTuning", num_prompts=3),
    "adapter_tuning": dict(type="AdapterTuning", bottleneck=4),
    "lora": dict(type="LoRA", rank=2, targets=["q", "k", "v", "o"]),
    "point_peft": dict(type="PointPEFT", prompt=False, group_size=4),
}
