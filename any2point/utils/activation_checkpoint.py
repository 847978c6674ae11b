"""Activation checkpointing that batch norms can live with.

:func:`checkpoint` runs a function without keeping its intermediate activations for backward
(``torch.utils.checkpoint``, non-reentrant) and runs it again in the backward pass. A batch norm in
training mode inside it would update its running statistics twice, once per run; while the second
run lasts :func:`is_recomputing` is true, and the norms that read it (the guided adapter's
:class:`~any2point.models.any2point.adapter.GroupedBatchNorm`) normalise with the same batch statistics but
leave their running statistics alone. Checkpoints may nest (a block inside which an adapter is
checkpointed): everything run inside an outer recomputation counts as recomputed.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint

_RECOMPUTING = contextvars.ContextVar("any2point_recomputing", default=False)


def is_recomputing() -> bool:
    """True while a checkpointed function runs a second time for the backward pass."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, keeping only its inputs for backward, which runs it again (RNG state restored)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """The bytes of the distinct storages autograd keeps for backward while ``fn()`` runs, those of
    ``exclude`` (e.g. the parameters, which stay anyway) left out; ``fn``'s result is dropped."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
