"""The three paper sources behind the SourceTransformer contract: tiny models at random init, checked
against the libraries they wrap (open_clip, timm, nn.MultiheadAttention) and against checkpoints
written in the original layouts (OpenAI / open_clip, Meta DINOv2 through TimmViTSource, ImageBind)."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import open_clip
import pytest
import timm
import torch
import torch.nn as nn
from torch import Tensor

from any2point.errors import CheckpointError
from any2point.models import build_source
from any2point.models.sources.base import AttentionWeight, SourceTransformer, single
from tests import tiny
from any2point.models.sources.clip_text import CLIPTextSource, SelfAttention
from any2point.models.sources.imagebind_audio import BiasKVAttention, ImageBindAudioSource
from any2point.models.tuners.lora import LoRA, LoRAWrapper

TINY = {"CLIPTextSource": tiny.source("clip_text"), "DINOv2": tiny.source("dinov2"),
        "ImageBindAudioSource": tiny.source("imagebind_audio")}
TINY_TABLE = {"CLIPTextSource": (77, 64), "DINOv2": (4, 4, 64), "ImageBindAudioSource": (3, 5, 64)}


def tiny(name: str, **kwargs: Any) -> SourceTransformer:
    torch.manual_seed(0)
    return build_source({**TINY[name], **kwargs})


def randomize_(module: nn.Module) -> None:
    """Give every parameter non-trivial values (e.g. LayerScale gammas far from their 1e-5 init)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


def table(source: SourceTransformer) -> Tensor:
    return source.pos_embed_1d if source.modality_dim == 1 else source.pos_embed_2d


# ----------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("name", list(TINY))
def test_contract(name: str) -> None:
    source = tiny(name)
    assert source.dim == 64 and source.depth == 2 == len(source.blocks)
    assert tuple(table(source).shape) == TINY_TABLE[name]
    state = source.state_dict()
    for buffer in ("pos_embed_1d", "pos_embed_2d", "cls_token", "cls_pos_embed"):
        assert buffer not in state
    # A source neither freezes itself nor fixes its mode: the tuner decides (models/tuners).
    assert all(p.requires_grad for p in source.parameters())
    source.eval()
    assert not any(m.training for m in source.modules())
    source.train()
    assert all(m.training for m in source.modules())
    source.double()  # the tables are buffers: they follow the module
    assert table(source).dtype == torch.float64
    if name == "CLIPTextSource":
        assert source.cls_token is None and source.cls_pos_embed is None
        assert source.plane_size is None and source.modality_dim == 1
    else:
        assert source.cls_token.shape == source.cls_pos_embed.shape == (1, 1, 64)
        assert source.cls_token.dtype == torch.float64
        grid = table(source).shape[:2]
        assert source.plane_size == (grid[0] * source.patch_size, grid[1] * source.patch_size)
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    assert source.forward_block(1, x).shape == (2, 7, 64)


def reference_block(name: str, source: SourceTransformer, index: int) -> tuple[nn.Module, nn.Module]:
    """The library's own block (or, for ImageBind, a block built on nn.MultiheadAttention as
    ImageBind does, sequence-first) and the module whose output is the FFN's residual branch f."""
    block = source.blocks[index]
    if name == "CLIPTextSource":
        return block, block.ls_2
    if name == "DINOv2":
        return block, block.ls2
    dim, heads = source.dim, block.attn.num_heads
    mha = nn.MultiheadAttention(dim, heads, add_bias_kv=True)
    mha.load_state_dict(block.attn.state_dict())

    class ImageBindStyleBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.norm_1, self.mlp, self.norm_2 = mha, block.norm_1, block.mlp, block.norm_2

        def forward(self, x: Tensor) -> Tensor:
            h = self.norm_1(x).transpose(0, 1)  # "b l d -> l b d"
            x = x + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
            return x + self.mlp(self.norm_2(x))

    reference = ImageBindStyleBlock().eval()
    return reference, reference.mlp


