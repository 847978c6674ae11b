"""The memory pass: how a model holding Point-NN (:class:`~any2point.models.point_nn.point_nn.PointNN`,
alone or as the plug-in of a trained classifier) gets its bank, instead of (or after) training.

1. The selection split (``val`` under the honest protocol, ``test`` under the paper protocol) is
   encoded once: Point-NN's features and, for a plug-in, the trained classifier's own logits (the
   bank is still empty, so they are the classifier's alone).
2. One pass over the training split (``train``, or ``trainval`` under the paper protocol), with the
   test transforms (no augmentation), fills the bank: no optimiser, no gradient.
3. ``gamma`` (and the plug-in's ``weight``), unless the config fixes them, are the grid values with
   the best overall accuracy on the selection split (the first in grid order on a tie, so the
   smallest weight: 0 where the bank does not help).
4. Under the honest protocol the ``val`` features then join the bank, so that the bank holds the
   whole training set, as a trained model's data does; the test split is never added.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from any2point.datasets import build_dataset
from any2point.errors import ConfigError
from any2point.models.point_nn.point_nn import PointNN, PointNNPlugIn

logger = logging.getLogger("any2point")


def point_nn_of(model: nn.Module) -> Optional[PointNN]:
    """The Point-NN inside ``model`` (``model`` itself, or its plug-in), or ``None``."""
    found = [m for m in model.modules() if isinstance(m, PointNN)]
    if len(found) > 1:
        raise ConfigError(f"the model holds {len(found)} Point-NN banks; one at most")
    return found[0] if found else None


def memory_dataset(dataset_cfg: Any, split: str) -> Any:
    """``split`` of the dataset with its test transforms: the bank stores the clouds as they are."""
    cfg = copy.deepcopy(OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig)
                        else dataset_cfg)
    transforms = dict(cfg.get("transforms") or {})
    transforms["train"] = transforms.get("test", [])
    cfg["transforms"] = transforms
    return build_dataset(cfg, split)


@torch.no_grad()
def fill_bank(model: nn.Module, point_nn: PointNN, memory_loader: DataLoader, select_loader: DataLoader,
              device: torch.device, add_selection: bool) -> dict[str, Any]:
    """Fill ``point_nn``'s bank and choose its gamma (and weight); see the module docstring.
    Returns what was chosen: ``gamma``, ``weight`` (plug-in), ``select_OA`` (``None`` without a
    selection split) and ``bank_size``."""
    model.eval()
    bank = point_nn.bank
    bank.reset()
    plug_in = isinstance(point_nn, PointNNPlugIn)
    feats, labels, base = [], [], []
    for batch in select_loader:
        points = batch["points"].to(device, non_blocking=True)
        feats.append(point_nn.encode(points))
        labels.append(batch["label"].to(device))
        if plug_in:
            base.append(model(points).float())
    for batch in memory_loader:
        points = batch["points"].to(device, non_blocking=True)
        bank.add(point_nn.encode(points), batch["label"].to(device))
    bank.finish()
    gammas = [float(bank.gamma)] if point_nn.gamma_fixed else point_nn.gammas
    weights = ([float(point_nn.weight)] if point_nn.weight_fixed else point_nn.weights) if plug_in else [1.0]
    best: Optional[tuple[float, float, float]] = None
    if feats:
        features, targets = torch.cat(feats), torch.cat(labels)
        similarity = bank.similarity(features)
        logits = torch.cat(base) if plug_in else torch.zeros(len(targets), bank.num_classes, device=device)
        for gamma in gammas:
            votes = bank.votes(similarity, gamma)
            for weight in weights:
                accuracy = 100.0 * ((logits + weight * votes).argmax(dim=1) == targets).double().mean().item()
                if best is None or accuracy > best[0]:
                    best = (accuracy, gamma, weight)
    elif len(gammas) > 1 or len(weights) > 1:
        raise ConfigError("Point-NN chooses gamma (and the plug-in its weight) on the selection split, which is "
                          "empty here: set dataset.val_fraction above 0, or fix model gamma (and weight)")
    accuracy, gamma, weight = best if best is not None else (None, gammas[0], weights[0])
    bank.gamma.fill_(gamma)
    if plug_in:
        point_nn.weight.fill_(weight)
    if add_selection and feats:
        bank.add(features, targets)
        bank.finish()
    info = {"gamma": gamma, "select_OA": accuracy, "bank_size": bank.size}
    if plug_in:
        info["weight"] = weight
    logger.info("Point-NN memory pass: %d training clouds in the bank; gamma %g%s (%s)", bank.size, gamma,
                f", weight {weight:g}" if plug_in else "",
                "no selection split" if accuracy is None else f"selection OA {accuracy:.2f}")
    return info
