"""Consumer crashes: unacknowledged packets come back, and a poison packet dies alone.

Lease expiry is driven by moving ``visible_at`` into the past (``tests.queue_helpers.expire``);
tests/test_consumer.py has the test that waits out a real one-second lease.
"""

from __future__ import annotations

from collections import Counter

from tests.queue_helpers import ack, expire, ingest, poll, row, status


def test_unacknowledged_packets_return_after_the_lease_with_count_incremented(client, app):
    """A consumer that crashes before acking loses nothing: the packets are served again."""
    ids = [ingest(client, user_id="crash") for _ in range(3)]
    first = poll(client, limit=10, visibility_timeout=60)
    assert sorted(p["packet_id"] for p in first["packets"]) == sorted(ids)
    assert poll(client, limit=10)["count"] == 0, "leased packets are invisible to others"

    expire(app, ids)  # the consumer crashed: its leases run out
    seen = []
    for _ in range(3):
        again = poll(client, limit=10)
        assert again["count"] == 1, "expired leases come back one at a time"
        (packet,) = again["packets"]
        assert packet["delivery_count"] == 2
        assert packet["suspect"] is True
        assert packet["receipt"] != first["packets"][0]["receipt"]
        seen.append(packet["packet_id"])
    assert sorted(seen) == sorted(ids)


def test_suspects_are_served_apart_from_healthy_packets(client, app):
    """A batch never mixes a suspect with healthy packets, and suspects come in batches of 1."""
    suspects = [ingest(client, user_id="mixed") for _ in range(2)]
    poll(client, limit=10)
    expire(app, suspects)
    healthy = [ingest(client, user_id="mixed") for _ in range(3)]

    batches = []
    while (served := poll(client, limit=10))["count"]:
        batches.append(served)
    shapes = [(b["count"], {p["suspect"] for p in b["packets"]}) for b in batches]
    # The suspects expired before the healthy packets arrived, so they keep their FIFO turn.
    assert shapes == [(1, {True}), (1, {True}), (3, {False})]
    assert sorted(p["packet_id"] for p in batches[-1]["packets"]) == sorted(healthy)


def test_poison_packet_dies_alone_while_its_batch_mates_are_processed(make_app):
    """The unchanged poller gives up at the poison packet every time; only the poison ends dead."""
    max_attempts = 4
    app = make_app(BUCKET_MAX_ATTEMPTS=max_attempts)
    client = app.test_client()
    ids = [ingest(client, user_id="batch", focus_score=None if n == 4 else 60) for n in range(10)]
    poison = ids[4]
    processed: Counter[str] = Counter()
    deliveries: Counter[str] = Counter()

    for _round in range(30):
        served = poll(client, limit=10, visibility_timeout=60)
        if served["count"] == 0:
            if status(client)["pending_packets"] == 0:
                break
            expire(app)  # the poller crashed: its leases run out
            continue
        for packet in served["packets"]:
            deliveries[packet["packet_id"]] += 1
            if packet["focus_score"] is None:
                break  # the poller cannot handle it and leaves the rest of the batch unacked
            processed[packet["packet_id"]] += 1
            assert ack(client, packet["packet_id"], success=True).status_code == 200
    else:
        raise AssertionError("the queue never drained")

    mates = [pid for pid in ids if pid != poison]
    assert dict(processed) == {pid: 1 for pid in mates}, "each batch-mate processed exactly once"
    assert all(deliveries[pid] <= 2 for pid in mates), deliveries
    dead = row(app, poison)
    assert dead.delivery_state == "dead"
    assert dead.delivery_count == max_attempts
    assert deliveries[poison] == max_attempts
    figures = status(client)
    assert (figures["processed_packets"], figures["dead_packets"]) == (9, 1)
    assert figures["pending_packets"] == 0
    assert poll(client, limit=10)["count"] == 0
