"""The authors' released Any2Point checkpoints: which runs there are, and how a released file's tensors
become this model's (docs/method.md, "Where the official code differs from the paper").

Six runs were released (the official README's "Ckpt Release"), each trained by its own copy of the
code; ``cfgs/official/<run>.yaml`` rebuilds each exactly, every deviation switched on. Two layouts:

- ScanObjectNN runs (openpoints code): ``{"model": state_dict, "optimizer", "scheduler", "epoch",
  "best_val"}`` with keys ``encoder.*`` (the encoder) and ``prediction.head.*`` (the head);
- ModelNet40 runs (Point-MAE code): ``{"base_model": state_dict, "optimizer", "epoch", "metrics",
  "best_metrics"}`` with keys ``module.*`` (a DataParallel wrapper; a file saved without it has no
  prefix), the head under ``cls_head_finetune.*``, fed ``[cls, max]`` where ours reads ``[max, cls]``.

After the prefix, both name the encoder alike: ``cls_token``, ``cls_pos``, ``patch_embed.EncP.*``
(the Point-PN tokenizer), ``norm.*`` (the final norm), ``attn1.v.*`` / ``norm3.v.*`` (the six local
attentions, shared by all blocks) and per block (``resblocks.N`` for CLIP, ``blocks.N`` otherwise)
the bottleneck ``adapter.ln1`` / ``adapter.ln2``, the per-view batch norms
``out_transform_{1d,2d}.v.0``, the 3D batch norm ``out_transform_3d.0`` and the frozen source's own
weights. :func:`convert_state` maps every tensor or says why it is dropped, and fails on anything it
does not know, on a missing tensor and on a shape mismatch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from any2point.errors import CheckpointError
from any2point.paper import match_group
from any2point.utils.safe_load import load_torch_file

#: Where the official README's "Ckpt Release" links the files (Google Drive).
RELEASE_PAGE = "https://github.com/Ivan-Tang-3D/Any2Point#ckpt-release"


@dataclass(frozen=True)
class OfficialRun:
    """One released run: its file name, layout, preset and the accuracy the authors report."""

    name: str
    released_file: str
    layout: str  # "openpoints" (ScanObjectNN) or "pointmae" (ModelNet40, and Point-PEFT's runs)
    download: str
    config: Optional[str] = None  # the preset, when not cfgs/official/<name>.yaml
    other_paper_oa: Optional[float] = None  # the accuracy its own paper reports, for a run not Any2Point's

    @property
    def preset(self) -> str:
        return self.config or f"cfgs/official/{self.name}.yaml"

    @property
    def reported_oa(self) -> float:
        """The authors' test OA of this run: Any2Point's Table 1 number of its source and dataset
        (``cfgs/paper/paper_results.csv``), or its own paper's."""
        if self.other_paper_oa is not None:
            return self.other_paper_oa
        match = match_group(self.name)
        if match is None:
            raise KeyError(f"the paper reports no accuracy for the run '{self.name}'")
        return match.accuracy


_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
RUNS: dict[str, OfficialRun] = {run.name: run for run in (
    OfficialRun("scanobjectnn_clip_text", "Language_CLIP_Scan.pth", "openpoints",
                _DRIVE.format("1votPHTcD3KQ6fmdcZvUCZc5yMq4xbK0V")),
    OfficialRun("scanobjectnn_dinov2", "Vision_DINOV2_Scan.pth", "openpoints",
                _DRIVE.format("1cTCKNc5xfbMvLnQOj9BQf-uHg3Fime-W")),
    OfficialRun("scanobjectnn_imagebind_audio", "Audio_imagebind_scan.pth", "openpoints",
                _DRIVE.format("1mKFeKVfSyiBba2DNEY6gPPqDrINQBS2F")),
    OfficialRun("modelnet40_clip_text", "Language_CLIP_ModelNet.pth", "pointmae",
                _DRIVE.format("1DCIA6gfCjwOmauo7m4gh03DxOQB5KG4d")),
    OfficialRun("modelnet40_dinov2", "Vision_DINOV2_ModelNet.pth", "pointmae",
                _DRIVE.format("1bApmj6GgCPcJrlm7Ke3pFs34LApGUnjX")),
    OfficialRun("modelnet40_imagebind_audio", "Audio_imagebind_ModelNet.pth", "pointmae",
                _DRIVE.format("163-Pskgx8GXdlN26itbds8fqmfzTYMl2")),
)}

