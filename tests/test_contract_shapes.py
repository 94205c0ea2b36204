"""The five endpoints kept from the original answer its shapes (CONTRACT.md), field for field.

Deployed clients parse these answers and cannot change; what this service adds travels in
other fields (README, "Where this service answers differently from the original").
"""

from __future__ import annotations

from tests.contract import PENDING_FIELDS, STATUS_FIELDS, USER_FIELDS
from tests.factories import fixture, make_packet

API = "/api/v1/bucket/prana"


def test_ingest_answers_status_packet_id_and_received_at(client):
    """``{"status": "ingested", "packet_id", "received_at"}``, status 200."""
    response = client.post(f"{API}/ingest", json=fixture("gurukul_packet.json"))
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ingested" and isinstance(body["packet_id"], str)
    assert isinstance(body["received_at"], str) and body["received_at"].endswith("+00:00")


def test_pending_answers_packets_count_and_queue_size(client):
    """``{"packets": [...], "count", "queue_size"}``, each packet with the contract's fields."""
    for _ in range(3):
        assert client.post(f"{API}/ingest", json=make_packet()).status_code == 200
    body = client.get(f"{API}/packets/pending?limit=2").json
    assert {"packets", "count", "queue_size"} <= set(body)
    assert body["count"] == len(body["packets"]) == 2 and body["queue_size"] == 1
    for packet in body["packets"]:
        assert PENDING_FIELDS <= set(packet), PENDING_FIELDS - set(packet)


def test_mark_processed_answers_the_original_ok_shape(client):
    """A successful single acknowledgement: ``{"status": "ok", "message", "packet_id"}``, for
    every outcome that is a 200; this service's outcome travels in ``outcome``."""
    first, second = (
        client.post(f"{API}/ingest", json=make_packet()).json["packet_id"] for _ in range(2)
    )
    client.get(f"{API}/packets/pending?limit=2")
    ack = fixture("mark_processed.json")
    ack["packet_id"] = first
    done = client.post(f"{API}/packets/mark-processed", json=ack)
    assert done.status_code == 200
    assert done.json["status"] == "ok" and done.json["packet_id"] == first
    assert done.json["message"] == "Packet marked as processed"
    assert done.json["outcome"] == "processed"
    again = client.post(f"{API}/packets/mark-processed", json=ack)
    assert again.json["status"] == "ok" and again.json["outcome"] == "already_processed"
    failed = client.post(
        f"{API}/packets/mark-processed",
        json={"packet_id": second, "success": False, "karma_actions": None, "error_message": "x"},
    )
    assert failed.status_code == 200
    assert failed.json["status"] == "ok" and failed.json["outcome"] == "retry_scheduled"
    assert failed.json["message"] and failed.json["packet_id"] == second
    unknown = client.post(f"{API}/packets/mark-processed", json={**ack, "packet_id": "nope"})
    assert unknown.status_code == 404 and unknown.json["status"] != "ok"


def test_user_listing_answers_a_list_newest_first(client):
    """A JSON list of the user's packets, processed ones included, with the contract's fields."""
    ids = [
        client.post(f"{API}/ingest", json=make_packet(user_id="shape")).json["packet_id"]
        for _ in range(2)
    ]
    client.get(f"{API}/packets/pending?limit=1")
    client.post(f"{API}/packets/mark-processed", json={"packet_id": ids[0], "success": True})
    body = client.get(f"{API}/packets/user/shape?limit=50&processed_only=false").json
    assert isinstance(body, list) and [p["packet_id"] for p in body] == ids[::-1]
    for packet in body:
        assert USER_FIELDS <= set(packet), USER_FIELDS - set(packet)
    assert [p["processed_by_karma"] for p in body] == [False, True]


def test_status_answers_the_original_figures(client):
    """At least queue_size, redis_connected, total_packets, processed_packets, pending_packets."""
    client.post(f"{API}/ingest", json=make_packet())
    body = client.get(f"{API}/status").json
    assert STATUS_FIELDS <= set(body)
    assert body["total_packets"] == body["pending_packets"] == body["queue_size"] == 1
    assert body["processed_packets"] == 0 and isinstance(body["redis_connected"], bool)
