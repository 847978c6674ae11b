"""The SourceTransformer contract: what the Any2Point method needs from a frozen source model.

Every source (CLIP text tower, DINOv2, ImageBind audio, any timm ViT or Hugging Face encoder) is
wrapped so the method never knows which modality it runs on (docs/method.md, "The SourceTransformer
contract"). A wrapper exposes:

- ``dim`` (C) and ``depth`` (number of blocks), ``blocks`` (an ``nn.ModuleList``);
- its positional-embedding table as a **non-persistent buffer**: ``pos_embed_1d`` of shape (L, C)
  for 1D (language) sources, or ``pos_embed_2d`` of shape (H, W, C) for 2D (vision / audio) sources,
  with ``plane_size`` (height, width in pixels of the input plane that produced the grid) and
  ``patch_size`` (pixels per patch of the source's own patchifier: one table cell covers
  ``patch_size`` x ``patch_size`` pixels of the plane; the adapter's cell size is a setting of the
  method, e.g. 26 px on DINOv2's 518 px plane);
- ``cls_token`` (1, 1, C) and ``cls_pos_embed`` (1, 1, C) where the model has them (else ``None``),
  also non-persistent buffers: the method copies them into its own trainable parameters;
- ``norm``: the final normalisation layer;
- :meth:`forward_block`: run block ``i`` with hooks on its two residual adds (attention and FFN),
  where tuners insert their modules;
- :meth:`attention_weights`: where block ``i``'s attention projections live (for LoRA);
- :meth:`load_pretrained`: strict loading through a per-source key converter;
- :meth:`identity`: the name and the sha256 of the weight file, stored in checkpoints;
- the **point-embedding slot**: :meth:`build_point_embedding` builds what turns a cloud into tokens
  for this source and :meth:`embed_points` runs it, giving an :class:`Embedded`. A source with a
  position table (1D or 2D) gets the method's tokenizer (Point-PN) and virtual projection onto its
  table; a 3D-pretrained source (:mod:`.point_transformer`) embeds points itself. The classifier
  and the tuners read only :class:`Embedded`, whatever the kind of source.

A wrapper neither freezes itself nor fixes its train/eval mode: the tuner of the method
(:mod:`any2point.models.tuners`) decides which source parameters train and which mode the source's
modules run in.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from any2point.errors import CheckpointError
from any2point.utils.safe_load import load_torch_file
from any2point.registry import PROJECTIONS, TOKENIZERS, build_from_cfg

ResidualHook = Callable[[Tensor, Tensor], Tensor]
"""``hook(x, f) -> x_new``: ``x`` is the residual stream entering a residual add (B, T, C), ``f`` the
branch's output (attention or FFN, B, T, C); the default (no hook) is ``x + f``."""


def residual(hook: Optional[ResidualHook], x: Tensor, branch: Tensor) -> Tensor:
    """A block's residual add ``x + branch``, or ``hook(x, branch)`` where a tuner replaces it."""
    return hook(x, branch) if hook is not None else x + branch


@dataclass(frozen=True)
class AttentionWeight:
    """One weight tensor of a block's attention that holds some of its projections.

    Attributes:
        module: path of the module that owns the weight, relative to the block (``attn``).
        param: the weight's name inside that module, dotted if nested (``in_proj_weight``,
            ``out_proj.weight``).
        rows: output rows of each projection in the weight, ``{"q": (0, C), "k": (C, 2C), ...}``;
            a fused q/k/v weight lists three, a separate projection one.
    """

    module: str
    param: str
    rows: Mapping[str, tuple[int, int]]


def fused_qkv(module: str, param: str, dim: int) -> AttentionWeight:
    """The rows of a fused ``(3C, C)`` in-projection: q, k, v in that order."""
    return AttentionWeight(module, param, {"q": (0, dim), "k": (dim, 2 * dim), "v": (2 * dim, 3 * dim)})


def single(module: str, param: str, target: str, dim: int) -> AttentionWeight:
    """A ``(C, C)`` weight holding one projection ``target`` (``q``, ``k``, ``v`` or ``o``)."""
    return AttentionWeight(module, param, {target: (0, dim)})


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def missing_weights_error(path: str | Path, what: str, where: str) -> FileNotFoundError:
    """The error raised when a pretrained weight file is absent: names the file and its source."""
    return FileNotFoundError(
        f"pretrained weights for {what} not found at '{path}'. Download them from {where} and put "
        f"the file there (see ckpts/README.md), or set the source's `pretrained: null` to build it "
        f"at random init.")


