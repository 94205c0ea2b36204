"""Threads and waits with deadlines: a waiting test fails with a message, it never hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


def wait_until(
    condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.05
) -> float:
    """Poll ``condition()`` until it is true; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"{message} (waited {elapsed:.1f} s)"
        time.sleep(interval)
    return time.monotonic() - started


def join_all(threads: Iterable[threading.Thread], timeout: float, what: str = "thread") -> None:
    """Join every thread within one shared deadline; fail naming those still running."""
    deadline = time.monotonic() + timeout
    threads = list(threads)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, f"{len(alive)} {what}(s) still running after {timeout:.0f} s: {alive}"


def run_threads(count: int, target: Callable[[int], Any], timeout: float = 60.0) -> list:
    """Run ``target(index)`` on ``count`` daemon threads released at once; return the results.

    An exception in any thread is raised here, and a thread that does not finish within
    ``timeout`` fails the test instead of hanging it.
    """
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            barrier.wait(timeout)
            results[index] = target(index)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the calling thread
            errors.append(exc)

    threads = [
        threading.Thread(target=body, args=(i,), name=f"worker-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    join_all(threads, timeout)
    if errors:
        raise errors[0]
    return results
