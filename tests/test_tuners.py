"""The tuner slot's contract, over a table of tiny sources and every registered tuner: trainability is
decided by structure (only the declared-trainable tensors change under optimizer steps, and all of
them do), the source's mode follows the tuner, checkpoints hold only the trainable state and round-trip
to identical outputs, and ``main.py --test`` loads any tuner's checkpoint strictly. Then each tuner
against a straightforward reference: LoRA's fused-qkv update against the dense ``W + B A``, prompt
tuning against hand-made prompt slots, Houlsby adapters against the residual formula."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

import main as entry
from any2point import build_model, load_config
from any2point.errors import CheckpointError, ConfigError
from any2point.engine.checkpoint import load_trainable_state_dict, save_atomic, trainable_state_dict
from any2point.models.sources.base import AttentionWeight
from any2point.models.tuners.lora import LoRAWrapper
from any2point.registry import TUNERS as TUNER_REGISTRY
from any2point.registry import build_from_cfg
from tests import tiny

SOURCES = {name: tiny.source(name, width=32) for name in tiny.SOURCE_NAMES if not name.startswith("point_")}
TUNERS = tiny.TUNERS
# Every tuner on the three paper sources and on the rotary sources (a decoder LLM, a rotary ViT); the
# guided adapter and LoRA (which reaches into the source's own attention layout) on every source family.
CASES = ([(s, t) for s in ("clip_text", "dinov2", "imagebind_audio") + tiny.ROTARY_SOURCES for t in TUNERS]
         + [(s, t) for s in ("hf_bert", "hf_clip_text", "timm_deit3", "ast") for t in ("any2point", "lora")])

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(source: str, tuner: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dict(type="Any2Point", num_classes=4, source=SOURCES[source],
                            tokenizer=dict(type="PointPNTokenizer", k=8), tuner=TUNERS[tuner]))


def points(batch: int = 3, n: int = 128) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, n, 3)


LABELS = torch.tensor([0, 1, 3])


def declared_trainable(name: str, tuner: str, block_biases: frozenset[str] = frozenset()) -> bool:
    """What each tuner says trains, by structure: everything outside the source; inside it, the
    final norm, LoRA's factors, Point-PEFT's ``block_biases`` (the source's names of the biases
    inside its blocks), or (full fine-tuning) everything."""
    if not name.startswith("source."):
        return True
    return (tuner == "full_finetune" or name.startswith("source.norm.") or ".lora_" in name
            or (tuner == "point_peft" and name in block_biases))


def block_bias_names(model: nn.Module) -> frozenset[str]:
    ids = {id(p) for n, p in model.source.blocks.named_parameters() if "bias" in n.rsplit(".", 1)[-1]}
    return frozenset(f"source.{n}" for n, p in model.source.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("source, tuner", CASES)
def test_steps_change_exactly_the_declared_trainable_tensors(source: str, tuner: str) -> None:
    model = tiny_model(source, tuner)
    model.train()
    source_modes = {m.training for m in model.source.modules()}
    assert source_modes == ({True} if tuner == "full_finetune" else {False})
    assert model.tokenizer.training and model.head.training
    biases = block_bias_names(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == declared_trainable(name, tuner, biases), name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tables = {name: getattr(model.source, name).clone() for name in model.source.table_names()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # zero-initialised factors (LoRA's B, the adapters' Up) unlock their partners
        optimizer.zero_grad()
        loss = F.cross_entropy(model(points()), LABELS)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        if key in params:
            assert torch.equal(value, before[key]) != params[key].requires_grad, key
        elif key.startswith("source."):
            assert torch.equal(value, before[key]), key  # no source buffer moves
    for name, value in tables.items():
        assert torch.equal(getattr(model.source, name), value), name


ROUND_TRIP = ("clip_text", "dinov2") + tiny.ROTARY_SOURCES


@pytest.mark.parametrize("source, tuner", [(s, t) for s, t in CASES if s in ROUND_TRIP])
def test_checkpoint_holds_the_trainable_state_and_round_trips(source: str, tuner: str) -> None:
    model = tiny_model(source, tuner)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(points()), LABELS).backward()
        optimizer.step()
    state = trainable_state_dict(model)
    biases = block_bias_names(model)
    frozen_in_state = [k for k in state if k.startswith("source.") and not declared_trainable(k, tuner, biases)]
    assert frozen_in_state == []  # adapter-only checkpoints; full fine-tuning saves the whole source
    if tuner == "full_finetune":
        assert set(model.source.state_dict()) == {k[len("source."):] for k in state if k.startswith("source.")}
    restored = tiny_model(source, tuner)  # the same frozen source (its weights come from its file)
    model.eval()
    restored.eval()
    assert not torch.equal(restored(points()), model(points()))
    load_trainable_state_dict(restored, state, "round trip")
    torch.testing.assert_close(restored(points()), model(points()), rtol=0, atol=0)


def test_every_registered_tuner_is_in_the_contract_table() -> None:
    registered = set(TUNER_REGISTRY.names())
    assert registered == {cfg["type"] for cfg in TUNERS.values()}


TINY_RUN = {
    "dataset": {"type": "SyntheticShapes", "num_points": 128, "train_size": 8, "val_size": 4, "test_size": 8,
                "classes": ["sphere", "box", "cone", "torus"]},
    "train": {"epochs": 1, "batch_size": 4, "num_workers": 0},
}


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_main_test_loads_any_tuners_checkpoint_strictly(tuner: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = {"model": dict(type="Any2Point", num_classes=4, source=SOURCES["dinov2"],
                          tokenizer=dict(type="PointPNTokenizer", k=8), tuner=TUNERS[tuner]),
            **copy.deepcopy(TINY_RUN), "experiment": {"name": tuner, "output_dir": str(tmp_path)}}
    path = tmp_path / "cfg.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    cfg = load_config(path)
    model = build_model(cfg.model)
    ckpt = {"model": trainable_state_dict(model), "config": OmegaConf.to_container(cfg), "epoch": 0}
    save_atomic(ckpt, tmp_path / "good.pth")
    assert entry.main(["--test", "--ckpt", str(tmp_path / "good.pth")]) == 0
    dropped = sorted(ckpt["model"])[-1]
    del ckpt["model"][dropped]
    with pytest.raises(CheckpointError, match=rf"missing keys: .*{dropped}"):
        load_trainable_state_dict(build_model(cfg.model), ckpt["model"], "dropped key")


# ------------------------------------------------------------------------------- LoRA vs dense

def test_lora_on_fused_qkv_equals_the_dense_update() -> None:
    """open_clip's nn.MultiheadAttention with LoRA on q and v of its fused in-projection (and on its
    output projection) equals the same attention with the dense weights ``W + (alpha / r) B A``."""
    torch.manual_seed(0)
    dim = 16
    mha = nn.MultiheadAttention(dim, 4, batch_first=True)
    rows = {"q": (0, dim), "v": (2 * dim, 3 * dim)}
    wrapper = LoRAWrapper(copy.deepcopy(mha), [AttentionWeight("attn", "in_proj_weight", rows),
                                               AttentionWeight("attn", "out_proj.weight", {"o": (0, dim)})],
                          rank=3, alpha=6.0)
    with torch.no_grad():
        for p in (*wrapper.lora_A.values(), *wrapper.lora_B.values()):
            p.normal_()
    dense = copy.deepcopy(mha)
    with torch.no_grad():
        for target, (start, stop) in rows.items():
            key = f"in_proj_weight__{target}"
            dense.in_proj_weight[start:stop] += 2.0 * wrapper.lora_B[key] @ wrapper.lora_A[key]
        dense.out_proj.weight += 2.0 * wrapper.lora_B["out_proj__weight__o"] @ wrapper.lora_A["out_proj__weight__o"]
    x = torch.randn(2, 7, dim)
    expected = dense(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(wrapper(x, x, x, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(wrapper.base.in_proj_weight, mha.in_proj_weight)  # the frozen weight is untouched
    assert not torch.allclose(mha(x, x, x, need_weights=False)[0], expected, atol=1e-3)


def test_lora_wraps_the_open_clip_attention_and_counts() -> None:
    model = tiny_model("clip_text", "lora")
    attn = model.source.blocks[0].attn
    assert isinstance(attn, LoRAWrapper) and isinstance(attn.base, nn.MultiheadAttention)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == 2 * 4 * (2 * 32 * 2)  # 2 blocks x 4 targets x (A: 2 x 32, B: 32 x 2)
    with pytest.raises(ConfigError, match="targets"):
        build_from_cfg(dict(type="LoRA", targets=["x"]), TUNER_REGISTRY)


# ------------------------------------------------------------------------- prompts and adapters

def test_prompt_tuning_rewrites_its_slots_before_every_block() -> None:
    model = tiny_model("dinov2", "prompt_tuning")
    tuner = model.tuner
    x = torch.randn(2, 1 + 10, 32)
    first = tuner.enter_block(0, x, None)
    assert first.shape == (2, 1 + 3 + 10, 32)
    torch.testing.assert_close(first[:, 1:4], tuner.prompts[0].expand(2, -1, -1))
    torch.testing.assert_close(first[:, 4:], x[:, 1:])
    second = tuner.enter_block(1, first * 2, None)
    torch.testing.assert_close(second[:, 1:4], tuner.prompts[1].expand(2, -1, -1))
    torch.testing.assert_close(second[:, 4:], x[:, 1:] * 2)
    torch.testing.assert_close(second[:, 0], x[:, 0] * 2)
    assert model.encode(points()).tokens.shape[1] == model.tokenizer(points())[1].shape[1]


def test_adapter_tuning_adds_bottlenecks_after_attention_and_ffn() -> None:
    model = tiny_model("clip_text", "adapter_tuning")
    tuner = model.tuner
    with torch.no_grad():
        for p in tuner.parameters():
            p.normal_()
    hooks = tuner.hooks(1, None)
    x, f = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for hook, adapter in ((hooks.attn, tuner.attn_adapters[1]), (hooks.ffn, tuner.ffn_adapters[1])):
        expected = x + f + adapter.up(F.gelu(adapter.down(f)))
        torch.testing.assert_close(hook(x, f), expected)


def test_zero_initialised_tuners_start_as_the_frozen_source() -> None:
    """LoRA's B and the adapters' Up start at zero: the model's output equals the frozen source's."""
    reference = tiny_model("clip_text", "frozen_source").eval()
    shared = {k: v for k, v in reference.state_dict().items() if not k.startswith("source.")}
    for tuner in ("lora", "adapter_tuning"):
        model = tiny_model("clip_text", tuner).eval()  # the same source: built first, from the same seed
        model.load_state_dict(shared, strict=False)  # the same tokenizer, class token and head
        torch.testing.assert_close(model(points()), reference(points()))
