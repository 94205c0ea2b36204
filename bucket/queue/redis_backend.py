"""Redis backend: publishes readiness on a channel that every process of every instance hears."""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bucket.queue.base import WakeSignal

log = logging.getLogger(__name__)


def make_client(url: str) -> redis.Redis:
    """Build a client that fails fast: a dead Redis must never stall ingest or polls."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=0.25,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisBackend:
    """Shared backend for several workers and instances; its keys live under one prefix."""

    name = "redis"

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}:ready"
        self.client = make_client(url)
        self._signals: list[WakeSignal] = []
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()

    def publish_ready(self) -> None:
        self.client.publish(self.channel, b"1")

    def ping(self) -> bool:
        return bool(self.client.ping())

    def flush(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.prefix}:*"))
        if keys:
            self.client.delete(*keys)

    def listen(self, signal: WakeSignal) -> None:
        with self._lock:
            if signal not in self._signals:
                self._signals.append(signal)
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._listen_forever, name="bucket-redis-listener", daemon=True
                )
                self._listener.start()

    def _listen_forever(self) -> None:
        """Forward channel messages to local waiters; reconnect after Redis restarts."""
        while True:
            client = redis.Redis.from_url(
                self.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                # A reconnect may have missed announcements: wake waiters to look once.
                self._bump_all()
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self._bump_all()
            except (redis.RedisError, OSError) as exc:
                log.debug("redis listener lost its connection: %s", exc)
                time.sleep(0.5)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass

    def _bump_all(self) -> None:
        for signal in self._signals:
            signal.bump()
