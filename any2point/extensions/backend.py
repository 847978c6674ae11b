"""Choice of the implementation behind the point ops.

Every op has a pure-PyTorch implementation that runs on any device and is the reference. One op
has optional faster backends, both returning exactly the torch path's indices, ties included (the
tests check it): ``furthest_point_sample`` can call

- on CPU, for inputs computed in float32, the ``fpsample`` package (``fpsample.fps_sampling``, its
  exact vanilla FPS; its approximate kd-tree/bucket variants are never used). It samples one cloud
  per call in single-threaded C++, while the torch path runs ~8 batched ops per pick: fpsample is
  faster when torch has one thread, and on small batches (B * N up to ~16k points) otherwise; with
  2+ threads the torch path is faster on large batches (32 x 1024 points: ~70 ms vs ~110 ms);
- on CUDA, for clouds of at most 8192 points, a Triton kernel (``_triton_fps``) that runs all picks
  in one launch instead of ~8 launches per pick.

Modes, chosen by the environment variable ``ANY2POINT_OPS_BACKEND`` or by :func:`set_backend`:

- ``auto`` (default): fpsample for CPU float32 FPS calls with ``B * N <= FPSAMPLE_MAX_POINTS`` (any
  size when torch runs on one thread) and
  the Triton kernel for CUDA FPS calls, each when its package is installed; the Triton kernel is
  first checked against the torch path once per device and dtype and dropped (with a warning) if it
  fails or disagrees;
- ``fpsample``: fpsample for every CPU float32 FPS call (ImportError if it is missing); torch elsewhere;
- ``triton``: the Triton kernel for every CUDA FPS call it can take, unchecked (ImportError if
  Triton is missing); torch elsewhere;
- ``torch``: pure torch everywhere.

The mode in force is logged once per choice on the ``any2point.extensions`` logger.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Optional

ENV_VAR = "ANY2POINT_OPS_BACKEND"
CHOICES = ("auto", "torch", "fpsample", "triton")
# Largest B * N for which ``auto`` sends a multi-threaded FPS call to fpsample (crossover on 2 cores).
FPSAMPLE_MAX_POINTS = 16384

logger = logging.getLogger("any2point.extensions")

_requested: Optional[str] = None
_resolved: Optional[str] = None


def _check_choice(name: object, source: str) -> str:
    value = name.strip().lower() if isinstance(name, str) else name
    if value not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}, got {name!r}")
    return value


@functools.lru_cache(maxsize=None)
def package_installed(package: str) -> bool:
    """Whether ``package`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(package) is not None


def set_backend(name: Optional[str]) -> None:
    """Override the mode for this process (``auto`` | ``torch`` | ``fpsample`` | ``triton``).

    ``None`` drops the override, so the next op reads ``ANY2POINT_OPS_BACKEND`` again. The new
    choice is resolved and logged at the next call of an op (or of :func:`get_backend`).
    """
    global _requested, _resolved
    _requested = None if name is None else _check_choice(name, "set_backend(name)")
    _resolved = None


def get_backend() -> str:
    """The mode in force: ``"auto"``, ``"torch"``, ``"fpsample"`` or ``"triton"`` (see the module docstring).

    Resolved on first use from :func:`set_backend` or ``ANY2POINT_OPS_BACKEND`` (default ``auto``,
    which becomes ``"torch"`` when neither fpsample nor Triton is installed) and logged once.
    Requesting ``fpsample`` or ``triton`` when that package is missing raises ``ImportError``.
    """
    global _resolved
    if _resolved is not None:
        return _resolved
    if _requested is not None:
        requested, source = _requested, "set_backend()"
    else:
        requested = _check_choice(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")
        source = ENV_VAR if ENV_VAR in os.environ else "default"
    if requested in ("fpsample", "triton") and not package_installed(requested):
        raise ImportError(
            f"point-ops backend {requested!r} was requested ({source}) but the {requested} package is not "
            f"installed: pip install {requested}, or use {ENV_VAR}=torch"
        )
    fpsample, triton = package_installed("fpsample"), package_installed("triton")
    resolved = "torch" if requested == "auto" and not (fpsample or triton) else requested
    plan = {
        "torch": "pure torch for every op",
        "fpsample": "fpsample for FPS on CPU float32 inputs",
        "triton": "the Triton kernel for FPS on CUDA (clouds of at most 8192 points)",
        "auto": ", ".join(
            part
            for part, present in (
                (f"fpsample for FPS on CPU float32 inputs with B * N <= {FPSAMPLE_MAX_POINTS} or 1 thread", fpsample),
                ("the self-checked Triton kernel for FPS on CUDA", triton),
            )
            if present
        ),
    }[resolved]
    suffix = "" if resolved == "torch" else ", pure torch for everything else"
    logger.info("point ops backend %r (requested %r via %s): %s%s", resolved, requested, source, plan, suffix)
    _resolved = resolved
    return resolved
