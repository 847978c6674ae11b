"""Classify your own shape files with a trained checkpoint.

    python tools/predict.py --ckpt experiments/demo/ckpt-best.pth cloud.ply meshes/ [--top-k 5] [--json]

Files: point clouds ``.npy .npz .txt .xyz .pts`` and meshes ``.ply .obj .off .stl`` (sampled
uniformly on the surface); a folder is searched recursively for them. Each cloud is prepared as the
checkpoint's test data was: a mesh is sampled with the dataset's ``num_points`` points (2048 when the
dataset has no such key), a larger cloud is reduced to that many by furthest point sampling, the
cloud is centred and scaled into the unit sphere (``--no-normalize`` keeps it as it is), and the
dataset's test transforms are applied. Prints the top-k classes with their probabilities, or one
JSON object with ``--json``. A file that cannot be read is reported on its own line; the others are
still classified, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from any2point.datasets import build_dataset, build_transforms
from any2point.datasets.io import MESH_SUFFIXES, POINT_SUFFIXES, DataError, normalize_unit_sphere, read_shape_file
from any2point.datasets.transforms import FPSResample
from any2point.engine.evaluate import load_model
from any2point.errors import UserError, run_cli

SUFFIXES = POINT_SUFFIXES + MESH_SUFFIXES
DEFAULT_POINTS = 2048


def collect_files(paths: Sequence[str]) -> list[Path]:
    """The given files, and the supported files under the given folders (sorted); a path that does
    not exist is an error naming it."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: holds no shape files (supported: {', '.join(SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def class_names(cfg: DictConfig, ckpt: dict[str, Any]) -> list[str]:
    """The checkpoint's class names (older checkpoints: those of the config's test split)."""
    if ckpt.get("class_names"):
        return list(ckpt["class_names"])
    return list(build_dataset(cfg.dataset, "test").class_names)


class Preparer:
    """Turns a file into the model's input ``(N, 3)``, as the checkpoint's test data was prepared."""

    def __init__(self, cfg: DictConfig, num_points: Optional[int], normalize: bool, seed: int) -> None:
        dataset = cfg.dataset
        self.num_points = num_points or dataset.get("num_points") or DEFAULT_POINTS
        self.transform = build_transforms((dataset.get("transforms") or {}).get("test"))
        self.normalize = normalize
        self.seed = seed

    def __call__(self, path: Path, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        points = read_shape_file(path, self.num_points, rng)[:, :3].astype(np.float32)
        if len(points) > self.num_points:
            points = FPSResample(self.num_points)(points, rng)
        if self.normalize:
            points = normalize_unit_sphere(points.copy())
        points = self.transform(points, rng)
        return torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32))


@torch.no_grad()
def predict(model: torch.nn.Module, points: torch.Tensor, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes of one cloud ``(N, 3)`` with their softmax probabilities."""
    device = next(model.parameters()).device
    probs = model(points[None].to(device)).float().softmax(-1)[0].cpu()
    values, labels = probs.topk(min(top_k, len(names)))
    return [{"class": names[i], "label": int(i), "probability": round(float(p), 6)}
            for p, i in zip(values.tolist(), labels.tolist())]


def run(ckpt: str, paths: Sequence[str], top_k: int = 5, num_points: Optional[int] = None, normalize: bool = True,
        seed: int = 0, device: Optional[str] = None) -> list[dict[str, Any]]:
    """One record per file: ``{"file", "predictions"}`` or ``{"file", "error"}``."""
    files = collect_files(paths)
    model, cfg, state = load_model(ckpt, device=torch.device(device) if device else None)
    if state.get("task", "classification") != "classification":
        raise UserError(f"{ckpt} is a {state['task']} checkpoint; tools/predict.py classifies shapes (draw a "
                        f"test shape's predicted parts with tools/visualize.py --figures parts)")
    names = class_names(cfg, state)
    prepare = Preparer(cfg, num_points, normalize, seed)
    records = []
    for index, path in enumerate(files):
        try:
            records.append({"file": str(path), "predictions": predict(model, prepare(path, index), names, top_k)})
        except ValueError as e:  # DataError (unreadable file) or a cloud the model cannot take
            records.append({"file": str(path), "error": str(e)})
    return records


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
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    return run_cli(lambda: report(args), debug=args.debug)


def report(args: argparse.Namespace) -> int:
    """Classify and print; 1 if a file could not be classified."""
    records = run(args.ckpt, args.paths, args.top_k, args.num_points, not args.no_normalize, args.seed, args.device)
    failed = [r for r in records if "error" in r]
    if args.json:
        print(json.dumps({"checkpoint": args.ckpt, "results": records}, indent=2))
    else:
        for r in records:
            if "error" in r:
                continue
            best = "  ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in r["predictions"])
            print(f"{r['file']}: {best}")
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
