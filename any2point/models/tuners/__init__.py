"""Tuners: the ways to adapt a source transformer (the guided adapter, full fine-tuning, a frozen
source, prompt tuning, bottleneck adapters, LoRA) behind one slot (:mod:`.base`); every module here
registers its tuners on import."""
from any2point.models.tuners.base import BlockHooks, Tuner
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)

__all__ = ["BlockHooks", "Tuner"]
