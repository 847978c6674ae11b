"""The assembled Any2Point model on the real tiny sources (2 blocks x 64): shapes, gradients reach
exactly the trainable parameters; the ablation switches run; the paper's configs build offline at
random init with the paper's parameter counts. (Optimizer steps and checkpoint round trips of every
tuner on every source family: tests/test_tuners.py.)"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from any2point import build_model, load_config
from any2point.errors import ConfigError
from tools.count_params import count_params
from tools.count_params import main as count_params_main
from tests.conftest import TINY_SOURCES

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(source: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(type="Any2Point", num_classes=5, source=TINY_SOURCES[source],
               tokenizer=dict(type="PointPNTokenizer", k=16),
               tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5))
    cfg.update(overrides)
    return build_model(cfg)


def points(batch: int = 3, n: int = 256) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, n, 3)


@pytest.mark.parametrize("source", sorted(TINY_SOURCES))
def test_forward_shapes_and_finite(source):
    model = tiny_model(source)
    logits = model(points())
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()
    model.eval()
    assert torch.isfinite(model(points(batch=1))).all()


@pytest.mark.parametrize("source", sorted(TINY_SOURCES))
def test_gradients_reach_exactly_the_trainable_parameters(source):
    model = tiny_model(source)
    F.cross_entropy(model(points()), torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("source.") or name.startswith("source.norm.")), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_summary_line_identity_and_cls_initialisation(caplog):
    with caplog.at_level(logging.INFO, logger="any2point"):
        model = tiny_model("dinov2")
    counts = model.parameter_counts()
    assert f"{counts['trainable']:,}" in caplog.text and "without the head" in caplog.text
    assert counts["trainable"] - counts["head"] == counts["trainable_without_head"]
    assert model.source_identity() == model.source.identity()
    torch.testing.assert_close(model.cls_token.detach(), model.source.cls_token)
    torch.testing.assert_close(model.cls_pos_embed.detach(), model.source.cls_pos_embed)
    assert tiny_model("clip_text").source.cls_token is None


@pytest.mark.parametrize("source, projection, tuner", [
    ("clip_text", dict(pe="none"), dict(guidance="3d", pool="maxmean")),
    ("clip_text", dict(pe="learnable", lines="pointclip_views", line_direction=[-1.0, 0.0, 1.0],
                       plane_size=[56, 56]), dict(guidance="2d", cell_size=14, position="parallel")),
    ("dinov2", dict(pe="sinusoidal", line_length=77), dict(guidance="1d", position="before", insert_depth=1)),
    ("imagebind_audio", dict(num_views=3), dict(ensemble=False)),
])
def test_ablation_switches_run(source, projection, tuner):
    model = tiny_model(source, projection=dict(type="VirtualProjection", **projection),
                       tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5, **tuner))
    F.cross_entropy(model(points()), torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_missing_guidance_geometry_is_a_config_error():
    with pytest.raises(ConfigError, match="line_length"):
        tiny_model("dinov2", tuner=dict(type="GuidedAdapter", guidance="1d"))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        tiny_model("clip_text")(torch.randn(3, 256, 2))


PAPER_COUNTS = {"clip_text": 948_312, "dinov2": 801_000, "imagebind_audio": 875_000}


@pytest.mark.parametrize("source", sorted(PAPER_COUNTS))
def test_full_size_configs_build_offline_with_the_paper_counts(source):
    counts = count_params(str(ROOT / f"cfgs/scanobjectnn/any2point_{source}.yaml"))
    assert counts["total"] > 80_000_000
    if source == "clip_text":
        assert counts["trainable_without_head"] == 948_312
    assert abs(counts["trainable_without_head"] - PAPER_COUNTS[source]) / PAPER_COUNTS[source] < 0.05
    modelnet = count_params(str(ROOT / f"cfgs/modelnet40/any2point_{source}.yaml"))
    # ModelNet runs: r = 16 (CLIP text) or 8; 40 classes in the head's last layer (256 x 40 + 40).
    assert modelnet["trainable_without_head"] == (948_312 if source == "clip_text" else 800_760)
    head = counts["trainable"] - counts["trainable_without_head"]
    assert modelnet["trainable"] - modelnet["trainable_without_head"] - head == (40 - 15) * 257


TINY_DINOV2_OVERRIDES = ["+model.source.embed_dim=64", "+model.source.depth=2", "+model.source.num_heads=4",
                         "model.source.img_size=56", "model.tuner.cell_size=14"]


def test_count_params_cli_prints_one_json_object(capsys):
    count_params_main(["--config", str(ROOT / "cfgs/scanobjectnn/any2point_dinov2.yaml"),
                       *TINY_DINOV2_OVERRIDES, "model.tuner.bottleneck=4"])
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"total", "trainable", "trainable_without_head"}
    # Tokenizer 64: widths 16/32/64, mids 8/16/32; cls + PE and final norm; 6 local attentions of
    # 64 -> 36, 12 -> 64 with LayerNorms; per block a 64 -> 4 -> 64 bottleneck and 7 BNs of 64.
    tokenizer = (3 * 8 + 2 * 8 + 2 * (16 * 8 + 8 + 16 + 8 * 16 + 16 + 32)
                 + (32 * 16 + 16 + 32 + 16 * 32 + 32 + 64) + (64 * 32 + 32 + 64 + 32 * 64 + 64 + 128))
    attention = 6 * (2 * 64 + 64 * 36 + 36 + 12 * 64 + 64)
    block = 64 * 4 + 4 + 4 * 64 + 64 + 7 * 128
    assert counts["trainable_without_head"] == tokenizer + 2 * 64 + 128 + attention + 2 * block


def test_config_keys_are_checked_with_the_file_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {ROOT / 'cfgs/scanobjectnn/any2point_dinov2.yaml'}\n"
                   "model:\n  tuner:\n    bottlenek: 4\n")
    with pytest.raises(ConfigError, match=r"bottlenek.*bad\.yaml"):
        load_config(bad)
    cfg = load_config(ROOT / "cfgs/scanobjectnn/any2point_dinov2.yaml", TINY_DINOV2_OVERRIDES)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
        build_model(cfg.model)
