"""Karma Tracker's side: pending leases each packet to one consumer, mark-processed records it."""

from __future__ import annotations

import time

import pytest

from bucket.api.presenters import processed_time
from tests.concurrency import run_threads
from tests.contract import PENDING_FIELDS as CONTRACT_FIELDS
from tests.factories import fixture, make_packet
from tests.queue_helpers import expire, row
from tests.queue_helpers import ingest_many as ingest

API = "/api/v1/bucket/prana"
PENDING = f"{API}/packets/pending"
ACK = f"{API}/packets/mark-processed"


def row_of(app, packet_id: str) -> dict:
    """The stored row of one packet, with its delivery."""
    return dict(row(app, packet_id)._mapping)


def poll_ids(client, query: str = "limit=10") -> list[str]:
    response = client.get(f"{PENDING}?{query}")
    assert response.status_code == 200
    return [p["packet_id"] for p in response.json["packets"]]


def test_pending_answers_in_the_contract_shape(client):
    """{packets, count, queue_size}, each packet with every field the poller reads."""
    client.post(f"{API}/ingest", json=fixture("gurukul_packet.json"))
    ingest(client, 2)
    body = client.get(f"{PENDING}?limit=2").json
    assert body["count"] == 2 == len(body["packets"])
    assert body["queue_size"] == 1
    for packet in body["packets"]:
        assert CONTRACT_FIELDS <= set(packet)
    gurukul = body["packets"][0]
    assert gurukul["user_id"] == "stu_1042"
    assert gurukul["raw_signals"] == fixture("gurukul_packet.json")["raw_signals"]
    assert gurukul["cognitive_state"] == "DEEP_FOCUS"


def test_pending_serves_oldest_first(client):
    """Packets leave in arrival order."""
    ids = ingest(client, 5)
    assert poll_ids(client, "limit=3") == ids[:3]
    assert poll_ids(client, "limit=3") == ids[3:]


def test_a_leased_packet_is_not_served_again_while_leased(client, app):
    """While its lease runs, no other poll gets the packet; the database says leased."""
    (packet_id,) = ingest(client)
    assert poll_ids(client) == [packet_id]
    assert poll_ids(client) == []
    row = row_of(app, packet_id)
    assert row["delivery_state"] == "leased"
    assert row["delivery_count"] == 1
    assert row["visible_at"] > time.time() + 30


def test_a_packet_is_served_again_after_its_lease_expires(client, app):
    """A consumer that never acknowledges does not lose the packet: it comes back."""
    (packet_id,) = ingest(client)
    assert poll_ids(client, "visibility_timeout=60") == [packet_id]
    assert poll_ids(client) == []
    expire(app, [packet_id])
    assert poll_ids(client) == [packet_id]
    assert row_of(app, packet_id)["delivery_count"] == 2


def test_a_short_lease_runs_out_on_the_real_clock(client, app):
    """A one-second lease really ends: after waiting it out, the packet is served as a suspect."""
    (packet_id,) = ingest(client)
    assert poll_ids(client, "visibility_timeout=1") == [packet_id]
    time.sleep(1.5)
    again = client.get(f"{PENDING}?limit=10").json["packets"]
    assert [p["packet_id"] for p in again] == [packet_id]
    assert (again[0]["delivery_count"], again[0]["suspect"]) == (2, True)


def test_default_lease_comes_from_config(make_app):
    """BUCKET_VISIBILITY_TIMEOUT sets the lease when the poll does not."""
    app = make_app(BUCKET_VISIBILITY_TIMEOUT=1234)
    client = app.test_client()
    (packet_id,) = ingest(client)
    before = time.time()
    assert poll_ids(client) == [packet_id]
    after = time.time()
    assert before + 1234 <= row_of(app, packet_id)["visible_at"] <= after + 1234
    assert poll_ids(client) == []


