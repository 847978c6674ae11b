"""Checkpoints: atomic writes, trainable-only model state, strict loading with a key report.

A checkpoint stores the model's *trainable* state (every parameter and buffer outside the frozen
source), so a 300M-parameter source is never copied into each file; the source is identified by
name and sha256 instead (DESIGN.md, "Non-negotiables").
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def frozen_prefixes(model: nn.Module) -> list[str]:
    """Names of the outermost submodules whose parameters are all frozen (and which have some)."""
    out: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        params = list(module.parameters())
        if prefix and params and not any(p.requires_grad for p in params):
            out.append(prefix)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the frozen submodules (their weights come from the source file)."""
    frozen = tuple(p + "." for p in frozen_prefixes(model))
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(frozen)}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a trainable state strictly; a mismatch raises ``KeyError`` naming the keys."""
    expected = set(trainable_state_dict(model))
    got = set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        msg = [f"checkpoint {where} does not match the model"]
        if missing:
            msg.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {', '.join(unexpected)}")
        raise KeyError("; ".join(msg))
    current = model.state_dict()
    bad = [k for k in expected if current[k].shape != state[k].shape]
    if bad:
        raise KeyError(f"checkpoint {where}: shape mismatch for "
                       + ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(current[k].shape)}" for k in bad))
    model.load_state_dict(state, strict=False)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)
