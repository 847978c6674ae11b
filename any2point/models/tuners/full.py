"""The two ends of the tuner range: fine-tune the whole source, or train none of it.

- :class:`FullFinetune` (paper Table 2, "full fine-tuning"): every source parameter trains and the
  source's dropout and norm layers follow ``train()``; checkpoints hold the whole source.
- :class:`FrozenSource` (paper Table 3, first row): nothing is inserted and the source stays
  frozen; only the tokenizer, the class token, the final norm and the head train.
"""
from __future__ import annotations

from any2point.models.sources.base import SourceTransformer
from any2point.models.tuners.base import Tuner
from any2point.registry import TUNERS


@TUNERS.register()
class FullFinetune(Tuner):
    """Every source parameter trains; its modules run in the classifier's mode."""

    trains_source = True

    def attach(self, source: SourceTransformer) -> None:
        source.requires_grad_(True)


@TUNERS.register()
class FrozenSource(Tuner):
    """The source as it is, frozen (its final norm trains, as in every tuner); nothing inserted."""
