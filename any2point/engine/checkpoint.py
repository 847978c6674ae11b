"""Checkpoints: safe loading, atomic writes, trainable-only model state, strict loading with a key report.

A checkpoint stores the model's *trainable* state (every parameter and buffer outside the frozen
source), so a 300M-parameter source is never copied into each file; the source is identified by
name and sha256 instead (docs/method.md, "Checkpoints"). A checkpoint holds only tensors, numbers,
strings, ``None`` and lists, tuples and dicts of them, and is read with ``weights_only=True``: a file
that needs anything else (an object whose unpickling could run code) is refused, never executed.
A module whose buffers are sized by the data (Point-NN's memory bank) lists them in
``resizable_buffers``; loading takes their shapes from the checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Optional

import torch
import torch.nn as nn

from any2point.errors import CheckpointError, ExperimentError, describe_os_error
from any2point.utils.safe_load import load_torch_file

TMP_SUFFIX = ".tmp"


def frozen_prefixes(model: nn.Module) -> list[str]:
    """Names of the outermost submodules whose parameters are all frozen (and which have some)."""
    out: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        params = list(module.parameters())
        if prefix and params and not any(p.requires_grad for p in params):
            out.append(prefix)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return out


def trainable_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a checkpoint holds: all but the frozen submodules' and the frozen parameters
    of the others (e.g. the weight of a source Linear whose bias is tuned); those come from the source
    file. Works on the ``meta`` device."""
    frozen = tuple(p + "." for p in frozen_prefixes(model))
    frozen_params = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return [k for k in model.state_dict() if not k.startswith(frozen) and k not in frozen_params]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of :func:`trainable_keys`, on the CPU."""
    state = model.state_dict()
    return {k: state[k].detach().cpu() for k in trainable_keys(model)}


def resize_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every buffer a module lists in ``resizable_buffers`` the shape it has in ``state``."""
    for prefix, module in model.named_modules():
        for name in getattr(module, "resizable_buffers", ()):
            key = f"{prefix}.{name}" if prefix else name
            current = module._buffers.get(name)
            if key in state and current is not None and current.shape != state[key].shape:
                module._buffers[name] = current.new_zeros(state[key].shape)


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a trainable state strictly; a mismatch raises :class:`CheckpointError` naming the keys."""
    resize_buffers(model, state)
    expected = set(trainable_state_dict(model))
    got = set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        msg = [f"checkpoint {where} does not match the model"]
        if missing:
            msg.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {', '.join(unexpected)}")
        raise CheckpointError("; ".join(msg))
    current = model.state_dict()
    bad = [k for k in sorted(expected) if current[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"checkpoint {where}: shape mismatch for "
                              + ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(current[k].shape)}"
                                          for k in bad))
    model.load_state_dict(state, strict=False)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` unless ``obj`` is tensors, numbers, strings, ``None`` and lists, tuples
    and dicts of them: exactly what ``torch.load(weights_only=True)`` reads back."""
    if obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a string or integer")
            check_plain(item, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
                        f"tensors, numbers, strings, lists and dicts")


class _KeepWriteError:
    """A binary file that keeps the error of a failed write: torch's zip writer replaces it with a
    ``RuntimeError`` ("enforce fail at inline_container.cc") that hides the cause (a full disk)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._file.flush()


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``; the
    temporary file is removed if the write fails (a full disk, a read-only folder), and the error
    names the cause and ``path`` (the previous file at ``path`` is intact)."""
    check_plain(obj)
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            out = _KeepWriteError(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ExperimentError(f"cannot write checkpoint: {describe_os_error(e, path)}") from e
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (``.NAME.*.tmp``) left in ``folder``."""
    stale = sorted(Path(folder).glob(f".*.pth.*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return stale


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or corrupt, or
    needs objects beyond tensors and plain containers (nothing in it is executed)."""
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not an any2point checkpoint (no 'model' entry)")
    if not isinstance(obj["model"], dict) or not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a mapping of names to tensors")
    if not isinstance(obj.get("config"), dict):
        raise CheckpointError(f"{path} is not an any2point checkpoint (no 'config' entry: the config it was "
                              f"trained with)")
    return obj
