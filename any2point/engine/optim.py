"""Optimizers and learning-rate schedules, built from config.

Weight decay applies only to weight matrices/kernels: 1-D parameters (norm scales, biases, tokens
with a single non-trivial dimension) get none, as in the paper's recipe (docs/method.md, "Training").
The schedule is stepped once per iteration.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Sequence

import torch
import torch.nn as nn

from any2point.registry import (OPTIMIZERS, SCHEDULERS, ConfigError, Fraction, NonNegativeFloat, NonNegativeInt,
                                PositiveFloat, Range, build_from_cfg)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a no-decay group (1-D and biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.squeeze().ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register(name="AdamW")
def adamw(model: nn.Module, lr: PositiveFloat = 5e-4, weight_decay: NonNegativeFloat = 0.05,
          betas: Sequence[Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999),
          eps: PositiveFloat = 1e-8) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay on 1-D parameters and biases."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register(name="SGD")
def sgd(model: nn.Module, lr: PositiveFloat = 0.1, weight_decay: NonNegativeFloat = 1e-4, momentum: Fraction = 0.9,
        nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum over the trainable parameters (same decay split as AdamW)."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


adamw.injected_args = sgd.injected_args = ("model",)


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                         min_lr: float, warmup_start_lr: float) -> float:
    """lr(step) / base_lr: linear warm-up from ``warmup_start_lr``, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        lr = warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return lr / base_lr


@SCHEDULERS.register(name="CosineWarmup")
def cosine_warmup(optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int,
                  warmup_epochs: NonNegativeInt = 10, min_lr: NonNegativeFloat = 1e-6,
                  warmup_start_lr: NonNegativeFloat = 1e-6) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration cosine schedule with linear warm-up (epochs are converted to iterations)."""
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise ConfigError(f"scheduler.warmup_epochs must be in [0, train.epochs={epochs}], got {warmup_epochs}")
    if any(g["lr"] < min_lr for g in optimizer.param_groups):
        raise ConfigError(f"scheduler.min_lr={min_lr} is above the optimizer's lr={optimizer.param_groups[0]['lr']}")
    total, warmup = epochs * iters_per_epoch, warmup_epochs * iters_per_epoch
    lambdas = [
        (lambda step, base=g["lr"]: cosine_warmup_factor(step, total, warmup, base, min_lr, warmup_start_lr))
        for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@SCHEDULERS.register(name="Constant")
def constant(optimizer: torch.optim.Optimizer, epochs: int,
             iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A constant learning rate (useful for debugging and tests)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


cosine_warmup.injected_args = constant.injected_args = ("optimizer", "epochs", "iters_per_epoch")


def load_schedule_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Continue ``scheduler`` at the step saved in ``state`` (a ``LambdaLR`` state dict).

    Only the step count is restored: the base learning rates and the schedule's shape stay those of
    the current config, so a resume with a changed ``lr`` or ``epochs`` follows the new schedule and
    never leaves it (in particular never goes below its ``min_lr``). With an unchanged config this is
    the same as ``load_state_dict``.
    """
    scheduler.last_epoch = state["last_epoch"]
    scheduler._step_count = state["_step_count"]
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    return build_from_cfg(cfg, OPTIMIZERS, model=model)


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, epochs: int,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    return build_from_cfg(cfg, SCHEDULERS, optimizer=optimizer, epochs=epochs, iters_per_epoch=iters_per_epoch)
