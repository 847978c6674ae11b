"""A checkpoint's model: built from a config, its source checked against the one the checkpoint was
trained with, its trainable state loaded strictly."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from any2point.config import config_changes, validate
from any2point.engine import checkpoint
from any2point.engine.runtime import pick_device
from any2point.engine.seeds import run_seeds, seed_globals
from any2point.errors import CheckpointError, ConfigError
from any2point.models import build_model

logger = logging.getLogger("any2point")


#: Model keys that may differ from the checkpoint's: where the source weights are read from (their
#: identity, the sha256, is checked by :func:`check_source`).
MODEL_LOCATION_KEYS = ("model.source.pretrained",)


def load_model(ckpt_path: str | Path, cfg: Optional[DictConfig] = None, device: Optional[torch.device] = None,
               ignore_source_mismatch: bool = False,
               allow_model_change: bool = False) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """The model of a checkpoint, in eval mode: built from ``cfg`` (default: the checkpoint's own
    config) with the run's init seed (so a frozen randomly initialised source is the one it trained
    with), its source checked against the saved identity, its trainable state loaded strictly.
    A ``cfg`` whose model section differs from the checkpoint's is refused, naming the keys (the
    weights could load into another model and give a wrong number), unless ``allow_model_change``."""
    ckpt = checkpoint.load(ckpt_path)
    if cfg is None:
        cfg = OmegaConf.create(ckpt["config"])
        validate(cfg)
    else:
        check_model_config(ckpt, cfg, ckpt_path, allow_model_change)
    device = device or pick_device(cfg.train.device)
    seed_globals(run_seeds(cfg.experiment)["init"])
    model = build_model(cfg.model).to(device)
    check_source(ckpt.get("source"), model, ckpt_path, ignore_source_mismatch)
    checkpoint.load_trainable_state_dict(model, ckpt["model"], str(ckpt_path))
    return model.eval(), cfg, ckpt


def check_model_config(ckpt: dict[str, Any], cfg: DictConfig, ckpt_path: str | Path, allow: bool) -> None:
    """Refuse (or with ``allow``, warn about) a ``cfg.model`` that differs from the checkpoint's."""
    saved = (ckpt.get("config") or {}).get("model")
    if saved is None:
        return
    changes = [c for c in config_changes({"model": saved}, {"model": OmegaConf.to_container(cfg.model, resolve=True)})
               if c.split(":", 1)[0] not in MODEL_LOCATION_KEYS]
    if not changes:
        return
    listed = "; ".join(changes)
    if not allow:
        raise ConfigError(f"the model config differs from the one {ckpt_path} was trained with: {listed}. Test with "
                          f"the checkpoint's model settings, or pass --allow-config-change to test it anyway")
    logger.warning("testing %s with a changed model config (--allow-config-change): %s", ckpt_path, listed)


def _describe_source(identity: dict[str, Any]) -> str:
    if not identity.get("sha256"):
        return f"{identity.get('name')} at random init (no weight file)"
    return f"{identity.get('name')} from {identity.get('weights')} (sha256 {identity['sha256']})"


def check_source(saved: Optional[dict[str, Any]], model: nn.Module, ckpt_path: str | Path,
                 ignore: bool = False) -> None:
    """Refuse a checkpoint whose source (name and weight-file sha256) differs from the model's, both
    ways: real weights vs random init, or another file. ``ignore`` turns the error into a warning."""
    identity = getattr(model, "source_identity", None)
    if saved is None or identity is None:
        return  # a model without a pretrained source (e.g. PointNet)
    now = identity()
    if (saved.get("name"), saved.get("sha256")) == (now.get("name"), now.get("sha256")):
        return
    message = (f"checkpoint {ckpt_path} was trained with source {_describe_source(saved)}, but the config builds "
               f"{_describe_source(now)}")
    if ignore:
        logger.warning("%s; continuing anyway (--ignore-source-mismatch)", message)
        return
    hint = (f"set model.source.pretrained to {saved.get('weights')}" if saved.get("sha256")
            else "set model.source.pretrained=null")
    raise CheckpointError(f"{message}; {hint}, or pass --ignore-source-mismatch")
