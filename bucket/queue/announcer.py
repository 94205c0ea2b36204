"""Background announcements: ingest never waits on a Redis round trip to wake other processes."""

from __future__ import annotations

import threading
from collections.abc import Callable

IDLE_EXIT_SECONDS = 30.0


class Announcer:
    """Runs ``send`` on one background thread per process, once per burst of requests.

    Ingest only sets an event (about a microsecond); the thread sends one announcement for
    every run of requests that arrived while it was busy, so a thousand packets per second cost
    a few hundred PUBLISH commands at most, off the request path. The thread exits when idle
    and the next request starts it again (also in a freshly forked worker).
    """

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
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
            self._send()
        with self._lock:
            self._thread = None
        if self._wanted.is_set():  # a request raced with the idle exit
            self._start()
