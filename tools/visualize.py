"""Figures of a trained model, as PNG files (matplotlib).

    python tools/visualize.py --ckpt experiments/demo/ckpt-best.pth [--figures all] [--out DIR]
        [--sample 0 | --file cloud.ply] [--layer -1] [--point 0]
    python tools/visualize.py --exp experiments/demo --figures curves
    python tools/visualize.py --compare "Complete=A/ckpt-best.pth" "Max-mean pool.=B/ckpt-best.pth" \
        "3D-guided L.A.=C.yaml" --out DIR                     # paper Fig. 6, models side by side

Figures (``--figures``, comma-separated, default ``all``):

- ``confusion``: the test confusion matrix (row-normalised) and ``per_class``: per-class accuracy
  bars (part segmentation: per-category mIoU), from the experiment's ``results.json`` when it has
  one (``--results``), else from a test pass;
- ``parts`` (part segmentation): the true and the predicted parts of one cloud, side by side;
- ``curves``: training loss, accuracy (or mIoU), selection-split score and learning rate over epochs, from the
  experiment's TensorBoard scalars (or its ``log.txt``);
- ``attention`` (paper Fig. 5): the attention of the [CLS] token to the point tokens in one block of
  the source (``--layer``, default the last; heads averaged), each point coloured by its token's;
- ``clusters`` (paper Fig. 6): the cosine similarity between the final [CLS] feature and each point
  token's, clustered into 3 groups by k-means;
- ``pe`` (paper Fig. 7): the cosine similarity of one point's (``--point``) virtual-projection
  positional embedding to every other point's, per view (line or 2D view) and averaged over views.

``--compare LABEL=PATH ...`` draws paper Fig. 6 as the paper does, for two or more models side by
side (``clusters_compare.png``): per model its ``clusters`` (top row) and the similarity they cluster
(bottom row), on the same cloud. Each ``PATH`` is a checkpoint (the trained model) or a YAML config (the
model as its training would start, built with the config's init seed), so the comparison does not
depend on which config switches made the variants (the paper's: the complete adapter, max-mean
pooling instead of the adaptive ensemble, local aggregation guided by 3D positions only).

The attention is read through forward hooks on the source block's attention module, the features
through the model's ``encode`` and the PE through the projection's public geometry, so no model
code changes to draw them. One cloud is
drawn: test item ``--sample`` of the checkpoint's dataset, or ``--file`` prepared as
``tools/predict.py`` prepares it.
"""
from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import any2point.engine.tasks  # noqa: E402,F401  (registers the tasks)
from any2point.errors import UserError, run_cli  # noqa: E402
from any2point.registry import TASKS  # noqa: E402

FIGURES = ("confusion", "per_class", "curves", "attention", "clusters", "pe", "parts")
COMPARE_FILE = "clusters_compare.png"
CONFIG_SUFFIXES = (".yaml", ".yml")  # a --compare entry with one of these is a config, else a checkpoint
MODEL_FIGURES = ("attention", "clusters", "pe")


# ------------------------------------------------------------------------------------ hooks on the model
class _AttentionRecorder(TorchFunctionMode):
    """Records attention probabilities ``(B, H, T, S)`` of the scaled-dot-product-attention calls
    and the 4-D softmaxes (eager attention) made while it is active."""

    def __init__(self, maps: list[Tensor]) -> None:
        super().__init__()
        self.maps = maps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.maps.append(_sdpa_probs(*args, **kwargs))
        elif func in (torch.softmax, F.softmax, Tensor.softmax) and out.ndim == 4:
            self.maps.append(out.detach().float())
        return out


