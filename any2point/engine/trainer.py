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

from any2point.config import config_changes, read_history, save_config
from any2point.datasets import PointDataset, build_dataset
from any2point.engine import checkpoint, distributed
from any2point.engine.experiment import claim
from any2point.engine.log import ScalarWriter, setup_logging
from any2point.engine.metrics import Metrics, confusion_matrix
from any2point.engine.optim import build_optimizer, build_scheduler, load_schedule_state
from any2point.errors import CheckpointError, ExperimentError
from any2point.models import build_model
from any2point.registry import ConfigError
from any2point.utils.cpu_memory import keep_freed_memory

logger = logging.getLogger("any2point")

LAST, BEST = "ckpt-last.pth", "ckpt-best.pth"


def pick_device(name: str) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; a device this machine
    does not have is a :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device='{name}' is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name} but CUDA is not available on this machine; "
                              f"use train.device=cpu or train.device=auto")
        if device.index is None:
            device = torch.device("cuda", distributed.local_rank())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"train.device={name}: only auto, cpu and cuda devices are supported")
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
    """Every generator's state as tensors and plain values (NumPy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
    """Builds model, data, optimizer and schedule from a config, then trains with :meth:`fit`.

    The run owns its experiment folder (see :mod:`any2point.engine.experiment`) from construction
    until :meth:`fit` returns or :meth:`close` is called. ``resume`` continues from ``ckpt-last.pth``
    (or from ``resume_from``) and refuses a config that differs from the checkpoint's unless
    ``allow_config_change``; ``overwrite`` empties a used folder first; ``ignore_source_mismatch``
    downgrades a different source (weights) than the checkpoint's to a warning.
    """

    def __init__(self, cfg: DictConfig, resume: bool = False, *, resume_from: Optional[str | Path] = None,
                 overwrite: bool = False, allow_config_change: bool = False,
                 ignore_source_mismatch: bool = False) -> None:
        self.cfg = cfg
        t = cfg.train
        resume = resume or resume_from is not None
        self.ignore_source_mismatch = ignore_source_mismatch
        self.device = pick_device(t.device)
        distributed.init(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.exp_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name
        if resume and resume_from is None and not (self.exp_dir / LAST).is_file():
            raise ExperimentError(f"--resume: no checkpoint to resume from at {self.exp_dir / LAST}")
        self.lock = claim(self.exp_dir, resume, overwrite, LAST) if distributed.is_main() else None
        try:
            distributed.barrier()
            self._build(resume, resume_from, allow_config_change)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool, resume_from: Optional[str | Path], allow_config_change: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        setup_logging(self.exp_dir / "log.txt")
        resumed, history = None, []
        if resume:
            resumed = self._load_resume_checkpoint(Path(resume_from) if resume_from else self.exp_dir / LAST)
            history = self._check_config_change(resumed, allow_config_change)
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
        if resumed is not None:
            self._resume(*resumed)
        if distributed.is_main():
            save_config(cfg, self.exp_dir / "config.yaml", history)
        # a resumed run drops the scalars logged after its checkpoint (a killed epoch) instead of repeating steps
        self.writer = ScalarWriter(self.exp_dir / "tb", purge_step=self.start_epoch + 1 if resume else None)
        logger.info("experiment folder: %s (checkpoints %s, %s; TensorBoard logs %s)", self.exp_dir,
                    LAST, BEST, self.exp_dir / "tb")
        logger.info("protocol '%s': training on '%s', selecting the best epoch on '%s'", self.protocol,
                    train_split, self.select_split)

    def close(self) -> None:
        """Flush the TensorBoard log and give up the experiment folder."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        if self.lock is not None:
            self.lock.release()

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

    def _load_resume_checkpoint(self, path: Path) -> tuple[Path, dict[str, Any]]:
        try:
            return path, checkpoint.load(path)
        except CheckpointError as e:
            best = self.exp_dir / BEST
            if path.name == LAST and best.is_file():
                raise CheckpointError(f"{e}; {best} (the best epoch so far) exists: continue from it with "
                                      f"--resume-from {best}") from None
            raise CheckpointError(f"{e}; resume from another checkpoint with --resume-from PATH, or start "
                                  f"again with --overwrite") from None

    def _check_config_change(self, resumed: tuple[Path, dict[str, Any]], allow: bool) -> list[str]:
        """The config.yaml history for this resume; a changed config is an error unless ``allow``."""
        path, ckpt = resumed
        history = read_history(self.exp_dir / "config.yaml")
        changes = config_changes(ckpt["config"], OmegaConf.to_container(self.cfg, resolve=True))
        if not changes:
            return history
        listed = "; ".join(changes)
        if not allow:
            raise ConfigError(f"the config differs from the one {path} was trained with: {listed}. Resume with "
                              f"the same config, or pass --allow-config-change to continue with the new one")
        logger.warning("resuming %s with a changed config (--allow-config-change): %s", path, listed)
        return history + [f"resumed at epoch {ckpt['epoch'] + 1} from {path} with changes: {listed}"]

    def _resume(self, path: Path, ckpt: dict[str, Any]) -> None:
        check_source(ckpt.get("source"), self.model, path, self.ignore_source_mismatch)
        checkpoint.load_trainable_state_dict(self.model, ckpt["model"], str(path))
        # keep the configured hyper-parameters (they differ only with --allow-config-change)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model ({e})") from None
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)
        load_schedule_state(self.scheduler, ckpt["scheduler"])
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
        try:
            return self._fit(stop_after)
        finally:
            self.close()

    def _fit(self, stop_after: Optional[int]) -> Optional[Metrics]:
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
        logger.info("checkpoints: %s, %s", self.exp_dir / LAST, best)
        return m


def evaluate_checkpoint(cfg: DictConfig, ckpt_path: str | Path, ignore_source_mismatch: bool = False) -> Metrics:
    """Evaluate a checkpoint on the test split of ``cfg``'s dataset; log per-class accuracy."""
    device = pick_device(cfg.train.device)
    distributed.init(device)
    setup_logging()
    ckpt = checkpoint.load(ckpt_path)
    model = build_model(cfg.model).to(device)
    check_source(ckpt.get("source"), model, ckpt_path, ignore_source_mismatch)
    checkpoint.load_trainable_state_dict(model, ckpt["model"], str(ckpt_path))
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
