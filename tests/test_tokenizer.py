"""Point-PN tokenizer: parameter count of the paper's configuration, shapes, the sin/cos embedding's
layout, neighbour normalisation by hand, and one stage against a per-group brute-force reference."""
from __future__ import annotations

import copy

import pytest
import torch

from any2point.extensions import furthest_point_sample, gather, group, knn
from any2point.models.any2point.tokenizer import (PointPNStage, PointPNTokenizer, _LeanStage, _pack_bits, _unpack_bits,
                                                  normalize_offsets, sincos_embedding)
from any2point.errors import ConfigError


def test_paper_configuration_has_276672_parameters():
    tokenizer = PointPNTokenizer(dim=768, k=81)
    assert sum(p.numel() for p in tokenizer.parameters()) == 276_672
    assert [s.width for s in tokenizer.stages] == [192, 384, 768]
    assert [len(s.blocks) for s in tokenizer.stages] == [2, 1, 1]
    assert [s.blocks[0].net1[0].out_channels for s in tokenizer.stages] == [96, 192, 32]
    plain = PointPNTokenizer(dim=768, k=81, recompute=False)
    assert sum(p.numel() for p in plain.parameters()) == 276_672
    assert [s.recompute for s in plain.stages] == [False] * 3 and all(s.recompute for s in tokenizer.stages)


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
    offsets = torch.tensor([[1.0, 2.0, -4.0], [0.5, -1.0, 2.0]]).reshape(1, 1, 2, 3)
    expected = torch.tensor([[1.0, 1.0, -1.0], [0.5, -0.5, 0.5]]).reshape(1, 1, 2, 3)
    torch.testing.assert_close(normalize_offsets(offsets, "scan"), expected)
    flat = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]).reshape(1, 1, 2, 3)
    assert torch.isfinite(normalize_offsets(flat, "scan")).all()


