"""Classify your own shape files with a trained checkpoint, or label their points with the parts of a
part-segmentation checkpoint.

    python tools/predict.py --ckpt experiments/demo/ckpt-best.pth cloud.ply meshes/ [--top-k 5] [--json]
    python tools/predict.py --ckpt experiments/demo_partseg/ckpt-best.pth mug.ply --category mug [--out parts/]

Files: point clouds ``.npy .npz .txt .xyz .pts`` and meshes ``.ply .obj .off .stl`` (sampled
uniformly on the surface); a folder is searched recursively for them. Each cloud is prepared as the
checkpoint's test data was: a mesh is sampled with the dataset's ``num_points`` points (2048 when the
dataset has no such key), a larger cloud is reduced to that many by furthest point sampling, the
cloud is centred and scaled into the unit sphere (``--no-normalize`` keeps it as it is), and the
dataset's test transforms are applied. Prints the top-k classes with their probabilities, or one
JSON object with ``--json``. With a part-segmentation checkpoint, ``--category`` names the shapes'
category (the model is conditioned on it), each point gets the most likely of that category's
parts, and ``<out>/<name>.parts.txt`` holds the prepared points, one ``x y z part`` line each (the
part's global index), where ``<name>`` is the file's path under the folder given without its suffix
(a file given by itself: its stem), so ``shapes/a/s0.npy`` and ``shapes/b/s0.npy`` write
``a/s0.parts.txt`` and ``b/s0.parts.txt``; two inputs that would still write the same output are an
error before anything is written. The printout gives the points per part. A file that cannot be
read or classified is reported on its own line naming it; the others are still classified, and the
exit status is 1. A bad flag is an error (exit status 2) before any file is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from any2point.errors import ConfigError, DataError, UserError, run_cli
from any2point.registry import MAX_POINTS, MAX_SEED

if TYPE_CHECKING:  # the model libraries load only once the flags are checked (a bad flag is instant)
    import torch
    from omegaconf import DictConfig

    from any2point.engine.tasks import Task

DEFAULT_POINTS = 2048


def collect_files(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """The given files, and the supported files under the given folders (sorted), each with its
    name: its path under the folder given (a file given by itself: its file name). A path that
    does not exist is an error naming it."""
    from any2point.datasets.io import MESH_SUFFIXES, POINT_SUFFIXES

    suffixes = POINT_SUFFIXES + MESH_SUFFIXES
    files: list[tuple[Path, Path]] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: holds no shape files (supported: {', '.join(suffixes)})")
            files += [(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            files.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


class Preparer:
    """Turns a file into the model's input ``(N, 3)``, as the checkpoint's test data was prepared."""

    def __init__(self, cfg: DictConfig, num_points: Optional[int], normalize: bool, seed: int) -> None:
        from any2point.datasets import build_transforms

        dataset = cfg.dataset
        self.num_points = num_points or dataset.get("num_points") or DEFAULT_POINTS
        self.transform = build_transforms((dataset.get("transforms") or {}).get("test"))
        self.normalize = normalize
        self.seed = seed

    def __call__(self, path: Path, index: int) -> torch.Tensor:
        import torch

        from any2point.datasets.io import normalize_unit_sphere, read_shape_file
        from any2point.datasets.transforms import FPSResample

        rng = np.random.default_rng([self.seed, index])
        points = read_shape_file(path, self.num_points, rng)[:, :3].astype(np.float32)
        if len(points) > self.num_points:
            points = FPSResample(self.num_points)(points, rng)
        if self.normalize:
            points = normalize_unit_sphere(points.copy())
        points = self.transform(points, rng)
        return torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32))


def run(ckpt: str, paths: Sequence[str], top_k: int = 5, num_points: Optional[int] = None, normalize: bool = True,
        seed: int = 0, device: Optional[str] = None, category: Optional[str] = None,
        out: str = "predictions") -> tuple[list[dict[str, Any]], Task]:
    """One record per file, as the checkpoint's task predicts (``{"file", "predictions"}`` for
    classification, ``{"file", "category", "parts", "output"}`` for part segmentation) or
    ``{"file", "error"}``; and the task."""
    from any2point.datasets import build_dataset
    from any2point.engine.loading import load_model
    from any2point.engine.runtime import pick_device
    from any2point.registry import TASKS

    files = collect_files(paths)
    model, cfg, state = load_model(ckpt, device=pick_device(device, "--device") if device else None)
    name = state.get("task", "classification")
    if name not in TASKS:
        raise UserError(f"{ckpt} was trained for task '{name}', which this version does not know "
                        f"(known: {', '.join(TASKS.names())})")
    task = TASKS.get(name).from_checkpoint(state, lambda: build_dataset(cfg.dataset, "test"))
    predict = task.predictor(files, top_k, category, Path(out))
    prepare = Preparer(cfg, num_points, normalize, seed)
    records = []
    for index, (path, _) in enumerate(files):
        points = None
        try:
            points = prepare(path, index)
            records.append({"file": str(path), **predict(model, points, index)})
        except ValueError as e:  # DataError (unreadable file) or a cloud the model cannot take
            size = "" if points is None else f"its {len(points)} prepared points: "
            records.append({"file": str(path), "error": f"{size}{e}"})
    return records, task


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint (its config says how to prepare the clouds)")
    parser.add_argument("paths", nargs="+", help="shape files or folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per file (default 5)")
    parser.add_argument("--num-points", type=int, help="points sampled on meshes / kept by FPS (default: the "
                                                       "dataset's num_points, else 2048)")
    parser.add_argument("--no-normalize", action="store_true", help="do not centre and scale into the unit sphere")
    parser.add_argument("--seed", type=int, default=0, help="seed of mesh sampling and random test transforms")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the checkpoint config's train.device)")
    parser.add_argument("--category", help="part segmentation: the shapes' category (the model is conditioned on it)")
    parser.add_argument("--out", default="predictions",
                        help="part segmentation: folder of the <name>.parts.txt outputs, named after each file's "
                             "path under the folder given (default predictions/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.num_points is not None and not 1 <= args.num_points <= MAX_POINTS:
        parser.error(f"--num-points must be in [1, {MAX_POINTS}], got {args.num_points}")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.device is not None:
        from any2point.engine.runtime import pick_device

        try:
            pick_device(args.device, "--device")
        except ConfigError as e:
            parser.error(str(e))
    return run_cli(lambda: report(args), debug=args.debug)


def report(args: argparse.Namespace) -> int:
    """Classify and print; 1 if a file could not be classified."""
    records, task = run(args.ckpt, args.paths, args.top_k, args.num_points, not args.no_normalize, args.seed,
                        args.device, args.category, args.out)
    failed = [r for r in records if "error" in r]
    if args.json:
        print(json.dumps({"checkpoint": args.ckpt, "results": records}, indent=2))
    else:
        for r in records:
            if "error" not in r:
                print(task.describe(r))
    for r in failed:
        message = r["error"] if r["error"].startswith(r["file"]) else f"{r['file']}: {r['error']}"
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
