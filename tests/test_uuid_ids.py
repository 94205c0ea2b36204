"""Packet ids and dedup keys: native uuid on PostgreSQL (migration 0016), strings on SQLite,
and on both the same strings through the API: an id is only ever the lowercase hyphenated
form the service handed out, and anything else names no packet (404), never an error."""

from __future__ import annotations

from datetime import datetime

from bucket.services.ingest import identity_key
from tests.factories import make_packet
from tests.queue_helpers import API, ack, ingest, poll, row, sql

ACK = f"{API}/packets/mark-processed"
LEASE = f"{API}/packets/lease"
ID_COLUMNS_SQL = (
    "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name IN ('packets', 'deliveries', "
    "'packet_keys', 'packet_idempotency_keys') "
    "AND column_name IN ('packet_id', 'dedup_key', 'idempotency_key') ORDER BY 1"
)


def test_ids_and_keys_read_back_as_the_strings_handed_out(app, client, backend):
    """The id ingest answers is the one every read gives back (poll, listing, the stored row),
    lowercase and hyphenated; the dedup key reads as its 32 hex digits, in packets (SQLite)
    and in packet_keys (PostgreSQL, which leaves the packet's own NULL since migration 0027),
    and the Idempotency-Key's row points to that key. On PostgreSQL every
    id and key column is uuid (packets and deliveries since migration 0016, the key tables
    since 0015) but the Idempotency-Key on packets, kept as text."""
    body = make_packet(user_id="uuid_reader")
    packet_id = client.post(
        f"{API}/ingest", json=body, headers={"Idempotency-Key": "uuid-order"}
    ).json["packet_id"]
    assert len(packet_id) == 36 and packet_id == packet_id.lower()
    assert [p["packet_id"] for p in poll(client)["packets"]] == [packet_id]
    listed = client.get(f"{API}/packets/user/uuid_reader").json
    assert [p["packet_id"] for p in listed] == [packet_id]
    timestamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    digest = identity_key(body["system_type"], body["user_id"], body["session_id"], timestamp)
    stored = row(app, packet_id)
    # PostgreSQL keeps the key in packet_keys only since migration 0027.
    own_key = None if backend == "postgres" else digest
    assert (stored.packet_id, stored.dedup_key) == (packet_id, own_key)
    if backend == "postgres":
        keys = "SELECT replace(dedup_key::text, '-', ''), packet_id FROM packet_keys"
        assert sql(app, keys) == [(digest, packet_id)]
        idempotent = (
            "SELECT replace(i.dedup_key::text, '-', ''), k.packet_id "
            "FROM packet_idempotency_keys i JOIN packet_keys k USING (dedup_key, client_day)"
        )
        assert sql(app, idempotent) == [(digest, packet_id)]
        assert dict(sql(app, ID_COLUMNS_SQL)) == {
            "deliveries.packet_id": "uuid",
            "packet_idempotency_keys.dedup_key": "uuid",
            "packet_idempotency_keys.idempotency_key": "uuid",
            "packet_keys.dedup_key": "uuid",
            "packet_keys.packet_id": "uuid",
            "packets.dedup_key": "uuid",
            "packets.idempotency_key": "character varying",
            "packets.packet_id": "uuid",
        }
    again = client.post(f"{API}/ingest", json=body).json
    assert again["packet_id"] == packet_id and again["duplicate"] is True
    reused = client.post(
        f"{API}/ingest",
        json=make_packet(user_id="uuid_reader"),
        headers={"Idempotency-Key": "uuid-order"},
    ).json
    assert reused["packet_id"] == packet_id and reused["duplicate"] is True


def test_an_id_in_another_spelling_names_no_packet(app, client):
    """The uppercase or unhyphenated spelling of a leased packet's id is not its id (it never
    was, as a string): an ack, a lease change and an artifact request answer 404 and the
    packet stays leased, as uuid's own comparison would not have it."""
    packet_id = ingest(client)
    receipt = poll(client)["packets"][0]["receipt"]
    for other in (packet_id.upper(), packet_id.replace("-", "")):
        answer = ack(client, other)
        assert answer.status_code == 404 and answer.json["errors"]["packet_id"], answer.json
        changed = client.post(
            LEASE, json={"packet_id": other, "receipt": receipt, "visibility_timeout": 60}
        )
        assert changed.status_code == 404, changed.json
        assert client.get(f"/api/v1/audit/artifact/{other}").status_code == 404
    assert row(app, packet_id).delivery_state == "leased"
    assert ack(client, packet_id).json["outcome"] == "processed"


def test_malformed_ids_are_not_found_beside_real_ones(make_app):
    """A batch ack naming a malformed id and a real one records the real one and answers the
    other 404; a requeue naming a malformed id beside a dead packet requeues the dead one."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    first, second = ingest(client), ingest(client)
    poll(client, limit=2)
    results = [
        {"packet_id": "no-such-packet", "success": True},
        {"packet_id": first, "success": True},
        {"packet_id": second, "success": False},
    ]
    answer = client.post(ACK, json={"results": results})
    assert answer.status_code in (200, 207), answer.json
    outcomes = {item["packet_id"]: item["status"] for item in answer.json["results"]}
    assert outcomes == {"no-such-packet": "not_found", first: "processed", second: "dead"}
    requeued = client.post(
        f"{API}/packets/dead/requeue", json={"packet_ids": ["not-a-uuid", second]}
    )
    assert requeued.json == {"requeued": 1}
    assert [p["packet_id"] for p in poll(client)["packets"]] == [second]
