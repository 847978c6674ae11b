"""Turn many runs' results into one table: mean +- std over seeds, and the number of runs.

    python tools/collect_results.py experiments/scanobjectnn_* [--group-by model.source.type]
        [--paper] [--ref GROUP=OA ...] [--cost] [--csv table.csv] [--markdown table.md]
    python tools/collect_results.py --paper-tables

Each EXPERIMENT is an experiment folder holding a results file (``results.json``, or ``--file``),
a results file itself, or a folder searched recursively for results files. Runs are grouped by
their experiment name without a trailing ``_seed<N>`` (``-seed<N>``, ``.seed<N>``), or by
``--group-by`` keys (comma-separated; each a field of the results record such as ``voting.passes``
or ``protocol``, or a dotted config key such as ``model.source.type``). The table gives, per group,
the runs, their seeds, OA and mAcc (part segmentation: instance and class mIoU) as mean +- sample
standard deviation, the voting passes, and the number of distinct configurations pooled (ignoring
the experiment section); ``--ref GROUP=VALUE`` adds a reference for the first metric and the
difference to it. ``--paper`` takes each group's reference from the paper's numbers
(``cfgs/paper/paper_results.csv``, matched by the group's name: ``table<N>_<row>_<source>`` or
``<dataset>_<source>``, see :func:`any2point.paper.match_group`) and adds, per table touched, every row
and source the paper reports beside ours (mean ± std and n; "-" and 0 for a row not run) and the
difference. ``--cost`` adds each group's trainable parameters and mean run time (the records'
``parameters`` and ``run_seconds``). A cross-validation's folder (``main.py --folds K``) counts as
one run: its ``cv_results.json`` (the pooled OA and mAcc over every file), with a ``folds`` column
giving the OA's mean ± std over its folds (averaged over the group's runs). Prints markdown;
writes CSV and markdown files on request. ``--paper-tables`` prints the
paper's numbers with the commands that run them (the tables of docs/scripts_and_tables.md) and
nothing else.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from any2point.errors import UserError, run_cli
from any2point.paper import PaperResult, match_group, render_markdown, table_results

SEED_SUFFIX = re.compile(r"[-_.]seed\d+$")
MISSING = object()
CV_RESULTS = "cv_results.json"  # written by main.py --folds (any2point/engine/cross_validation.py)


def _without_fold_runs(files: list[Path]) -> list[Path]:
    """``files`` less the fold runs of the cross-validations among them (their summary stands for them)."""
    summaries = {f.parent for f in files if f.name == CV_RESULTS}
    return [f for f in files if f.name == CV_RESULTS or f.parent.parent not in summaries]


def find_results(paths: Sequence[str], name: str) -> list[Path]:
    """The results files named by ``paths`` (files, experiment folders, or folders above them)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif (path / name).is_file():
            found.append(path / name)
        elif (path / CV_RESULTS).is_file():
            found.append(path / CV_RESULTS)
        elif path.is_dir():
            hits = _without_fold_runs(sorted([*path.rglob(name), *path.rglob(CV_RESULTS)]))
            if not hits:
                raise FileNotFoundError(f"{path}: no {name} in it or below it (has the run been tested?)")
            found += hits
        else:
            raise FileNotFoundError(f"no such results file or experiment folder: {path}")
    return list(dict.fromkeys(found))


def load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable results file ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise UserError(f"{path}: not a results file (no 'metrics' mapping)")
    record["_path"] = str(path)
    return record


def lookup(record: dict[str, Any], key: str) -> Any:
    """A dotted key of the record, else of its config; ``MISSING`` if neither has it."""
    for tree in (record, record.get("config") or {}):
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = MISSING
                break
            node = node[part]
        if node is not MISSING:
            return node
    return MISSING


