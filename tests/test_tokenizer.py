"""Point-PN tokenizer: parameter count of the paper's configuration, shapes, the sin/cos embedding's
layout, neighbour normalisation by hand, and one stage against a per-group brute-force reference."""
from __future__ import annotations

import pytest
import torch

from any2point.extensions import furthest_point_sample
from any2point.models.tokenizer import PointPNStage, PointPNTokenizer, sincos_embedding
from any2point.registry import ConfigError


def test_paper_configuration_has_276672_parameters():
    tokenizer = PointPNTokenizer(dim=768, k=81)
    assert sum(p.numel() for p in tokenizer.parameters()) == 276_672
    assert [s.width for s in tokenizer.stages] == [192, 384, 768]
    assert [len(s.blocks) for s in tokenizer.stages] == [2, 1, 1]
    assert [s.blocks[0].net1[0].out_channels for s in tokenizer.stages] == [96, 192, 32]


def test_output_shapes_and_centres_are_input_points():
    torch.manual_seed(0)
    tokenizer = PointPNTokenizer(dim=64, k=16)
    points = torch.randn(2, 256, 3)
    centres, tokens = tokenizer(points)
    assert centres.shape == (2, 32, 3) and tokens.shape == (2, 32, 64)
    assert torch.isfinite(tokens).all()
    dist = (centres[:, :, None] - points[:, None]).norm(dim=-1).amin(dim=-1)
    assert dist.max() == 0


def test_sincos_embedding_layout():
    xyz = torch.tensor([[0.3, -0.2, 0.7]])
    out = sincos_embedding(xyz, 14, alpha=1000.0, beta=100.0)
    assert out.shape == (1, 14)
    freqs = torch.tensor([1.0, 1000.0 ** 0.5])
    expected = []
    for axis in range(3):
        angle = 100.0 * xyz[0, axis] / freqs
        expected += [angle.sin(), angle.cos()]
    expected = torch.cat(expected + [torch.zeros(2)])
    torch.testing.assert_close(out[0], expected)


def test_scan_normalisation_divides_each_axis_by_its_group_max():
    stage = PointPNStage(width=12, mid=6, num_blocks=1, k=2, norm="scan", alpha=1000.0, beta=100.0)
    offsets = torch.tensor([[1.0, 2.0, -4.0], [0.5, -1.0, 2.0]]).reshape(1, 1, 2, 3)
    expected = torch.tensor([[1.0, 1.0, -1.0], [0.5, -0.5, 0.5]]).reshape(1, 1, 2, 3)
    torch.testing.assert_close(stage._normalize(offsets), expected)
    flat = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]).reshape(1, 1, 2, 3)
    assert torch.isfinite(stage._normalize(flat)).all()


def test_mn40_normalisation_divides_by_the_sample_std():
    stage = PointPNStage(width=12, mid=6, num_blocks=1, k=2, norm="mn40", alpha=1000.0, beta=100.0)
    offsets = torch.randn(2, 4, 2, 3) * torch.tensor([1.0, 10.0])[:, None, None, None]
    out = stage._normalize(offsets)
    for b in range(2):
        expected = offsets[b] / (offsets[b].std() + 1e-5)
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("norm", ["scan", "mn40"])
def test_stage_matches_a_per_group_reference(norm):
    torch.manual_seed(1)
    stage = PointPNStage(width=16, mid=8, num_blocks=2, k=5, norm=norm, alpha=1000.0, beta=100.0).eval()
    xyz, feats = torch.randn(2, 20, 3), torch.randn(2, 20, 8)
    centres, out = stage(xyz, feats)
    fps = furthest_point_sample(xyz, 10)
    for b in range(2):
        offsets, grouped = [], []
        for j, i in enumerate(fps[b].tolist()):
            nbrs = torch.argsort(((xyz[b] - xyz[b, i]) ** 2).sum(-1))[:5]
            offsets.append(xyz[b, nbrs] - xyz[b, i])
            grouped.append(torch.cat([feats[b, nbrs], feats[b, i].expand(5, -1)], dim=-1))
            torch.testing.assert_close(centres[b, j], xyz[b, i])
        offsets = torch.stack(offsets)
        if norm == "scan":
            offsets = offsets / offsets.abs().amax(dim=1, keepdim=True)
        else:
            offsets = offsets / (offsets.std() + 1e-5)
        x = torch.stack(grouped) + sincos_embedding(offsets, 16)
        x = stage.blocks(x.permute(2, 0, 1).unsqueeze(0))[0]
        torch.testing.assert_close(out[b], x.amax(dim=-1).t(), atol=1e-5, rtol=1e-5)


def test_bad_settings_and_inputs_raise():
    with pytest.raises(ConfigError, match="end with the source width"):
        PointPNTokenizer(dim=64, widths=[16, 32, 32])
    with pytest.raises(ConfigError, match="twice the previous"):
        PointPNTokenizer(dim=64, widths=[24, 32, 64])
    with pytest.raises(ConfigError, match="one count per stage"):
        PointPNTokenizer(dim=64, blocks=[1, 1])
    tokenizer = PointPNTokenizer(dim=64, k=16)
    with pytest.raises(ValueError, match="k=16"):
        tokenizer(torch.randn(1, 40, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        tokenizer(torch.randn(64, 3))
