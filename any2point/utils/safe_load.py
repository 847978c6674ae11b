"""The one reader of every file that is unpickled: checkpoints, source weight files, the authors'
released checkpoints and memory banks.

``torch.load`` with ``weights_only=True`` rebuilds only tensors, numbers, strings and plain
containers (plus the few globals a caller names, e.g. NumPy scalars in a released file); a file that
needs anything else could run code when unpickled, and is refused without anything in it running.
Every failure is a :class:`~any2point.errors.CheckpointError` naming the file and what it was
meant to be.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from any2point.errors import CheckpointError


def load_torch_file(path: str | Path, what: str, mmap: bool = False, allowed_globals: Sequence[Any] = ()) -> Any:
    """The object in the ``torch.save`` file ``path``, on the CPU, read weights-only.

    ``what`` names the file in errors ("checkpoint", "memory bank", ...); ``mmap`` maps a zip-format
    file instead of reading it whole (only the tensors used are read); ``allowed_globals`` are the
    extra classes the file may rebuild.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with warnings.catch_warnings(), (safe(list(allowed_globals)) if allowed_globals and safe is not None
                                         else contextlib.nullcontext()):
            # garbage may look like an unusual pickle protocol: the error below says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it calls '{unsafe.group(1)}' when unpickled, but a {what} holds only "
                f"tensors, numbers, strings, lists and dicts (this file could run code; nothing in it ran)") from None
        raise CheckpointError(f"{path} is not a readable {what} (corrupt or not a torch file)") from None
    except Exception as e:  # noqa: BLE001  (random bytes fail in many ways inside the unpickler)
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable {what} (truncated or corrupt: {first})") from None
