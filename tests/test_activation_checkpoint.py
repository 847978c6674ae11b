"""Activation checkpointing (the guided adapter's ``checkpoint``, the classifier's
``checkpoint_blocks``) against the plain path on every tiny paper source: the same loss, gradients,
running statistics and weights after a training step, with fewer tensors kept for backward; batch
norms inside a recomputed function update their running statistics once; ``checkpoint_blocks:
auto`` decides from the batch's estimated block activations and ``block_memory_gb``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from any2point import build_model
from any2point.engine.optim import build_optimizer
from any2point.models.any2point.adapter import GroupedBatchNorm
from any2point.errors import ConfigError
from any2point.models.any2point import classifier
from any2point.utils.activation_checkpoint import checkpoint, is_recomputing, saved_bytes
from tests.conftest import TINY_SOURCES
from tests import tiny
from tests.tiny import ROTARY_SOURCES

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(source: str, adapter_checkpoint: bool, checkpoint_blocks: bool | str, block_memory_gb: float = 1.2,
               **tuner) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dict(
        type="Any2Point", num_classes=5, source=TINY_SOURCES[source], checkpoint_blocks=checkpoint_blocks,
        block_memory_gb=block_memory_gb, tokenizer=dict(type="PointPNTokenizer", k=16),
        tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5, checkpoint=adapter_checkpoint, **tuner)))


def train_step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One AdamW step on fixed clouds (dropout active): the loss, the gradients, and the bytes of
    the tensors autograd kept for backward."""
    optimizer = build_optimizer(dict(type="AdamW", lr=1e-2, weight_decay=0.05), model)
    torch.manual_seed(1)
    points, labels = torch.randn(3, 256, 3), torch.tensor([0, 1, 2])
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(points), labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("source", sorted(TINY_SOURCES))
@pytest.mark.parametrize("adapter_checkpoint, checkpoint_blocks", [(True, False), (False, True), (True, True),
                                                                (True, "auto")])
def test_checkpointed_step_equals_plain_step(source, adapter_checkpoint, checkpoint_blocks):
    plain = tiny_model(source, False, False, dropout=0.5)
    # auto with a budget of one byte: the blocks are checkpointed (after the estimate's own forward pass)
    lean = tiny_model(source, adapter_checkpoint, checkpoint_blocks, block_memory_gb=2 ** -30, dropout=0.5)
    loss_plain, grads_plain, saved_plain = train_step(plain)
    loss_lean, grads_lean, saved_lean = train_step(lean)
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_lean.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    state_plain, state_lean = plain.state_dict(), lean.state_dict()
    moved = [k for k in state_plain if "running_" in k and "tuner" in k]
    assert moved and all(not torch.equal(state_plain[k], tiny_model(source, False, False).state_dict()[k])
                         for k in moved)  # the adapter's running statistics did move, once
    for key in state_plain:
        torch.testing.assert_close(state_lean[key], state_plain[key], rtol=1e-5, atol=1e-6, msg=key)
    assert saved_lean < 0.8 * saved_plain


def test_eval_and_no_grad_run_without_checkpointing(monkeypatch):
    lean = tiny_model("clip_text", True, True)
    plain = tiny_model("clip_text", False, False)
    points = torch.randn(2, 256, 3)

    def run(model: torch.nn.Module) -> torch.Tensor:
        torch.manual_seed(2)  # the same dropout masks
        return model(points)

    expected = run(plain)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", None)  # any checkpointing would fail
    with torch.no_grad():  # training mode without a graph: nothing to keep, nothing checkpointed
        torch.testing.assert_close(run(lean), expected)
    lean.eval(), plain.eval()
    torch.testing.assert_close(run(lean), run(plain).detach())


