"""YAML configs with ``_base_`` inheritance, dotted command-line overrides and validation.

A config file may name one or more base files (paths relative to the file) under ``_base_``; bases
merge in order, then the file itself on top. Overrides ``a.b=value`` replace existing keys; a new key
must be spelt ``+a.b=value``. Every key is checked when the config is loaded: the top-level sections
against :data:`SCHEMA`, and every mapping with a ``type:`` against the signature of the registered
class it names. Errors name the key and the file that set it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

import any2point.catalog  # noqa: F401  (fills every registry)
from any2point.errors import ConfigError, FieldError
from any2point.provenance import CLI, origin_of
from any2point.registry import (DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, NonNegativeInt, PositiveFloat, PositiveInt,
                                Range, Registry, Seed, check_kwargs, constructor_keys, slots_of)



class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` (no dot, as people write learning rates) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# Limits of one YAML document: the largest shipped config is about 2 kB and 150 nodes. Aliases
# (``*name``) share a node, so a 600-byte file can stand for 10^8 values (an "alias bomb") that
# merging and validation would copy one by one; the nodes are counted as the aliases expand them.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000


def _expanded_nodes(node: yaml.Node, where: str, memo: dict[int, int], active: set[int]) -> int:
    """Nodes under ``node`` with every alias expanded, counted without expanding (shared nodes are
    counted once per use from ``memo``); a node that contains itself is an error."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError(f"{where}: an alias refers to a node that contains it (a recursive YAML structure)")
    active.add(key)
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_nodes(child, where, memo, active)
        if total > MAX_YAML_NODES:
            break  # the caller reports it; counting further could take as long as expanding
    active.discard(key)
    memo[key] = total
    return total


def parse_yaml(text: str, where: str = "YAML text") -> Any:
    """Parse YAML text with :class:`_Loader`; a syntax error names ``where`` and the line. A text
    over :data:`MAX_YAML_BYTES`, or whose aliases expand to more than :data:`MAX_YAML_NODES` nodes,
    is refused before anything is built from it."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: more than {MAX_YAML_BYTES} characters of YAML; a config is far smaller")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, where, {}, set()) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (aliases "
                              f"'*name' repeat whole blocks); a config is far smaller")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {where}{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply to be a config") from None
    finally:
        loader.dispose()


@dataclass
class ExperimentConfig:
    """Where outputs go and how randomness is controlled. ``name`` (the run's folder under
    ``output_dir``) defaults to the config file's path under ``cfgs/``, folders joined by ``_``
    (``cfgs/paper/table2/lora_dinov2.yaml`` -> ``paper_table2_lora_dinov2``; a file elsewhere: its
    stem), unless a config file or an override sets it. ``seed`` drives every random stream of the
    run (see :mod:`any2point.engine.seeds`); ``<stream>_seed`` pins one stream on purpose."""

    name: str = "default"
    output_dir: str = "experiments"
    seed: Seed = 0
    init_seed: Optional[Seed] = None
    order_seed: Optional[Seed] = None
    augment_seed: Optional[Seed] = None
    dropout_seed: Optional[Seed] = None
    deterministic: bool = False


@dataclass
class TrainConfig:
    """Loop settings. ``protocol: honest`` selects the best epoch on a validation split held out
    from the training set; ``protocol: paper`` trains on the whole training set and selects on the
    test split, as the official code did."""

    epochs: PositiveInt = 300
    batch_size: PositiveInt = 32
    test_batch_size: Optional[PositiveInt] = None
    grad_clip: Optional[PositiveFloat] = 10.0
    num_workers: NonNegativeInt = 4
    protocol: str = "honest"
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on the CPU as well: faster steps on CPUs with AVX512-BF16 or AMX (2x the fp32
    # matmul rate), slower elsewhere; `auto` turns it on exactly on such CPUs. Results differ from
    # fp32 beyond rounding.
    cpu_amp: Union[bool, Literal["auto"]] = False
    eval_every: PositiveInt = 1
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    device: str = "auto"
    compile: bool = False  # torch.compile the model (opt-in; first steps pay the compilation)
    # CPU: keep freed memory in the heap for reuse within an epoch (faster steps; the heap
    # fragments, so the resident memory is higher); false leaves glibc's malloc as it is.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in ("honest", "paper"):
            raise FieldError("protocol", f"must be 'honest' or 'paper', got '{self.protocol}'")


@dataclass
class Config:
    """The top-level schema. ``model``, ``dataset``, ``optimizer`` and ``scheduler`` are ``type:``
    mappings checked against their registries."""

    model: Any = None
    dataset: Any = None
    optimizer: Any = field(default_factory=lambda: {"type": "AdamW", "lr": 5e-4, "weight_decay": 0.05})
    scheduler: Any = field(default_factory=lambda: {"type": "CosineWarmup"})
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)


SCHEMA = Config
REQUIRED = ("model", "dataset")
SECTION_REGISTRY: dict[str, Registry] = {"model": MODELS, "dataset": DATASETS, "optimizer": OPTIMIZERS,
                                          "scheduler": SCHEDULERS}




def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        if not tree and prefix:
            return [prefix]
        out = []
        for k, v in tree.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [prefix]


def _read_tree(path: Path, provenance: dict[str, str], stack: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` and its bases into one plain dict; record each leaf key's file in ``provenance``."""
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"circular _base_ chain: {' -> '.join(str(p) for p in stack + (path,))}")
    if not path.is_file():
        where = f" (named in _base_ of {stack[-1]})" if stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at top level")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create({})
    # A mapping with a new `type:` replaces the earlier mapping (of a previous base, or of the bases
    # under a file) instead of merging into it, so a config that swaps a component does not inherit
    # the old component's arguments.
    for base in bases:
        tree = _read_tree(path.parent / base, provenance, stack + (path,))
        _drop_retyped(merged, tree)
        merged = OmegaConf.merge(merged, tree)
    _drop_retyped(merged, data)
    merged = OmegaConf.merge(merged, data)
    for key in _leaves(data):
        provenance[key] = str(path)
    return OmegaConf.to_container(merged)


