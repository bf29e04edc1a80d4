"""Giving the memory of large request bodies back to the operating system.

glibc keeps what Python frees in its heaps (its mmap threshold adapts upwards after the first large free, so
later multi-megabyte bodies land on the heap, not in their own mappings), so a gateway that once held many large
bodies at a time kept that size for good: issue 11 measured 1.6 GB still resident after 120 abandoned 7.9 MB
requests had expired, with no Python object left holding them. malloc_trim(0) returns the free pages. It walks
the heap (a few ms for a heap of hundreds of MB), so it runs only after at least TRIM_AFTER_BYTES of large bodies
were released, and at most once per TRIM_EVERY_S; elsewhere (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LARGE_BODY_BYTES = 256 * 1024       # smaller bodies come and go within Python's own allocator
TRIM_AFTER_BYTES = 32 * 1024 * 1024
TRIM_EVERY_S = 1.0


def _malloc_trim() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class Reclaimer:
    """Counts the bytes of large request bodies released and trims the heap when enough were."""

    def __init__(self, trim: Callable[[], object] | None = None, after_bytes: int = TRIM_AFTER_BYTES,
                 every_s: float = TRIM_EVERY_S) -> None:
        self.trim = trim if trim is not None else _malloc_trim()
        self.after_bytes = after_bytes
        self.every_s = every_s
        self.released_bytes = 0
        self.trimmed_at = 0.0
        self.scheduled = False
        self.trims = 0

    def released(self, nbytes: int) -> None:
        """A request whose body was nbytes has ended (all it held is garbage now). Call on the event loop."""
        if nbytes < LARGE_BODY_BYTES or self.trim is None:
            return
        self.released_bytes += nbytes
        if self.released_bytes < self.after_bytes or self.scheduled:
            return
        wait = self.trimmed_at + self.every_s - time.monotonic()
        if wait <= 0:
            self.run()
        else:   # the rest of a wave of large requests ends within the interval: one trim after it
            self.scheduled = True
            asyncio.get_running_loop().call_later(wait, self.run)

    def run(self) -> None:
        assert self.trim is not None
        self.scheduled = False
        self.released_bytes = 0
        self.trimmed_at = time.monotonic()
        self.trim()
        self.trims += 1
