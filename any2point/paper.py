"""The paper's reported numbers (Tables 1-10), read from their one home, ``cfgs/paper/paper_results.csv``.

One line per table, row, source and dataset: ``table,row,source,dataset,params_M,accuracy,setting``.
``row`` is the short row name (the config ``cfgs/paper/table<N>/<row>_<source>.yaml`` runs it, for
Tables 2-10), ``source`` the source of our configs (empty for the other methods of Table 1),
``params_M`` the paper's #P in millions where it gives one, ``accuracy`` its overall accuracy (%).

The run scripts, ``tools/collect_results.py --paper`` and the tables of docs/scripts_and_tables.md
all read the numbers from here (:func:`load_paper_results`, :func:`match_group`,
:func:`render_markdown`), so each is written once.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from any2point.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER_RESULTS = ROOT / "cfgs" / "paper" / "paper_results.csv"
FIELDS = ("table", "row", "source", "dataset", "params_M", "accuracy", "setting")
#: Tables 2-10 are on ScanObjectNN's hardest split; Table 1 also reports ModelNet40.
SCANOBJECTNN = "scanobjectnn_pb_t50_rs"
DATASETS = (SCANOBJECTNN, "modelnet40")
#: The two sources of the ablation tables (1D and 2D), in the paper's column order.
ABLATION_SOURCES = ("clip_text", "dinov2")
#: What each table compares (the paper's captions, shortened).
TITLES = {
    1: "comparison with other methods",
    2: "PEFT methods",
    3: "main components: virtual projection (V.P.) and guided adapter (G.A.)",
    4: "positional encoding of the 3D tokens",
    5: "components of the guided adapter",
    6: "more sources on ScanObjectNN",
    7: "adapter position and insertion depth",
    8: "virtual projection: kind and number of views",
    9: "local neighbourhood sizes: 1D line / 2D patch and 3D grid",
    10: "1D/2D-guided vs 3D-guided local aggregation",
}
_GROUP = re.compile(r"^(?:paper_)?table(?P<table>\d+)_(?P<rest>.+)$")


@dataclass(frozen=True)
class PaperResult:
    """One number the paper reports: ``accuracy`` (%) of ``row`` of ``table`` with ``source`` on ``dataset``."""

    table: int
    row: str
    source: str
    dataset: str
    params_m: Optional[float]
    accuracy: float
    setting: str

    @property
    def config(self) -> Optional[str]:
        """The config that runs this row (Tables 2-10), relative to the repository root."""
        if self.table in (1, 6):
            return None
        return f"cfgs/paper/table{self.table}/{self.row}_{self.source}.yaml"


def _number(value: str, what: str, optional: bool = False) -> Optional[float]:
    if optional and value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise UserError(f"{PAPER_RESULTS.name}: {what} must be a non-negative number, got '{value}'")
    return number


@lru_cache(maxsize=None)
def load_paper_results(path: Path = PAPER_RESULTS) -> tuple[PaperResult, ...]:
    """Every number of the data file, checked: known columns, numbers, one line per table, row,
    source and dataset."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != FIELDS:
                raise UserError(f"{path}: the columns must be {','.join(FIELDS)}, got {reader.fieldnames}")
            lines = list(reader)
    except OSError as e:
        raise UserError(f"{path}: cannot read the paper's numbers ({e})") from e
    results, seen = [], set()
    for n, line in enumerate(lines, start=2):
        where = f"line {n}"
        if not line["table"].isdigit() or not line["row"]:
            raise UserError(f"{path}: {where}: needs a table number and a row name")
        if line["dataset"] not in DATASETS:
            raise UserError(f"{path}: {where}: dataset must be one of {DATASETS}, got '{line['dataset']}'")
        result = PaperResult(int(line["table"]), line["row"], line["source"], line["dataset"],
                             _number(line["params_M"], f"{where} params_M", optional=True),
                             _number(line["accuracy"], f"{where} accuracy"), line["setting"])
        key = (result.table, result.row, result.source, result.dataset)
        if key in seen:
            raise UserError(f"{path}: {where}: table {key[0]} row '{key[1]}' ({key[2]}, {key[3]}) appears twice")
        seen.add(key)
        results.append(result)
    return tuple(results)


def table_results(table: int) -> list[PaperResult]:
    """The lines of one table, in the data file's order."""
    return [r for r in load_paper_results() if r.table == table]


def paper_result(table: int, row: str, source: str, dataset: str = SCANOBJECTNN) -> PaperResult:
    """The paper's line for ``row`` of ``table`` with ``source`` on ``dataset`` (a :class:`UserError` if
    the paper has no such number)."""
    for r in load_paper_results():
        if (r.table, r.row, r.source, r.dataset) == (table, row, source, dataset):
            return r
    raise UserError(f"the paper reports no number for table {table} row '{row}' with source '{source}' on {dataset}")


def match_group(label: str) -> Optional[PaperResult]:
    """The paper's number for a group of runs, from its name: ``table<N>_<row>_<source>`` (a run of
    ``scripts/table<N>.sh``, or ``paper_table<N>_...``, a config's own name) or ``<dataset>_<source>``
    (``scanobjectnn_clip_text``, ``modelnet40_dinov2``: Any2Point's row of Table 1 or 6). ``None``
    when the paper has no number for it."""
    match = _GROUP.match(label)
    if match:
        table = int(match["table"])
        for r in table_results(table):
            if f"{r.row}_{r.source}" == match["rest"]:
                return r
        return None
    for dataset in DATASETS:
        prefix = dataset.split("_")[0] + "_"
        if label.startswith(prefix):
            source = label[len(prefix):]
            for r in load_paper_results():
                if r.table in (1, 6) and r.row == f"any2point_{source}" and r.dataset == dataset:
                    return r
    return None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def render_markdown() -> str:
    """The tables of the paper's numbers (docs/scripts_and_tables.md): Any2Point's rows of Tables 1
    and 6 with the script that runs each, then Tables 2-10 row by row with the paper's #P and accuracy per source."""
    lines = ["| Table | source | dataset | paper #P (M) | paper OA | run it |", "|---|---|---|---:|---:|---|"]
    for r in load_paper_results():
        if r.table in (1, 6) and r.source:
            script = f"`bash scripts/{r.dataset.split('_')[0]}_{r.source}.sh`"
            if not (ROOT / "scripts" / f"{r.dataset.split('_')[0]}_{r.source}.sh").is_file():
                script = f"`cfgs/{r.dataset.split('_')[0]}/any2point_{r.source}.yaml`"
            lines.append(f"| {r.table} | {r.source} | {r.dataset} | {_fmt(r.params_m)} | {r.accuracy:.1f} | {script} |")
    tables = sorted({r.table for r in load_paper_results()} - {1, 6})
    for table in tables:
        results = table_results(table)
        lines += ["", f"**Table {table}**, {TITLES.get(table, '')}: `bash scripts/table{table}.sh`", "",
                  "| row | setting | paper #P (M) | CLIP text | DINOv2 |", "|---|---|---:|---:|---:|"]
        rows: dict[str, dict[str, PaperResult]] = {}
        for r in results:
            rows.setdefault(r.row, {})[r.source] = r
        for row, by_source in rows.items():
            first = next(iter(by_source.values()))
            cells = [f"{by_source[s].accuracy:.1f}" if s in by_source else "-" for s in ABLATION_SOURCES]
            lines.append(f"| `{row}` | {first.setting} | {_fmt(first.params_m)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
