"""The small protocol every queue backend implements, and the in-process wake-up signal."""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable


@runtime_checkable
class QueueBackend(Protocol):
    """What the delivery logic needs from a queue backend."""

    name: str

    def publish_ready(self) -> None:
        """Tell every waiting consumer, in any process, that packets may be ready."""

    def listen(self, signal: WakeSignal) -> None:
        """Start forwarding other processes' announcements to ``signal`` (idempotent)."""

    def ping(self) -> bool:
        """Return whether the backend answers right now."""

    def flush(self) -> None:
        """Drop everything the backend holds (tests and operator rebuilds)."""


class WakeSignal:
    """A generation counter with a condition: waiters never miss a bump made after they looked."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        """The number of bumps so far; read it before checking the database."""
        return self._generation

    def bump(self) -> None:
        """Wake every waiter of this process."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, seen_generation: int, timeout: float) -> bool:
        """Wait until a bump newer than ``seen_generation`` or ``timeout``; True when bumped."""
        with self._condition:
            return self._condition.wait_for(lambda: self._generation != seen_generation, timeout)