#: The top-level entry holding the weights, per layout.
WEIGHTS_ENTRY = {"openpoints": "model", "pointmae": "base_model"}

# Head layers: released index -> ours (Linear, BN, ReLU, Dropout, Linear, BN, ReLU, Dropout, Linear).
_SCAN_HEAD = {"0.0": "0", "0.1": "1", "2.0": "4", "2.1": "5", "4.0": "8"}
_MN_HEAD = {str(i): str(i) for i in (0, 1, 4, 5, 8)}
# The frozen source's sub-modules in a block, and ImageBind's own names for some of them.
_FROZEN = r"(attn|ln_1|ln_2|mlp|norm1|norm2|ls1|ls2)\."
_IMAGEBIND_RENAMES = (("attn.qkv.", "attn.in_proj_"), ("attn.proj.", "attn.out_proj."), ("norm1.", "norm_1."),
                      ("norm2.", "norm_2."))


@dataclass
class Target:
    """Where one released tensor goes: our key, and a row of it for stacked tensors (``None``: all)."""

    key: str
    row: Optional[int] = None
    transform: Optional[Callable[[Tensor], Tensor]] = None


@dataclass
class Conversion:
    """The outcome of :func:`convert_state`.

    Attributes:
        model: our trainable state (keys of ``trainable_state_dict``).
        frozen: the released copies of the frozen source's weights, keyed like our model
            (``source.blocks.N.*``), for comparison with the source file.
        mapped: ``(released key, our key)`` pairs.
        dropped: ``(released key, reason)`` pairs.
    """

    model: dict[str, Tensor] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


def swap_halves(weight: Tensor) -> Tensor:
    """Swap the two column halves of a ``(out, 2C)`` weight: ``[cls, max]`` inputs -> ``[max, cls]``."""
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def read_released(path: str | Path, run: OfficialRun) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights of a released file and its other top-level entries.

    Read with ``weights_only=True`` (NumPy scalars allowed: training scripts store accuracies that
    way); a file of the other layout, or without the weights entry, is a :class:`CheckpointError`.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"released checkpoint not found: {path} (download {run.released_file} from "
                              f"{run.download})")
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import scalar
    allowed = [scalar, np.dtype, *(type(np.dtype(t)) for t in ("f8", "f4", "i8"))]
    obj = load_torch_file(path, "released checkpoint", allowed_globals=allowed)
    entry = WEIGHTS_ENTRY[run.layout]
    if not isinstance(obj, Mapping) or not isinstance(obj.get(entry), Mapping):
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        other = [r for r, e in WEIGHTS_ENTRY.items() if r != run.layout and isinstance(obj, Mapping) and e in obj]
        hint = (f"; it has '{WEIGHTS_ENTRY[other[0]]}', the layout of the "
                f"{'ScanObjectNN' if other[0] == 'openpoints' else 'ModelNet40'} runs: check --run" if other else "")
        raise CheckpointError(f"{path}: no '{entry}' state dict (the {run.layout} layout of run {run.name}); "
                              f"top level: {found}{hint}")
    state = dict(obj[entry])
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: '{entry}' holds non-tensors under {', '.join(map(str, bad[:5]))}")
    return state, {k: v for k, v in obj.items() if k != entry}


def strip_prefix(key: str, layout: str) -> tuple[str, str]:
    """``(part, rest)``: ``part`` is ``encoder`` or ``head`` and ``rest`` the key inside it, or
    ``part`` is ``""`` for a key outside the layout."""
    if layout == "openpoints":
        if key.startswith("encoder."):
            return "encoder", key[len("encoder."):]
        if key.startswith("prediction.head."):
            return "head", key[len("prediction.head."):]
        return "", key
    rest = key[len("module."):] if key.startswith("module.") else key
    if rest.startswith("cls_head_finetune."):
        return "head", rest[len("cls_head_finetune."):]
    return "encoder", rest


def _bn_row(key: str, index: int, name: str) -> Target:
    """A released BatchNorm1d tensor into row ``index`` of our stacked (grouped) batch norm ``key``."""
    if name in ("weight", "bias"):
        return Target(f"{key}.{name}.{index}")
    return Target(f"{key}.{name}", row=index)