@pytest.mark.parametrize("name", list(TINY))
def test_forward_block_equals_the_reference_block_and_hook_gets_x_and_f(name: str) -> None:
    source = tiny(name)
    randomize_(source)
    x = torch.randn(3, 9, 64)
    reference, ffn_out = reference_block(name, source, 1)
    captured = {}
    handle = ffn_out.register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    with torch.no_grad():
        expected = reference(x)
    handle.remove()
    assert torch.allclose(source.forward_block(1, x), expected, atol=1e-5)

    seen = {}

    def hook(x_: Tensor, f: Tensor) -> Tensor:
        seen.update(x=x_, f=f)
        return x_ + 2 * f

    out = source.forward_block(1, x, hook)
    assert torch.allclose(seen["f"], captured["f"], atol=1e-5)
    assert torch.allclose(seen["x"], expected - captured["f"], atol=1e-5)
    assert torch.allclose(out, expected + captured["f"], atol=1e-5)


def test_clip_blocks_attend_without_mask_within_each_sample() -> None:
    source = tiny("CLIPTextSource")
    block = source.blocks[0]
    x = torch.randn(2, 77, 64)
    causal = torch.full((77, 77), float("-inf")).triu(1)
    with torch.no_grad():
        assert not torch.allclose(block(x, attn_mask=causal), block(x), atol=1e-4)  # the mask would matter
    y = x.clone()
    y[1] = torch.randn_like(y[1])
    out_x, out_y = source.forward_block(0, x), source.forward_block(0, y)
    assert torch.allclose(out_x[0], out_y[0], atol=1e-6)  # sample 0 does not see sample 1


def open_clip_block(block: nn.Module) -> nn.Module:
    """A copy of a CLIP text block with open_clip's own attention module (a plain
    ``nn.MultiheadAttention``) holding the same weights: the reference of :class:`SelfAttention`."""
    reference = copy.deepcopy(block)
    reference.attn = nn.MultiheadAttention(block.attn.embed_dim, block.attn.num_heads, batch_first=True,
                                           dtype=block.attn.in_proj_weight.dtype)
    reference.attn.load_state_dict(block.attn.state_dict())
    return reference