def check_state_dict_keys(expected: set[str], got: set[str], what: str,
                          allowed_missing: frozenset[str] = frozenset(),
                          allowed_unexpected: frozenset[str] = frozenset()) -> None:
    """Raise a :class:`CheckpointError` naming every missing and unexpected key (strict loading)."""
    missing = sorted(expected - got - allowed_missing)
    unexpected = sorted(got - expected - allowed_unexpected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{what}: checkpoint does not match the model; " + "; ".join(parts))


def check_state_dict_shapes(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], what: str) -> None:
    """Raise a :class:`CheckpointError` naming every key whose tensor shape differs from the model's."""
    wrong = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in got and got[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{what}: checkpoint shapes do not match the model: " + "; ".join(wrong))


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a ``torch.save`` weight file (loaded with ``weights_only=True``, on CPU).

    Zip-format files are memory-mapped, so only the tensors a source copies are read (ImageBind's
    file holds six encoders). A checkpoint that wraps its weights under ``"state_dict"`` (open_clip,
    Lightning) is unwrapped; anything that is not a mapping of names to tensors is an error naming
    the file.
    """
    obj = load_torch_file(path, f"{what} weight file", mmap=zipfile.is_zipfile(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: '{path}' is not a state dict (a mapping of names to tensors)")
    return dict(obj)


@dataclass
class Embedded:
    """One batch of clouds as tokens of a source: what the classifier adds and the tuners read
    (:meth:`~any2point.models.tuners.base.Tuner.prepare`).

    Attributes:
        centres: the token centres ``(B, G, 3)``.
        tokens: the point tokens ``(B, G, C)``.
        pe: their positional embedding ``(B, G, C)`` (``None`` without one).
        source: the source the tokens are for.
        projected: the virtual projection's output (positions and frame of every token in every
            view) for a source with a table; ``None`` for a 3D-pretrained source.
        projection: the virtual projection that produced ``projected`` (``None`` likewise).
    """

    centres: Tensor
    tokens: Tensor
    pe: Optional[Tensor]
    source: "SourceTransformer"
    projected: Any = None
    projection: Any = None


class SourceTransformer(nn.Module):
    """Base class of all sources; subclasses build their modules and load their weights.

    Attributes set by subclasses: ``dim``, ``depth``, ``blocks``, ``norm``, one of
    ``pos_embed_1d`` / ``pos_embed_2d`` (registered with ``persistent=False``), ``plane_size`` and
    ``patch_size`` for 2D sources, ``cls_token`` / ``cls_pos_embed`` or ``None``, ``name``.
    """

    dim: int
    depth: int
    blocks: nn.ModuleList
    norm: nn.Module
    name: str = "source"
    plane_size: Optional[tuple[int, int]] = None
    patch_size: Optional[int] = None

    def __init__(self) -> None:
        super().__init__()
        # Registered as empty buffers so a subclass sets them by plain assignment, e.g.
        # ``self.cls_token = tensor``, and they follow ``.to(device)``.
        self.register_buffer("cls_token", None, persistent=False)
        self.register_buffer("cls_pos_embed", None, persistent=False)
        self.weight_file: Optional[str] = None
        self.weight_sha256: Optional[str] = None

    #: How the point embedding's positions enter the blocks by default (the classifier's
    #: ``pe_injection``): once before the first block, as Any2Point adds its projected PE.
    default_pe_injection: str = "once"

    @property
    def modality_dim(self) -> int:
        """1 for sources with a 1D table (language), 2 for a 2D table (vision, audio)."""
        return 1 if getattr(self, "pos_embed_1d", None) is not None else 2

    @property
    def position_table(self) -> Tensor:
        """The table the virtual projection reads: ``pos_embed_1d`` (L, C) or ``pos_embed_2d`` (H, W, C)."""
        return self.pos_embed_1d if self.modality_dim == 1 else self.pos_embed_2d

    def build_point_embedding(self, tokenizer: Optional[dict], projection: Optional[dict]
                              ) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
        """The tokenizer (``tokenizer`` mapping, default Point-PN; gets ``dim``) and the virtual
        projection onto this source's table (``projection`` mapping; gets the source) that embed a
        cloud for it."""
        return (build_from_cfg(tokenizer or {"type": "PointPNTokenizer"}, TOKENIZERS, dim=self.dim),
                build_from_cfg(projection or {"type": "VirtualProjection"}, PROJECTIONS, source=self))

    def embed_points(self, points: Tensor, tokenizer: Optional[nn.Module], projection: Optional[nn.Module]
                     ) -> Embedded:
        """``points (B, N, 3)`` -> their tokens, centres and the projected PE, with the modules of
        :meth:`build_point_embedding`."""
        centres, tokens = tokenizer(points)
        projected = projection(centres, self.position_table)
        return Embedded(centres, tokens, projected.pe, self, projected, projection)

    def block_context(self, embedded: Embedded) -> Any:
        """What every block needs from a batch besides its tokens, passed to :meth:`forward_block` after
        the hooks; ``None`` (nothing) but for rotary sources, whose blocks get the batch's positions
        (:mod:`any2point.models.sources.rotary`)."""
        return None

    def first_sample_context(self, context: Any) -> Any:
        """``context`` (from :meth:`block_context`) cut to the batch's first sample."""
        return context

    def forward_block(self, index: int, x: Tensor, ffn_hook: Optional[ResidualHook] = None,
                      attn_hook: Optional[ResidualHook] = None) -> Tensor:
        """Run block ``index`` on tokens ``x`` (B, T, C) -> (B, T, C), calling ``ffn_hook(x, f)`` in
        place of the FFN's residual add ``x + f`` and ``attn_hook(x, a)`` in place of the attention's
        ``x + a`` (see :func:`residual`)."""
        raise NotImplementedError

    def attention_weights(self, index: int) -> list[AttentionWeight]:
        """Where block ``index``'s attention projections (``q``, ``k``, ``v``, output ``o``) live."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its attention weights are")

    def load_pretrained(self, path: str | Path) -> None:
        """Load a weight file strictly (through the source's key converter) and record its hash."""
        raise NotImplementedError

    def table_names(self) -> list[str]:
        """Names of the non-persistent tables set (``pos_embed_1d``/``pos_embed_2d``, ``cls_*``)."""
        return [name for name in ("pos_embed_1d", "pos_embed_2d", "cls_token", "cls_pos_embed")
                if getattr(self, name, None) is not None]

    @torch.no_grad()
    def load_converted(self, state: Mapping[str, Tensor], what: str) -> None:
        """Copy a converted checkpoint into the model, strictly.

        ``state`` is keyed like ``self.state_dict()`` plus the table buffers of
        :meth:`table_names`; every key must be present with the model's shape, and no other key may
        appear (:func:`check_state_dict_keys`, :func:`check_state_dict_shapes`). Values are cast to
        the model's dtype (e.g. OpenAI's fp16 weights into an fp32 model).
        """
        targets = dict(self.state_dict(keep_vars=True))
        targets.update({name: getattr(self, name) for name in self.table_names()})
        check_state_dict_keys(set(targets), set(state), what)
        check_state_dict_shapes(targets, state, what)
        for key, target in targets.items():
            target.copy_(state[key])

    def record_weights(self, path: str | Path) -> None:
        """Remember which file the weights came from, with its sha256 (for checkpoints)."""
        self.weight_file = str(path)
        self.weight_sha256 = sha256_of(path)

    def identity(self) -> dict[str, Optional[str]]:
        """The source's name and weight file hash, saved with checkpoints."""
        return {"name": self.name, "weights": self.weight_file, "sha256": self.weight_sha256}

    @staticmethod
    def resolve_weights(path: Optional[str], what: str, where: str) -> Optional[Path]:
        """``None`` for random init; otherwise the existing file, or a clear error naming it."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if not p.exists():
            raise missing_weights_error(p, what, where)
        return p

    def extra_repr(self) -> str:
        table = ("pos_embed_1d", tuple(self.pos_embed_1d.shape)) if self.modality_dim == 1 else \
            ("pos_embed_2d", tuple(self.pos_embed_2d.shape))
        return f"name={self.name}, dim={self.dim}, depth={self.depth}, {table[0]}={table[1]}"

