"""Rotary sources (decoder LLMs and ModernBERT through transformers, DINOv3 / EVA-02 / RoPE ViTs
through timm) and the rotary virtual projection: the multiview attention against M separate logit
matrices averaged (1D, 2D axial, grouped-query, partial rotation); every family's layers against
its library's own forward on the same positions; the projection's modes; causal line order; bfloat16
weights; loading saved models strictly; the offline error; LoRA on separate q / v projections
against the dense ``W + B A``; the attention figure. The tuner contract (training steps, checkpoints)
runs on the tiny rotary sources in tests/test_tuners.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModel

from any2point import build_model
from any2point.errors import CheckpointError, ConfigError, SourceUnavailableError
from any2point.models.any2point.projection import VirtualProjection
from any2point.models.sources.base import Embedded
from any2point.models.sources.hf_rotary import HFRotarySource
from any2point.models.sources.rotary import RotaryPositions, multiview_qk, rotary_attention
from any2point.models.sources.timm_rotary import TimmRotarySource
from any2point.models.tuners.lora import LoRAWrapper
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)
# Each family at a tiny size: grouped-query attention where the family has it, q/k norms (Qwen3,
# OLMo 2, Gemma 3), sandwich norms (Gemma 3), post-norms (OLMo 2), a fused qkv and partial rotation
# (Phi-3), local/global layers (Gemma 3, ModernBERT).
FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2, bos_token_id=1, **SIZES),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, bos_token_id=1, **SIZES),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, bos_token_id=1, **SIZES),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, bos_token_id=1, **SIZES),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, bos_token_id=1,
                        sliding_window=4, **SIZES),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, bos_token_id=1, partial_rotary_factor=0.5,
                 pad_token_id=0, **SIZES),
    "olmo2": dict(model_type="olmo2", num_key_value_heads=2, bos_token_id=1, pad_token_id=0, **SIZES),
    "modernbert": dict(model_type="modernbert", cls_token_id=2, pad_token_id=0, global_attn_every_n_layers=2,
                       local_attention=4, **SIZES),
}
TIMM_MODELS = ("vit_base_patch16_dinov3", "eva02_tiny_patch14_224", "vit_small_patch16_rope_224",
               "vit_small_patch16_rope_ape_224")
TIMM_TINY = dict(embed_dim=32, depth=2, num_heads=4)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (norm weights far from 1, layer scales far from 1e-5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return module.eval()


# ------------------------------------------------------------------------- the multiview attention

def brute_logits(q: Tensor, k: Tensor, angles: Tensor, pairing: str, rotated: int) -> Tensor:
    """``(B, H, T, T)``: for each view its own logit matrix of the rotated queries and keys (as
    complex numbers: channel pairs times ``exp(i angle)``), then the mean over the views."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    per_view = []
    for v in range(angles.shape[1]):
        theta = angles[:, v, None]  # (B, 1, T, D_r / 2)

        def as_complex(x: Tensor) -> tuple[Tensor, Tensor]:
            head, rest = x[..., :rotated], x[..., rotated:]
            if pairing == "half":
                z = torch.complex(head[..., :rotated // 2], head[..., rotated // 2:])
            else:
                z = torch.complex(head[..., 0::2], head[..., 1::2])
            return z * torch.exp(1j * theta), rest

        zq, rq = as_complex(q.double())
        zk, rk = as_complex(k.double())
        logits = torch.einsum("bhid,bhjd->bhij", zq, zk.conj()).real + rq @ rk.transpose(-1, -2)
        per_view.append(logits)
    return torch.stack(per_view).mean(0)


def cos_sin(angles: Tensor, pairing: str) -> tuple[Tensor, Tensor]:
    """Per-channel ``cos`` / ``sin`` of per-pair angles ``(..., D_r / 2)`` in the pairing's layout."""
    full = torch.cat([angles, angles], -1) if pairing == "half" else angles.repeat_interleave(2, -1)
    return full.cos(), full.sin()


@pytest.mark.parametrize("pairing, axes, rotated", [("half", 1, 8), ("interleaved", 2, 8), ("half", 1, 4),
                                                    ("interleaved", 2, 4)])
def test_multiview_logits_are_the_mean_of_the_views_logits(pairing: str, axes: int, rotated: int) -> None:
    torch.manual_seed(0)
    b, h, h_kv, t, d, views = 2, 4, 2, 7, 8, 6
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)
    positions = torch.rand(b, views, t, axes) * 10  # fractional rows, or (row, col)
    freqs = torch.rand(axes, rotated // 2) * 2  # 1D: one frequency per pair; 2D axial: per axis
    if axes == 2:
        freqs[0, rotated // 4:] = 0  # the first half of the pairs turns with the row, the rest with the column
        freqs[1, :rotated // 4] = 0
    angles = positions @ freqs
    cos, sin = cos_sin(angles.double(), pairing)
    wide_q, wide_k = multiview_qk(q.double(), k.double(), cos, sin, pairing)
    assert wide_q.shape == (b, h, t, views * d) and wide_k.shape == (b, h_kv, t, views * d)
    got = wide_q @ wide_k.repeat_interleave(h // h_kv, 1).transpose(-1, -2)
    expected = brute_logits(q, k, angles.double(), pairing, rotated)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The attention itself: the source's softmax scale on the averaged logits, values unchanged.
    scale = d ** -0.5
    out = rotary_attention(q, k, v, cos.float(), sin.float(), pairing, scale)
    reference = (expected.float() * scale).softmax(-1) @ v.repeat_interleave(h // h_kv, 1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_one_view_is_the_plain_rotary_attention_and_relative() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    angles = torch.arange(5.0)[None, None, :, None] * torch.rand(4)
    cos, sin = cos_sin(angles, "half")
    shifted = cos_sin(angles + 3.0 * torch.rand(4), "half")  # every position moved by the same offset
    a, b = multiview_qk(q, k, cos, sin, "half")
    c, d = multiview_qk(q, k, *shifted, "half")
    assert a.shape == q.shape
    torch.testing.assert_close(a @ b.transpose(-1, -2), c @ d.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, q)


# ------------------------------------------------------------------------- the projection's modes

def tiny_source(name: str) -> nn.Module:
    torch.manual_seed(0)
    from any2point.registry import SOURCES, build_from_cfg

    return build_from_cfg(tiny.source(name, width=32), SOURCES)


@pytest.mark.parametrize("name", tiny.ROTARY_SOURCES)
def test_projection_hands_positions_to_a_rotary_source(name: str) -> None:
    source = tiny_source(name)
    centres = torch.randn(2, 10, 3)
    multi = VirtualProjection(source)(centres, source.position_table)
    mean = VirtualProjection(source, rotary="mean_position")(centres, source.position_table)
    assert multi.pe is None and mean.pe is None  # no table to sample
    torch.testing.assert_close(multi.rotary, multi.positions)
    torch.testing.assert_close(mean.rotary, multi.positions.mean(1, keepdim=True))
    for pe in ("none", "sinusoidal", "learnable"):
        projected = VirtualProjection(source, pe=pe)(centres, source.position_table)
        assert projected.rotary is None and (projected.pe is None) == (pe == "none")
    context = source.block_context(Embedded(centres, torch.zeros(2, 10, 32), None, source, multi))
    assert context.points.shape == (2, 6, 10, 1 if name == "hf_qwen3" else 2)


def test_rotary_mode_is_refused_on_a_table_source_and_checked() -> None:
    with pytest.raises(ConfigError, match="rotary sources only"):
        VirtualProjection(tiny_source("clip_text"), rotary="multiview")
    with pytest.raises(ConfigError, match="projection rotary must be one of"):
        VirtualProjection(tiny_source("hf_qwen3"), rotary="median")


def test_plane_pixels_become_patch_coordinates() -> None:
    source = tiny_source("timm_dinov3")  # 128 px plane, 16 px patches
    pixels = torch.tensor([[0.0, 0.0], [8.0, 24.0], [63.0, 40.0]])
    torch.testing.assert_close(source.rotary_coordinates(pixels), torch.tensor([[-0.5, -0.5], [0.0, 1.0],
                                                                               [3.4375, 2.0]]))


# ------------------------------------------------------------------------- Hugging Face layers

def integer_context(batch: int, points: int) -> RotaryPositions:
    """One view, point token ``i`` at row ``i`` (line order = sequence order)."""
    rows = torch.arange(points, dtype=torch.float32).expand(batch, 1, points)[..., None]
    return RotaryPositions(rows, torch.arange(points).expand(batch, points))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_hf_layers_equal_the_transformers_layers(family: str, attention: str) -> None:
    if family == "modernbert" and attention == "causal":
        pytest.skip("ModernBERT is an encoder")
    source = HFRotarySource(architecture=FAMILIES[family], line_length=8, attention=attention)
    randomize_(source)
    config = AutoConfig.for_model(**FAMILIES[family])
    reference = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    reference.layers.load_state_dict(source.blocks.state_dict())
    if family == "modernbert":
        reference.embeddings.norm.load_state_dict(source.embed_norm.state_dict())
    b, g = 2, 6
    t = g + 1  # the class token at row -1, then the point tokens at rows 0..g-1
    torch.manual_seed(1)
    x = torch.randn(b, t, 32)
    mask = None if attention == "causal" else torch.ones(b, 1, t, t, dtype=torch.bool)
    position_ids = (torch.arange(t, dtype=torch.float32) - 1).expand(b, t)
    context = integer_context(b, g)
    theirs = reference.embeddings.norm(x) if family == "modernbert" else x  # what the text path does first
    for index, layer in enumerate(reference.layers):
        args = (config.layer_types[index],) if family in ("gemma3_text", "modernbert") else ()
        out = layer(theirs, attention_mask=mask, position_embeddings=reference.rotary_emb(theirs, position_ids, *args))
        theirs = out[0] if isinstance(out, tuple) else out
    ours = x
    for index in range(source.depth):
        ours = source.forward_block(index, ours, context=context)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_modernbert_normalises_the_input_and_runs_every_layer_globally() -> None:
    source = randomize_(HFRotarySource(architecture=FAMILIES["modernbert"]))
    x = torch.randn(1, 9, 32)
    torch.testing.assert_close(source.embed_input(x), source.embed_norm(x))
    # A local layer (window 4) with tokens 8 rows apart still attends between them: no window.
    context = integer_context(1, 8)
    far = x.clone()
    far[:, -1] += torch.randn(32)
    first = source.forward_block(1, x, context=context)[:, 1]
    assert not torch.allclose(first, source.forward_block(1, far, context=context)[:, 1])


def test_causal_attention_follows_the_line_order() -> None:
    source = randomize_(HFRotarySource(architecture=FAMILIES["qwen3"], attention="causal"))
    rows = torch.tensor([[3.0, 0.0, 2.0, 1.0]])[:, None, :, None]  # token 0 is last on the line
    context = source.block_context(_embedded_at(source, rows[..., 0]))
    x = torch.randn(1, 5, 32)
    moved = x.clone()
    moved[:, 1] += torch.randn(32)  # the point token last on the line
    before, after = source.forward_block(0, x, context=context), source.forward_block(0, moved, context=context)
    torch.testing.assert_close(before[:, 2:], after[:, 2:])  # nobody else sees it
    moved[:, 2] += torch.randn(32)  # the first on the line: everyone after it sees it
    assert not torch.allclose(source.forward_block(0, moved, context=context)[:, 3:], before[:, 3:])


def _embedded_at(source: nn.Module, rows: Tensor) -> Embedded:
    """An :class:`Embedded` whose projection put the point tokens at ``rows (B, V, G)``."""
    from any2point.models.any2point.projection import Projected

    b, _, g = rows.shape
    projected = Projected(xyz=torch.zeros(b, g, 3), positions=rows, pe=None, rotary=rows)
    return Embedded(torch.zeros(b, g, 3), torch.zeros(b, g, source.dim), None, source, projected)


@pytest.mark.parametrize("tuner", ["any2point", "lora", "prompt_tuning"])
def test_bfloat16_weights_run_with_a_float32_stream_and_float32_trainables(tuner: str) -> None:
    cfg = dict(tiny.source("hf_qwen3", width=32), dtype="bfloat16")
    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=3, source=cfg, tokenizer=dict(type="PointPNTokenizer", k=8),
                             tuner=tiny.TUNERS[tuner]))
    assert {p.dtype for p in model.source.blocks.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    logits = model(torch.randn(2, 128, 3))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.sum().backward()


# ------------------------------------------------------------------------- timm rotary ViTs

@pytest.mark.parametrize("model_name", TIMM_MODELS)
def test_timm_rotary_blocks_equal_timm_blocks(model_name: str) -> None:
    # EVA-02 scales its rotary grid to its own 16 x 16; DINOv3 normalises it to the image (8 x 8 here)
    img = 224 if model_name.startswith("eva02") else 128 if "dinov3" in model_name else 64
    source = randomize_(TimmRotarySource(model_name, img_size=img, **TIMM_TINY))
    vit = randomize_(timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img, **TIMM_TINY))
    height, width = vit.patch_embed.grid_size
    prefix = vit.num_prefix_tokens
    rope = vit.rope.get_embed(shape=[height, width])
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], -1).expand(2, 1, -1, -1)
    context = RotaryPositions(points, torch.arange(height * width).expand(2, -1))
    vit.blocks.load_state_dict(source.blocks.state_dict())
    x = torch.randn(2, prefix + height * width, 32)  # the prefix (class, registers) first, then the grid
    reference = vit.norm_pre(x)
    for block in vit.blocks:
        reference = block(reference, rope=rope)
    ours = x
    for index in range(source.depth):
        ours = source.forward_block(index, ours, context=context)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert source.modality_dim == 2 and (source.position_table is not None) == (vit.pos_embed is not None)


def test_a_grid_too_coarse_to_read_the_rotary_rule_off_is_refused() -> None:
    with pytest.raises(ConfigError, match="use a larger img_size"):  # EVA-02 on 4 x 4 of its 16 x 16 grid
        TimmRotarySource("eva02_tiny_patch14_224", img_size=56, **TIMM_TINY)


def test_rope_mixed_vits_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="RoPE-Mixed"):
        TimmRotarySource("vit_small_patch16_rope_mixed_224", img_size=64, **TIMM_TINY)
    with pytest.raises(ConfigError, match="use TimmViTSource"):
        TimmRotarySource("deit_tiny_patch16_224", img_size=64, **TIMM_TINY)


# ------------------------------------------------------------------------- weights and LoRA

def test_hf_rotary_loads_a_saved_model_strictly(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {k: v for k, v in FAMILIES["qwen3"].items() if k != "model_type"}
    model = randomize_(Qwen3ForCausalLM(Qwen3Config(**fields)))
    model.save_pretrained(tmp_path)
    source = HFRotarySource(pretrained=str(tmp_path), architecture=FAMILIES["qwen3"])
    torch.testing.assert_close(source.blocks.state_dict(), model.model.layers.state_dict())
    torch.testing.assert_close(source.cls_token[0, 0], model.model.embed_tokens.weight[1])
    assert source.identity()["sha256"] is not None
    with pytest.raises(ConfigError, match="architecture.hidden_size"):
        HFRotarySource(pretrained=str(tmp_path), architecture=dict(FAMILIES["qwen3"], hidden_size=64))
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp"):
        HFRotarySource(pretrained=str(tmp_path))


def test_timm_rotary_loads_a_saved_checkpoint_strictly(tmp_path: Path) -> None:
    vit = randomize_(timm.create_model("vit_base_patch16_dinov3", pretrained=False, img_size=128, **TIMM_TINY))
    torch.save(vit.state_dict(), tmp_path / "pytorch_model.bin")
    source = TimmRotarySource("vit_base_patch16_dinov3", img_size=128, pretrained=str(tmp_path), **TIMM_TINY)
    torch.testing.assert_close(source.blocks.state_dict(), vit.blocks.state_dict())
    torch.testing.assert_close(source.cls_token, vit.cls_token)
    state = vit.state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc1.weight"):
        TimmRotarySource("vit_base_patch16_dinov3", img_size=128, pretrained=str(tmp_path), **TIMM_TINY)


@pytest.mark.parametrize("source, ref", [(HFRotarySource, "Qwen/Qwen3-0.6B"),
                                         (TimmRotarySource, "timm/vit_base_patch16_dinov3.lvd1689m")])
def test_an_uncached_model_fails_naming_it_and_the_download(source: type, ref: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceUnavailableError, match=f"{ref}.*hf download {ref}"):
        source(pretrained=ref)


@pytest.mark.parametrize("name", tiny.ROTARY_SOURCES)
def test_lora_on_a_rotary_source_equals_the_dense_update(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=3, source=tiny.source(name, width=32),
                             tokenizer=dict(type="PointPNTokenizer", k=8), tuner=tiny.TUNERS["lora"]))
    wrappers = [m for m in model.source.blocks[0].modules() if isinstance(m, LoRAWrapper)]
    assert wrappers
    x = torch.randn(5, 32)
    for wrapper in wrappers:
        with torch.no_grad():
            for p in wrapper.lora_B.values():
                p.normal_()
        for param, rows in wrapper.rows.items():
            dense = wrapper.base.get_parameter(param).clone()
            for target, (start, stop) in rows.items():
                key = f"{param.replace('.', '__')}__{target}"
                dense[start:stop] += wrapper.scale * wrapper.lora_B[key] @ wrapper.lora_A[key]
            bias = getattr(wrapper.base, "bias", None)
            torch.testing.assert_close(wrapper(x), F.linear(x, dense, bias), rtol=1e-5, atol=1e-5)
    wrapped = {name.rpartition(".")[2] for name, m in model.source.blocks[0].named_modules()
               if isinstance(m, LoRAWrapper)}
    assert wrapped == ({"q_proj", "k_proj", "v_proj", "o_proj"} if name == "hf_qwen3" else {"qkv", "proj"})


@pytest.mark.parametrize("name", tiny.ROTARY_SOURCES)
def test_the_attention_figure_reads_a_rotary_source(name: str) -> None:
    from tools.visualize import cls_attention

    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=3, source=tiny.source(name, width=32),
                             tokenizer=dict(type="PointPNTokenizer", k=8), tuner=tiny.TUNERS["any2point"])).eval()
    centres, attention = cls_attention(model, torch.randn(128, 3))
    assert attention.shape == (centres.shape[0],)
    assert (attention >= 0).all() and 0 < attention.sum() <= 1 + 1e-5