def test_clip_forward_block_equals_open_clips_block_values_and_gradients() -> None:
    """forward_block runs the attention as in-projection, SDPA and out-projection
    (:class:`SelfAttention`); open_clip's block with its own ``nn.MultiheadAttention`` is the
    reference, for outputs and for the gradients of input and weights (equal up to float32
    summation order)."""
    torch.manual_seed(0)
    source = tiny("CLIPTextSource")
    block = source.blocks[0]
    assert isinstance(block.attn, SelfAttention)
    reference = open_clip_block(block)
    x = torch.randn(3, 11, 64, requires_grad=True)
    ours, expected_out = source.forward_block(0, x), reference(x)
    torch.testing.assert_close(ours, expected_out)
    grads = torch.autograd.grad(ours.square().sum(), [x, *block.parameters()])
    expected = torch.autograd.grad(expected_out.square().sum(), [x, *reference.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # asked for its weights, the module runs its own path
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=False)
        assert weights.shape == (3, 4, 11, 11)


def test_clip_forward_block_runs_a_lora_wrapped_attention_with_its_update() -> None:
    """With LoRA wrapped around a block's attention (its weights substituted in
    :class:`SelfAttention`'s fast path), forward_block equals open_clip's block with its own
    attention module under the same LoRA: values, and gradients of the input and of the LoRA factors
    (in float64, so summation order does not show)."""
    torch.manual_seed(0)
    source = tiny("CLIPTextSource").double()
    reference = open_clip_block(source.blocks[0])
    plain = copy.deepcopy(source)
    LoRA(rank=2, targets=["q", "v", "o"]).attach(source)
    block = source.blocks[0]
    lora = [p for name, p in block.named_parameters() if ".lora_" in name]
    with torch.no_grad():
        for p in lora:
            p.normal_(std=0.1)  # B starts at zero: give the update a value
    qv = AttentionWeight("attn", "in_proj_weight", {"q": (0, 64), "v": (128, 192)})
    reference.attn = LoRAWrapper(reference.attn, [qv, single("attn", "out_proj.weight", "o", 64)], rank=2, alpha=16.0)
    reference.attn.load_state_dict(block.attn.state_dict())
    reference_lora = [p for name, p in reference.named_parameters() if ".lora_" in name]
    x = torch.randn(3, 11, 64, dtype=torch.float64, requires_grad=True)
    ours, expected_out = source.forward_block(0, x), reference(x)
    torch.testing.assert_close(ours, expected_out)
    assert not torch.allclose(ours, plain.forward_block(0, x), atol=1e-3)  # the update takes part
    grads = torch.autograd.grad(ours.square().sum(), [x, *lora])
    expected = torch.autograd.grad(expected_out.square().sum(), [x, *reference_lora])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_clip_official_seq_first_bug_is_attention_across_the_batch() -> None:
    source = tiny("CLIPTextSource", official_seq_first_bug=True)
    reference = copy.deepcopy(source.blocks[0])
    reference.attn.batch_first = False  # the official code's sequence-first nn.MultiheadAttention
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        assert torch.allclose(source.forward_block(0, x), reference(x), atol=1e-5)
    y = x.clone()
    y[1] = torch.randn_like(y[1])
    assert not torch.allclose(source.forward_block(0, x)[0], source.forward_block(0, y)[0], atol=1e-4)


def test_imagebind_attention_equals_multihead_attention_with_bias_kv() -> None:
    torch.manual_seed(0)
    ours = BiasKVAttention(64, 4)
    mha = nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True)
    mha.load_state_dict(ours.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)
        ours.bias_k.add_(1.0)  # the learned key bias takes part in the attention
        assert not torch.allclose(ours(x), mha(x, x, x, need_weights=False)[0], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(TINY))
def test_cuda_forward_block_equals_cpu(name: str) -> None:
    source = tiny(name)
    x = torch.randn(2, 9, 64)
    expected = source.forward_block(1, x)
    source.cuda()
    torch.testing.assert_close(source.forward_block(1, x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = source.forward_block(1, x.cuda())
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0.05, atol=0.1)


# ------------------------------------------------------------------------------- pretrained loading

def tiny_open_clip() -> open_clip.CLIP:
    torch.manual_seed(1)
    return open_clip.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=100, width=64, heads=4, layers=2)).eval()


def assert_clip_text_loaded(source: SourceTransformer, clip: open_clip.CLIP) -> None:
    for ours, theirs in zip(source.blocks, clip.transformer.resblocks):
        for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b.float()), key
    assert torch.equal(source.norm.weight, clip.ln_final.weight.float())
    assert torch.equal(source.pos_embed_1d, clip.positional_embedding.float())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_clip_loads_openai_torchscript_archive(tmp_path: Path) -> None:
    clip = tiny_open_clip()
    clip.register_buffer("input_resolution", torch.tensor(16))  # OpenAI's archives carry such scalars
    archive = torch.jit.trace_module(clip, {"encode_text": torch.zeros(1, 77, dtype=torch.long)})
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(archive, str(path))
    source = tiny("CLIPTextSource", pretrained=str(path))
    assert_clip_text_loaded(source, clip)
    assert source.identity() == {"name": "CLIPTextSource:ViT-L-14-quickgelu", "weights": str(path),
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_clip_loads_open_clip_checkpoints_fp16_and_ddp_wrapped(tmp_path: Path) -> None:
    clip = tiny_open_clip()
    half = {k: v.half() for k, v in clip.state_dict().items()}
    torch.save(half, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}},
               tmp_path / "train.pt")
    source = tiny("CLIPTextSource")
    source.load_pretrained(tmp_path / "train.pt")
    assert_clip_text_loaded(source, clip)
    source.load_pretrained(tmp_path / "plain.pt")
    assert_clip_text_loaded(source, clip.half())


