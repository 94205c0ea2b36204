"""In-memory backend: wakes waiters of this process only; other processes rely on polling."""

from __future__ import annotations

from bucket.queue.base import WakeSignal


class MemoryBackend:
    """Process-local backend used when Redis is not configured or not reachable."""

    name = "memory"

    def __init__(self) -> None:
        self._signals: list[WakeSignal] = []

    def publish_ready(self) -> None:
        for signal in self._signals:
            signal.bump()

    def listen(self, signal: WakeSignal) -> None:
        if signal not in self._signals:
            self._signals.append(signal)

    def ping(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing is held in memory beyond wake-ups, so there is nothing to drop."""
