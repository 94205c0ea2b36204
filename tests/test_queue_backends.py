"""The queue backends' shared contract, run against the memory backend and a real Redis."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from bucket.queue.base import QueueBackend, WakeSignal
from bucket.queue.memory import MemoryBackend
from bucket.queue.redis_backend import RedisBackend
from tests.concurrency import join_all


@pytest.fixture(params=["memory", "redis"])
def make_backend(request):
    """Build backends of one kind; Redis ones share a fresh key prefix and are flushed after."""
    prefix = f"bucket-test-{uuid.uuid4().hex[:10]}"
    built: list = []

    def build():
        if request.param == "memory":
            backend = MemoryBackend()
        else:
            backend = RedisBackend(request.getfixturevalue("redis_url"), prefix)
        built.append(backend)
        return backend

    yield build
    if request.param == "redis":
        built[0].flush()


def listening(backend, signal: WakeSignal) -> None:
    """Start listening and, for Redis, wait until the subscription is confirmed."""
    backend.listen(signal)
    subscribed = getattr(backend, "subscribed", None)
    if subscribed is not None:
        assert subscribed.wait(5), "the listener never subscribed"


def test_each_backend_implements_the_protocol_and_answers(make_backend):
    """Both kinds satisfy QueueBackend and answer a ping."""
    backend = make_backend()
    assert isinstance(backend, QueueBackend)
    assert backend.ping() is True
    assert backend.name in {"memory", "redis"}


def test_an_announcement_wakes_a_listener(make_backend):
    """publish_ready bumps every listening signal: what long polls wait on."""
    backend = make_backend()
    signal = WakeSignal()
    listening(backend, signal)
    seen = signal.generation
    backend.publish_ready()
    assert signal.wait(seen, 5.0)


def test_flush_keeps_listeners_working(make_backend):
    """A flush drops what the backend holds, never the ability to wake waiters: a poll already
    waiting when the flush happens is still woken by the next announcement, and only once."""
    backend = make_backend()
    signal = WakeSignal()
    listening(backend, signal)
    seen = signal.generation
    woken = threading.Event()
    waiter = threading.Thread(target=lambda: signal.wait(seen, 10.0) and woken.set(), daemon=True)
    waiter.start()
    backend.flush()
    assert not woken.wait(0.3), "a flush is not an announcement"
    backend.publish_ready()
    join_all([waiter], 10, "waiter")
    assert woken.is_set()
    assert signal.generation == seen + 1


def test_redis_announcements_cross_processes_but_not_prefixes(redis_url):
    """Another client on the same prefix wakes the listener; another prefix does not."""
    prefix = f"bucket-test-{uuid.uuid4().hex[:10]}"
    listener = RedisBackend(redis_url, prefix)
    signal = WakeSignal()
    listening(listener, signal)

    seen = signal.generation
    RedisBackend(redis_url, f"{prefix}-other").publish_ready()
    assert not signal.wait(seen, 0.3)

    RedisBackend(redis_url, prefix).publish_ready()
    assert signal.wait(seen, 5.0)


def test_redis_flush_removes_only_its_own_keys(redis_url):
    """Keys are namespaced: a flush never touches another deployment's keys."""
    prefix = f"bucket-test-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(redis_url)
    client.set(f"{prefix}:probe", 1)
    client.set(f"{prefix}-neighbour:probe", 1)
    try:
        RedisBackend(redis_url, prefix).flush()
        assert client.exists(f"{prefix}:probe") == 0
        assert client.exists(f"{prefix}-neighbour:probe") == 1
    finally:
        client.delete(f"{prefix}-neighbour:probe")
        client.close()
