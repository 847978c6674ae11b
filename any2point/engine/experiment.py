"""The experiment folder: one run owns it, and a run deletes nothing but what runs write there.

Ownership is an exclusive ``fcntl.flock`` on ``FOLDER/.lock`` holding the owner's PID. The operating
system releases it when the owner exits or dies, so a lock file left behind by a killed run is never
in the way. A forked child (a DataLoader worker) drops its copy of the lock at once, so a worker that
outlives a killed run does not keep the folder. A second run into the same folder fails at once,
naming the folder and the owner's PID.

The folder is ``experiment.output_dir/experiment.name``; the name must be a relative path that stays
below ``output_dir`` (no ``..``, not empty, not absolute), so a run never reaches other runs' folders.
``--overwrite`` deletes only what runs write (:data:`RUN_FILES`): a folder that holds anything else
is refused, untouched. A folder that holds only what a start which failed before its first
checkpoint leaves behind (:data:`LEFTOVERS`: a log, the config, empty TensorBoard logs) is reused by
a new run without ``--overwrite``: nothing computed is lost, and a corrected rerun just works.
"""
from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from omegaconf import DictConfig

from any2point.config import origin_of
from any2point.engine.checkpoint import TMP_SUFFIX, remove_stale_temporaries
from any2point.errors import ExperimentError, describe_os_error
from any2point.registry import ConfigError

LOCK_NAME = ".lock"
TENSORBOARD = "tb"
#: What a start that failed before its first checkpoint leaves (a new run may reuse such a folder).
LEFTOVERS = (LOCK_NAME, "log.txt", "config.yaml", TENSORBOARD)
#: Name patterns of everything a run writes into its folder: all ``--overwrite`` may delete
#: (``*.json``: the results of the final test and of ``--test``; ``.*.tmp``: killed checkpoint writes).
RUN_FILES = (*LEFTOVERS, "ckpt-last.pth", "ckpt-best.pth", "*.json", f".*{TMP_SUFFIX}")
#: What TensorBoard writes into ``tb/``.
TENSORBOARD_FILES = "events.out.tfevents.*"
#: Keys that say where a run is kept, not what it computes (a moved run folder resumes unchanged).
LOCATION_KEYS = ("experiment.name", "experiment.output_dir")

_held: set[int] = set()  # file descriptors of the locks this process holds


def _drop_locks_in_child() -> None:
    """In a forked child: let go of the inherited lock descriptors (without unlocking: the lock
    belongs to the parent), so the lock dies with the parent even if the child lives on. Each is
    replaced by ``/dev/null`` rather than closed, so the child's copy of the file object still closes
    its own descriptor, never a reused number."""
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _held:
        os.dup2(null, fd)
    os.close(null)
    _held.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def experiment_folder(experiment: DictConfig) -> Path:
    """``output_dir/name``; a name that is empty, absolute or climbs out with ``..`` is a
    :class:`ConfigError` naming where it was set (the folder would not be this run's own)."""
    name = str(experiment.name)
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        origin = origin_of(experiment, "name")
        raise ConfigError(f"experiment.name={name!r}{f' (set in {origin})' if origin else ''} must be a relative "
                          f"folder name below experiment.output_dir, not empty, absolute or containing '..' (the run "
                          f"would write into, or --overwrite empty, a folder that is not its own)")
    return Path(experiment.output_dir) / name


def without_location(config: dict) -> dict:
    """A plain config without :data:`LOCATION_KEYS` (for comparing what two runs compute)."""
    out = dict(config)
    out["experiment"] = {k: v for k, v in (config.get("experiment") or {}).items()
                         if f"experiment.{k}" not in LOCATION_KEYS}
    return out


class ExperimentLock:
    """An exclusive, non-blocking lock on a folder, held until :meth:`release` or process exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        """Take the lock (creating the folder); raise :class:`ExperimentError` if another process holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise ExperimentError(f"cannot create the experiment folder: {describe_os_error(e)}") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ExperimentError(f"experiment folder {self.folder} is in use by another run (PID {holder}); wait "
                                  f"for it to end, or choose another folder with experiment.name=...") from None
        _held.add(f.fileno())
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Give the lock up (idempotent); the lock file stays, harmless without a holder."""
        if self._file is not None:
            _held.discard(self._file.fileno())
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _written_by_runs(path: Path) -> bool:
    """True if ``path`` (an entry of an experiment folder) is something runs write: one of
    :data:`RUN_FILES`, and ``tb/`` only if it holds nothing but TensorBoard event files."""
    if not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_FILES):
        return False
    if path.name == TENSORBOARD:
        return (path.is_dir() and not path.is_symlink()
                and all(p.is_file() and fnmatch.fnmatchcase(p.name, TENSORBOARD_FILES) for p in path.iterdir()))
    return path.is_file() or path.is_symlink()


def _delete(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def claim(folder: Path, resume: bool, overwrite: bool, last: str) -> ExperimentLock:
    """Lock ``folder`` for this run and check that it may start there.

    A fresh run needs a folder without a run: one that holds ``last`` (its checkpoint) is refused
    with a pointer to ``--resume``; one that holds only :data:`LEFTOVERS` of a failed start is
    cleared and reused; one that holds anything else is refused. ``overwrite`` empties the folder
    first, but only if everything in it is something runs write (:data:`RUN_FILES`); otherwise it
    is refused and nothing is deleted. Temporary files of killed checkpoint writes are removed in
    every case.
    """
    lock = ExperimentLock(folder)
    lock.acquire()
    try:
        remove_stale_temporaries(folder)
        contents = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        foreign = [name for name in contents if not _written_by_runs(folder / name)]
        if overwrite and foreign:
            raise ExperimentError(f"--overwrite deletes only what runs write, and {folder} also holds "
                                  f"{', '.join(foreign)}: move that away, or choose another experiment.name")
        if overwrite:
            _delete(folder, contents)
        elif not resume and last in contents:
            raise ExperimentError(f"{folder} already holds a run ({last}); pass --resume to continue it, "
                                  f"--overwrite to discard it, or choose another folder with experiment.name=...")
        elif not resume and contents and not foreign and set(contents) <= set(LEFTOVERS):
            _delete(folder, contents)  # a start that failed before its first checkpoint: nothing to lose
        elif not resume and contents:
            raise ExperimentError(f"{folder} is not empty ({', '.join(contents)}) but holds no run to resume (no "
                                  f"{last}); pass --overwrite to empty it, or choose another experiment.name")
    except OSError as e:
        lock.release()
        raise ExperimentError(f"cannot prepare the experiment folder: {describe_os_error(e)}") from e
    except BaseException:
        lock.release()
        raise
    return lock
