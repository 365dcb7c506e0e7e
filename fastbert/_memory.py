"""Bounded memory for long-running processes: hand freed heap pages back to the OS after each encode call.

Why: on glibc, the activations of one encoder call (tens to hundreds of MiB, a different size for every batch
shape: the packed path makes ``(total_tokens, hidden)`` tensors of every size) are served from malloc's heap
once glibc's dynamic mmap threshold has risen past them (it rises to the size of each large block freed, up to
32 MiB on 64-bit, and most activation blocks are below that). Freed, they stay in the heap as free chunks, and
with varied sizes the free space is fragmented and rarely shrinks from the top: measured on all-MiniLM-L6-v2,
after 5 varied calls the heap held 150 MiB in use and 107 MiB free, and RSS kept rising call after call.
``malloc_trim(0)`` returns the free pages inside the heap (not only at its top) with ``madvise(MADV_DONTNEED)``;
it costs well under a millisecond to a few milliseconds, against calls that take tens of milliseconds or more.

Only glibc has ``malloc_trim``; elsewhere (musl, macOS, Windows) this does nothing. ``FASTBERT_MALLOC_TRIM=0``
turns it off (for a process that sets ``MALLOC_*`` tunables itself or links another allocator).

The second leak is per shape, in oneDNN (the cpp backend's GEMMs go through ``mkldnn::_linear_pointwise``):
ideep caches each input shape's compiled GEMM in an LRU of ``LRU_CACHE_CAPACITY`` entries (default 1024) and
oneDNN its primitives in another (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024). Every distinct token
count is a new shape: measured with a 384 -> 1536 GEMM + GELU at 400 row counts, RSS (after malloc_trim) grew by
250 MiB with the defaults, by 127 MiB with the oneDNN cache at 16, and by 17 MiB with both at 16. Both are read
from the environment when oneDNN is first used, so importing this module (``fastbert.sentence`` does) sets
them to ``ONEDNN_CACHE_CAPACITY`` unless the process already has them: 64 entries keep every shape of a batch
(4 GEMM shapes per encoder layer, the same in every layer) and of the last few batches. Set either variable
yourself to keep another value; it has no effect once oneDNN has run in the process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

__all__ = ["ONEDNN_CACHE_CAPACITY", "bound_onednn_caches", "release_free_memory"]

#: Entries of ideep's GEMM cache and oneDNN's primitive cache (each defaults to 1024; ~0.3-0.6 MiB an entry).
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap ideep's and oneDNN's per-shape caches at ``capacity`` entries, unless the environment sets them.

    Effective only before oneDNN's first primitive in this process (it reads the variables once).
    """
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the libc this process already runs with; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the symbols already loaded into the process: its own libc
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); True when something was released.

    Called by ``SentenceEncoder.encode`` and ``CrossEncoder.predict`` after every call, so a process that
    embeds batch after batch of varied sizes levels off instead of growing. Does nothing when
    ``FASTBERT_MALLOC_TRIM=0`` or without glibc.
    """
    if os.environ.get("FASTBERT_MALLOC_TRIM", "1") == "0":
        return False
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


bound_onednn_caches()
