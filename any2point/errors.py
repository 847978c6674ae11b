"""Errors a user can cause, and how command-line tools report them.

Every error class of the package is defined here. Every such error is a :class:`UserError` (or an operating-system error about a file: missing, not
writable, disk full). :func:`run_cli` turns one into a single ``error: ...`` line on stderr and exit
code 2; anything else is a bug and keeps its traceback. ``--debug`` or ``ANY2POINT_DEBUG=1`` keeps
the traceback of user errors too. This module imports nothing heavy, so ``--help`` stays fast.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable, Optional

USER_ERRNOS = {errno.ENOENT: "not found", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory",
               errno.EFBIG: "file too large (over the file size limit)"}
EXIT_USER_ERROR = 2
DEBUG_ENV = "ANY2POINT_DEBUG"


class UserError(Exception):
    """A problem the user can fix (a config, a file, a flag); its message names the cause."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model or the experiment."""


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or weight (a learning rate too high, bad inputs)."""


class ExperimentError(UserError):
    """The experiment folder is in use, holds another run, or cannot be written."""


class ConfigError(UserError, ValueError):
    """A configuration is invalid: an unknown key, a wrong type, or a missing required value."""


class FieldError(ConfigError):
    """An impossible value of one field of a config section (the section adds its name and file)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


class DataError(UserError, ValueError):
    """A dataset file is unreadable or holds invalid data; the message names the file."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message says where to get the dataset."""


class SourceUnavailableError(FileNotFoundError):
    """A source's pretrained weights are not on this machine, and nothing is downloaded at run time."""


def describe_os_error(exc: OSError, path: object = None) -> str:
    """One line for an OS error about a file: what happened and to which file."""
    what = USER_ERRNOS.get(exc.errno) or exc.strerror or type(exc).__name__
    target = path if path is not None else exc.filename
    return f"{what}: {target}" if target is not None else what


def _without_worker_traceback(exc: BaseException) -> str:
    """The message of ``exc``; for an error torch re-raised from a DataLoader worker, whose message
    is the worker's traceback ("Caught X in DataLoader worker process N. Original Traceback ..."),
    the original message at its end."""
    message = str(exc)
    if not re.match(r"Caught \w+ in DataLoader worker process \d+\.", message):
        return message
    raised = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", message, re.MULTILINE))
    return message[raised[-1].end():].strip() if raised else message


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user error; ``None`` for anything else (a bug)."""
    if isinstance(exc, UserError):
        return _without_worker_traceback(exc)
    if isinstance(exc, FileNotFoundError) and exc.errno is None:  # raised by any2point, with its own message
        return _without_worker_traceback(exc)
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        return describe_os_error(exc)
    return None


def debug_requested(flag: bool = False) -> bool:
    """True with ``--debug`` or when ``ANY2POINT_DEBUG`` is set to anything but empty or ``0``."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(command: Callable[[], Optional[int]], debug: bool = False) -> int:
    """Run ``command`` and return its exit code (``None``: 0); a user error prints
    ``error: <message>`` and returns 2 (no traceback)."""
    try:
        return command() or 0
    except Exception as exc:  # noqa: BLE001  (user errors are reported, everything else re-raised)
        message = user_message(exc)
        if message is None or debug_requested(debug):
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
