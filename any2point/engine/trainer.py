"""The training loop: a short :meth:`Trainer.fit` around small hooks.

The loop itself only runs epochs of optimizer steps; what happens around them is a hook, each doing
one thing: :class:`LRSchedule` steps the learning rate after every optimizer step,
:class:`Validation` evaluates on the selection split and tracks the best epoch, :class:`Checkpoints`
writes ``ckpt-last.pth`` and ``ckpt-best.pth``, :class:`EpochLog` writes the log line and the
TensorBoard scalars. What a batch means (inputs, loss, metrics) comes from the task
(:mod:`any2point.engine.tasks`), so a new task needs no change here.

Model selection is honest by default: ``train.protocol: honest`` trains on the ``train`` split and
keeps the epoch with the best score (the task's: OA, or instance mIoU) on ``val`` (held out of the
official training set); the test split is evaluated once, with that checkpoint, at the end.
``train.protocol: paper`` trains on ``trainval`` and selects on ``test``, as the official code did;
every number logged says which protocol produced it.

A model holding Point-NN gets its memory bank from one pass over the training split
(:mod:`any2point.engine.memory`) before the final test: Point-NN alone has no trainable parameter,
so its run is that pass and the test (no epoch, no optimizer); a classifier with the Point-NN
plug-in trains as usual and builds the bank after its last epoch, with its best weights. The
results record carries the model's parameter counts and the run's time (``run_seconds``: the
seconds of this process and, after ``--resume``, those of the runs before it up to their last
checkpoint).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from any2point.config import config_changes, read_history, save_config
from any2point.datasets import PointDataset, build_dataset
from any2point.engine import checkpoint, distributed
from any2point.engine.evaluate import eval_loader, evaluate, log_test
from any2point.engine.experiment import claim, experiment_folder, without_location
from any2point.engine.loading import check_source
from any2point.engine.records import RESULTS, results_record, write_results
from any2point.engine.runtime import autocast, pick_device, precision_note, uses_bf16
from any2point.engine.log import ScalarWriter, setup_logging
from any2point.engine.memory import fill_bank, memory_dataset, point_nn_of
from any2point.engine.metrics import Metrics, SegmentationMetrics
from any2point.engine.optim import build_optimizer, build_scheduler, load_schedule_state
from any2point.engine.seeds import derive_seed, describe_seeds, run_seeds, seed_globals
from any2point.engine.tasks import build_task
from any2point.errors import CheckpointError, ConfigError, DivergenceError, ExperimentError
from any2point.models import build_model
from any2point.utils.cpu_memory import keep_freed_memory, release_freed_memory

logger = logging.getLogger("any2point")

LAST, BEST = "ckpt-last.pth", "ckpt-best.pth"
POSTFIX_EVERY = 10  # steps between the progress bar's loss readings (each one waits for the device)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed the global generators; ``deterministic`` also asks torch for deterministic kernels."""
    seed_globals(seed)
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


def train_loader(dataset: PointDataset, batch_size: int, order_seed: int, num_workers: int,
                 device: torch.device) -> DataLoader:
    """This rank's shuffled share of the training split, reproducible from ``(order_seed, epoch)``; the
    last incomplete batch is dropped. Call :func:`seed_workers` before each epoch."""
    sampler = distributed.EpochSampler(len(dataset), True, order_seed, distributed.rank(), distributed.world_size())
    if len(sampler) < batch_size:
        raise ConfigError(f"the {dataset.split} split has {len(dataset)} samples, fewer than one batch of "
                          f"{batch_size * distributed.world_size()}; lower train.batch_size")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda", generator=torch.Generator())