def _sdpa_probs(query: Tensor, key: Tensor, value: Tensor = None, attn_mask: Optional[Tensor] = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                **_: Any) -> Tensor:
    """The probabilities ``softmax(q k^T * scale + mask)`` an SDPA call weighs its values with."""
    q, k = query.detach().float(), key.detach().float()
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else logits + attn_mask.float())
    return logits.softmax(-1)


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """A block's self-attention: its ``nn.MultiheadAttention``, else every module whose class name
    contains ``Attention`` (timm, Hugging Face, ImageBind; a source may call an inner one directly)."""
    for module in block.modules():
        if isinstance(module, nn.MultiheadAttention):
            return [module]
    found = [m for m in block.modules() if m is not block and "attention" in type(m).__name__.lower()]
    if not found:
        raise UserError(f"{type(block).__name__} has no attention module to read the attention of")
    return found


@contextmanager
def record_attention(block: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the context, every call of ``block``'s attention appends its probabilities
    ``(B, H, T, S)`` to the yielded list (forward hooks on the attention modules)."""
    modules = attention_modules(block)
    maps: list[Tensor] = []
    handles = []
    if isinstance(modules[0], nn.MultiheadAttention):
        busy = [False]

        def again_with_weights(mod, args, kwargs, output):
            if busy[0]:
                return
            busy[0] = True
            try:
                weights = mod(*args, **{**kwargs, "need_weights": True, "average_attn_weights": False})[1]
            finally:
                busy[0] = False
            maps.append(weights.detach().float())

        handles.append(modules[0].register_forward_hook(again_with_weights, with_kwargs=True))
    else:
        recorder = _AttentionRecorder(maps)
        depth = [0]  # nested attention modules (an outer one calling an inner one) record once

        def start(*_: Any) -> None:
            depth[0] += 1
            if depth[0] == 1:
                recorder.__enter__()

        def stop(*_: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0:
                recorder.__exit__(None, None, None)

        for module in modules:
            handles.append(module.register_forward_pre_hook(start))
            handles.append(module.register_forward_hook(stop))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def cls_attention(model: nn.Module, points: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
    """Token centres ``(G, 3)`` and the [CLS] token's attention to each point token ``(G,)``
    (heads averaged) in source block ``layer``, for one cloud ``(N, 3)``. The [CLS] token is the
    first of the sequence and the point tokens its last ``G`` (prompt tokens, if any, in between)."""
    with record_attention(model.source.blocks[layer]) as maps:
        centres = model.encode(points[None]).centres[0]
    if not maps:
        raise UserError(f"block {layer} of the source made no attention call that could be recorded")
    probs = maps[0].mean(1)[0]  # (T, S): queries, keys (S > T with learned bias keys after the tokens)
    tokens, num_points = probs.shape[0], len(centres)
    if tokens < 1 + num_points:
        raise UserError(f"block {layer} attends over {tokens} tokens, fewer than [CLS] + {num_points} point tokens")
    return centres, probs[0, tokens - num_points:tokens]


@torch.no_grad()
def cls_similarity(model: nn.Module, points: Tensor) -> tuple[Tensor, Tensor]:
    """Token centres ``(G, 3)`` and the cosine similarity of each point token's final (normed)
    feature to the [CLS] token's ``(G,)``, for one cloud ``(N, 3)``."""
    encoded = model.encode(points[None])
    return encoded.centres[0], F.cosine_similarity(encoded.tokens[0].float(), encoded.cls[0:1].float(), dim=-1)


def kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means on scalars, started at the quantiles (deterministic). Labels ``0..k-1`` are
    ordered by cluster centre, 0 the lowest."""
    values = np.asarray(values, dtype=np.float64)
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        labels = np.abs(values[:, None] - centres[None]).argmin(1)
        new = np.array([values[labels == j].mean() if (labels == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    return np.argsort(order)[np.abs(values[:, None] - centres[None]).argmin(1)]


@torch.no_grad()
def pe_similarity(model: nn.Module, points: Tensor, index: int) -> tuple[Tensor, Tensor]:
    """Cosine similarity of point ``index``'s virtual-projection PE to every point's: per view
    ``(M, N)`` and of the view-averaged PE ``(N,)``, for one cloud ``(N, 3)``."""
    from any2point.models.any2point.projection import normalize_to_unit_sphere, sample_table_1d, sample_table_2d

    source, projection = model.source, model.projection
    if projection is None:
        raise UserError(f"the PE figure shows the virtual projection; source '{source.name}' is 3D-pretrained "
                        f"and has none")
    if source.position_table is None:
        raise UserError(f"the PE figure samples a position table; source '{source.name}' is rotary and has none "
                        f"(its positions are rotations); leave it out of --figures (e.g. --figures attention,clusters)")
    unit = normalize_to_unit_sphere(points[None].float())
    if source.modality_dim == 1:
        per_view = sample_table_1d(source.pos_embed_1d.float(), projection.positions(unit, "1d"))[0]
    else:
        pixels = projection.positions(unit, "2d")
        per_view = sample_table_2d(source.pos_embed_2d.float(), pixels, projection.plane_size)[0]
    views = F.cosine_similarity(per_view, per_view[:, index:index + 1], dim=-1)
    mean = per_view.mean(0)
    return views, F.cosine_similarity(mean, mean[index:index + 1], dim=-1)


def nearest_token(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The index of each point's nearest token centre."""
    return ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)