@pytest.mark.parametrize("name", tiny.ROTARY_SOURCES)
def test_projection_modes_and_ablations_train_on_a_rotary_source(name: str) -> None:
    """``multiview`` and ``mean_position`` give different models of the same weights; the ``pe``
    ablations and causal attention run and train."""
    cloud = torch.randn(2, 128, 3)

    def logits(projection: dict, **source: object) -> Tensor:
        torch.manual_seed(0)
        model = build_model(dict(type="Any2Point", num_classes=3, source=dict(tiny.source(name, width=32), **source),
                                 tokenizer=dict(type="PointPNTokenizer", k=8), projection=projection,
                                 tuner=tiny.TUNERS["any2point"])).eval()
        randomize_(model.source)  # far from timm's tiny init (layer scales of 1e-5 hide the attention)
        out = model(cloud)
        assert torch.isfinite(out).all()
        out.sum().backward()
        return out.detach()

    multiview = logits(dict(type="VirtualProjection"))
    assert not torch.allclose(multiview, logits(dict(type="VirtualProjection", rotary="mean_position")))
    for pe in ("none", "sinusoidal", "learnable"):
        logits(dict(type="VirtualProjection", pe=pe))
    if name == "hf_qwen3":
        assert not torch.allclose(multiview, logits(dict(type="VirtualProjection"), attention="causal"))