def map_key(part: str, key: str, layout: str, imagebind: bool) -> tuple[Optional[Target], Optional[str], bool]:
    """Where the released tensor ``key`` (inside ``part``) goes: ``(target, None, frozen)``, or
    ``(None, reason, False)`` for a tensor dropped on purpose, or ``(None, None, False)`` when unknown."""
    if part == "head":
        table = _SCAN_HEAD if layout == "openpoints" else _MN_HEAD
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\.(weight|bias|running_mean|running_var|num_batches_tracked)", key)
        if m and m.group(1) in table:
            ours = f"head.{table[m.group(1)]}.{m.group(2)}"
            swap = layout == "pointmae" and ours == "head.0.weight"
            return Target(ours, transform=swap_halves if swap else None), None, False
        return None, None, False
    simple = {"cls_token": "cls_token", "cls_pos": "cls_pos_embed"}
    if key in simple:
        return Target(simple[key]), None, False
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"patch_embed\.EncP\.raw_point_embed\.net\.(.+)", lambda m: f"tokenizer.stem.{m.group(1)}"),
        (r"patch_embed\.EncP\.LGA_list\.(\d+)\.linear2\.(\d+)\.(net[12]\..+)",
         lambda m: f"tokenizer.stages.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"),
        (r"norm\.(weight|bias)", lambda m: f"source.norm.{m.group(1)}"),
        (r"norm3\.(\d+)\.(weight|bias)", lambda m: f"tuner.local_attention.norms.{m.group(1)}.{m.group(2)}"),
        (r"attn1\.(\d+)\.(qkv|proj)\.(weight|bias)",
         lambda m: f"tuner.local_attention.{m.group(2)}.{m.group(1)}.{m.group(3)}"),
        (r"(?:res)?blocks\.(\d+)\.adapter\.ln1\.(weight|bias)", lambda m: f"tuner.blocks.{m.group(1)}.down.{m.group(2)}"),
        (r"(?:res)?blocks\.(\d+)\.adapter\.ln2\.(weight|bias)", lambda m: f"tuner.blocks.{m.group(1)}.up.{m.group(2)}"),
    ]
    for pattern, ours in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return Target(ours(m)), None, False
    m = re.fullmatch(r"(?:res)?blocks\.(\d+)\.out_transform_(?:1d\.(\d+)|2d\.(\d+)|3d)\.0\."
                     r"(weight|bias|running_mean|running_var|num_batches_tracked)", key)
    if m:
        block, view, name = m.group(1), m.group(2) or m.group(3), m.group(4)
        if name == "num_batches_tracked":
            return None, ("batch-count of a per-view / 3D batch norm: ours has none (the momentum is fixed at "
                          "0.1, so the count is never read)"), False
        norm = f"tuner.blocks.{block}.{'view_norm' if view is not None else 'voxel_norm'}"
        return _bn_row(norm, int(view) if view is not None else 0, name), None, False
    m = re.fullmatch(r"(?:res)?blocks\.(\d+)\.(" + _FROZEN + r".+)", key)
    if m:
        inner = m.group(2)
        if imagebind:
            for old, new in _IMAGEBIND_RENAMES:
                if inner.startswith(old):
                    inner = new + inner[len(old):]
        return Target(f"source.blocks.{m.group(1)}.{inner}"), None, True
    return None, None, False


Mapper = Callable[[str], tuple[Optional[Target], Optional[str], bool]]