def test_batch_norm_in_a_checkpoint_updates_running_stats_once():
    norm = GroupedBatchNorm(2, 4)
    x, group = torch.randn(10, 4, requires_grad=True), torch.tensor([0, 1] * 5)
    reference = GroupedBatchNorm(2, 4)
    flags = []

    def run(x: torch.Tensor) -> torch.Tensor:
        flags.append(is_recomputing())
        return norm(x, group)

    out = checkpoint(run, x)
    reference(x, group)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    out.square().sum().backward()
    assert flags == [False, True] and not is_recomputing()
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    torch.testing.assert_close(norm.running_var, reference.running_var)
    expected = torch.autograd.grad(reference(x, group).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_block_checkpointing_refuses_a_tuner_with_torch_batch_norms():
    with pytest.raises(ConfigError, match="checkpoint_blocks.*BatchNorm"):
        build_model(dict(type="Any2Point", num_classes=5, source=TINY_SOURCES["clip_text"], checkpoint_blocks=True,
                         tuner=dict(type="PointPEFT", prompt=False)))


def blocks_input(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """Tokens ``(B, 1 + G, C)`` as the first block gets them (cls first), requiring a gradient."""
    torch.manual_seed(3)
    return torch.randn(batch, 33, model.source.dim, requires_grad=True)


@pytest.mark.parametrize("source", sorted(TINY_SOURCES))
def test_auto_block_checkpointing_decides_from_the_batch_and_the_budget(source, monkeypatch):
    model = tiny_model(source, True, "auto")
    x = blocks_input(model, 4)
    # The estimate: batch x depth x what the first block keeps for one sample (brute force: the bytes
    # the whole stack of blocks keeps for the batch, within the blocks' shared inputs and outputs).
    estimate = model.block_activation_bytes(x)
    assert estimate == 4 * model.block_activation_bytes(x[:1]) == 2 * model.block_activation_bytes(x[:2]) > 0

    def blocks(tokens: torch.Tensor) -> None:
        for index in range(model.source.depth):
            tokens = model.source.forward_block(index, tokens)

    whole = saved_bytes(lambda: blocks(x), exclude=[*model.parameters(), *model.buffers()])
    assert 0.8 < estimate / whole < 1.25
    # Above the budget the blocks are checkpointed, at or below it not.
    model.block_memory_gb = estimate / 2 ** 30
    assert not model.checkpoints_blocks(x)
    model.block_memory_gb = (estimate - 1) / 2 ** 30
    assert model.checkpoints_blocks(x)
    calls = []
    monkeypatch.setattr(classifier, "checkpoint", lambda fn, *args: calls.append(1) or fn(*args))
    points = torch.randn(2, 256, 3)
    model.block_memory_gb = 1e-9
    model(points).sum().backward()
    assert len(calls) == model.source.depth
    calls.clear()
    with torch.no_grad():
        model(points)  # nothing kept for backward: nothing to checkpoint, nothing measured
    model.eval()
    model(points)
    model.train()
    model.block_memory_gb = 1.2  # the default: a tiny model's blocks stay as they are
    model(points).sum().backward()
    assert not calls


def test_block_checkpointing_settings_are_checked():
    for bad in ({"block_memory_gb": 0}, {"block_memory_gb": -1.0}, {"checkpoint_blocks": "sometimes"}):
        with pytest.raises(ConfigError, match="key 'checkpoint_blocks'.*got str 'sometimes'|block_memory_gb must be a positive"):
            build_model(dict(type="Any2Point", num_classes=5, source=TINY_SOURCES["clip_text"], **bad))
    # auto never checkpoints a tuner whose torch batch norms would move twice
    model = build_model(dict(type="Any2Point", num_classes=5, source=TINY_SOURCES["clip_text"],
                             tuner=dict(type="PointPEFT", prompt=False), block_memory_gb=1e-9))
    assert model.checkpoints_blocks(blocks_input(model, 2)) is False


@pytest.mark.parametrize("source", ROTARY_SOURCES)
def test_auto_block_checkpointing_measures_a_rotary_block_with_the_batchs_positions(source):
    """A rotary block keeps more with the projection's positions (multiview: six rotated copies of
    every query and key) than without: the estimate is taken with them, cut to one sample."""
    torch.manual_seed(0)
    model = build_model(dict(type="Any2Point", num_classes=5, source=tiny.source(source), checkpoint_blocks="auto",
                             tokenizer=dict(type="PointPNTokenizer", k=16)))
    torch.manual_seed(1)
    embedded = model.source.embed_points(torch.randn(4, 256, 3), model.tokenizer, model.projection)
    context = model.source.block_context(embedded)
    assert context.points is not None
    x = torch.randn(4, 1 + embedded.tokens.shape[1], model.source.dim, requires_grad=True)
    estimate = model.block_activation_bytes(x, context)

    def blocks(tokens: torch.Tensor, ctx) -> None:
        for index in range(model.source.depth):
            tokens = model.source.forward_block(index, tokens, None, None, ctx)

    exclude = [*model.parameters(), *model.buffers()]
    whole = saved_bytes(lambda: blocks(x, context), exclude=exclude)
    assert 0.8 < estimate / whole < 1.25
    assert whole > 1.25 * saved_bytes(lambda: blocks(x, None), exclude=exclude)
