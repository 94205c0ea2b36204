"""Background announcements: ingest never waits on a Redis round trip to wake other processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

IDLE_EXIT_SECONDS = 30.0
# Sends are at least this far apart: under a steady stream of ingests (each thread finishing
# before the next request), a send per request cost every ingest a Redis round trip of CPU.
# A long poll in another process hears of new packets at most this much later.
MIN_SEND_INTERVAL = 0.02


class Announcer:
    """Runs ``send`` on one background thread per process, once per burst of requests.

    Ingest only sets an event (about a microsecond); the thread sends one announcement for
    every run of requests that arrived while it was busy or pausing, so however many packets
    arrive, a process sends at most 1 / ``min_interval`` PUBLISH commands a second, off the
    request path. The thread exits when idle
    and the next request starts it again (also in a freshly forked worker).
    """

    def __init__(self, send: Callable[[], None], min_interval: float = MIN_SEND_INTERVAL) -> None:
        self._send = send
        self._min_interval = min_interval
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Ask for an announcement soon; never blocks on the network."""
        self._wanted.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="bucket-announcer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._wanted.wait(IDLE_EXIT_SECONDS):
            self._wanted.clear()
            started = time.monotonic()
            self._send()
            pause = self._min_interval - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
        with self._lock:
            self._thread = None
        if self._wanted.is_set():  # a request raced with the idle exit
            self._start()
