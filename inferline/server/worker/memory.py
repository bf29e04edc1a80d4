"""Giving a worker's memory back after a large batch.

A batch of large requests (up to max_batch_size x gateway.max_body_bytes of payload, and their decoded rows) can take
hundreds of MB while it runs. Once it is answered, glibc keeps what it freed for reuse: the heap's free pages stay
resident, and its mmap threshold has grown with each large block freed (up to 32 MiB), so later large arrays come from
that heap too. A worker's RSS then stays near the peak of its largest batch for good (measured before this: 0.77 ->
3.6 GB after one request of 200,000 texts). After a batch whose payloads passed TRIM_OVER_BYTES, malloc_trim(0)
returns the free pages to the system. Not after every batch: it walks the heap (tens of µs to a few ms)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_OVER_BYTES = 1 << 20   # a batch's payload bytes past which its memory is handed back once it is answered


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS): there nothing is done."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back() -> None:
    """Return the C heap's free pages to the system (glibc; a no-op elsewhere). Blocks for up to a few ms: callers
    run it off the event loop."""
    if _TRIM is not None:
        _TRIM(0)
