"""The training loop and its small helpers: seeding, data loaders, one epoch, evaluation, checkpoints.

Model selection is honest by default: ``train.protocol: honest`` trains on the ``train`` split and
keeps the epoch with the best OA on ``val`` (held out of the official training set); the test split
is evaluated once, with that checkpoint, at the end. ``train.protocol: paper`` trains on
``trainval`` and selects on ``test``, as the official code did; every number logged says which
protocol produced it.
"""
from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from any2point.config import save_config
from any2point.datasets import PointDataset, build_dataset
from any2point.engine import checkpoint, distributed
from any2point.engine.log import ScalarWriter, setup_logging
from any2point.engine.metrics import Metrics, confusion_matrix
from any2point.engine.optim import build_optimizer, build_scheduler
from any2point.models import build_model
from any2point.registry import ConfigError
from any2point.utils.cpu_memory import keep_freed_memory

logger = logging.getLogger("any2point")

LAST, BEST = "ckpt-last.pth", "ckpt-best.pth"


def pick_device(name: str) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loader(dataset: PointDataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                device: torch.device) -> DataLoader:
    """A loader over this rank's share; training batches drop the last incomplete batch."""
    sampler = distributed.EpochSampler(len(dataset), shuffle, seed, distributed.rank(), distributed.world_size())
    if shuffle and len(sampler) < batch_size:
        raise ConfigError(f"the {dataset.split} split has {len(dataset)} samples, fewer than one batch of "
                          f"{batch_size * distributed.world_size()}; lower train.batch_size")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=shuffle,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; full precision on CPU (no fast bf16 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (DDP wrappers unwrapped)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, amp: bool,
             desc: str = "eval") -> Metrics:
    """OA / mAcc / per-class accuracy over the whole split (all ranks' shares all-reduced)."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if distributed.is_main() else True):
        points = batch["points"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(points)
        cm += confusion_matrix(logits.argmax(-1), labels, num_classes)
    return Metrics.from_confusion(distributed.all_reduce_sum(cm).cpu())


class Trainer:
    """Builds model, data, optimizer and schedule from a config, then trains with :meth:`fit`."""

    def __init__(self, cfg: DictConfig, resume: bool = False) -> None:
        self.cfg = cfg
        t = cfg.train
        self.device = pick_device(t.device)
        distributed.init(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.exp_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name
        self._check_exp_dir(resume)
        setup_logging(self.exp_dir / "log.txt")
        seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)

        self.model = build_model(cfg.model).to(self.device)
        counts = parameter_summary(self.model)
        logger.info("model %s: %s trainable / %s total parameters (%.3f%%)", cfg.model.type,
                    f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["trainable"] / counts["total"])

        self.protocol = t.protocol
        train_split, self.select_split = ("train", "val") if self.protocol == "honest" else ("trainval", "test")
        world = distributed.world_size()
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} is the global batch and must be divisible "
                              f"by the number of processes ({world})")
        seed = cfg.experiment.seed
        self.train_set = build_dataset(cfg.dataset, train_split)
        self.num_classes = self.train_set.num_classes
        self._check_num_classes()
        self.train_loader = make_loader(self.train_set, t.batch_size // world, True, seed, t.num_workers, self.device)
        eval_bs = max(1, (t.test_batch_size or t.batch_size) // world)
        self.select_loader = make_loader(build_dataset(cfg.dataset, self.select_split), eval_bs, False, seed,
                                         t.num_workers, self.device)
        self.test_loader = self.select_loader if self.select_split == "test" else make_loader(
            build_dataset(cfg.dataset, "test"), eval_bs, False, seed, t.num_workers, self.device)

        self.net: nn.Module = self.model
        if world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if t.compile:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, t.epochs, len(self.train_loader))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.start_epoch, self.best_oa, self.best_epoch = 0, -1.0, -1
        if resume:
            self._resume()
        elif distributed.is_main():
            save_config(cfg, self.exp_dir / "config.yaml")
        self.writer = ScalarWriter(self.exp_dir / "tb")
        logger.info("experiment folder: %s (checkpoints %s, %s; TensorBoard logs %s)", self.exp_dir,
                    LAST, BEST, self.exp_dir / "tb")
        logger.info("protocol '%s': training on '%s', selecting the best epoch on '%s'", self.protocol,
                    train_split, self.select_split)

    def _check_exp_dir(self, resume: bool) -> None:
        last = self.exp_dir / LAST
        if resume and not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
        if not resume and last.is_file():
            raise FileExistsError(f"{self.exp_dir} already holds a run; pass --resume to continue it, or choose "
                                  f"another folder with experiment.name=...")
        if distributed.is_main():
            self.exp_dir.mkdir(parents=True, exist_ok=True)

    def _check_num_classes(self) -> None:
        expected = self.cfg.model.get("num_classes")
        if expected is not None and expected != self.num_classes:
            raise ConfigError(f"model.num_classes={expected} but dataset {self.cfg.dataset.type} has "
                              f"{self.num_classes} classes")

    # ----------------------------------------------------------------------------------- state
    def state(self, epoch: int) -> dict[str, Any]:
        rng = [None] * distributed.world_size()
        if distributed.world_size() > 1:
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        source = getattr(self.model, "source_identity", None)
        return {"model": checkpoint.trainable_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_oa": self.best_oa,
                "best_epoch": self.best_epoch, "protocol": self.protocol, "rng": rng,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "source": source() if source else None}

    def save(self, name: str, state: dict[str, Any]) -> None:
        if distributed.is_main():
            checkpoint.save_atomic(state, self.exp_dir / name)

    def _resume(self) -> None:
        path = self.exp_dir / LAST
        ckpt = checkpoint.load(path)
        checkpoint.load_trainable_state_dict(self.model, ckpt["model"], str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch = ckpt["epoch"] + 1
        self.best_oa, self.best_epoch = ckpt["best_oa"], ckpt["best_epoch"]
        rng = ckpt["rng"]
        if len(rng) == distributed.world_size():
            set_rng_state(rng[distributed.rank()])
        else:
            logger.warning("checkpoint was written by %d processes, resuming with %d: RNG streams restart",
                           len(rng), distributed.world_size())
        logger.info("resumed from %s: %d of %d epochs done (best %s OA %.2f at epoch %d)", path, self.start_epoch,
                    self.cfg.train.epochs, self.select_split, self.best_oa, self.best_epoch + 1)

    # ----------------------------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> dict[str, float]:
        t = self.cfg.train
        self.net.train()
        self.train_set.set_epoch(epoch)
        self.train_loader.sampler.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                   disable=None if distributed.is_main() else True)
        for batch in bar:
            points = batch["points"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            with autocast(self.device, t.amp):
                logits = self.net(points)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            n = labels.numel()
            totals += torch.tensor([loss.item() * n, (logits.argmax(-1) == labels).sum().item(), n],
                                   dtype=torch.float64, device=self.device)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        loss_sum, correct, count = distributed.all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / count, "acc": 100.0 * correct / count,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def fit(self, stop_after: Optional[int] = None) -> Optional[Metrics]:
        """Train to ``train.epochs``, checkpointing every epoch; return the test metrics of the best
        epoch. ``stop_after`` ends this call after that many epochs (e.g. to fit a job's time limit;
        ``--resume`` continues) and returns ``None`` if training is not finished."""
        t = self.cfg.train
        end = t.epochs if stop_after is None else min(t.epochs, self.start_epoch + stop_after)
        for epoch in range(self.start_epoch, end):
            stats = self.train_epoch(epoch)
            step = epoch + 1
            for key, value in stats.items():
                self.writer.add(f"train/{key}", value, step)
            line = f"epoch {step}/{t.epochs}  loss {stats['loss']:.4f}  acc {stats['acc']:.2f}  lr {stats['lr']:.2e}"
            if step % t.eval_every == 0 or step == t.epochs:
                m = evaluate(self.net, self.select_loader, self.num_classes, self.device, t.amp, self.select_split)
                self.writer.add(f"{self.select_split}/OA", m.oa, step)
                self.writer.add(f"{self.select_split}/mAcc", m.macc, step)
                improved = m.oa > self.best_oa
                if improved:
                    self.best_oa, self.best_epoch = m.oa, epoch
                line += (f"  | {self.select_split} OA {m.oa:.2f} mAcc {m.macc:.2f}  (best {self.best_oa:.2f} "
                         f"@ epoch {self.best_epoch + 1}, protocol {self.protocol})")
                state = self.state(epoch)
                if improved:
                    self.save(BEST, state)
            else:
                state = self.state(epoch)
            self.save(LAST, state)
            logger.info(line)
        if end < t.epochs:
            self.writer.close()
            return None
        return self.final_test()

    def final_test(self) -> Metrics:
        """Evaluate the best checkpoint on the test split and log it with its protocol."""
        distributed.barrier()
        best = self.exp_dir / BEST
        if best.is_file():
            checkpoint.load_trainable_state_dict(self.model, checkpoint.load(best)["model"], str(best))
        m = evaluate(self.net, self.test_loader, self.num_classes, self.device, self.cfg.train.amp, "test")
        how = ("best epoch selected on the validation split held out of train" if self.protocol == "honest"
               else "best epoch selected on the test split itself (paper protocol; optimistic)")
        logger.info("test %s  [epoch %d; protocol %s: %s]", m.summary(), self.best_epoch + 1, self.protocol, how)
        self.writer.add("test/OA", m.oa, self.best_epoch + 1)
        self.writer.add("test/mAcc", m.macc, self.best_epoch + 1)
        self.writer.close()
        logger.info("checkpoints: %s, %s", self.exp_dir / LAST, best)
        return m


def evaluate_checkpoint(cfg: DictConfig, ckpt_path: str | Path) -> Metrics:
    """Evaluate a checkpoint on the test split of ``cfg``'s dataset; log per-class accuracy."""
    device = pick_device(cfg.train.device)
    distributed.init(device)
    setup_logging()
    model = build_model(cfg.model).to(device)
    ckpt = checkpoint.load(ckpt_path)
    checkpoint.load_trainable_state_dict(model, ckpt["model"], str(ckpt_path))
    _check_source(model, ckpt.get("source"))
    dataset = build_dataset(cfg.dataset, "test")
    world = distributed.world_size()
    loader = make_loader(dataset, max(1, (cfg.train.test_batch_size or cfg.train.batch_size) // world), False,
                         cfg.experiment.seed, cfg.train.num_workers, device)
    m = evaluate(model, loader, dataset.num_classes, device, cfg.train.amp, "test")
    logger.info("test %s  [checkpoint %s, epoch %s, protocol %s]", m.summary(), ckpt_path,
                ckpt.get("epoch", -1) + 1, ckpt.get("protocol"))
    names = dataset.class_names
    for name, acc in zip(names, m.per_class):
        logger.info("  %-16s %6.2f", name, acc)
    return m


def _check_source(model: nn.Module, saved: Optional[dict[str, Any]]) -> None:
    identity = getattr(model, "source_identity", None)
    if saved is None or identity is None:
        return
    now = identity()
    if saved.get("sha256") and now.get("sha256") and saved["sha256"] != now["sha256"]:
        raise ValueError(f"the checkpoint was trained on source weights {saved} but the config loads {now}")