def test_limit_defaults_to_ten_and_reaches_five_hundred(client):
    """limit defaults to 10; a consumer may raise it to 500; queue_size counts the rest."""
    response = client.post(f"{API}/ingest", json={"packets": [make_packet() for _ in range(500)]})
    assert response.status_code == 200
    first = client.get(PENDING).json
    assert first["count"] == 10 and first["queue_size"] == 490
    rest = client.get(f"{PENDING}?limit=500").json
    assert rest["count"] == 490 and rest["queue_size"] == 0
    assert client.get(f"{PENDING}?limit=1").json["count"] == 0


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=2.5", "limit"),
        ("visibility_timeout=0", "visibility_timeout"),
        ("visibility_timeout=43201", "visibility_timeout"),
        ("visibility_timeout=soon", "visibility_timeout"),
        ("wait=21", "wait"),
        ("wait=-1", "wait"),
        ("wait=nan", "wait"),
        ("wait=inf", "wait"),
    ],
)
def test_out_of_range_poll_parameters_are_422(client, query, field):
    """Bad limit, visibility_timeout or wait is a 422 naming the parameter; nothing is leased."""
    ingest(client)
    response = client.get(f"{PENDING}?{query}")
    assert response.status_code == 422
    body = response.json
    assert body["code"] == 422 and body["message"]
    assert field in body["errors"]["query"]
    assert client.get(PENDING).json["count"] == 1


@pytest.mark.parametrize(
    "query", ["limit=1", "limit=500", "visibility_timeout=1", "visibility_timeout=43200", "wait=0"]
)
def test_edge_poll_parameters_are_accepted(client, query):
    """The documented bounds are inclusive."""
    ingest(client)
    assert client.get(f"{PENDING}?{query}").status_code == 200


def test_lease_length_follows_visibility_timeout(client, app):
    """visibility_timeout overrides the default lease for that poll."""
    (packet_id,) = ingest(client)
    before = time.time()
    body = client.get(f"{PENDING}?visibility_timeout=43200").json
    assert body["packets"][0]["packet_id"] == packet_id
    assert row_of(app, packet_id)["visible_at"] >= before + 43200 - 1


def test_successful_ack_stores_karma_actions_and_ends_delivery(client, app):
    """success: true records the karma actions; the packet is never served again."""
    (packet_id,) = ingest(client)
    poll_ids(client)
    ack = fixture("mark_processed.json")
    ack["packet_id"] = packet_id
    ack["karma_actions"][0]["packet_id"] = packet_id
    response = client.post(ACK, json=ack)
    assert response.status_code == 200
    assert response.json["packet_id"] == packet_id
    assert response.json["outcome"] == "processed"
    row = row_of(app, packet_id)
    assert row["delivery_state"] == "processed"
    assert row["processed_by_karma"] is True
    assert row["karma_actions"] == ack["karma_actions"]
    # The time as the listing shows it: PostgreSQL keeps it in visible_at only (0021).
    assert processed_time(row) is not None
    assert row["lease_id"] is None
    time.sleep(0.01)
    assert poll_ids(client) == []


def test_success_with_null_karma_actions_is_recorded(client, app):
    """karma_actions may be null."""
    (packet_id,) = ingest(client)
    poll_ids(client)
    response = client.post(
        ACK,
        json={
            "packet_id": packet_id,
            "success": True,
            "karma_actions": None,
            "error_message": None,
        },
    )
    assert response.status_code == 200
    row = row_of(app, packet_id)
    assert row["delivery_state"] == "processed" and row["karma_actions"] is None


def test_unknown_packet_id_is_404_json(client):
    """Acknowledging a packet that does not exist is a 404 in the one error shape."""
    response = client.post(ACK, json={"packet_id": "no-such-packet", "success": True})
    assert response.status_code == 404
    body = response.json
    assert body["code"] == 404 and body["message"]
    assert "packet_id" in body["errors"]