def group_label(record: dict[str, Any], keys: Sequence[str]) -> str:
    if not keys:
        name = record.get("experiment") or Path(record["_path"]).parent.name
        return SEED_SUFFIX.sub("", name)
    parts = []
    for key in keys:
        value = lookup(record, key)
        if value is MISSING:
            raise UserError(f"{record['_path']}: has no key '{key}' (in the record or its config)")
        parts.append(f"{key}={value}" if len(keys) > 1 else str(value))
    return ", ".join(parts)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float, std: Optional[float]) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


#: What a table of classification runs shows (the default of the functions below).
CLASSIFICATION_METRICS = ("OA", "mAcc")


def task_metrics(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The two metrics of the records' task; runs of different tasks do not share a table."""
    tasks = sorted({r.get("task") or "classification" for r in records})
    if len(tasks) > 1:
        raise UserError(f"the results mix tasks ({', '.join(tasks)}); tabulate each task's runs separately")
    import any2point.engine.tasks  # noqa: F401  (registers the tasks)
    from any2point.registry import TASKS

    if tasks[0] not in TASKS:
        raise UserError(f"{records[0]['_path']}: unknown task '{tasks[0]}' (known: {', '.join(TASKS.names())})")
    return TASKS.get(tasks[0]).table_metrics


def summarize(records: list[dict[str, Any]], keys: Sequence[str], references: dict[str, float],
              metrics: Sequence[str] = CLASSIFICATION_METRICS) -> list[dict[str, Any]]:
    """One row per group, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(group_label(r, keys), []).append(r)
    rows = []
    for label, runs in groups.items():
        seeds = [r.get("seed") for r in runs]
        if len(set(seeds)) < len(seeds):
            print(f"warning: group '{label}' holds several runs with the same seed: "
                  f"{', '.join(r['_path'] for r in runs)}", file=sys.stderr)
        row: dict[str, Any] = {"group": label, "runs": len(runs), "seeds": " ".join(str(s) for s in sorted(
            seeds, key=str)), "configs": len({r.get("group_hash") for r in runs}),
            "voting": " ".join(sorted({str((r.get("voting") or {}).get("passes", 1)) for r in runs}))}
        for metric in metrics:
            values = [float(r["metrics"][metric]) if r["metrics"].get(metric) is not None else math.nan
                      for r in runs]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
        folds = [r["cross_validation"] for r in runs if r.get("cross_validation")]
        row["folds"] = (f"{folds[0]['folds']}: {statistics.fmean(f['fold_OA_mean'] for f in folds):.2f} ± "
                        f"{statistics.fmean(f['fold_OA_std'] for f in folds):.2f}") if folds else None
        trainable = {(r.get("parameters") or {}).get("trainable") for r in runs} - {None}
        row["trainable"] = " / ".join(f"{t:,}" for t in sorted(trainable)) or None
        seconds = [r["run_seconds"] for r in runs if r.get("run_seconds") is not None]
        row["seconds"] = statistics.fmean(seconds) if seconds else None
        ref = references.get(label)
        row["reference"] = ref
        row["delta"] = row[f"{metrics[0]}_mean"] - ref if ref is not None else None
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], with_reference: bool,
             metrics: Sequence[str] = CLASSIFICATION_METRICS, cost: bool = False) -> str:
    with_folds = any(r.get("folds") for r in rows)
    head = ["group", "runs", "seeds", *metrics, *([f"folds: {metrics[0]} over folds"] if with_folds else []),
            *(["trainable", "time (s)"] if cost else []), "voting", "configs"]
    if with_reference:
        head += [f"reference {metrics[0]}", "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [r["group"], str(r["runs"]), r["seeds"], *(fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics)]
        if with_folds:
            cells.append(r.get("folds") or "-")
        if cost:
            cells += [r.get("trainable") or "-", "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"]
        cells += [r["voting"], str(r["configs"])]
        if with_reference:
            cells += ["-" if r["reference"] is None else f"{r['reference']:.2f}",
                      "-" if r["delta"] is None else f"{r['delta']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path, metrics: Sequence[str] = CLASSIFICATION_METRICS) -> None:
    fields = ["group", "runs", "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")), "folds", "trainable",
              "seconds", "voting", "configs", "reference", "delta"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else round(r[k], 4) if isinstance(r[k], float) else r[k])
                             for k in fields})


def parse_references(items: Sequence[str]) -> dict[str, float]:
    refs = {}
    for item in items:
        group, sep, value = item.rpartition("=")
        try:
            refs[group] = float(value)
        except ValueError:
            sep = ""
        if not sep or not group:
            raise UserError(f"--ref '{item}' is not of the form GROUP=NUMBER")
    return refs


def paper_side_by_side(rows: list[dict[str, Any]], metric: str) -> str:
    """Ours beside the paper's number, per row and source of every paper table a group belongs to
    (Tables 1 and 6: only the rows run)."""
    ours: dict[PaperResult, dict[str, Any]] = {}
    for r in rows:
        match = match_group(r["group"])
        if match is not None:
            ours[match] = r
    lines = [f"| table | row | source | ours {metric} | n | paper {metric} | Δ |", "|---|---|---|---|---:|---:|---:|"]
    for table in sorted({p.table for p in ours}):
        for p in table_results(table):
            if table in (1, 6) and p not in ours:
                continue
            run = ours.get(p)
            row = p.row if p.dataset.startswith("scanobjectnn") else f"{p.row} ({p.dataset})"
            mean = run[f"{metric}_mean"] if run else math.nan
            cells = [str(table), row, p.source, fmt(mean, run[f"{metric}_std"]) if run else "-",
                     str(run["runs"]) if run else "0", f"{p.accuracy:.1f}",
                     "-" if math.isnan(mean) else f"{mean - p.accuracy:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="*", help="experiment folders, results files, or folders above them")
    parser.add_argument("--group-by", default="", help="comma-separated record or config keys (default: the "
                                                       "experiment name without its _seed<N> suffix)")
    parser.add_argument("--file", default="results.json", help="results file name in each experiment folder")
    parser.add_argument("--ref", action="append", default=[], metavar="GROUP=VALUE",
                        help="a reference value of a group's first metric (OA, or instance mIoU)")
    parser.add_argument("--paper", action="store_true", help="references from the paper's numbers, and ours "
                                                             "beside them per row and source")
    parser.add_argument("--paper-tables", action="store_true", help="print the paper's tables with the commands "
                                                                    "that run them, and exit")
    parser.add_argument("--cost", action="store_true", help="add the trainable parameters and the mean run time")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    return run_cli(lambda: collect(args), debug=args.debug)


def collect(args: argparse.Namespace) -> None:
    """Read, group, print and write the table."""
    if args.paper_tables:
        print(render_markdown(), end="")
        return
    if not args.experiments:
        raise UserError("give the experiment folders or results files to tabulate (or --paper-tables)")
    refs = parse_references(args.ref)
    records = [load_record(p) for p in find_results(args.experiments, args.file)]
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()]
    metrics = task_metrics(records)
    rows = summarize(records, keys, refs, metrics)
    if args.paper:
        if metrics[0] != "OA":
            raise UserError("--paper compares overall accuracy; these runs are not classification runs")
        unmatched = []
        for row in rows:
            match = match_group(row["group"])
            if match is None:
                unmatched.append(row["group"])
            elif row["reference"] is None:
                row["reference"], row["delta"] = match.accuracy, row["OA_mean"] - match.accuracy
        if unmatched:
            print(f"warning: the paper has no number for: {', '.join(unmatched)}", file=sys.stderr)
    unknown = sorted(set(refs) - {r["group"] for r in rows})
    if unknown:
        print(f"warning: --ref names groups with no runs: {', '.join(unknown)}", file=sys.stderr)
    table = markdown(rows, bool(refs) or args.paper, metrics, args.cost)
    if args.paper:
        table += "\n" + paper_side_by_side(rows, metrics[0])
    print(table, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.csv:
        write_csv(rows, args.csv, metrics)


if __name__ == "__main__":
    sys.exit(main())