def _drop_retyped(base: DictConfig, child: dict) -> None:
    for key, value in child.items():
        if not isinstance(value, dict) or key not in base or not isinstance(base[key], DictConfig):
            continue
        if "type" in value and base[key].get("type") != value["type"]:
            del base[key]
        else:
            _drop_retyped(base[key], value)


def _apply_override(cfg: DictConfig, item: str, provenance: dict[str, str]) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, _, raw = item.partition("=")
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    value = parse_yaml(raw, f"the override '{item}'") if raw.strip() else None
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not add and (not isinstance(parent, DictConfig) or leaf not in parent):
        _check_new_key(cfg, key, parent_key, leaf)
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    for sub in _leaves(value, key) if isinstance(value, dict) else [key]:
        provenance[sub] = CLI


def _check_new_key(cfg: DictConfig, key: str, parent_key: str, leaf: str) -> None:
    """An override of a key the config does not hold is fine when it is an argument of the class
    that builds its mapping (``model.tuner.checkpoint=false``); else an error naming the allowed keys."""
    target = _target_at(cfg, parent_key) if parent_key else None
    if target is None:
        raise ConfigError(f"override of unknown key '{key}' from {CLI}; write '+{key}=...' to add a new key")
    allowed = constructor_keys(target)
    if leaf not in allowed:
        raise ConfigError(f"override of unknown key '{key}' from {CLI}: '{parent_key}' ({target.__name__}) takes "
                          f"{', '.join(allowed)}")


def _validate_dataclass(node: Any, schema: type, prefix: str, root: DictConfig) -> None:
    if not isinstance(node, DictConfig):
        raise ConfigError(f"'{prefix}' must be a mapping{_origin(root, prefix)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}.{key}'{_origin(root, f'{prefix}.{key}')}; "
                              f"allowed keys: {', '.join(fields)}")
    check_kwargs(schema, OmegaConf.to_container(node), f"section '{prefix}'", node, path=prefix)
    try:
        schema(**OmegaConf.to_container(node))
    except FieldError as e:
        key = f"{prefix}.{e.key}"
        raise ConfigError(f"{key} {e.problem}{_origin(root, key)}") from None


