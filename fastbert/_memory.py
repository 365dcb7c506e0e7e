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
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

__all__ = ["release_free_memory"]


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
