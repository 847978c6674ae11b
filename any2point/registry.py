"""Registries: every buildable piece (model, dataset, transform, optimizer, scheduler) is named by
`type:` in a config and built by :func:`build_from_cfg`.

A registered class's ``__init__`` signature is its config schema: keys that are not parameters are
rejected, required parameters must be present, and annotated ``int``/``float``/``bool``/``str``
parameters are type-checked, so a misspelt key fails at build time with the key's name. A number is
also checked against the interval its annotation declares (``lr: PositiveFloat``, see :class:`Range`),
and a ``float`` must be finite: ``.nan`` or ``.inf`` never reaches an optimizer or a dataset.
"""
from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from any2point.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration is invalid: an unknown key, a wrong type, or a missing required value."""


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
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


@dataclass(frozen=True)
class Range:
    """The interval a numeric config value must lie in, declared on its parameter with ``Annotated``
    (``lr: Annotated[float, Range(gt=0)]``) and checked when the config is loaded, so the error names
    the key and the file that set it; ``None`` bounds are open."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def problem(self, value: float) -> Optional[str]:
        """What is wrong with ``value`` ("must be ..., got ..."), or ``None`` when it fits."""
        fits = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if fits:
            return None
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            want = f"in {low}, {high}"
        elif low:
            want = f"at least {self.ge}" if self.ge is not None else f"> {self.gt}"
        else:
            want = f"at most {self.le}" if self.le is not None else f"< {self.lt}"
        return f"must be {want}, got {value}"


#: Bounds used across the configs' signatures.
MAX_SEED = 2**32 - 1          # numpy's legacy seeding takes 32 bits; torch's generators take 64
MAX_POINTS = 1 << 20          # points per cloud: real scans and meshes are sampled to 1k-10k
MAX_ITEMS = 10_000_000        # items per generated split
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Seed = Annotated[int, Range(ge=0, le=MAX_SEED)]
NumPoints = Annotated[int, Range(ge=1, le=MAX_POINTS)]
NumItems = Annotated[int, Range(ge=0, le=MAX_ITEMS)]


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a ``Union`` / ``Optional`` annotation; any other annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def value_problem(value: Any, annotation: Any) -> Optional[str]:
    """What is wrong with a number of the right type: a ``float`` that is not finite, or a value
    outside a :class:`Range` of its annotation (also inside ``Optional[...]``, and each element of a
    ``Sequence[...]``); ``None`` if nothing."""
    if isinstance(value, (list, tuple)):
        element = next((typing.get_args(a)[0] for a in _members(annotation)
                        if typing.get_origin(a) in (list, tuple, collections.abc.Sequence) and typing.get_args(a)),
                       Any)
        problems = ((i, value_problem(v, element)) for i, v in enumerate(value))
        return next((f"[{i}] {p}" for i, p in problems if p), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for member in _members(annotation):
        if typing.get_origin(member) is Annotated:
            for bound in member.__metadata__:
                if isinstance(bound, Range) and (problem := bound.problem(value)):
                    return problem
    return None


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _where(cfg: Any, key: str) -> str:
    """' (set in FILE)' for a key of a loaded config, where the loader recorded its file."""
    if not isinstance(cfg, DictConfig):
        return ""
    from any2point.config import origin_of

    origin = origin_of(cfg, key)
    return f" (set in {origin})" if origin else ""


def _check_type(value: Any, annotation: Any) -> bool:
    """True when ``value`` fits a simple annotation; anything more complex is accepted."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _check_type(value, typing.get_args(annotation)[0])
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


def check_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any], what: str,
                 cfg: Any = None, injected: tuple[str, ...] = (), path: str = "") -> None:
    """Validate config keys against ``target``'s signature; raise :class:`ConfigError` naming the key
    (``path.key`` for an impossible value when the config path ``path`` is given)."""
    sig = inspect.signature(target)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except Exception:  # unresolved forward references: fall back to no type checks
        hints = {}
    for key, value in kwargs.items():
        if key not in params:
            allowed = ", ".join(k for k in params if k not in injected and k != "self")
            raise ConfigError(f"unknown key '{key}' for {what}{_where(cfg, key)}; allowed keys: {allowed}")
        annotation = hints.get(key, params[key].annotation)
        if not _check_type(_to_plain(value), annotation):
            expected = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
            raise ConfigError(
                f"wrong type for key '{key}' of {what}{_where(cfg, key)}: got {type(value).__name__} "
                f"{value!r}, expected {getattr(expected, '__name__', expected)}")
        problem = value_problem(_to_plain(value), annotation)
        if problem:
            name = f"{path}.{key}" if path else f"key '{key}' of {what}"
            space = "" if problem.startswith("[") else " "  # "betas[1] must be ..."
            raise ConfigError(f"{name}{space}{problem}{_where(cfg, key)}")
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
