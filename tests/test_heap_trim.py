"""A worker gives the heap its threads freed back to the system (bucket/web/heap.py).

glibc keeps freed memory for reuse and returns only what lies at the top of a heap, so a
worker's resident size climbs under load and stays up. The trimmer must release the free pages
in the middle of the heap, and every worker the Procfile starts must call it when its interval
has passed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from bucket.web.heap import HeapTrimmer, malloc_trim
from tests.cluster import Instance, migrate
from tests.concurrency import wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(malloc_trim() is None, reason="the C library has no malloc_trim")

# 1 KiB blocks come from malloc (Python's own allocator takes only blocks up to 512 bytes);
# keeping one in 64 leaves no free stretch at the top of the heap for free() to give back.
FRAGMENTED_HEAP = """
import re
from bucket.web.heap import HeapTrimmer

def rss_mb():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", status).group(1)) / 1024

trimmer = HeapTrimmer(1.0)
blocks = [bytes(1024) for _ in range(96_000)]
kept = blocks[::64]
del blocks
freed = rss_mb()
released = trimmer.trim()
print(freed, rss_mb(), released, trimmer.trims)
"""


def test_the_trimmer_gives_freed_heap_in_the_middle_of_the_heap_back():
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    freed, trimmed, released, trims = done.stdout.split()
    # About 93 MB lie free between the blocks kept; allow for pages the kept blocks still touch.
    assert float(freed) - float(trimmed) > 60, done.stdout
    assert (released, trims) == ("True", "1")


def test_the_trimmer_trims_once_an_interval_and_never_at_zero():
    trimmer = HeapTrimmer(10.0, now=100.0)
    assert trimmer.active
    ticks = [trimmer.tick(now) for now in (105.0, 110.0, 115.0, 119.9, 121.0, 125.0)]
    assert ticks == [False, True, False, False, True, False]
    assert trimmer.trims == 2
    off = HeapTrimmer(0.0, now=100.0)
    assert not off.active
    assert [off.tick(now) for now in (100.0, 1e9)] == [False, False]
    assert not off.trim() and off.trims == 0


def test_every_worker_the_procfile_starts_trims_its_heap_when_due():
    with tempfile.TemporaryDirectory(prefix="bucket-heap-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(
            DATABASE_URL=f"sqlite:///{tmp}/bucket.sqlite3",
            BUCKET_HEAP_TRIM_INTERVAL="0.2",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="text",
        )
        migrate(env)
        instance = Instance(env, workers=2, threads=2).start()
        try:
            assert requests.get(f"{instance.url}/health", timeout=5).ok
            workers = set(instance.worker_pids())

            def both_trimmed() -> bool:
                found = re.findall(r"heap of process (\d+) trimmed in", instance.output())
                return workers <= {int(pid) for pid in found}

            wait_until(both_trimmed, 20, "not every worker trimmed its heap", interval=0.2)
        finally:
            instance.stop()
