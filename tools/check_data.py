"""Report what a config's dataset finds on disk: for each split the number of samples, the samples
per class and the points per cloud, then what is missing or invalid. Exit status 1 when a split
cannot be read. The FPS cache is switched off, so the point counts are those of the stored clouds.

    python tools/check_data.py --config cfgs/scanobjectnn/any2point_clip_text.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Optional

from any2point.errors import run_cli

if TYPE_CHECKING:
    from any2point.datasets import PointDataset


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML config")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. dataset.root=/data/ScanObjectNN")
    return p.parse_args(argv)


def report(found: dict[str, PointDataset], problems: dict[str, str]) -> str:
    """The text report: a table of splits, a table of per-class counts, the problems (each message
once, after the splits it concerns)."""
    lines = []
    if found:
        lines.append(f"{'split':<10}{'samples':>9}  points per cloud")
        for split, ds in found.items():
            sizes = [len(ds.get_raw(i)[0]) for i in range(len(ds))]
            span = "-" if not sizes else f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
            lines.append(f"{split:<10}{len(ds):>9}  {span}")
        names = next(iter(found.values())).class_names
        counts = {split: [int((ds.labels() == c).sum()) for c in range(len(names))] for split, ds in found.items()}
        width = max(len("class"), *(len(n) for n in names)) + 2
        lines += ["", f"{'class':<{width}}" + "".join(f"{s:>10}" for s in found)]
        for c, name in enumerate(names):
            lines.append(f"{name:<{width}}" + "".join(f"{counts[s][c]:>10}" for s in found))
    if problems:
        splits_of: dict[str, list[str]] = {}
        for split, message in problems.items():
            splits_of.setdefault(message, []).append(split)
        lines += ["", "missing or invalid:"] + [f"  {', '.join(s)}: {m}" for m, s in splits_of.items()]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    """Print the report of ``args.config``'s dataset; 1 when a split cannot be read."""
    from omegaconf import OmegaConf

    from any2point.config import load_config
    from any2point.datasets import SPLITS, build_dataset
    from any2point.errors import DataError

    cfg = load_config(args.config, args.overrides)
    dataset_cfg = OmegaConf.to_container(cfg.dataset)
    if "fps_cache" in dataset_cfg:
        dataset_cfg["fps_cache"] = False
    print(f"dataset: {dataset_cfg['type']}" + (f" (root: {dataset_cfg['root']})" if "root" in dataset_cfg else ""))
    found, problems = {}, {}
    for split in SPLITS:
        try:
            found[split] = build_dataset(dataset_cfg, split)
        except (FileNotFoundError, DataError) as e:
            problems[split] = str(e)
    print(report(found, problems))
    return 1 if problems else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: check(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
