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
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from any2point.datasets import build_dataset, build_transforms
from any2point.datasets.io import MESH_SUFFIXES, POINT_SUFFIXES, DataError, normalize_unit_sphere, read_shape_file
from any2point.datasets.transforms import FPSResample
from any2point.engine.evaluate import load_model, pick_device
from any2point.errors import UserError, run_cli
from any2point.registry import MAX_POINTS, MAX_SEED, ConfigError

SUFFIXES = POINT_SUFFIXES + MESH_SUFFIXES
DEFAULT_POINTS = 2048


def collect_files(paths: Sequence[str]) -> list[tuple[Path, Path]]:
    """The given files, and the supported files under the given folders (sorted), each with its
    name: its path under the folder given (a file given by itself: its file name). A path that
    does not exist is an error naming it."""
    files: list[tuple[Path, Path]] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: holds no shape files (supported: {', '.join(SUFFIXES)})")
            files += [(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            files.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def output_paths(files: Sequence[tuple[Path, Path]], out_dir: Path) -> list[Path]:
    """``<out_dir>/<name without suffix>.parts.txt`` for each file; two files that would write the
    same output are an error naming both (nothing is overwritten silently)."""
    targets: dict[Path, Path] = {}
    for path, name in files:
        target = out_dir / name.with_suffix(".parts.txt")
        if target in targets:
            raise UserError(f"{targets[target]} and {path} would both write {target}; give them different names "
                            f"or folders, or run them separately with other --out folders")
        targets[target] = path
    return list(targets)


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


@torch.no_grad()
def predict_parts(model: torch.nn.Module, points: torch.Tensor, label: int, parts: list[int]) -> torch.Tensor:
    """The part ``(N,)`` of each point of one cloud ``(N, 3)`` of category ``label``: the most likely
    of the category's ``parts``."""
    device = next(model.parameters()).device
    logits = model(points[None].to(device), torch.tensor([label], device=device)).float()[0].cpu()
    allowed = torch.tensor(parts)
    return allowed[logits[:, allowed].argmax(-1)]


def part_info(cfg: DictConfig, ckpt: dict[str, Any]) -> tuple[list[list[int]], list[str]]:
    """A segmentation checkpoint's categories' parts and part names (older checkpoints: those of the
    config's test split)."""
    if ckpt.get("category_parts") and ckpt.get("part_names"):
        return [list(p) for p in ckpt["category_parts"]], list(ckpt["part_names"])
    dataset = build_dataset(cfg.dataset, "test")
    return [list(p) for p in dataset.category_parts], list(dataset.part_names)


def run(ckpt: str, paths: Sequence[str], top_k: int = 5, num_points: Optional[int] = None, normalize: bool = True,
        seed: int = 0, device: Optional[str] = None, category: Optional[str] = None,
        out: str = "predictions") -> list[dict[str, Any]]:
    """One record per file: ``{"file", "predictions"}`` (classification), ``{"file", "category",
    "parts", "output"}`` (part segmentation) or ``{"file", "error"}``."""
    files = collect_files(paths)
    model, cfg, state = load_model(ckpt, device=pick_device(device, "--device") if device else None)
    names = class_names(cfg, state)
    segmentation = state.get("task", "classification") == "part_segmentation"
    if segmentation:
        if category is None:
            raise UserError(f"{ckpt} is a part-segmentation checkpoint: give the shapes' category with "
                            f"--category (one of {', '.join(names)})")
        if category not in names:
            raise UserError(f"--category '{category}' is not one of the checkpoint's categories: {', '.join(names)}")
        category_parts, part_names = part_info(cfg, state)
        label, targets = names.index(category), output_paths(files, Path(out))
    elif category is not None:
        raise UserError(f"--category is for part-segmentation checkpoints; {ckpt} is a classification one")
    prepare = Preparer(cfg, num_points, normalize, seed)
    records = []
    for index, (path, _) in enumerate(files):
        points = None
        try:
            points = prepare(path, index)
            if not segmentation:
                records.append({"file": str(path), "predictions": predict(model, points, names, top_k)})
                continue
            parts = predict_parts(model, points, label, category_parts[label])
            target = targets[index]
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(target, np.column_stack([points.numpy(), parts.numpy()]), fmt=["%.6f"] * 3 + ["%d"])
            counts = {part_names[p]: int((parts == p).sum()) for p in category_parts[label]}
            records.append({"file": str(path), "category": category, "parts": counts, "output": str(target)})
        except ValueError as e:  # DataError (unreadable file) or a cloud the model cannot take
            size = "" if points is None else f"its {len(points)} prepared points: "
            records.append({"file": str(path), "error": f"{size}{e}"})
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
        try:
            pick_device(args.device, "--device")
        except ConfigError as e:
            parser.error(str(e))
    return run_cli(lambda: report(args), debug=args.debug)


def report(args: argparse.Namespace) -> int:
    """Classify and print; 1 if a file could not be classified."""
    records = run(args.ckpt, args.paths, args.top_k, args.num_points, not args.no_normalize, args.seed, args.device,
                  args.category, args.out)
    failed = [r for r in records if "error" in r]
    if args.json:
        print(json.dumps({"checkpoint": args.ckpt, "results": records}, indent=2))
    else:
        for r in records:
            if "error" in r:
                continue
            if "parts" in r:
                counts = "  ".join(f"{name} {count}" for name, count in r["parts"].items())
                print(f"{r['file']}: {r['category']}: points per part: {counts} -> {r['output']}")
                continue
            best = "  ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in r["predictions"])
            print(f"{r['file']}: {best}")
    for r in failed:
        message = r["error"] if r["error"].startswith(r["file"]) else f"{r['file']}: {r['error']}"
        print(f"error: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