# ------------------------------------------------------------------------------------------------ plots
def _cloud_axes(fig: plt.Figure, rows: int, cols: int, index: int, points: np.ndarray, values: np.ndarray,
                title: str, cmap: str, marker: Optional[int] = None, vmin: Optional[float] = None,
                vmax: Optional[float] = None) -> None:
    ax = fig.add_subplot(rows, cols, index, projection="3d")
    art = ax.scatter(points[:, 0], points[:, 2], points[:, 1], c=values, cmap=cmap, s=6, depthshade=False,
                     vmin=vmin, vmax=vmax)
    if marker is not None:
        p = points[marker]
        ax.scatter([p[0]], [p[2]], [p[1]], c="black", marker="*", s=120)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.colorbar(art, ax=ax, shrink=0.6)


def plot_cloud(points: np.ndarray, values: np.ndarray, path: Path, title: str, cmap: str = "viridis") -> Path:
    fig = plt.figure(figsize=(5, 4.5))
    _cloud_axes(fig, 1, 1, 1, points, values, title, cmap)
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> Path:
    cm = np.asarray(confusion, dtype=np.float64)
    rates = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i, j in np.ndindex(*cm.shape):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 50 else "black")
    fig.colorbar(image, ax=ax, label="% of the true class")
    ax.set_title("confusion matrix (test)")
    return _save(fig, path)


def plot_per_class(per_class: dict[str, Optional[float]], path: Path,
                   words: tuple[str, str, str] = ("accuracy", "mAcc", "class")) -> Path:
    """Bars of a metric per class; ``words``: the metric, its mean and what a class is (the task's)."""
    names = list(per_class)
    values = [np.nan if v is None else v for v in per_class.values()]
    what, mean, kind = words
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{what} (%)")
    ax.axhline(np.nanmean(values), color="tab:red", linestyle="--", label=f"{mean} {np.nanmean(values):.1f}")
    ax.legend()
    ax.set_title(f"per-{kind} {what} (test)")
    return _save(fig, path)


def plot_parts(points: np.ndarray, truth: np.ndarray, pred: np.ndarray, parts: Sequence[int], category: str,
               path: Path) -> Path:
    """The true and the predicted parts of one cloud; each part of the category has its colour."""
    colour = {p: k for k, p in enumerate(parts)}
    iou = [(np.sum((pred == p) & (truth == p)) / max(1, np.sum((pred == p) | (truth == p))))
           if np.any((pred == p) | (truth == p)) else 1.0 for p in parts]
    fig = plt.figure(figsize=(10, 4.5))
    for index, (labels, title) in enumerate(((truth, "true parts"), (pred, f"predicted parts (mIoU "
                                                                          f"{100 * np.mean(iou):.1f})"))):
        ax = fig.add_subplot(1, 2, index + 1, projection="3d")
        ax.scatter(points[:, 0], points[:, 2], points[:, 1], c=[colour.get(int(p), -1) for p in labels],
                   cmap="tab10", vmin=0, vmax=9, s=10, depthshade=False)
        ax.set_title(f"{category}: {title}", fontsize=9)
        ax.set_axis_off()
    return _save(fig, path)


