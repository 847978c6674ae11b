"""Models; every module and subpackage here registers its classes on import."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from any2point.registry import MODELS, SOURCES, build_from_cfg
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)


def build_model(cfg: Any) -> nn.Module:
    """Build the model of ``cfg`` (a ``type:`` mapping of the model registry)."""
    return build_from_cfg(cfg, MODELS)


def build_source(cfg: Any) -> nn.Module:
    """Build the source transformer of ``cfg`` (a ``type:`` mapping of the source registry, e.g. a
    config's ``model.source``)."""
    return build_from_cfg(cfg, SOURCES)


__all__ = ["build_model", "build_source"]