def test_mn40_normalisation_divides_by_the_sample_std():
    offsets = torch.randn(2, 4, 2, 3) * torch.tensor([1.0, 10.0])[:, None, None, None]
    out = normalize_offsets(offsets, "mn40")
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
    with pytest.raises(ConfigError, match="chunk_mb must be positive"):
        PointPNTokenizer(dim=64, chunk_mb=0)
    with pytest.raises(ConfigError, match="cache_mb must be >= 0"):
        PointPNTokenizer(dim=64, cache_mb=-1)
    tokenizer = PointPNTokenizer(dim=64, k=16)
    with pytest.raises(ValueError, match="k=16"):
        tokenizer(torch.randn(1, 40, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        tokenizer(torch.randn(64, 3))


def reference_stage(stage: PointPNStage, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The straightforward stage: grouped features as (B, C, G, k) through the Conv2d blocks."""
    centre_idx = furthest_point_sample(xyz, xyz.shape[1] // 2)
    centres = gather(xyz, centre_idx)
    _, nbr_idx = knn(centres, xyz, stage.k)
    offsets = normalize_offsets(group(xyz, nbr_idx, centres), stage.norm)
    nbr_feats = group(feats, nbr_idx)
    x = torch.cat([nbr_feats, gather(feats, centre_idx).unsqueeze(2).expand_as(nbr_feats)], dim=-1)
    x = x + sincos_embedding(offsets, stage.width, stage.alpha, stage.beta)
    return stage.blocks(x.permute(0, 3, 1, 2)).amax(dim=-1).transpose(1, 2)


ONE_INPUT_MB = 3 * 12 * 5 * 16 * 4 / 2 ** 20  # one block input (B G k, C) of the stage below, in MiB


@pytest.mark.parametrize("recompute, chunk_mb, num_blocks, cache_mb", [
    (True, 32.0, 2, 1024.0),  # the lean path in one chunk, every block input held
    (True, 1e-9, 2, 1024.0),  # one group per chunk
    (True, 7 * 5 * 16 * 4 / 2 ** 20, 3, 0.0),  # 7 groups per chunk: 36 groups do not divide evenly; nothing held
    (True, 7 * 5 * 16 * 4 / 2 ** 20, 3, ONE_INPUT_MB),  # only the grouped input held
    (False, 32.0, 2, 1024.0),
])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_stage_equals_the_straightforward_path(recompute, chunk_mb, num_blocks, cache_mb, training, momentum):
    """Outputs, gradients (features and every parameter) and BatchNorm running statistics over
    three steps equal those of the plain Conv2d path, whatever the chunks of the lean path and the
    block inputs it holds. (The gradients of the biases before a training-mode BatchNorm are zero
    up to rounding, hence the absolute tolerance.)"""
    torch.manual_seed(2)
    fast = PointPNStage(width=16, mid=8, num_blocks=num_blocks, k=5, norm="scan", alpha=1000.0, beta=100.0,
                        recompute=recompute, chunk_mb=chunk_mb, cache_mb=cache_mb)
    for module in fast.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = momentum
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    fast.train(training)
    ref = copy.deepcopy(fast)
    for step in range(3):
        xyz = torch.randn(3, 24, 3)
        feats = torch.randn(3, 24, 8, requires_grad=True)
        feats_ref = feats.detach().clone().requires_grad_()
        out = fast(xyz, feats)[1]
        out_ref = reference_stage(ref, xyz, feats_ref)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        weight = torch.randn_like(out)
        (out * weight).sum().backward()
        (out_ref * weight).sum().backward()
        torch.testing.assert_close(feats.grad, feats_ref.grad, atol=1e-5, rtol=1e-5)
        for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for (name, b), b_ref in zip(fast.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_blocks, cache_mb, builds", [
    (2, 0.0, (3, 2)),  # per chunk: each block's statistics pass and the output pass; two in backward
    (2, 2 * ONE_INPUT_MB, (1, 1)),  # x_0 and x_1 held in forward, x_0 in backward
    (2, ONE_INPUT_MB, (1, 1)),
    (1, 0.0, (2, 1)),
    (1, 1024.0, (1, 1)),
])
def test_lean_path_builds_the_grouped_input_once_per_pass_direction_when_held(num_blocks, cache_mb, builds,
                                                                               monkeypatch):
    """With the block inputs held (``cache_mb``) the grouped input (gather, sin/cos embedding) of
    each chunk is built once in forward and once in backward instead of in every pass."""
    calls = []
    grouped = _LeanStage.grouped
    monkeypatch.setattr(_LeanStage, "grouped", lambda run, groups: calls.append(groups) or grouped(run, groups))
    torch.manual_seed(5)
    stage = PointPNStage(width=16, mid=8, num_blocks=num_blocks, k=5, norm="scan", alpha=1000.0, beta=100.0,
                         chunk_mb=7 * 5 * 16 * 4 / 2 ** 20, cache_mb=cache_mb).train()
    out = stage(torch.randn(3, 24, 3), torch.randn(3, 24, 8, requires_grad=True))[1]
    chunks = -(-3 * 12 // 7)
    assert len(calls) == builds[0] * chunks
    out.sum().backward()
    assert len(calls) == sum(builds) * chunks


def test_state_dict_keys_are_those_of_the_conv_modules():
    """Checkpoints and converters rely on the Conv2d / BatchNorm2d layout of the blocks."""
    state = PointPNTokenizer(dim=768, k=81).state_dict()
    assert len(state) == 62
    block = {k.split("blocks.0.")[1]: tuple(v.shape) for k, v in state.items() if k.startswith("stages.1.blocks.0.")}
    assert block == {"net1.0.weight": (192, 384, 1, 1), "net1.0.bias": (192,), "net1.1.weight": (192,),
                     "net1.1.bias": (192,), "net1.1.running_mean": (192,), "net1.1.running_var": (192,),
                     "net1.1.num_batches_tracked": (), "net2.0.weight": (384, 192, 1, 1), "net2.0.bias": (384,),
                     "net2.1.weight": (384,), "net2.1.bias": (384,), "net2.1.running_mean": (384,),
                     "net2.1.running_var": (384,), "net2.1.num_batches_tracked": ()}


def test_fused_training_path_runs_in_fp32_under_autocast():
    """Mixed precision leaves the fused stage in fp32: the same output and gradients as without."""
    torch.manual_seed(3)
    stage = PointPNStage(width=16, mid=8, num_blocks=1, k=5, norm="scan", alpha=1000.0, beta=100.0)
    twin = copy.deepcopy(stage)
    xyz, feats = torch.randn(2, 20, 3), torch.randn(2, 20, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stage(xyz, feats)[1]
    out_fp32 = twin(xyz, feats)[1]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_fp32)
    (grad,) = torch.autograd.grad(out.sum(), feats)
    (grad_fp32,) = torch.autograd.grad(out_fp32.sum(), feats)
    torch.testing.assert_close(grad, grad_fp32)


@pytest.mark.parametrize("width", [1, 7, 8, 12, 192])
def test_packed_masks_round_trip(width):
    mask = torch.rand(37, width) > 0.5
    packed = _pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (37, -(-width // 8))
    assert torch.equal(_unpack_bits(packed, width), mask)


def test_lean_path_keeps_no_grouped_rows_for_backward():
    """In training the stage keeps per block its (B G k, mid) first activation, one bit per value of
    the inner blocks' outputs and small statistics; never a (B G k, C) tensor of the grouped rows."""
    torch.manual_seed(4)
    stage = PointPNStage(width=32, mid=8, num_blocks=2, k=6, norm="scan", alpha=1000.0, beta=100.0,
                         chunk_mb=1e-9).train()
    xyz, feats = torch.randn(2, 40, 3), torch.randn(2, 40, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stage(xyz, feats)
    rows = 2 * 20 * 6
    assert max(t.numel() for t in saved) == rows * 8  # z1 of each block
    assert any(t.dtype == torch.uint8 and t.shape == (rows, 32 // 8) for t in saved)  # block 0's output mask


@pytest.mark.parametrize("chunk_mb, num_blocks", [(32.0, 2), (1e-9, 1), (7 * 5 * 16 * 4 / 2 ** 20, 3)])
def test_inference_path_equals_the_plain_path(chunk_mb, num_blocks):
    """Eval mode without a gradient (chunked, batch norms folded into the products) gives the plain
    path's tokens (eval mode with a gradient), whatever the chunks; the running statistics stay."""
    torch.manual_seed(4)
    stage = PointPNStage(width=16, mid=8, num_blocks=num_blocks, k=5, norm="scan", alpha=1000.0, beta=100.0,
                         chunk_mb=chunk_mb)
    for module in stage.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    stage.eval()
    xyz, feats = torch.randn(3, 24, 3), torch.randn(3, 24, 8)
    buffers = copy.deepcopy(list(stage.buffers()))
    with torch.no_grad():
        centres, out = stage(xyz, feats)
    plain_centres, plain = stage(xyz, feats)
    assert plain.requires_grad  # the plain path ran
    torch.testing.assert_close(centres, plain_centres)
    torch.testing.assert_close(out, plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference_stage(stage, xyz, feats).detach(), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(buffers, stage.buffers()))
