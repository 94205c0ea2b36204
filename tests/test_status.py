"""Status counts match what was done: total, processed, pending, leased, retrying, dead, ready."""

from __future__ import annotations

import time

from bucket.services.stats import HEAD_ROWS
from tests.factories import make_packet
from tests.queue_helpers import expire

API = "/api/v1/bucket/prana"
STATUS = f"{API}/status"
ACK = f"{API}/packets/mark-processed"


def ingest(client, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post(f"{API}/ingest", json=make_packet())
        assert response.status_code == 200
        ids.append(response.json["packet_id"])
    return ids


def test_empty_status_reports_zeros_and_the_live_backend(client, backend):
    """A fresh service: every count zero, no oldest age, the backend pair in use."""
    body = client.get(STATUS).json
    for name in (
        "queue_size",
        "total_packets",
        "processed_packets",
        "pending_packets",
        "leased_packets",
        "retrying_packets",
        "dead_packets",
    ):
        assert body[name] == 0, name
    assert body["oldest_pending_age_seconds"] is None
    if backend == "postgres":
        assert (body["redis_connected"], body["queue_backend"]) == (True, "redis")
    else:
        assert (body["redis_connected"], body["queue_backend"]) == (False, "memory")


def test_counts_follow_every_delivery_state(make_app):
    """processed, leased, retrying, dead and ready packets are each counted where they belong."""
    app = make_app(BUCKET_MAX_ATTEMPTS=2, BUCKET_RETRY_BACKOFF=3600)
    client = app.test_client()
    a, b, c, d, e, f = ingest(client, 6)
    polled = client.get(f"{API}/packets/pending?limit=2&visibility_timeout=600").json
    assert [p["packet_id"] for p in polled["packets"]] == [a, b]
    assert client.post(ACK, json={"packet_id": a, "success": True}).status_code == 200
    for _ in range(2):  # two failed deliveries of c: dead at the second
        assert client.post(ACK, json={"packet_id": c, "success": False}).status_code == 200
    assert client.post(ACK, json={"packet_id": d, "success": False}).status_code == 200

    body = client.get(STATUS).json
    assert body["total_packets"] == 6
    assert body["processed_packets"] == 1  # a
    assert body["dead_packets"] == 1  # c
    assert body["leased_packets"] == 1  # b
    assert body["retrying_packets"] == 1  # d, waiting out its back-off
    assert body["pending_packets"] == 4  # b, d, e, f: not processed, not dead
    assert body["queue_size"] == 2  # e, f could be polled right now
    assert body["oldest_pending_age_seconds"] >= 0


def test_queue_size_counts_an_expired_lease_as_ready(client, app):
    """A lease that ran out is pollable again, so queue_size includes it."""
    first, _ = ingest(client, 2)
    polled = client.get(f"{API}/packets/pending?limit=1&visibility_timeout=60").json
    assert [p["packet_id"] for p in polled["packets"]] == [first]
    body = client.get(STATUS).json
    assert (body["queue_size"], body["leased_packets"], body["pending_packets"]) == (1, 1, 2)
    expire(app, [first])  # the lease runs out
    body = client.get(STATUS).json
    assert (body["queue_size"], body["leased_packets"], body["pending_packets"]) == (2, 1, 2)


def test_oldest_pending_age_grows_and_clears_when_all_are_processed(client):
    """The age of the oldest unfinished packet grows with time and is null once none remain."""
    ids = ingest(client, 2)
    first = client.get(STATUS).json["oldest_pending_age_seconds"]
    time.sleep(0.3)
    second = client.get(STATUS).json["oldest_pending_age_seconds"]
    assert 0 <= first < second < 60
    for packet_id in ids:
        client.post(ACK, json={"packet_id": packet_id, "success": True})
    body = client.get(STATUS).json
    assert body["oldest_pending_age_seconds"] is None
    assert (body["processed_packets"], body["pending_packets"], body["queue_size"]) == (2, 0, 0)


def test_oldest_pending_age_is_exact_only_below_the_head_size(client):
    """``oldest_pending_age_exact`` holds with HEAD_ROWS - 1 ready packets; at exactly HEAD_ROWS
    the head read is full, a packet behind it cannot be ruled out, and it says so."""
    batch = [make_packet() for _ in range(HEAD_ROWS - 1)]
    assert client.post(f"{API}/ingest", json={"packets": batch}).status_code == 200
    below = client.get(STATUS).json
    assert below["queue_size"] == HEAD_ROWS - 1 and below["oldest_pending_age_exact"] is True
    ingest(client, 1)
    full = client.get(STATUS).json
    assert full["queue_size"] == HEAD_ROWS and full["oldest_pending_age_exact"] is False


def test_duplicates_and_rejections_do_not_count(client):
    """Only stored packets are counted: duplicates and invalid packets add nothing."""
    packet = make_packet()
    client.post(f"{API}/ingest", json=packet)
    client.post(f"{API}/ingest", json=packet)
    client.post(f"{API}/ingest", json=make_packet(focus_score=1000))
    client.post(f"{API}/ingest", json={"packets": [packet, make_packet(role="x")]})
    body = client.get(STATUS).json
    assert (body["total_packets"], body["pending_packets"], body["queue_size"]) == (1, 1, 1)


def test_status_agrees_with_the_poller_queue_size(client):
    """pending's queue_size and status's queue_size describe the same ready set."""
    ingest(client, 5)
    polled = client.get(f"{API}/packets/pending?limit=2").json
    assert polled["queue_size"] == client.get(STATUS).json["queue_size"] == 3
