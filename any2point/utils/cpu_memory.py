"""Keep freed CPU memory in the process for reuse.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the system when
freed, so each large activation of a training step costs page faults on first touch: on a shared
2-core VM that doubled the Point-PN tokenizer's step time. Serving all allocations from the heap and
never trimming it lets the step reuse its own pages (the resident memory stays at the step's peak,
which a training process reaches anyway). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc
for the same reason; this needs no preload.

A heap that is never trimmed fragments: tensors whose sizes change from batch to batch (the guided
adapter's cells, the data's) leave holes that later, larger ones cannot use, and the resident memory
of a CPU run grew by about 0.4 GB per epoch of the demo while the memory in use stayed at 0.23 GB.
:func:`release_freed_memory` hands the free pages back once per epoch (``malloc_trim``), which costs
one step's page faults per epoch.

Within a step the holes come from how PyTorch allocates: every CPU tensor is a 64-byte aligned
``posix_memalign``, for which glibc takes a chunk a little larger than asked and frees the bits before
and after the aligned block. Those bits land in glibc's per-thread cache (tcache) and fast bins,
which never merge with their neighbours, so a freed activation stays a hole of exactly its own size,
and the next activation of that size, which again asks for a little more, cannot use it: at batch 32
of the paper configuration the resident memory rose to 5.4-6.7 GB while the live data peaked at
3.3 GB. With the fast bins off (:func:`keep_freed_memory`) and the tcache off
(:func:`restart_without_thread_cache`, before the process starts allocating) the bits merge back and
the holes are reused: 4.5-5.1 GB for the three paper configurations, at the same step time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Optional

_M_MXFAST, _M_TRIM_THRESHOLD, _M_MMAP_MAX = 1, -1, -4  # glibc <malloc.h>
NO_THREAD_CACHE = "glibc.malloc.tcache_count=0"


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse, and to merge small freed chunks at once (no
    fast bins); ``False`` where that is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_MXFAST, 0)])


def restart_without_thread_cache() -> None:
    """Start this program again, in this process, with glibc's per-thread cache of freed chunks off.

    glibc reads the setting (``GLIBC_TUNABLES``) only when a process starts, so this replaces the
    process by the same interpreter with the same arguments and environment plus
    ``glibc.malloc.tcache_count=0`` (``os.execv``: same PID, nothing of the old process survives);
    call it first thing. It does nothing where the C library is not glibc, or where
    ``GLIBC_TUNABLES`` already sets ``tcache_count`` (also the mark that the restart happened; set
    ``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` to run with glibc's default), or if the restart fails.
    """
    tunables = os.environ.get("GLIBC_TUNABLES")
    if "glibc.malloc.tcache_count" in (tunables or "") or not is_glibc():
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{NO_THREAD_CACHE}" if tunables else NO_THREAD_CACHE
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # e.g. the interpreter cannot be run again: carry on with the cache
        if tunables is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = tunables


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux with the GNU C library)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``); ``False`` where that
    is not available or nothing was released."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
