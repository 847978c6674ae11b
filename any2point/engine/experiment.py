"""The experiment folder: one run owns it, and a fresh run starts only in an empty one.

Ownership is an exclusive ``fcntl.flock`` on ``FOLDER/.lock`` holding the owner's PID. The operating
system releases it when the owner exits or dies, so a lock file left behind by a killed run is never
in the way. A second run into the same folder fails at once, naming the folder and the owner's PID.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO, Optional

from any2point.engine.checkpoint import remove_stale_temporaries
from any2point.errors import ExperimentError, describe_os_error

LOCK_NAME = ".lock"


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
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Give the lock up (idempotent); the lock file stays, harmless without a holder."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def claim(folder: Path, resume: bool, overwrite: bool, last: str) -> ExperimentLock:
    """Lock ``folder`` for this run and check that it may start there.

    A fresh run needs an empty folder: one that holds a run (``last``, its checkpoint) is refused
    with a pointer to ``--resume``; one that holds anything else (an earlier failed start) is refused
    too. ``overwrite`` empties the folder first. Temporary files of killed checkpoint writes are
    removed in every case.
    """
    lock = ExperimentLock(folder)
    lock.acquire()
    try:
        remove_stale_temporaries(folder)
        contents = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        if overwrite:
            for name in contents:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif not resume and last in contents:
            raise ExperimentError(f"{folder} already holds a run ({last}); pass --resume to continue it, "
                                  f"--overwrite to discard it, or choose another folder with experiment.name=...")
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
