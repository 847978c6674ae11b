"""The package's shape: no import cycle, one registry per kind with every registered source and
tuner in the tests' tiny table, no guessing of tasks or source kinds in the classifier and the
engine, and a checkpoint written before the layout by method still loads with the same logits."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from any2point.config import config_from_dict
from any2point.engine import checkpoint
from any2point.engine.loading import load_model
from any2point.models import build_model
from any2point.models.sources.base import SourceTransformer
from any2point.models.tuners.base import Tuner
from any2point.registry import SOURCES, TUNERS, build_from_cfg
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "any2point"
OLD = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body, functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules (empty: none)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"any2point.config", "any2point.registry", "any2point.catalog"} <= set(graph)
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_classifier_and_the_engine_do_not_guess_tasks_or_source_kinds() -> None:
    pattern = re.compile(r"hasattr\(.*category_parts|modality_dim == 3")
    files = [PACKAGE / "models" / "any2point" / "classifier.py", *sorted((PACKAGE / "engine").rglob("*.py"))]
    hits = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_every_registered_source_and_tuner_is_in_the_tiny_table() -> None:
    assert {tiny.source(name)["type"] for name in tiny.SOURCE_NAMES} == set(SOURCES.names())
    assert {cfg["type"] for cfg in tiny.TUNERS.values()} == set(TUNERS.names())
    assert all(issubclass(TUNERS.get(name), Tuner) for name in TUNERS.names())


@pytest.mark.parametrize("name", tiny.SOURCE_NAMES)
def test_every_tiny_source_builds_as_a_source(name: str) -> None:
    torch.manual_seed(0)
    assert isinstance(build_from_cfg(tiny.source(name, width=32), SOURCES), SourceTransformer)


@pytest.mark.parametrize("run", ["any2point_clip_text", "point_peft_point_mae"])
def test_a_checkpoint_written_before_the_layout_by_method_gives_the_same_logits(run: str) -> None:
    expected = torch.load(OLD / "logits.pt", weights_only=True)
    load_model(OLD / f"{run}.pth")  # loads as any checkpoint does
    # The frozen source is at random init: the logits were taken with the model built first under seed 0.
    ckpt = checkpoint.load(OLD / f"{run}.pth")
    cfg = config_from_dict(ckpt["config"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    checkpoint.load_trainable_state_dict(model, ckpt["model"], run)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["points"]), expected[run], rtol=0, atol=1e-6)


def test_datasets_declare_registered_tasks_and_an_unknown_one_is_named() -> None:
    from any2point.datasets import DATASETS
    from any2point.engine.tasks import build_task
    from any2point.errors import ConfigError
    from any2point.registry import TASKS

    assert {DATASETS.get(name).task for name in DATASETS.names()} <= set(TASKS.names())

    class Odd:
        task = "depth_estimation"

    with pytest.raises(ConfigError, match=r"declares task 'depth_estimation'; registered tasks: classification, "
                                          r"part_segmentation"):
        build_task(Odd())
