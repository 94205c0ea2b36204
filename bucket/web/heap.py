"""Giving a worker's freed heap back to the operating system.

glibc's malloc keeps what a process frees for reuse, in an arena per thread that allocates,
and returns it to the system only from the top of a heap. A worker's 16 threads free memory
all over theirs, so its resident size climbs through its first minutes under load and stays
there, though nothing in it is live: measured, 101.5 -> 108.7 MB over four minutes of ingest,
and 101.8 MB once ``malloc_trim(0)`` had released every free page of every arena (BENCHMARKS.md,
"The worker's memory, given back"). A memory graph that only climbs looks like a leak and moves
an instance toward its memory limit for nothing, so each worker calls ``malloc_trim`` every
``BUCKET_HEAP_TRIM_INTERVAL`` seconds from its event loop (``gunicorn_worker``). ctypes lets go
of the GIL during the call, so request threads keep running. A C library without it (musl,
macOS) makes this a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Releases the process's free heap pages, at most once an ``interval`` (0: never)."""

    def __init__(self, interval: float, now: float | None = None) -> None:
        self.interval = interval
        self._trim = malloc_trim() if interval > 0 else None
        self.next_at = (time.monotonic() if now is None else now) + interval
        self.trims = 0

    @property
    def active(self) -> bool:
        return self._trim is not None

    def tick(self, now: float) -> bool:
        """Trim if the interval has passed since the last trim; whether it did."""
        if self._trim is None or now < self.next_at:
            return False
        self.trim()
        self.next_at = now + self.interval
        return True

    def trim(self) -> bool:
        """Release every whole free page now; whether the C library could release any."""
        if self._trim is None:
            return False
        started = time.perf_counter()
        released = bool(self._trim(0))
        self.trims += 1
        log.debug(
            "heap of process %d trimmed in %.1f ms (pages released: %s)",
            os.getpid(),
            (time.perf_counter() - started) * 1000,
            released,
        )
        return released
