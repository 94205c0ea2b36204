"""Releasing a lease: visible again at once, but never an extra try past the last delivery."""

from __future__ import annotations

import pytest

from tests.queue_helpers import ingest, poll, row, status

API = "/api/v1/bucket/prana"


@pytest.fixture
def app_config() -> dict:
    return {"BUCKET_MAX_ATTEMPTS": 2, "BUCKET_RETRY_BACKOFF": 0}


def release(client, packet: dict):
    return client.post(
        f"{API}/packets/lease",
        json={
            "packet_id": packet["packet_id"],
            "receipt": packet["receipt"],
            "visibility_timeout": 0,
        },
    )


def test_a_released_packet_is_served_again_at_once(client, app):
    """Released before the last delivery: pending and visible immediately, count kept."""
    packet_id = ingest(client)
    (first,) = poll(client, visibility_timeout=600)["packets"]
    answer = release(client, first)
    assert answer.status_code == 200
    assert answer.json["status"] == "released"
    (again,) = poll(client)["packets"]
    assert again["packet_id"] == packet_id
    assert again["delivery_count"] == 2


def test_releasing_the_last_allowed_delivery_dead_letters_with_a_reason(client, app):
    """On its last delivery a release ends the packet dead, with last_error saying why."""
    packet_id = ingest(client)
    release(client, poll(client, visibility_timeout=600)["packets"][0])
    last = poll(client, visibility_timeout=600)["packets"][0]
    answer = release(client, last)
    assert answer.status_code == 200
    assert answer.json["status"] == "dead"
    stored = row(app, packet_id)
    assert stored.delivery_state == "dead"
    assert "released" in stored.last_error
    assert poll(client)["packets"] == []
    assert status(client)["dead_packets"] == 1