def test_acking_an_already_processed_packet_is_harmless(client, app):
    """A repeated ack answers 200 and leaves the stored outcome unchanged."""
    (packet_id,) = ingest(client)
    poll_ids(client)
    actions = [{"action": "first"}]
    client.post(ACK, json={"packet_id": packet_id, "success": True, "karma_actions": actions})
    before = row_of(app, packet_id)

    again = client.post(
        ACK, json={"packet_id": packet_id, "success": True, "karma_actions": [{"action": "second"}]}
    )
    assert again.status_code == 200
    assert again.json["outcome"] == "already_processed"
    failed = client.post(
        ACK, json={"packet_id": packet_id, "success": False, "error_message": "late failure"}
    )
    assert failed.status_code == 200
    after = row_of(app, packet_id)
    assert after == before
    assert after["karma_actions"] == actions


def test_a_never_leased_packet_may_be_acknowledged(client, app):
    """An ack for a packet no poll handed out still records it as processed."""
    (packet_id,) = ingest(client)
    response = client.post(
        ACK, json={"packet_id": packet_id, "success": True, "karma_actions": [{"action": "direct"}]}
    )
    assert response.status_code == 200
    assert response.json["outcome"] == "processed"
    assert row_of(app, packet_id)["delivery_state"] == "processed"
    assert poll_ids(client) == []


def test_failed_ack_keeps_the_packet_for_another_delivery(make_app):
    """success: false never loses the packet; it returns after the back-off."""
    app = make_app(BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    (packet_id,) = ingest(client)
    poll_ids(client)
    response = client.post(
        ACK, json={"packet_id": packet_id, "success": False, "error_message": "karma API timed out"}
    )
    assert response.status_code == 200
    row = row_of(app, packet_id)
    assert row["delivery_state"] == "pending"
    assert row["last_error"] == "karma API timed out"
    assert row["processed_by_karma"] is False
    assert poll_ids(client) == [packet_id]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"success": True}, "packet_id"),
        ({"packet_id": "x"}, "success"),
        ({"packet_id": "x", "success": "maybe"}, "success"),
        ({"packet_id": "", "success": True}, "packet_id"),
        ({"packet_id": 5, "success": True}, "packet_id"),
        ({"packet_id": "x", "success": True, "karma_actions": "lots"}, "karma_actions"),
        ({"packet_id": "x\u0000", "success": True}, "packet_id"),
        ({"packet_id": "x", "success": False, "error_message": "a\u0000b"}, "error_message"),
    ],
)
def test_invalid_ack_is_422_naming_the_field(client, body, field):
    """mark-processed validates its body like ingest does."""
    response = client.post(ACK, json=body)
    assert response.status_code == 422
    assert field in response.json["errors"]["json"]


@pytest.mark.parametrize("raw", [b"", b"{", b"[]"])
def test_ack_body_that_is_not_an_object_is_refused(client, raw):
    """Malformed or non-object bodies get a 4xx JSON error, never a 500."""
    response = client.post(ACK, data=raw, content_type="application/json")
    assert response.status_code in (400, 422)
    assert response.json["code"] == response.status_code


def test_acks_from_another_app_instance_count(make_app):
    """Leases and acks live in the database: any instance may acknowledge."""
    first, second = make_app().test_client(), make_app().test_client()
    (packet_id,) = ingest(first)
    assert poll_ids(second) == [packet_id]
    assert first.post(ACK, json={"packet_id": packet_id, "success": True}).status_code == 200
    assert poll_ids(second) == []


def test_two_pollers_racing_never_get_the_same_packet(make_app):
    """Concurrent polls from threads on two app instances split the queue: none served twice,
    none left behind."""
    apps = [make_app(), make_app()]
    client = apps[0].test_client()
    client.post(f"{API}/ingest", json={"packets": [make_packet() for _ in range(120)]})
    served: list[list[str]] = [[] for _ in range(4)]

    def consumer(slot: int) -> None:
        own = apps[slot % 2].test_client()
        for _ in range(60):
            response = own.get(f"{PENDING}?limit=7&visibility_timeout=600")
            assert response.status_code == 200
            ids = [p["packet_id"] for p in response.json["packets"]]
            if not ids:
                return
            served[slot].extend(ids)

    run_threads(4, consumer)
    everything = [pid for ids in served for pid in ids]
    assert len(everything) == len(set(everything)) == 120
    assert client.get(f"{API}/status").json["leased_packets"] == 120
