"""any2point: frozen pretrained transformers of any modality as 3D point-cloud models.

``load_config``, ``build_model`` and ``build_dataset`` are imported on first use, so importing
the package (or ``any2point.extensions``) loads no model library and stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"load_config": "any2point.config", "build_model": "any2point.models",
           "build_dataset": "any2point.datasets"}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'any2point' has no attribute '{name}'")