def convert_state(state: Mapping[str, Tensor], layout: str, expected: Mapping[str, torch.Size],
                  frozen_expected: Mapping[str, torch.Size], imagebind: bool = False,
                  frozen_allowed_missing: Optional[Mapping[str, str]] = None,
                  mapper: Optional[Mapper] = None) -> Conversion:
    """Map a released state dict onto our model, strictly.

    ``expected``: our trainable keys and shapes; ``frozen_expected``: our frozen source keys
    (``source.blocks.*``) and shapes, of which ``frozen_allowed_missing`` (key -> reason) may be
    absent from the file; ``mapper`` maps a released key in place of the Any2Point layouts' rules
    (:func:`map_key`). Every released tensor must map or be dropped for a stated reason; every
    expected key (each row of a stacked one) must be filled exactly once with the right shape.
    Otherwise a :class:`CheckpointError` names the keys.
    """
    frozen_allowed_missing = frozen_allowed_missing or {}
    out = Conversion()
    unknown, wrong_shape, duplicate = [], [], []
    rows: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        if mapper is not None:
            target, reason, frozen = mapper(key)
        else:
            part, inner = strip_prefix(key, layout)
            target, reason, frozen = map_key(part, inner, layout, imagebind) if part else (None, None, False)
        if target is None:
            if reason is None:
                unknown.append(key)
            else:
                out.dropped.append((key, reason))
            continue
        shapes = frozen_expected if frozen else expected
        if target.key not in shapes:
            unknown.append(f"{key} (-> {target.key}, which this model does not have)")
            continue
        want = shapes[target.key] if target.row is None else shapes[target.key][1:]
        if tuple(value.shape) != tuple(want):
            wrong_shape.append(f"{key} {tuple(value.shape)} -> {target.key} {tuple(want)}")
            continue
        value = target.transform(value) if target.transform else value
        if target.row is not None:
            if target.row >= shapes[target.key][0] or target.row in rows.setdefault(target.key, {}):
                duplicate.append(key)
            rows[target.key][target.row] = value
        elif target.key in (out.frozen if frozen else out.model):
            duplicate.append(key)
        else:
            (out.frozen if frozen else out.model)[target.key] = value
        out.mapped.append((key, target.key if target.row is None else f"{target.key}[{target.row}]"))
    for key, filled in rows.items():
        if sorted(filled) == list(range(expected[key][0])):
            out.model[key] = torch.stack([filled[i] for i in range(expected[key][0])])
    missing = [k for k in expected if k not in out.model]
    missing = [k + (f" (rows {sorted(set(range(expected[k][0])) - set(rows[k]))} of {expected[k][0]})"
                    if k in rows else "") for k in missing]
    missing_frozen = [k for k in frozen_expected if k not in out.frozen and k not in frozen_allowed_missing]
    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): {', '.join(unknown[:12])}" + (" ..." if len(unknown) > 12 else ""))
    if wrong_shape:
        problems.append(f"shape mismatch ({len(wrong_shape)}): {', '.join(wrong_shape[:12])}"
                        + (" ..." if len(wrong_shape) > 12 else ""))
    if duplicate:
        problems.append(f"keys mapped twice ({len(duplicate)}): {', '.join(duplicate[:12])}")
    if missing or missing_frozen:
        both = missing + missing_frozen
        problems.append(f"missing (no released tensor for {len(both)} of our keys): {', '.join(both[:12])}"
                        + (" ..." if len(both) > 12 else ""))
    if problems:
        raise CheckpointError("the released checkpoint does not fit this run's model: " + "; ".join(problems))
    for key, reason in frozen_allowed_missing.items():
        if key in frozen_expected and key not in out.frozen:
            out.dropped.append((f"(absent) {key}", reason))
    return out


def model_keys(model: torch.nn.Module, frozen_prefix: str = "source.blocks."
               ) -> tuple[dict[str, torch.Size], dict[str, torch.Size], dict[str, str]]:
    """What a released file must fill in ``model`` (built from the run's preset, on any device,
    ``meta`` included): our trainable keys and shapes, the frozen source's keys under
    ``frozen_prefix`` (the blocks; all of it for Point-PEFT's files) and shapes, and the frozen keys
    the released files do not hold (key -> reason)."""
    from any2point.engine.checkpoint import trainable_keys

    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: shapes[k] for k in trainable_keys(model)}
    frozen_expected = {k: s for k, s in shapes.items() if k.startswith(frozen_prefix) and k not in expected}
    absent = {k: ("ImageBind's bias key / value: not in the released file (the released code's attention has "
                  "none, deviation 8); unused with official_plain_qkv")
              for k in frozen_expected if k.endswith(("attn.bias_k", "attn.bias_v"))}
    return expected, frozen_expected, absent


def compare_frozen(released: Mapping[str, Tensor], source: Mapping[str, Tensor], atol: float = 1e-6) -> list[str]:
    """Keys (``source.blocks.*``) whose released copy differs from the source file's weight by more
    than ``atol`` (largest difference given)."""
    differ = []
    for key, value in released.items():
        mine = source[key.removeprefix("source.")].float()
        diff = float((value.float() - mine).abs().max()) if value.numel() else 0.0
        if diff > atol:
            differ.append(f"{key} (max abs diff {diff:.3g})")
    return differ
