"""Keep freed CPU memory in the process for reuse.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the system when
freed, so each large activation of a training step costs page faults on first touch: on a shared
2-core VM that doubled the Point-PN tokenizer's step time. Serving all allocations from the heap and
never trimming it lets the step reuse its own pages (the resident memory stays at the step's peak,
which a training process reaches anyway). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc
for the same reason; this needs no preload.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; ``False`` where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