def seed_workers(loader: DataLoader, augment_seed: int, epoch: int) -> None:
    """Make the global generators of ``loader``'s workers in ``epoch`` a pure function of
    ``(augment_seed, epoch, rank, worker)``, so they differ between workers, ranks, epochs and seeds,
    and a resumed run's workers draw what a straight run's did.

    The loader draws its workers' base seed from ``loader.generator`` when an epoch's iteration
    starts, and worker ``w`` seeds Python, NumPy and torch from ``base + w``.
    """
    loader.generator.manual_seed(derive_seed(augment_seed, epoch, distributed.rank()))


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (DDP wrappers unwrapped)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


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
        self.started = time.monotonic()
        self.seconds_before = 0.0  # run time of the runs this one resumes, up to their checkpoint
        t = cfg.train
        resume = resume or resume_from is not None
        self.ignore_source_mismatch = ignore_source_mismatch
        self.device = pick_device(t.device)
        self.bf16 = uses_bf16(self.device, t)  # autocast of every forward pass (training, selection, test)
        distributed.init(self.device)
        if self.device.type == "cpu" and t.keep_freed_memory:
            keep_freed_memory()
        self.exp_dir = experiment_folder(cfg.experiment)
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
        self.seeds = run_seeds(cfg.experiment)
        seed_everything(self.seeds["init"], cfg.experiment.deterministic)
        self.model = build_model(cfg.model).to(self.device)
        seed_globals(self.seeds["dropout"])  # a resumed run restores the checkpoint's generators instead
        self.counts = counts = parameter_summary(self.model)
        logger.info("model %s: %s trainable / %s total parameters (%.3f%%)", cfg.model.type,
                    f"{counts['trainable']:,}", f"{counts['total']:,}",
                    100 * counts["trainable"] / max(counts["total"], 1))
        self.point_nn = point_nn_of(self.model)
        self.training_free = self.point_nn is not None and counts["trainable"] == 0
        if self.training_free:
            logger.info("training-free model: one memory pass over the training split instead of %d epochs",
                        t.epochs)

        self.protocol = t.protocol
        train_split, self.select_split = ("train", "val") if self.protocol == "honest" else ("trainval", "test")
        world = distributed.world_size()
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} is the global batch and must be divisible "
                              f"by the number of processes ({world})")
        self.train_set = build_dataset(cfg.dataset, train_split)
        self.train_set.set_augment_seed(self.seeds["augment"])
        self.seeds["dataset"] = self.train_set.seed
        self.task = build_task(self.train_set, t.label_smoothing)
        self.num_classes = self.train_set.num_classes
        self.task.check_model(cfg.model, cfg.dataset.type)
        if self.point_nn is not None and self.task.name != "classification":
            raise ConfigError(f"Point-NN's memory bank classifies whole clouds; dataset {cfg.dataset.type}'s task is "
                              f"{self.task.name}")
        self.train_loader = train_loader(self.train_set, t.batch_size // world, self.seeds["order"], t.num_workers,
                                         self.device)
        eval_bs = max(1, (t.test_batch_size or t.batch_size) // world)
        self.select_loader = eval_loader(build_dataset(cfg.dataset, self.select_split), eval_bs, t.num_workers,
                                         self.device)
        self.test_loader = self.select_loader if self.select_split == "test" else eval_loader(
            build_dataset(cfg.dataset, "test"), eval_bs, t.num_workers, self.device)

        self.net: nn.Module = self.model
        if world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if t.compile:
            self.net = torch.compile(self.net)
        self.optimizer = None if self.training_free else build_optimizer(cfg.optimizer, self.model)
        self.scheduler = None if self.training_free else build_scheduler(cfg.scheduler, self.optimizer, t.epochs,
                                                                         len(self.train_loader))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.start_epoch, self.best_score, self.best_epoch = 0, -1.0, -1
        self.hooks = [LRSchedule(), Validation(), Checkpoints(), EpochLog()]
        self.memory_split = train_split
        self.resumed_from = resumed[0] if resumed is not None else None
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
        logger.info("seeds: %s", describe_seeds(self.seeds))
        logger.info("device %s, %s", self.device, precision_note(self.device, t))

    def close(self) -> None:
        """Flush the TensorBoard log and give up the experiment folder."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------------- state
    def state(self, epoch: int) -> dict[str, Any]:
        rng = [None] * distributed.world_size()
        if distributed.world_size() > 1:
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        source = getattr(self.model, "source_identity", None)
        return {"model": checkpoint.trainable_state_dict(self.model),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "run_seconds": self.run_seconds(), "epoch": epoch, "best_score": self.best_score,
                "score_name": self.task.score_name, "best_epoch": self.best_epoch, "protocol": self.protocol,
                "rng": rng, "config": OmegaConf.to_container(self.cfg, resolve=True),
                "source": source() if source else None, **self.task.checkpoint_extras()}

    def run_seconds(self) -> float:
        """Seconds this run has taken so far, those of the runs it resumes included."""
        return self.seconds_before + time.monotonic() - self.started

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
        # where a run is kept is not part of what it computes: a moved or renamed folder resumes
        changes = config_changes(without_location(ckpt["config"]),
                                 without_location(OmegaConf.to_container(self.cfg, resolve=True)))
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
        self.seconds_before = float(ckpt.get("run_seconds") or 0.0)
        if self.optimizer is None:  # training-free: the memory pass runs again
            self.best_score, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
            return
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
        # checkpoints written before the score had its task's name called it best_oa
        self.best_score = ckpt["best_score"] if "best_score" in ckpt else ckpt["best_oa"]
        self.best_epoch = ckpt["best_epoch"]
        rng = ckpt["rng"]
        if len(rng) == distributed.world_size():
            set_rng_state(rng[distributed.rank()])
        else:
            logger.warning("checkpoint was written by %d processes, resuming with %d: RNG streams restart",
                           len(rng), distributed.world_size())
        logger.info("resumed from %s: %d of %d epochs done (best %s %s %.2f at epoch %d)", path, self.start_epoch,
                    self.cfg.train.epochs, self.select_split, self.task.score_name, self.best_score, self.best_epoch + 1)

    # ----------------------------------------------------------------------------------- loop
    def call(self, event: str) -> None:
        """Run every hook's handler of ``event`` in order."""
        for hook in self.hooks:
            getattr(hook, event)(self)

    def fit(self, stop_after: Optional[int] = None) -> Optional[Metrics | SegmentationMetrics]:
        """Train to ``train.epochs`` and return the test metrics of the best epoch. ``stop_after`` ends
        this call after that many epochs (e.g. to fit a job's time limit; ``--resume`` continues) and
        returns ``None`` if training is not finished. The experiment folder is released at the end."""
        try:
            epochs = 0 if self.training_free else self.cfg.train.epochs
            end = epochs if stop_after is None else min(epochs, self.start_epoch + stop_after)
            for self.epoch in range(self.start_epoch, end):
                self.stats: dict[str, Any] = {"train": self.train_epoch(self.epoch)}
                self.call("after_epoch")
                if self.device.type == "cpu" and self.cfg.train.keep_freed_memory:
                    release_freed_memory()  # the heap keeps freed memory within an epoch only
            return self.final_test() if end == epochs else None
        finally:
            self.close()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of optimizer steps; returns the mean loss, the accuracy and the last LR. A
        non-finite loss or gradient norm, or non-finite weights after the epoch, raise
        :class:`DivergenceError` before anything of the epoch is evaluated or saved."""
        t = self.cfg.train
        self.net.train()
        self.train_set.set_epoch(epoch)
        self.train_loader.sampler.set_epoch(epoch)
        seed_workers(self.train_loader, self.seeds["augment"], epoch)
        meter = self.task.meter(self.device)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, samples
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        # No host-device synchronisation per step: the loss is summed and checked on the device, and the
        # bar (shown on a terminal only) reads it every POSTFIX_EVERY steps. The bar is closed (its line
        # cleared) before an error propagates, so the error is printed on a line of its own.
        with tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                  disable=None if distributed.is_main() else True) as bar:
            for step, batch in enumerate(bar):
                with autocast(self.device, self.bf16):
                    outputs = self.task.forward(self.net, batch, self.device)
                loss = self.task.loss(outputs, batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                finite = torch.isfinite(loss.detach())
                if t.grad_clip:
                    finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip))
                first_bad = torch.where(finite | (first_bad >= 0), first_bad, step)
                self.optimizer.step()
                self.call("after_step")
                meter.add(outputs.detach(), batch)
                totals[0] += loss.detach().double() * len(outputs)
                totals[1] += len(outputs)
                if not bar.disable and step % POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        self._check_finite(epoch, first_bad, len(self.train_loader))
        loss_sum, count = distributed.all_reduce_sum(totals).tolist()
        return {"loss": loss_sum / count, self.task.score_name: self.task.score(meter.compute()),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _check_finite(self, epoch: int, first_bad: torch.Tensor, steps: int) -> None:
        """Raise :class:`DivergenceError` (on every process) if a step of the epoch had a non-finite
        loss or gradient norm, or a trainable weight is non-finite now; ``ckpt-last.pth`` then still
        holds the previous epoch."""
        bad_weights = sum((~torch.isfinite(p.detach())).any() for p in self.params)
        flags = torch.stack([(first_bad >= 0).double(), torch.as_tensor(bad_weights, device=self.device).double()])
        bad_steps, bad_weights = distributed.all_reduce_sum(flags).tolist()
        if not bad_steps and not bad_weights:
            return
        step = int(first_bad)
        where = (f"step {step + 1} of {steps}: the loss or the gradient norm is not finite" if step >= 0 else
                 "its last step: a weight is not finite" if bad_weights and not bad_steps else
                 "a step on another process: the loss or the gradient norm is not finite")
        last, source = self.exp_dir / LAST, self.resumed_from
        if epoch > self.start_epoch or (source is not None and source.resolve() == last.resolve()):
            kept = f"{last} holds epoch {epoch}: continue with --resume --allow-config-change"
        elif source is not None:
            kept = f"{source} is unchanged: continue with --resume-from {source} --allow-config-change"
        else:
            kept = "no checkpoint was written: start again"
        kept += " and a lower optimizer.lr"
        raise DivergenceError(f"training diverged in epoch {epoch + 1}, {where} (optimizer.lr="
                              f"{self.cfg.optimizer.get('lr')} is likely too high, or the inputs hold NaN or inf); "
                              f"nothing of this epoch was evaluated or saved; {kept}")

    def final_test(self) -> Metrics | SegmentationMetrics:
        """Evaluate the best checkpoint on the test split once; log it with its protocol and write
        ``results.json``."""
        distributed.barrier()
        best = self.exp_dir / BEST
        if best.is_file():
            checkpoint.load_trainable_state_dict(self.model, checkpoint.load(best)["model"], str(best))
        memory = self.build_memory() if self.point_nn is not None else None
        m = evaluate(self.net, self.test_loader, self.task, self.device, self.bf16, "test")
        how = ("best epoch selected on the validation split held out of train" if self.protocol == "honest"
               else "best epoch selected on the test split itself (paper protocol; optimistic)")
        log_test(m, self.task.class_names, 1, f"epoch {self.best_epoch + 1}; protocol {self.protocol}: {how}")
        for name, value in self.task.scalars(m).items():
            self.writer.add(f"test/{name}", value, self.best_epoch + 1)
        source = getattr(self.model, "source_identity", None)
        record = results_record(m, self.cfg, self.task.class_names, split="test", protocol=self.protocol,
                                voting={"passes": 1}, checkpoint=str(best), epoch=self.best_epoch + 1,
                                source=source() if source else None, task=self.task.name, seeds=self.seeds)
        record.update(parameters=self.counts, run_seconds=round(self.run_seconds(), 3))
        if memory is not None:
            record["memory"] = memory
        logger.info("results: %s; checkpoints: %s, %s", write_results(record, self.exp_dir / RESULTS),
                    self.exp_dir / LAST, best)
        return m

    def build_memory(self) -> dict[str, Any]:
        """Fill the Point-NN bank (:func:`~any2point.engine.memory.fill_bank`) and save it in
        ``ckpt-best.pth``; a training-free run also writes its ``ckpt-last.pth``. Returns what
        the memory pass chose."""
        t, world = self.cfg.train, distributed.world_size()
        batch = max(1, (t.test_batch_size or t.batch_size))
        # every process fills the whole bank: the memory loader is not split over processes
        memory_loader = DataLoader(memory_dataset(self.cfg.dataset, self.memory_split), batch_size=batch,
                                   num_workers=t.num_workers)
        select_loader = DataLoader(memory_dataset(self.cfg.dataset, self.select_split), batch_size=batch,
                                   num_workers=t.num_workers)
        if world > 1:
            logger.info("the memory pass runs on each of the %d processes", world)
        info = fill_bank(self.model, self.point_nn, memory_loader, select_loader, self.device,
                         add_selection=self.select_split != "test")
        best = self.exp_dir / BEST
        if self.training_free:
            self.best_epoch = 0
            self.best_score = info["select_OA"] if info["select_OA"] is not None else -1.0
            state = self.state(0)
            self.save(BEST, state)
            self.save(LAST, state)
        elif best.is_file() and distributed.is_main():
            saved = checkpoint.load(best)
            saved["model"] = checkpoint.trainable_state_dict(self.model)
            self.save(BEST, saved)
        return info


class Hook:
    """A piece of work around the loop; the trainer calls each handler at its moment."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step."""

    def after_epoch(self, trainer: Trainer) -> None:
        """After each epoch; ``trainer.stats`` holds what earlier hooks of the epoch computed."""


class LRSchedule(Hook):
    """The schedule is per iteration: step it after every optimizer step."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.scheduler.step()


class Validation(Hook):
    """Every ``train.eval_every`` epochs (and after the last), the task's metrics on the selection
    split (never voted); tracks the best epoch by the task's score."""

    def after_epoch(self, trainer: Trainer) -> None:
        step, epochs = trainer.epoch + 1, trainer.cfg.train.epochs
        if step % trainer.cfg.train.eval_every and step != epochs:
            return
        m = evaluate(trainer.net, trainer.select_loader, trainer.task, trainer.device, trainer.bf16,
                     trainer.select_split)
        improved = trainer.task.score(m) > trainer.best_score
        if improved:
            trainer.best_score, trainer.best_epoch = trainer.task.score(m), trainer.epoch
        trainer.stats.update(select=m, improved=improved)


class Checkpoints(Hook):
    """``ckpt-last.pth`` after every epoch; ``ckpt-best.pth`` when the selection score improved."""

    def after_epoch(self, trainer: Trainer) -> None:
        state = trainer.state(trainer.epoch)
        if trainer.stats.get("improved"):
            trainer.save(BEST, state)
        trainer.save(LAST, state)


class EpochLog(Hook):
    """The epoch's log line and TensorBoard scalars."""

    def after_epoch(self, trainer: Trainer) -> None:
        step, train = trainer.epoch + 1, trainer.stats["train"]
        for key, value in train.items():
            trainer.writer.add(f"train/{key}", value, step)
        score = trainer.task.score_name
        line = (f"epoch {step}/{trainer.cfg.train.epochs}  loss {train['loss']:.4f}  {score} {train[score]:.2f}  "
                f"lr {train['lr']:.2e}")
        m = trainer.stats.get("select")
        if m is not None:
            split, scalars = trainer.select_split, trainer.task.scalars(m)
            for name, value in scalars.items():
                trainer.writer.add(f"{split}/{name}", value, step)
            line += (f"  | {split} " + " ".join(f"{name} {value:.2f}" for name, value in scalars.items())
                     + f"  (best {score} {trainer.best_score:.2f} @ epoch {trainer.best_epoch + 1}, protocol {trainer.protocol})")
        logger.info(line)
