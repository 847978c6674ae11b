"""Registries, one per kind of buildable piece: every piece is named by ``type:`` in a config and
built by :func:`build_from_cfg` from the registry of its kind, so a config key's kind is always
known (``model.tuner`` is a tuner) and an unknown name is an error listing that kind's names.

The kinds: models (what ``model:`` builds: classifiers, segmenters, baselines), sources,
tokenizers, projections, tuners, datasets, transforms, optimizers, schedulers and tasks. A class
declares which of its arguments hold mappings of another kind in ``config_slots``
(:class:`Slot`); the config loader follows them.

A registered class's ``__init__`` signature is its config schema: keys that are not parameters are
rejected, required parameters must be present, and annotated ``int``/``float``/``bool``/``str``
parameters are type-checked, so a misspelt key fails at build time with the key's name.
"""
from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from any2point.errors import ConfigError
from any2point.provenance import origin_of


class Registry:
    """A name -> class (or factory function) table for one kind of buildable object."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, obj: Callable[..., Any] | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator."""

        def _add(target: Callable[..., Any]) -> Callable[..., Any]:
            key = name or target.__name__
            if key in self._items and self._items[key] is not target:
                raise KeyError(f"{self.kind} '{key}' is already registered by {self._items[key]!r}")
            self._items[key] = target
            return target

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} type '{name}'; registered {self.kind} types: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS = Registry("model")
SOURCES = Registry("source")
TOKENIZERS = Registry("tokenizer")
PROJECTIONS = Registry("projection")
TUNERS = Registry("tuner")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
TASKS = Registry("task")


@dataclass(frozen=True)
class Slot:
    """An argument that holds ``type:`` mappings of ``registry``: one (or ``None``), or with
    ``many`` a list of them or a mapping of such lists (e.g. a dataset's transforms per split)."""

    registry: Registry
    many: bool = False


def slots_of(target: Any) -> Mapping[str, Slot]:
    """The slots a registered class declares (``config_slots``; none by default)."""
    return getattr(target, "config_slots", {})


def constructor_keys(target: Callable[..., Any]) -> list[str]:
    """The config keys ``target`` takes: its named parameters, less those its builder injects."""
    injected = getattr(target, "injected_args", ())
    return [name for name, p in inspect.signature(target).parameters.items()
            if name != "self" and name not in injected and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _where(cfg: Any, key: str) -> str:
    """' (set in FILE)' for a key of a loaded config, where the loader recorded its file."""
    if not isinstance(cfg, DictConfig):
        return ""
    origin = origin_of(cfg, key)
    return f" (set in {origin})" if origin else ""


def _check_type(value: Any, annotation: Any) -> bool:
    """True when ``value`` fits a simple annotation; anything more complex is accepted."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if annotation in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _describe(annotation: Any) -> str:
    """An annotation as a reader writes it: ``float``, ``Optional[dict]``, ``Literal['a', 'b']``."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any], what: str,
                 cfg: Any = None, injected: tuple[str, ...] = ()) -> None:
    """Validate config keys against ``target``'s signature; raise :class:`ConfigError` naming the key."""
    sig = inspect.signature(target)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolved forward references: fall back to no type checks
        hints = {}
    for key, value in kwargs.items():
        if key not in params:
            allowed = ", ".join(k for k in params if k not in injected and k != "self")
            raise ConfigError(f"unknown key '{key}' for {what}{_where(cfg, key)}; allowed keys: {allowed}")
        annotation = hints.get(key, params[key].annotation)
        if not _check_type(_to_plain(value), annotation):
            raise ConfigError(
                f"wrong type for key '{key}' of {what}{_where(cfg, key)}: got {type(value).__name__} "
                f"{value!r}, expected {_describe(annotation)}")
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "self" or name in injected:
            continue
        if p.default is inspect.Parameter.empty and name not in kwargs:
            raise ConfigError(f"missing required key '{name}' for {what}")


def build_from_cfg(cfg: Mapping[str, Any] | DictConfig, registry: Registry, **default_args: Any) -> Any:
    """Build ``registry[cfg.type](**rest_of_cfg, **default_args)`` after validating the keys.

    ``default_args`` are supplied by the caller (e.g. ``split`` for datasets) and are not config keys.
    Nested values are passed as plain Python containers.
    """
    if cfg is None or "type" not in cfg:
        raise ConfigError(f"a {registry.kind} config needs a 'type' key; registered: {', '.join(registry.names())}")
    target = registry.get(cfg["type"])
    kwargs = {k: _to_plain(v) for k, v in cfg.items() if k != "type"}
    what = f"{registry.kind} '{cfg['type']}'"
    check_kwargs(target, kwargs, what, cfg, injected=tuple(default_args))
    return target(**kwargs, **default_args)