def meta_dinov2_state(seed: int = 2) -> tuple[dict[str, Tensor], nn.Module]:
    """A tiny DINOv2 checkpoint in Meta's layout (timm's names plus ``mask_token``)."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, embed_dim=64, depth=2,
                            num_heads=4, num_classes=0)
    randomize_(vit)
    return {**vit.state_dict(), "mask_token": torch.zeros(1, 64)}, vit


def test_dinov2_loads_meta_checkpoint(tmp_path: Path) -> None:
    state, vit = meta_dinov2_state()
    torch.save(state, tmp_path / "dinov2_vitb14_pretrain.pth")
    source = tiny("DINOv2", pretrained=str(tmp_path / "dinov2_vitb14_pretrain.pth"))
    pos = state["pos_embed"][0]
    assert torch.equal(source.cls_pos_embed[0, 0], pos[0])
    for row, col in [(0, 1), (1, 0), (2, 3), (3, 3)]:
        assert torch.equal(source.pos_embed_2d[row, col], pos[1 + row * 4 + col])  # row-major (y, x)
    assert torch.equal(source.cls_token, state["cls_token"])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(source.forward_block(1, x), vit.blocks[1](x), atol=1e-5)
        assert torch.equal(source.norm(x), vit.norm(x))


def imagebind_state(source: ImageBindAudioSource, seed: int = 3) -> dict[str, Tensor]:
    """A tiny ``imagebind_huge.pth`` layout: the audio encoder's keys, written out by name, and a few
    keys of the other modalities and of the audio parts this source does not use."""
    torch.manual_seed(seed)
    dim = source.dim
    state = {"modality_preprocessors.audio.cls_token": torch.randn(1, 1, dim),
             "modality_preprocessors.audio.pos_embedding_helper.pos_embed": torch.randn(1, 1 + 3 * 5, dim),
             "modality_preprocessors.audio.rgbt_stem.proj.weight": torch.randn(dim, 1, 16, 16),
             "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": torch.randn(dim),
             "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": torch.randn(dim),
             "modality_heads.audio.0.weight": torch.randn(dim),
             "modality_heads.audio.0.bias": torch.randn(dim),
             "modality_heads.audio.2.weight": torch.randn(32, dim),
             "modality_postprocessors.audio.1.log_logit_scale": torch.tensor(3.0),
             "modality_preprocessors.vision.cls_token": torch.randn(1, 1, 8),
             "modality_preprocessors.text.token_embedding.weight": torch.randn(10, 8),
             "modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.randn(24, 8),
             "modality_trunks.depth.blocks.0.attn.bias_k": torch.randn(1, 1, 8),
             "modality_heads.thermal.0.weight": torch.randn(8),
             "modality_postprocessors.imu.1.log_logit_scale": torch.tensor(1.0)}
    shapes = {"attn.in_proj_weight": (3 * dim, dim), "attn.in_proj_bias": (3 * dim,), "attn.bias_k": (1, 1, dim),
              "attn.bias_v": (1, 1, dim), "attn.out_proj.weight": (dim, dim), "attn.out_proj.bias": (dim,),
              "norm_1.weight": (dim,), "norm_1.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim),
              "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
              "norm_2.weight": (dim,), "norm_2.bias": (dim,)}
    for i in range(source.depth):
        for key, shape in shapes.items():
            state[f"modality_trunks.audio.blocks.{i}.{key}"] = torch.randn(shape)
    return state


def test_imagebind_audio_loads_imagebind_checkpoint(tmp_path: Path) -> None:
    source = tiny("ImageBindAudioSource")
    state = imagebind_state(source)
    torch.save(state, tmp_path / "imagebind_huge.pth")
    source.load_pretrained(tmp_path / "imagebind_huge.pth")
    pos = state["modality_preprocessors.audio.pos_embedding_helper.pos_embed"][0]
    assert torch.equal(source.cls_pos_embed[0, 0], pos[0])
    for row, col in [(0, 1), (1, 0), (2, 4), (1, 3)]:  # 3 mel rows x 5 time columns, row-major
        assert torch.equal(source.pos_embed_2d[row, col], pos[1 + row * 5 + col])
    assert torch.equal(source.cls_token, state["modality_preprocessors.audio.cls_token"])
    assert torch.equal(source.norm.bias, state["modality_heads.audio.0.bias"])
    assert torch.equal(source.blocks[1].attn.bias_v, state["modality_trunks.audio.blocks.1.attn.bias_v"])
    assert torch.equal(source.blocks[0].mlp.fc2.weight, state["modality_trunks.audio.blocks.0.mlp.fc2.weight"])


def original_checkpoint(name: str) -> dict[str, Tensor]:
    if name == "CLIPTextSource":
        return tiny_open_clip().state_dict()
    if name == "DINOv2":
        return meta_dinov2_state()[0]
    return imagebind_state(tiny("ImageBindAudioSource"))


KEY_IN_ORIGINAL = {"CLIPTextSource": ("transformer.resblocks.1.mlp.c_fc.bias", "blocks.1.mlp.c_fc.bias"),
                   "DINOv2": ("blocks.1.ls2.gamma", "blocks.1.ls2.gamma"),
                   "ImageBindAudioSource": ("modality_trunks.audio.blocks.1.attn.bias_k", "blocks.1.attn.bias_k")}


@pytest.mark.parametrize("name", list(TINY))
def test_missing_unexpected_and_misshaped_keys_are_errors_naming_them(name: str, tmp_path: Path) -> None:
    state = original_checkpoint(name)
    source = tiny(name)
    original_key, our_key = KEY_IN_ORIGINAL[name]
    path = tmp_path / "weights.pth"

    torch.save({k: v for k, v in state.items() if k != original_key}, path)
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {our_key}"):
        source.load_pretrained(path)

    torch.save({**state, "decoder.fc.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): decoder\.fc\.weight") as error:
        source.load_pretrained(path)
    assert str(path) in str(error.value)

    torch.save({**state, original_key: torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=rf"{our_key}: checkpoint \(3, 3\)"):
        source.load_pretrained(path)


@pytest.mark.parametrize("name", list(TINY))
def test_missing_weight_file_names_the_path_and_the_source(name: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth") as error:
        tiny(name, pretrained=str(path))
    assert str(path) in str(error.value)
    if name != "DINOv2":  # timm sources say how to fetch a hub id instead of a URL
        assert "https://" in str(error.value)


# -------------------------------------------------------------------------------- full-size models

@pytest.mark.parametrize("cfg, shape, plane, patch", [
    ({"type": "CLIPTextSource"}, (77, 768), None, None),
    ({"type": "TimmViTSource", "model_name": "vit_base_patch14_dinov2", "img_size": 518}, (37, 37, 768),
     (518, 518), 14),
    ({"type": "ImageBindAudioSource"}, (12, 19, 768), (192, 304), 16),
])
def test_full_size_builds_offline_with_the_paper_tables(cfg: dict, shape: tuple, plane: Any, patch: Any) -> None:
    with torch.device("meta"):
        source = build_source(cfg)
    name = cfg["type"]
    assert (source.dim, source.depth, len(source.blocks)) == (768, 12, 12)
    assert tuple(table(source).shape) == shape
    assert (source.plane_size, source.patch_size) == (plane, patch)
    if name == "CLIPTextSource":
        assert isinstance(source.blocks[0].mlp.gelu, open_clip.transformer.QuickGELU)  # as OpenAI trained it
        assert source.blocks[0].attn.num_heads == 12
    else:
        assert source.cls_token.shape == (1, 1, 768)


def test_models_the_wrappers_cannot_run_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        CLIPTextSource(model_name="ViT-Q-99")
    with pytest.raises(ValueError, match="'vit_small_patch14_reg4_dinov2' has 5 prefix tokens"):
        tiny("DINOv2", model_name="vit_small_patch14_reg4_dinov2")
