"""Where each key of a loaded config was set: a file of its ``_base_`` chain or the command line.

The loader records, per leaf key, the file that set it last (``root._metadata.provenance``); errors
about a key name that file. This module imports nothing of the package, so the registry and the
config loader can both use it.
"""
from __future__ import annotations

import re
from typing import Optional

from omegaconf import DictConfig

CLI = "the command line"


def origin_of(node: DictConfig, key: str) -> Optional[str]:
    """The file (or the command line) that set ``key`` of ``node``, if recorded."""
    root = node._get_root()
    provenance = getattr(root._metadata, "provenance", None) or {}
    full = node._get_full_key(key)
    while full:
        if full in provenance:
            return provenance[full]
        parent = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", full)  # "a.b[1].c" -> "a.b[1]" -> "a.b" -> "a"
        if parent == full:
            return None
        full = parent
    return None