@pytest.mark.parametrize("config", ["any2point_qwen3_0.6b", "any2point_dinov3_vitb16"])
def test_the_sources_page_states_the_configs_counts(config: str) -> None:
    from tools.count_params import count_params

    root = Path(__file__).resolve().parents[1]
    counts = count_params(str(root / f"cfgs/scanobjectnn/{config}.yaml"))
    row = next(line for line in (root / "docs/sources.md").read_text().splitlines() if f"`{config}.yaml`" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert [int(c.replace(",", "")) for c in cells[-3:]] == [counts["trainable_without_head"], counts["trainable"],
                                                           counts["total"]]


@pytest.mark.parametrize("name", tiny.ROTARY_SOURCES)
def test_checkpointed_blocks_give_the_plain_step(name: str) -> None:
    """``model.checkpoint_blocks`` recomputes each block in backward with the batch's positions."""
    grads = []
    for checkpoint_blocks in (False, True):
        torch.manual_seed(0)
        model = build_model(dict(type="Any2Point", num_classes=3, source=tiny.source(name, width=32),
                                 tokenizer=dict(type="PointPNTokenizer", k=8), tuner=tiny.TUNERS["adapter_tuning"],
                                 checkpoint_blocks=checkpoint_blocks))
        torch.manual_seed(1)
        F.cross_entropy(model(torch.randn(2, 128, 3)), torch.tensor([0, 2])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multiview_attention_on_cuda_equals_the_cpu() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    cos, sin = cos_sin(torch.rand(2, 6, 9, 4) * 5, "half")
    cpu = rotary_attention(q, k, v, cos, sin, "half", 8 ** -0.5)
    cuda = rotary_attention(*(t.cuda() for t in (q, k, v, cos, sin)), "half", 8 ** -0.5)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
