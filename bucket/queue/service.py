"""The queue service extension: picks Redis or memory and survives Redis coming and going."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import redis

from bucket.queue.announcer import Announcer
from bucket.queue.base import QueueBackend, WakeSignal
from bucket.queue.memory import MemoryBackend
from bucket.queue.redis_backend import RedisBackend

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

EXTENSION_KEY = "bucket.queue"


class QueueState:
    """Per-application state of the queue service, kept in ``app.extensions``."""

    def __init__(self, redis_url: str | None, prefix: str, retry_after: float) -> None:
        # Both backends implement QueueBackend: memory always (this process's waiters), Redis
        # when configured (every process of every instance).
        self.memory: QueueBackend = MemoryBackend()
        self.redis: RedisBackend | None = RedisBackend(redis_url, prefix) if redis_url else None
        self.signal = WakeSignal()
        self.memory.listen(self.signal)
        self.retry_after = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.announcer = Announcer(self.publish_to_redis)

    def redis_usable(self) -> bool:
        """True when Redis is configured and not inside its back-off window after a failure."""
        return self.redis is not None and time.monotonic() >= self._down_until

    def mark_redis_down(self, exc: Exception) -> None:
        """Fall back to memory for a moment; the next call after it tries Redis again."""
        with self._lock:
            if time.monotonic() >= self._down_until:
                log.warning("redis unavailable, using the in-memory queue: %s", exc)
            self._down_until = time.monotonic() + self.retry_after

    def publish_to_redis(self) -> None:
        """One PUBLISH to every process of every instance (run by the announcer thread)."""
        if not self.redis_usable():
            return
        try:
            self.redis.publish_ready()
        except (redis.RedisError, OSError) as exc:
            self.mark_redis_down(exc)


class QueueService:
    """Flask extension in front of the queue backends (Redis when reachable, memory otherwise)."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register per-app state; nothing connects until the first use."""
        app.extensions[EXTENSION_KEY] = QueueState(
            app.config["REDIS_URL"],
            app.config["BUCKET_REDIS_PREFIX"],
            app.config["BUCKET_REDIS_RETRY_AFTER"],
        )

    @property
    def state(self) -> QueueState:
        from flask import current_app

        return current_app.extensions[EXTENSION_KEY]

    @property
    def backend_name(self) -> str:
        """The backend in use right now: ``redis`` or ``memory``."""
        state = self.state
        return "redis" if state.redis_usable() else "memory"

    def redis_connected(self) -> bool:
        """Ping Redis (fast-failing); False when it is not configured or does not answer."""
        state = self.state
        if state.redis is None:
            return False
        try:
            return state.redis.ping()
        except (redis.RedisError, OSError) as exc:
            state.mark_redis_down(exc)
            return False

    def publish_ready(self) -> None:
        """Announce new or returned packets: local waiters at once, other processes via Redis
        from the background announcer (the caller never waits on the network)."""
        state = self.state
        state.memory.publish_ready()
        if state.redis is not None:
            state.announcer.request()

    def wake_generation(self) -> int:
        """Read before looking in the database, then pass to ``wait_for_ready``."""
        state = self.state
        if state.redis is not None:
            state.redis.listen(state.signal)
        return state.signal.generation

    def wait_for_ready(self, seen_generation: int, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for an announcement newer than ``seen_generation``."""
        return self.state.signal.wait(seen_generation, timeout)

    def flush(self) -> None:
        """Drop what the backends hold; the database keeps every packet."""
        state = self.state
        state.memory.flush()
        if state.redis is not None:
            try:
                state.redis.flush()
            except (redis.RedisError, OSError) as exc:
                state.mark_redis_down(exc)
