"""Point-PEFT's memory bank: the frozen 3D-pretrained encoder's global features of a training set.

File layout (ours): ``torch.save({"features": FloatTensor (M, C), "source": {"name", "weights",
"sha256"}})``, read strictly (exactly these keys, a 2-D float tensor). The released
``cache_shape.pt`` is a bare ``(C, M)`` tensor (the code multiplies ``(B, C)`` queries by it);
:func:`convert_released_bank` turns it into ours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from any2point.errors import CheckpointError, ConfigError
from any2point.utils.safe_load import load_torch_file

BANK_KEYS = frozenset({"features", "source"})


def read_memory_bank(path: str | Path) -> Tensor:
    """The ``(M, C)`` features of a bank file in our layout; anything else is a :class:`CheckpointError`."""
    obj = load_torch_file(path, "memory bank")
    if isinstance(obj, Tensor):
        raise CheckpointError(f"memory bank '{path}' is a bare tensor (the released cache_shape.pt layout); "
                              f"convert it with `python tools/build_memory_bank.py --released {path} --out NEW`")
    if not isinstance(obj, Mapping) or set(obj) != BANK_KEYS:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"memory bank '{path}' must hold exactly {sorted(BANK_KEYS)}, got {keys}")
    features = obj["features"]
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise CheckpointError(f"memory bank '{path}': 'features' must be a 2-D float tensor (M, C)")
    return features.float()


def read_bank_source(path: str | Path) -> Mapping[str, Any]:
    """The identity (``name``, ``weights``, ``sha256``) of the source a bank file was built with."""
    obj = load_torch_file(path, "memory bank")
    source = obj.get("source") if isinstance(obj, Mapping) else None
    return source if isinstance(source, Mapping) else {}


def check_bank_source(path: str | Path, sha256: Optional[str]) -> None:
    """Fail when the bank at ``path`` was built with other weights than those of sha256 ``sha256``
    (unchecked when either is unknown: a converted released bank, a random-init source)."""
    built = read_bank_source(path).get("sha256")
    if built is not None and sha256 is not None and built != sha256:
        raise CheckpointError(f"memory bank '{path}' was built with other source weights (sha256 {built[:12]}...) "
                              f"than the source loaded here ({sha256[:12]}...); rebuild it with "
                              f"tools/build_memory_bank.py")


def save_memory_bank(features: Tensor, source: Mapping[str, Optional[str]], path: str | Path) -> None:
    """Write a bank file atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"features": features.detach().float().cpu().contiguous(), "source": dict(source)}, tmp)
    tmp.replace(path)


def convert_released_bank(released: str | Path, out: str | Path) -> Tensor:
    """Convert the released ``cache_shape.pt`` (a bare ``(C, M)`` tensor) to our layout at ``out``."""
    obj = load_torch_file(released, "released memory bank")
    if not isinstance(obj, Tensor) or obj.ndim != 2 or not obj.is_floating_point():
        raise CheckpointError(f"released memory bank '{released}' must be a bare 2-D float tensor (C, M), got "
                              f"{type(obj).__name__}")
    features = obj.t()
    save_memory_bank(features, {"name": "released cache_shape.pt", "weights": str(released), "sha256": None}, out)
    return features


@torch.no_grad()
def extract_features(source: torch.nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """The 3D-pretrained source's global features ``(M, C)`` of clouds ``(B, N, 3)``: its own tokenizer
    and position embedding, its blocks and final norm, max over tokens, in eval mode."""
    if getattr(source, "modality_dim", None) != 3:
        raise ConfigError(f"a memory bank needs a 3D-pretrained source (PointMAESource, PointBERTSource), "
                          f"not '{getattr(source, 'name', type(source).__name__)}'")
    was_training = source.training
    source.eval()
    out = []
    for points in batches:
        centres, tokens = source.tokenize(points)
        out.append(source(tokens, source.embed_positions(centres)).float().cpu())
    source.train(was_training)
    return torch.cat(out)
