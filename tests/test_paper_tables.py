"""The configs under cfgs/paper/ are the paper's Tables 2-10: one per row and source with a number in
cfgs/paper/paper_results.csv, each differing from the full Any2Point config of its source in exactly
what the paper's text says the row changes; the data file is read back checked, groups of runs find
their paper number, the table scripts run every row, the rows' new switches train, and
docs/scripts_and_tables.md shows the rendering of the data file."""
from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from any2point import build_model, load_config
from any2point.errors import UserError
from any2point.paper import load_paper_results, match_group, paper_result, render_markdown

ROOT = Path(__file__).resolve().parents[1]
ROWS = [r for r in load_paper_results() if r.config is not None]
#: The 3D grid (voxel) size of each source's full config, the paper's Table 9 default.
GRID = {"clip_text": 0.08, "dinov2": 0.16}


def expected_changes(table: int, row: str, source: str) -> dict[str, Any]:
    """What a row changes in its source's full Any2Point config, from the paper's text: dotted key ->
    new value (a mapping replaces the whole sub-tree, as a new ``type:`` does)."""
    if table == 2:
        return {"full_finetune": {"model.tuner": {"type": "FullFinetune"}},
                "prompt_tuning": {"model.tuner": {"type": "PromptTuning", "num_prompts": 13}},
                "adapter_tuning": {"model.tuner": {"type": "AdapterTuning", "bottleneck": 3}},
                "lora": {"model.tuner": {"type": "LoRA", "rank": 16, "alpha": 16.0, "targets": ["q", "v"]}},
                "any2point": {}}[row]
    if table == 3:  # row 1 trains the tokenizer and the head only: no PE, nothing in the blocks
        return {"neither": {"model.projection.pe": "none", "model.tuner": {"type": "FrozenSource"}},
                "vp_only": {"model.tuner": {"type": "FrozenSource"}},
                "ga_only": {"model.projection.pe": "none"}, "vp_ga": {}}[row]
    if table == 4:  # row 1: no positional encoding, the guided adapter kept
        return {"no_pe": {"model.projection.pe": "none"}, "sinusoidal": {"model.projection.pe": "sinusoidal"},
                "learnable": {"model.projection.pe": "learnable"}, "virtual_projection": {}}[row]
    if table == 5:
        return {"bottleneck_mlp": {"model.tuner.local_aggregation": False, "model.tuner.ensemble": False},
                "local_aggregation": {"model.tuner.ensemble": False}, "full": {}}[row]
    if table == 7:
        position, depth = row.split("_")
        changes: dict[str, Any] = {} if position == "after" else {"model.tuner.position": position}
        return changes | ({} if depth == "12" else {"model.tuner.insert_depth": int(depth)})
    if table == 8:
        kind, views = row.rsplit("_", 1)
        changes = {"model.projection.views": "pointclip_v2"} if kind == "proj2d_v2" else {}
        return changes | ({} if views == "6" else {"model.projection.num_views": int(views)})
    if table == 9:
        size, grid = re.fullmatch(r"(?:patch|line)(\d+)_grid([\d.]+)", row).groups()
        changes = {} if int(size) == {"clip_text": 2, "dinov2": 26}[source] else {"model.tuner.cell_size": int(size)}
        return changes | ({} if float(grid) == GRID[source] else {"model.tuner.voxel_size": float(grid)})
    if table == 10:  # 3D-guided: the cells are voxels of the source's 3D grid
        return {"model.tuner.guidance": "3d", "model.tuner.cell_size": GRID[source]} if "3d" in row else {}
    raise AssertionError(f"no rows known for table {table}")


@functools.lru_cache(maxsize=None)
def _loaded(path: str) -> dict[str, Any]:
    tree = OmegaConf.to_container(load_config(ROOT / path), resolve=True)
    tree.pop("experiment")
    return tree


