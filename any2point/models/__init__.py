"""Models; every module and subpackage here registers its classes on import."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from any2point.registry import MODELS, build_from_cfg
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)


def build_model(cfg: Any) -> nn.Module:
    """Build the model of ``cfg`` (a ``type:`` mapping of the model registry)."""
    return build_from_cfg(cfg, MODELS)


__all__ = ["build_model"]
