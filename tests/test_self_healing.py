"""The queue heals itself: Redis restarting empty, Redis down then back, a process restart.

Each test runs its own redis-server (``PrivateRedis``) so it can SIGKILL and restart it; the
database is the parametrized backend's. Nothing here needs an operator: the database is the
queue of record and the Redis side only carries wake-ups, which resume on their own.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from bucket.extensions import queue
from tests.concurrency import join_all
from tests.queue_helpers import (
    Waiter,
    ack,
    expire,
    ingest,
    measure_wake_up,
    poll,
    status,
    wait_until_listening,
)
from tests.servers import PrivateRedis


@pytest.fixture
def private_redis():
    """A redis-server of this test's own."""
    server = PrivateRedis().start()
    yield server
    server.stop()


def drain(client, served: Counter) -> None:
    """Poll and ack until nothing is visible, counting every delivery."""
    while (batch := poll(client, limit=50))["count"]:
        for packet in batch["packets"]:
            served[packet["packet_id"]] += 1
            assert ack(client, packet["packet_id"], receipt=packet["receipt"]).status_code == 200


def until(condition, seconds: float = 10.0) -> float:
    """Wait for ``condition()``; return how long it took (fail after ``seconds``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "did not heal in time"
        time.sleep(0.1)
    return time.monotonic() - started


def on_redis(client) -> bool:
    """The instance answers that it uses Redis and Redis answers."""
    figures = status(client)
    return figures["redis_connected"] and figures["queue_backend"] == "redis"


def test_every_packet_is_served_once_after_redis_restarts_empty(make_app, private_redis):
    """Packets stored before, during and after a Redis crash are all served, none twice."""
    app = make_app(REDIS_URL=private_redis.url)
    client = app.test_client()
    before = [ingest(client, user_id="heal") for _ in range(5)]
    leased = poll(client, limit=2)["packets"]

    private_redis.kill()
    during = [ingest(client, user_id="heal") for _ in range(3)]
    figures = status(client)
    assert figures["redis_connected"] is False
    assert figures["queue_backend"] == "memory"

    private_redis.start()
    after = [ingest(client, user_id="heal") for _ in range(2)]
    served: Counter[str] = Counter()
    drain(client, served)
    crashed = {p["packet_id"] for p in leased}
    assert set(served) == set(before + during + after) - crashed
    assert set(served.values()) == {1}, "nothing is served twice"

    expire(app, sorted(crashed))  # the consumer that held them crashed with Redis
    drain(client, served)
    assert set(served) == set(before + during + after)
    assert set(served.values()) == {1}
    figures = status(client)
    assert (figures["processed_packets"], figures["pending_packets"]) == (10, 0)


def test_wake_ups_return_to_redis_after_it_was_down(make_app, private_redis):
    """A poll already waiting when Redis died is woken through Redis once it is back, unaided.

    Only the listener thread reconnecting on its own can wake it: the poll re-checks the
    database every 30 s here, and no new poll comes along to start a fresh listener.
    """
    waiting = make_app(REDIS_URL=private_redis.url, BUCKET_LONG_POLL_INTERVAL=30)
    ingesting = make_app(REDIS_URL=private_redis.url, BUCKET_REDIS_RETRY_AFTER=1.0)
    client = ingesting.test_client()
    measure_wake_up(waiting, client, wait=8, label="across instances, before the crash")
    with waiting.app_context():
        listener = queue.state.redis

    waiter = Waiter(waiting, 15)
    started = time.monotonic()
    waiter.start()
    wait_until_listening(waiting)
    private_redis.kill()
    until(lambda: not listener.subscribed.is_set())
    assert status(client)["queue_backend"] == "memory"

    private_redis.start()
    healed = until(lambda: on_redis(client) and listener.subscribed.is_set())
    print(f"\nback on Redis {healed:.2f} s after it restarted")
    packet_id = ingest(client, user_id="after-restart")
    ingested_at = time.monotonic()
    join_all([waiter], 20, "long poll")
    assert waiter.body is not None
    assert [p["packet_id"] for p in waiter.body["packets"]] == [packet_id]
    assert waiter.returned_at - started < 15, "the waiting poll was never woken"
    print(
        f"wake-up latency of a poll that waited through the restart: "
        f"{(waiter.returned_at - ingested_at) * 1000:.1f} ms"
    )


def test_service_started_without_redis_switches_to_it_when_it_appears(make_app):
    """Redis unreachable at start: memory serves; once Redis answers, it is used again."""
    server = PrivateRedis()  # its port is chosen, nothing listens there yet
    try:
        app = make_app(REDIS_URL=server.url, BUCKET_REDIS_RETRY_AFTER=0.5)
        client = app.test_client()
        packet_id = ingest(client, user_id="no-redis")
        assert status(client)["redis_connected"] is False
        served = poll(client, limit=10)["packets"]
        assert [p["packet_id"] for p in served] == [packet_id]

        server.start()
        until(lambda: on_redis(client))
        waiting = make_app(REDIS_URL=server.url, BUCKET_LONG_POLL_INTERVAL=30)
        measure_wake_up(waiting, client, wait=8, label="after Redis appeared")
    finally:
        server.stop()


def test_restarted_process_serves_what_the_old_one_left(make_app, private_redis):
    """A new process (fresh memory, flushed Redis) serves every pending and expired packet once."""
    old = make_app(REDIS_URL=private_redis.url)
    old_client = old.test_client()
    ids = [ingest(old_client, user_id="restart") for _ in range(6)]
    held = poll(old_client, limit=3)["packets"]
    with old.app_context():
        queue.flush()

    new = make_app(REDIS_URL=private_redis.url)
    new_client = new.test_client()
    served: Counter[str] = Counter()
    drain(new_client, served)
    held_ids = {p["packet_id"] for p in held}
    assert set(served) == set(ids) - held_ids, "held leases stay with their holder until expiry"
    expire(new, sorted(held_ids))
    drain(new_client, served)
    assert set(served) == set(ids)
    assert set(served.values()) == {1}
    assert status(new_client)["processed_packets"] == 6
