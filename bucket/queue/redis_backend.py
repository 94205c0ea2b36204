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
    """Shared backend for several workers and instances; its keys live under one prefix.

    One listener thread per process forwards the ready channel to local waiters. It is started
    by the first long poll (never at import or before gunicorn forks), reconnects on its own
    after Redis restarts, notices a silent connection with a ping, and ends after a spell with
    no polls, the next poll starting it again.
    """

    name = "redis"
    # Seconds without traffic before the listener pings; no answer within as long: reconnect.
    LIVENESS_SECONDS = 5.0
    # Seconds without any poll before the listener thread ends (the next poll restarts it).
    IDLE_EXIT_SECONDS = 120.0
    RECONNECT_PAUSE = 0.25

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}:ready"
        self.client = make_client(url)
        self._signals: list[WakeSignal] = []
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_listen = time.monotonic()
        self.subscribed = threading.Event()

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
            self._last_listen = time.monotonic()
            if signal not in self._signals:
                self._signals.append(signal)
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._listen_forever, name="bucket-redis-listener", daemon=True
                )
                self._listener.start()

    def _idle(self) -> bool:
        """Decide, under the lock ``listen`` takes, whether the listener may end now."""
        with self._lock:
            if time.monotonic() - self._last_listen < self.IDLE_EXIT_SECONDS:
                return False
            self._listener = None
            self.subscribed.clear()
            return True

    def _listen_forever(self) -> None:
        """Forward channel messages to local waiters; reconnect after Redis restarts."""
        while not self._idle():
            client = redis.Redis.from_url(
                self.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                self._forward(pubsub)
            except (redis.RedisError, OSError) as exc:
                log.debug("redis listener lost its connection: %s", exc)
                time.sleep(self.RECONNECT_PAUSE)
            finally:
                self.subscribed.clear()
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass

    def _forward(self, pubsub: redis.client.PubSub) -> None:
        """Bump waiters per message until the connection fails, stalls or the process idles."""
        confirmation = pubsub.get_message(timeout=self.LIVENESS_SECONDS)
        if confirmation is None or confirmation.get("type") != "subscribe":
            raise redis.ConnectionError(f"unexpected answer to SUBSCRIBE: {confirmation!r}")
        # Announcements made while we were not subscribed were missed: wake waiters to look
        # (before ``subscribed`` is set, so whoever waits for it sees that wake-up done).
        self._bump_all()
        self.subscribed.set()
        awaiting_pong = False
        while True:
            message = pubsub.get_message(timeout=self.LIVENESS_SECONDS)
            if message is None:
                if awaiting_pong:
                    raise redis.ConnectionError("no answer to the listener's ping")
                if self._idle():
                    return
                pubsub.ping()
                awaiting_pong = True
                continue
            awaiting_pong = False
            if message.get("type") == "message":
                self._bump_all()

    def _bump_all(self) -> None:
        for signal in self._signals:
            signal.bump()