def _plain(path: str) -> dict[str, Any]:
    """The config without its experiment section, as plain containers (a copy of a cached load)."""
    return copy.deepcopy(_loaded(path))


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def test_the_config_files_are_the_data_files_rows() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cfgs/paper").glob("*/*.yaml")}
    assert files == {r.config for r in ROWS}  # a missing or an extra row fails
    assert {r.table for r in ROWS} == {2, 3, 4, 5, 7, 8, 9, 10}
    assert len(ROWS) == 81


@pytest.mark.parametrize("result", ROWS, ids=lambda r: r.config.removeprefix("cfgs/paper/"))
def test_row_differs_from_the_reference_in_exactly_its_changes(result) -> None:
    text = (ROOT / result.config).read_text()
    assert text.startswith(f"# Paper Table {result.table} (") and f"row '{result.row}'" in text.splitlines()[0]
    assert "RECONSTRUCTION" not in text
    reference = _plain(f"cfgs/scanobjectnn/any2point_{result.source}.yaml")
    changes = expected_changes(result.table, result.row, result.source)
    expected = copy.deepcopy(reference)
    for key, value in changes.items():
        assert _get(reference, key) != value, f"{key} is already {value} in the reference"
        *parents, leaf = key.split(".")
        node = expected
        for part in parents:
            node = node[part]
        node[leaf] = value
    assert _plain(result.config) == expected
    name = load_config(ROOT / result.config).experiment.name
    assert name == f"paper_table{result.table}_{result.row}_{result.source}"


def test_each_table_has_one_reference_row_per_source() -> None:
    """The full config is a row of every table, with the accuracy of Table 1 (the paper repeats it there)."""
    for table in {r.table for r in ROWS}:
        for source in {r.source for r in ROWS if r.table == table}:
            unchanged = [r for r in ROWS if (r.table, r.source) == (table, source)
                         and not expected_changes(r.table, r.row, r.source)]
            assert len(unchanged) == 1, (table, source)
            assert unchanged[0].accuracy == paper_result(1, f"any2point_{source}", source).accuracy


def test_paper_defaults_of_table9_are_the_full_configs() -> None:
    """The paper's defaults: 1D lines of 2 rows and 2D patches of 26 px; the 3D grid of the reference
    rows (0.08 for CLIP text, 0.16 for DINOv2) is what the scanobjectnn configs use."""
    for source, cell in (("clip_text", 2), ("dinov2", 26)):
        tuner = _plain(f"cfgs/scanobjectnn/any2point_{source}.yaml")["model"]["tuner"]
        assert (tuner["cell_size"], tuner["voxel_size"]) == (cell, GRID[source])


def test_groups_of_runs_find_their_paper_number() -> None:
    assert match_group("table7_before_3_clip_text") == paper_result(7, "before_3", "clip_text")
    assert match_group("paper_table9_patch26_grid0.16_dinov2") == paper_result(9, "patch26_grid0.16", "dinov2")
    assert match_group("modelnet40_clip_text") == paper_result(1, "any2point_clip_text", "clip_text", "modelnet40")
    assert match_group("scanobjectnn_roberta").table == 6
    assert match_group("table8_proj1d_4_dinov2") is None  # the paper has no DINOv2 number there
    assert match_group("my_run") is None


def test_a_bad_data_file_is_a_clear_error(tmp_path: Path) -> None:
    good = (ROOT / "cfgs/paper/paper_results.csv").read_text().splitlines()
    for lines, message in ((good + [good[-1]], "appears twice"),
                           ([good[0], good[1].replace(",64.9,", ",n/a,")], "accuracy must be"),
                           ([good[0].replace("accuracy", "oa")], "columns must be")):
        path = tmp_path / "p.csv"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(UserError, match=message):
            load_paper_results.__wrapped__(path)


def test_the_docs_show_the_rendering_of_the_data_file() -> None:
    page = (ROOT / "docs/scripts_and_tables.md").read_text()
    start, end = "<!-- paper tables: python tools/collect_results.py --paper-tables -->\n", "<!-- end paper tables -->"
    assert start in page and end in page
    assert page.split(start, 1)[1].split(end, 1)[0] == render_markdown()


@pytest.mark.parametrize("table", sorted({r.table for r in ROWS}))
def test_table_script_runs_every_row_over_the_seeds_then_the_paper_table(table: int) -> None:
    proc = subprocess.run(["bash", str(ROOT / f"scripts/table{table}.sh"), "--dry-run"], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, "SEEDS": "3 4", "OUT": "exp"})
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    trained = sorted(c[c.index("--config") + 1] for c in commands if "main.py" in c)
    assert trained == sorted(2 * [r.config for r in ROWS if r.table == table])
    assert commands[-1][1] == "tools/collect_results.py" and "--paper" in commands[-1]


TINY = {"clip_text": ["+model.source.width=48", "+model.source.depth=4", "+model.source.heads=4"],
        "dinov2": ["+model.source.embed_dim=64", "+model.source.depth=4", "+model.source.num_heads=4",
                   "model.source.img_size=56"]}


@pytest.mark.parametrize("config", ["table5/bottleneck_mlp_dinov2", "table8/proj2d_v1_8_dinov2",
                                    "table10/guided3d_1d_clip_text"])
def test_rows_with_new_switches_train_on_tiny_sources(config: str) -> None:
    source = "dinov2" if config.endswith("dinov2") else "clip_text"
    cfg = load_config(ROOT / f"cfgs/paper/{config}.yaml",
                      ["model.source.pretrained=null", "model.tokenizer.k=16", *TINY[source]])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    model(torch.randn(2, 128, 3)).logsumexp(dim=-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