def read_curves(exp_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars per tag (``train/loss``, ``val/OA``, ...) from TensorBoard logs, else ``log.txt``."""
    tb = exp_dir / "tb"
    if tb.is_dir() and any(tb.iterdir()):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb))
        events.Reload()
        curves = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        if curves:
            return curves
    log = exp_dir / "log.txt"
    if not log.is_file():
        raise FileNotFoundError(f"{exp_dir}: no TensorBoard logs (tb/) and no log.txt to read curves from")
    curves: dict[str, list[tuple[int, float]]] = {}
    # the train score is named by the task (OA, instance_mIoU; "acc" in logs of older runs)
    epoch = re.compile(r"epoch (\d+)/\d+\s+loss ([\d.]+)\s+(\w+) ([\d.]+)\s+lr ([\d.e+-]+)"
                       r"(?:.*?\|\s+(\w+) OA ([\d.]+) mAcc ([\d.]+))?")
    for line in log.read_text().splitlines():
        m = epoch.search(line)
        if not m:
            continue
        step = int(m[1])
        for tag, value in (("train/loss", m[2]), (f"train/{m[3]}", m[4]), ("train/lr", m[5])):
            curves.setdefault(tag, []).append((step, float(value)))
        if m[6]:
            curves.setdefault(f"{m[6]}/OA", []).append((step, float(m[7])))
            curves.setdefault(f"{m[6]}/mAcc", []).append((step, float(m[8])))
    if not curves:
        raise UserError(f"{log}: holds no epoch lines to draw curves from")
    return curves


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    panels = [("loss", ["train/loss"]), ("accuracy / mIoU (%)", sorted(t for t in curves if t.endswith(
        ("/acc", "/OA", "/mAcc", "mIoU")))),
              ("learning rate", ["train/lr"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (label, tags) in zip(axes, panels):
        for tag in tags:
            if tag in curves:
                steps, values = zip(*sorted(curves[tag]))
                ax.plot(steps, values, marker="o", markersize=3, label=tag)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.suptitle("training curves")
    return _save(fig, path)


def plot_attention(points: np.ndarray, centres: np.ndarray, attention: np.ndarray, path: Path, layer: int) -> Path:
    values = attention[nearest_token(points, centres)]
    return plot_cloud(points, values, path, f"[CLS] attention to point tokens (block {layer})", cmap="jet")


def plot_clusters(points: np.ndarray, centres: np.ndarray, similarity: np.ndarray, path: Path) -> Path:
    labels = kmeans_1d(similarity, 3)[nearest_token(points, centres)]
    fig = plt.figure(figsize=(10, 4.5))
    _cloud_axes(fig, 1, 2, 1, points, similarity[nearest_token(points, centres)], "cos([CLS], point token)",
                "viridis")
    _cloud_axes(fig, 1, 2, 2, points, labels, "k-means, 3 clusters (0 = least similar)", "brg")
    return _save(fig, path)


@dataclass
class ClusterPanel:
    """What one model's column of the Fig. 6 comparison shows, per point of the cloud ``(N,)``."""

    label: str
    similarity: np.ndarray  # cosine similarity of the point's token's final feature to [CLS]
    clusters: np.ndarray  # that token's k-means cluster of the similarities (0 = least similar)


def cluster_panel(label: str, model: nn.Module, cloud: Tensor, k: int = 3) -> ClusterPanel:
    """The ``clusters`` figure's values of ``model`` on ``cloud`` ``(N, 3)``, per point."""
    centres, similarity = cls_similarity(model, cloud)
    token = nearest_token(cloud.numpy(), centres.numpy())
    similarity = similarity.numpy()
    return ClusterPanel(label, similarity[token], kmeans_1d(similarity, k)[token])


def plot_cluster_comparison(points: np.ndarray, panels: Sequence[ClusterPanel], path: Path, k: int = 3) -> Path:
    """Paper Fig. 6: each model's clusters (top row, colours shared) over the similarity they cluster."""
    cols = len(panels)
    fig = plt.figure(figsize=(4.2 * cols, 7.6))
    for col, panel in enumerate(panels):
        _cloud_axes(fig, 2, cols, col + 1, points, panel.clusters, f"{panel.label}: {k} clusters", "brg",
                    vmin=0, vmax=k - 1)
        _cloud_axes(fig, 2, cols, cols + col + 1, points, panel.similarity, f"{panel.label}: cos([CLS], token)",
                    "viridis")
    fig.suptitle(f"[CLS]-to-point-token similarity, {k} k-means clusters (0 = least similar)")
    return _save(fig, path)


def plot_pe(points: np.ndarray, views: np.ndarray, mean: np.ndarray, index: int, path: Path, kind: str) -> Path:
    panels = len(views) + 1
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig = plt.figure(figsize=(3.6 * cols, 3.4 * rows))
    for v, values in enumerate(views):
        _cloud_axes(fig, rows, cols, v + 1, points, values, f"{kind} {v + 1}", "coolwarm", index)
    _cloud_axes(fig, rows, cols, panels, points, mean, "averaged over views", "coolwarm", index)
    fig.suptitle(f"cosine similarity of point {index}'s virtual-projection PE to all points")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- driver
def _test_results(ckpt: Path, results: Optional[Path]) -> dict[str, Any]:
    """The results record next to the checkpoint, or one computed now by a test pass."""
    import json

    path = results or ckpt.parent / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    if results is not None:
        raise FileNotFoundError(f"results file not found: {results}")
    from any2point.datasets import build_dataset
    from any2point.engine.evaluate import eval_loader, evaluate
    from any2point.engine.runtime import uses_bf16
    from any2point.engine.loading import load_model
    from any2point.engine.tasks import build_task

    model, cfg, _ = load_model(ckpt)
    device = next(model.parameters()).device
    test = build_dataset(cfg.dataset, "test")
    task = build_task(test)
    m = evaluate(model, eval_loader(test, cfg.train.test_batch_size or cfg.train.batch_size, 0, device), task,
                 device, uses_bf16(device, cfg.train), "test")
    return {**m.record(task.class_names), "class_names": task.class_names, "task": task.name}


def _cloud(model_cfg: Any, ckpt: Path, sample: int, file: Optional[str]) -> Tensor:
    if file:
        from tools.predict import Preparer

        return Preparer(model_cfg, None, True, 0)(Path(file), 0)
    from any2point.datasets import build_dataset

    test = build_dataset(model_cfg.dataset, "test")
    if not 0 <= sample < len(test):
        raise UserError(f"--sample {sample} is outside the test split (0..{len(test) - 1})")
    return test[sample]["points"]


def draw(figures: Sequence[str], out: Path, ckpt: Optional[Path] = None, exp: Optional[Path] = None,
         results: Optional[Path] = None, sample: int = 0, file: Optional[str] = None, layer: int = -1,
         point: int = 0) -> list[Path]:
    """Draw the named figures into ``out``; returns the files written."""
    written: list[Path] = []
    if "confusion" in figures or "per_class" in figures:
        record = _test_results(ckpt, results)
        if "confusion" in figures:
            if "confusion" not in record:
                raise UserError(f"no confusion matrix for a {record.get('task')} model; draw the other figures")
            written.append(plot_confusion(record["confusion"], record["class_names"], out / "confusion.png"))
        if "per_class" in figures:
            written.append(plot_per_class(record["per_class"], out / "per_class.png",
                                          task_type(record.get("task") or "classification").per_class_words))
    if "curves" in figures:
        written.append(plot_curves(read_curves(exp or ckpt.parent), out / "curves.png"))
    if any(f in figures for f in MODEL_FIGURES):
        from any2point.engine.loading import load_model

        model, cfg, _ = load_model(ckpt, device=torch.device("cpu"))
        if not all(hasattr(model, name) for name in ("source", "projection", "encode")):
            raise UserError(f"figures {', '.join(MODEL_FIGURES)} need an Any2Point model; {ckpt} holds a "
                             f"{cfg.model.type}")
        cloud = _cloud(cfg, ckpt, sample, file)
        xyz = cloud.numpy()
        if "attention" in figures:
            centres, attention = cls_attention(model, cloud, layer)
            shown = layer if layer >= 0 else model.source.depth + layer
            written.append(plot_attention(xyz, centres.numpy(), attention.numpy(), out / "attention.png", shown + 1))
        if "clusters" in figures:
            centres, similarity = cls_similarity(model, cloud)
            written.append(plot_clusters(xyz, centres.numpy(), similarity.numpy(), out / "clusters.png"))
        if "pe" in figures:
            if not 0 <= point < len(xyz):
                raise UserError(f"--point {point} is outside the cloud (0..{len(xyz) - 1})")
            views, mean = pe_similarity(model, cloud, point)
            kind = "line" if model.source.modality_dim == 1 else "view"
            written.append(plot_pe(xyz, views.numpy(), mean.numpy(), point, out / "pe_similarity.png", kind))
    if "parts" in figures:
        written.append(draw_parts(ckpt, sample, out / "parts.png"))
    return written


def parse_compare(entries: Sequence[str]) -> list[tuple[str, Path]]:
    """``LABEL=PATH`` (or a bare ``PATH``, labelled by its experiment folder or config name) pairs."""
    pairs = []
    for entry in entries:
        label, sep, path = entry.rpartition("=")
        path = Path(path)
        if not sep:
            label = path.stem if path.suffix in CONFIG_SUFFIXES else path.parent.name
        pairs.append((label, path))
    return pairs


def comparison_model(path: Path) -> tuple[nn.Module, Any]:
    """The model of a checkpoint (trained), or of a config (as its training would start: built with
    the config's init seed), in eval mode on the CPU, and its config."""
    if path.suffix not in CONFIG_SUFFIXES:
        from any2point.engine.loading import load_model

        model, cfg, _ = load_model(path, device=torch.device("cpu"))
        return model, cfg
    from any2point.config import load_config
    from any2point.engine.seeds import run_seeds, seed_globals
    from any2point.models import build_model

    cfg = load_config(path)
    seed_globals(run_seeds(cfg.experiment)["init"])
    return build_model(cfg.model).eval(), cfg


def draw_comparison(entries: Sequence[tuple[str, Path]], out: Path, sample: int = 0,
                    file: Optional[str] = None) -> tuple[Path, list[ClusterPanel]]:
    """Paper Fig. 6 for the labelled checkpoints or configs, on one cloud (test item ``sample`` of the
    first one's dataset, or ``file``): the file written and the panels drawn."""
    models = []
    for label, path in entries:
        if not path.is_file():
            raise UserError(f"--compare {label}: no such checkpoint or config: {path}")
        model, cfg = comparison_model(path)
        if not all(hasattr(model, name) for name in ("source", "projection", "encode")):
            raise UserError(f"--compare {label}: the clusters need an Any2Point model; {path} holds a {cfg.model.type}")
        models.append((label, model, cfg))
    cloud = _cloud(models[0][2], entries[0][1], sample, file)
    panels = [cluster_panel(label, model, cloud) for label, model, _ in models]
    return plot_cluster_comparison(cloud.numpy(), panels, out / COMPARE_FILE), panels


def draw_parts(ckpt: Path, sample: int, path: Path) -> Path:
    """The ``parts`` figure of test item ``sample`` of a part-segmentation checkpoint."""
    from any2point.datasets import PartDataset, build_dataset
    from any2point.engine.loading import load_model
    from any2point.engine.metrics import category_part_mask, restricted_prediction

    model, cfg, _ = load_model(ckpt, device=torch.device("cpu"))
    test = build_dataset(cfg.dataset, "test")
    if not isinstance(test, PartDataset):
        raise UserError(f"figure parts needs a part-segmentation checkpoint; {ckpt} was trained on "
                        f"{cfg.dataset.type}, a classification dataset")
    if not 0 <= sample < len(test):
        raise UserError(f"--sample {sample} is outside the test split (0..{len(test) - 1})")
    item = test[sample]
    category = torch.tensor([item["label"]])
    with torch.no_grad():
        logits = model(item["points"][None], category)
    pred = restricted_prediction(logits, category, category_part_mask(test.category_parts, test.num_parts))[0]
    return plot_parts(item["points"].numpy(), item["parts"].numpy(), pred.numpy(), test.category_parts[item["label"]],
                      test.class_names[item["label"]], path)


def task_type(name: str) -> Any:
    """The registered task class of that name (a results file or checkpoint of an unknown task is an error)."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(TASKS.names())})")
    return TASKS.get(name)


def task_of(ckpt: Path) -> str:
    """The task a checkpoint was trained for (``classification`` for one that does not say)."""
    from any2point.engine import checkpoint

    return checkpoint.load(ckpt).get("task") or "classification"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="checkpoint (every figure but curves needs one)")
    parser.add_argument("--exp", type=Path, help="experiment folder for the curves (default: the checkpoint's)")
    parser.add_argument("--figures", default="all", help=f"comma-separated, from: {', '.join(FIGURES)} (default all)")
    parser.add_argument("--out", type=Path, help="output folder (default: <experiment>/figures)")
    parser.add_argument("--results", type=Path, help="results file for confusion / per_class")
    parser.add_argument("--sample", type=int, default=0, help="test item drawn in the model figures")
    parser.add_argument("--file", help="a shape file to draw instead of a test item")
    parser.add_argument("--layer", type=int, default=-1, help="source block of the attention figure (default last)")
    parser.add_argument("--point", type=int, default=0, help="the point whose PE is compared (pe figure)")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=PATH",
                        help="paper Fig. 6: the clusters of two or more checkpoints or configs side by side")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    if args.compare is not None:
        if len(args.compare) < 2:
            parser.error("--compare needs at least two LABEL=PATH entries (paper Fig. 6 has three)")
        if args.ckpt or args.exp or args.figures != "all" or args.out is None:
            parser.error("--compare draws its own figure: give --out DIR, and no --ckpt, --exp or --figures")
        return run_cli(lambda: print(draw_comparison(parse_compare(args.compare), args.out, args.sample,
                                                     args.file)[0]), debug=args.debug)
    figures = list(FIGURES) if args.figures == "all" else [f.strip() for f in args.figures.split(",")]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    if args.ckpt is None and (set(figures) - {"curves"} or args.exp is None):
        parser.error("--ckpt is required (only --figures curves works with --exp alone)")
    out = args.out or (args.exp or args.ckpt.parent) / "figures"

    def run() -> None:
        chosen = figures
        if args.figures == "all":
            task = task_of(args.ckpt)
            other = [f for name in TASKS.names() if name != task for f in TASKS.get(name).figures]
            chosen = [f for f in figures if f not in other]
        for path in draw(chosen, out, args.ckpt, args.exp, args.results, args.sample, args.file, args.layer,
                         args.point):
            print(path)

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
