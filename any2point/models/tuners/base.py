"""The tuner slot: one interface through which a method adapts a source transformer.

A tuner decides, for the assembled classifier (:class:`any2point.models.any2point.classifier.Any2Point`):

- **what trains in the source**, by module structure (:meth:`Tuner.attach`): nothing (the frozen
  source of every parameter-efficient method), everything (full fine-tuning), or the modules the
  tuner itself wraps inside it (LoRA); the source's final norm trains in every tuner (the paper
  trains it with the tokenizer and the head);
- **which mode the source's modules run in** (:meth:`Tuner.source_mode`): a frozen source stays in
  eval mode (no dropout, fixed norms) whatever ``train()`` is called with; a fine-tuned one follows;
- **what it inserts into each block** (:meth:`Tuner.hooks`): modules replacing the residual adds
  after attention and after the FFN (:class:`BlockHooks`; the source's
  :meth:`~any2point.models.sources.base.SourceTransformer.forward_block` calls them), or wrapped
  layers inside the source (LoRA);
- **how many prompt tokens the blocks carry** (:attr:`Tuner.num_prompts`, placed between the class
  token and the point tokens, rewritten before each block by :meth:`Tuner.enter_block`);
- **what it needs from each batch's geometry** (:meth:`Tuner.prepare`, from the source's
  :class:`~any2point.models.sources.base.Embedded`: the guided adapter's cells of the virtual
  projection, Point-PEFT's neighbourhoods of the token centres).

Tuners are registered on the model registry and built by the classifier, which injects what a
tuner names in ``injected_args`` out of ``dim`` and ``depth`` (the source's width and number of
blocks) and ``num_views`` and ``projection`` (the virtual projection; a 3D-pretrained source has none,
so a tuner that needs them is refused there by name). A tuner never holds the
source: what it puts inside it, :meth:`Tuner.attach` puts there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn
from torch import Tensor

from any2point.models.sources.base import Embedded, ResidualHook, SourceTransformer

logger = logging.getLogger("any2point")


@dataclass
class BlockHooks:
    """What a tuner puts into one block: replacements of its two residual adds (``None``: ``x + f``)."""

    attn: Optional[ResidualHook] = None
    ffn: Optional[ResidualHook] = None


class Tuner(nn.Module):
    """Base class of all tuners: a frozen source, nothing inserted, no prompts.

    Subclasses override what they change.
    """

    injected_args: tuple[str, ...] = ()
    #: Prompt tokens the blocks carry between the class token and the point tokens (those left after
    #: the last block, where the classifier drops them).
    num_prompts: int = 0
    #: Whether the source's own parameters (beyond its final norm) train: then its modules follow
    #: ``train()`` and checkpoints hold the whole source.
    trains_source: bool = False

    def attach(self, source: SourceTransformer) -> None:
        """Decide trainability inside ``source`` (called once, after the source loaded its weights):
        freeze it, except its final norm."""
        source.requires_grad_(False)
        source.norm.requires_grad_(True)

    def source_mode(self, source: SourceTransformer, mode: bool) -> None:
        """Set the train/eval mode of the source's modules when the classifier's ``train(mode)`` runs."""
        source.train(mode and self.trains_source)

    def prepare(self, embedded: Embedded) -> Any:
        """The per-batch context the hooks need, from the batch's point embedding (default: none)."""
        return None

    def enter_block(self, index: int, x: Tensor, context: Any) -> Tensor:
        """Tokens entering block ``index`` (B, T, C) -> (B, T', C); prompt tuners rewrite their tokens."""
        return x

    def hooks(self, index: int, context: Any) -> BlockHooks:
        """What block ``index`` runs in place of its residual adds."""
        return BlockHooks()