def _origin(root: DictConfig, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(root, parent) if parent else root
    origin = origin_of(node, leaf) if isinstance(node, DictConfig) else None
    return f" (set in {origin})" if origin else ""


def _typed_target(node: Any, path: str, registry: Registry) -> Any:
    """The class that the ``type:`` mapping ``node`` names in ``registry``; anything else is an error
    naming the key, the file that set it and the registered names of that kind."""
    if not isinstance(node, DictConfig) or "type" not in node:
        raise ConfigError(f"'{path}' must be a {registry.kind} mapping with a 'type' key; registered {registry.kind} "
                          f"types: {', '.join(registry.names())}")
    name = node["type"]
    if name not in registry:
        origin = origin_of(node, "type")
        raise ConfigError(f"unknown {registry.kind} type '{name}' at '{path}'{f' (set in {origin})' if origin else ''}; "
                          f"registered {registry.kind} types: {', '.join(registry.names())}")
    return registry.get(name)


def _validate_typed(node: Any, path: str, registry: Registry) -> None:
    """Check the ``type:`` mapping ``node`` against the signature of the class it names in
    ``registry``, then the mappings in that class's slots against theirs."""
    target = _typed_target(node, path, registry)
    kwargs = {k: v for k, v in node.items() if k != "type"}
    check_kwargs(target, kwargs, f"{registry.kind} '{node['type']}' at '{path}'", node,
                 injected=getattr(target, "injected_args", ()), path=path)
    for key, slot in slots_of(target).items():
        value = node.get(key)
        if value is None:
            continue
        if not slot.many:
            _validate_typed(value, f"{path}.{key}", slot.registry)
        elif isinstance(value, ListConfig):
            for i, item in enumerate(value):
                _validate_typed(item, f"{path}.{key}[{i}]", slot.registry)
        elif isinstance(value, DictConfig):
            for name, items in value.items():
                if items is None:
                    continue
                if not isinstance(items, ListConfig):
                    raise ConfigError(f"'{path}.{key}.{name}' must be a list of {slot.registry.kind} mappings"
                                      f"{_origin(node, f'{key}.{name}')}")
                for i, item in enumerate(items):
                    _validate_typed(item, f"{path}.{key}.{name}[{i}]", slot.registry)
        else:
            raise ConfigError(f"'{path}.{key}' must be a list or a mapping of lists of {slot.registry.kind} "
                              f"mappings{_origin(node, key)}")


def _target_at(cfg: DictConfig, path: str) -> Any:
    """The registered class that builds the ``type:`` mapping at ``path`` (e.g. ``model.tuner``),
    followed from its section through the slots of the classes above it; ``None`` where the path
    is not such a mapping (validation reports what is wrong there)."""
    section, *rest = path.split(".")
    registry = SECTION_REGISTRY.get(section)
    node = cfg.get(section) if registry is not None else None
    while True:
        if not isinstance(node, DictConfig) or node.get("type") not in registry:
            return None
        target = registry.get(node["type"])
        if not rest:
            break
        part = rest.pop(0)
        slot = slots_of(target).get(part)
        if slot is None or slot.many or part not in node:
            return None
        registry, node = slot.registry, node[part]
    return target


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on unknown keys, wrong types or missing required sections."""
    allowed = {f.name for f in dataclasses.fields(SCHEMA)}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"unknown top-level key '{key}'{_origin(cfg, str(key))}; allowed keys: "
                              f"{', '.join(sorted(allowed))}")
    for key in REQUIRED:
        if cfg.get(key) is None:
            raise ConfigError(f"missing required key '{key}'")
    _validate_dataclass(cfg.train, TrainConfig, "train", cfg)
    _validate_dataclass(cfg.experiment, ExperimentConfig, "experiment", cfg)
    for section, registry in SECTION_REGISTRY.items():
        node = cfg[section]
        if not isinstance(node, DictConfig) or "type" not in node:
            raise ConfigError(f"'{section}' needs a 'type' key{_origin(cfg, section)}; registered: "
                              f"{', '.join(registry.names())}")
        _validate_typed(node, section, registry)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` with its bases, apply ``overrides`` (``key=value``) and validate the result."""
    provenance: dict[str, str] = {}
    defaults = OmegaConf.structured(SCHEMA)
    tree = _read_tree(Path(path), provenance)
    cfg = OmegaConf.merge(OmegaConf.to_container(defaults), tree)
    _drop_retyped_defaults(cfg, tree)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg._metadata.provenance = provenance
    if "experiment.name" not in provenance:
        cfg.experiment.name = default_experiment_name(Path(path))
    for item in overrides:
        _apply_override(cfg, item, provenance)
    validate(cfg)
    return cfg


def default_experiment_name(path: Path) -> str:
    """The experiment name of a config file that sets none: its path under the nearest ``cfgs``
    folder above it, without the suffix, folders joined by ``_``; its stem outside such a folder."""
    path = path.resolve()
    parts = path.with_suffix("").parts
    if "cfgs" in parts[:-1]:
        start = len(parts) - 1 - parts[:-1][::-1].index("cfgs")
        return "_".join(parts[start:])
    return path.stem


def config_from_dict(data: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """A config stored as plain data (a checkpoint's), with ``overrides`` applied, validated."""
    provenance: dict[str, str] = {}
    cfg = OmegaConf.create(data)
    cfg._metadata.provenance = provenance
    for item in overrides:
        _apply_override(cfg, item, provenance)
    validate(cfg)
    return cfg


def _drop_retyped_defaults(cfg: DictConfig, tree: dict) -> None:
    """A file's ``optimizer``/``scheduler`` of another ``type`` replaces the default one whole."""
    defaults = Config()
    for section in ("optimizer", "scheduler"):
        given = tree.get(section)
        if isinstance(given, dict) and given.get("type", getattr(defaults, section)["type"]) != \
                getattr(defaults, section)["type"]:
            cfg[section] = given


HISTORY_PREFIX = "# history: "


def save_config(cfg: DictConfig, path: str | Path, history: Sequence[str] = ()) -> None:
    """Write the resolved config as YAML, after ``history`` lines as comments (a resumed run's
    config changes), so the file always describes the run and still loads as a config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"{HISTORY_PREFIX}{line}\n" for line in history)
    path.write_text(header + OmegaConf.to_yaml(cfg, resolve=True))


def read_history(path: str | Path) -> list[str]:
    """The history lines of a config written by :func:`save_config` (none if there is no file)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [line[len(HISTORY_PREFIX):] for line in path.read_text().splitlines() if line.startswith(HISTORY_PREFIX)]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two plain configs (lists compare whole)."""
    a, b = _flatten(old), _flatten(new)
    absent = "<absent>"
    return [f"{key}: {a.get(key, absent)} -> {b.get(key, absent)}" for key in sorted(a.keys() | b.keys())
            if a.get(key, absent) != b.get(key, absent)]
