"""The batch envelope: each packet stands alone, results in order, duplicates, size limits."""

from __future__ import annotations

import json

import pytest

from tests.factories import fixture, make_packet
from tests.queue_helpers import stored
from tests.statements import captured_statements

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"


def envelope(packets: list) -> dict:
    return {"packets": packets, "batch_size": len(packets), "sent_at": "2026-11-28T10:20:10.120Z"}


def test_fixture_envelope_stores_every_packet_and_answers_in_order(client, app):
    """The bridge's batch fixture: 200, one ingested result per packet, in request order."""
    response = client.post(
        INGEST, json=fixture("batch_envelope.json"), headers={"X-PRANA-BATCH-ID": "batch-42"}
    )
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ingested"
    assert body["batch_id"] == "batch-42"
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (3, 0, 0)
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert all(r["status"] == "ingested" for r in body["results"])
    by_id = {row["packet_id"]: row for row in stored(app)}
    states = [by_id[r["packet_id"]]["cognitive_state"] for r in body["results"]]
    assert states == ["ON_TASK", "THINKING", "AWAY"]


def test_mixed_batch_is_207_and_stores_only_the_good_packets(client, app):
    """One bad packet does not sink the others; each bad one is reported with its fields."""
    packets = [
        make_packet(user_id="good_0"),
        make_packet(focus_score=250),
        make_packet(user_id="good_2"),
        "not a packet",
        make_packet(active_seconds=1.0, timestamp="later"),
    ]
    response = client.post(INGEST, json=envelope(packets))
    assert response.status_code == 207
    body = response.json
    assert body["status"] == "partial"
    assert (body["accepted"], body["rejected"]) == (2, 3)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in results] == [
        "ingested",
        "rejected",
        "ingested",
        "rejected",
        "rejected",
    ]
    assert "focus_score" in results[1]["errors"]
    assert results[3]["errors"]
    assert {"timestamp", "active_seconds"} <= set(results[4]["errors"])
    assert "packet_id" not in results[1]
    assert {row["user_id"] for row in stored(app)} == {"good_0", "good_2"}
    assert {r["packet_id"] for r in results if "packet_id" in r} == {
        row["packet_id"] for row in stored(app)
    }


def test_batch_with_no_good_packet_is_422_and_stores_nothing(client, app):
    """When no packet is accepted the answer is 4xx, still with one result per packet."""
    response = client.post(INGEST, json=envelope([make_packet(role="x"), 5, {}]))
    assert response.status_code == 422
    assert response.mimetype == "application/json"
    body = response.json
    assert body["status"] == "rejected"
    assert [r["status"] for r in body["results"]] == ["rejected"] * 3
    assert "role" in body["results"][0]["errors"]
    assert "timestamp" in body["results"][2]["errors"]
    assert stored(app) == []


def test_duplicates_inside_one_batch_are_stored_once(client, app):
    """A packet repeated in the same batch (even with another offset) is one row."""
    first = make_packet(timestamp="2026-11-28T10:00:00.500Z")
    copy = {**first, "timestamp": "2026-11-28T15:30:00.500+05:30"}
    other = make_packet()
    response = client.post(INGEST, json=envelope([first, other, copy, first]))
    assert response.status_code == 200
    results = response.json["results"]
    assert [r["status"] for r in results] == ["ingested", "ingested", "duplicate", "duplicate"]
    assert results[2]["packet_id"] == results[0]["packet_id"] == results[3]["packet_id"]
    assert response.json["duplicates"] == 2
    assert len(stored(app)) == 2


def test_duplicates_of_stored_packets_return_the_stored_ids(client, app):
    """A batch re-sent after a timeout is recognised packet by packet."""
    single = make_packet()
    single_id = client.post(INGEST, json=single).json["packet_id"]
    fresh = make_packet()
    response = client.post(INGEST, json=envelope([single, fresh]))
    assert response.status_code == 200
    results = response.json["results"]
    assert results[0] == {"index": 0, "status": "duplicate", "packet_id": single_id}
    assert results[1]["status"] == "ingested"

    again = client.post(INGEST, json=envelope([single, fresh])).json["results"]
    assert [r["status"] for r in again] == ["duplicate", "duplicate"]
    assert [r["packet_id"] for r in again] == [single_id, results[1]["packet_id"]]
    assert len(stored(app)) == 2


def test_duplicate_packets_from_a_batch_are_served_once(client):
    """A batch and its retry deliver each packet exactly once."""
    batch = envelope([make_packet() for _ in range(4)])
    client.post(INGEST, json=batch)
    client.post(INGEST, json=batch)
    polled = client.get(f"{API}/packets/pending?limit=50").json
    assert polled["count"] == 4
    assert len({p["packet_id"] for p in polled["packets"]}) == 4


def test_batch_size_limit_is_enforced(make_app):
    """More than BUCKET_MAX_BATCH_SIZE packets is refused whole; exactly the limit is fine."""
    app = make_app(BUCKET_MAX_BATCH_SIZE=3)
    client = app.test_client()
    too_many = client.post(INGEST, json=envelope([make_packet() for _ in range(4)]))
    assert too_many.status_code == 422
    assert too_many.json["code"] == 422
    assert "packets" in too_many.json["errors"]["json"]
    assert stored(app) == []
    assert client.post(INGEST, json=envelope([make_packet() for _ in range(3)])).status_code == 200
    assert len(stored(app)) == 3


@pytest.mark.parametrize("packets", [[], None, "packets", {"0": {}}], ids=str)
def test_empty_or_malformed_packet_list_is_refused(client, app, packets):
    """The envelope's packets must be a non-empty list."""
    response = client.post(INGEST, json={"packets": packets})
    assert response.status_code == 422
    body = response.json
    assert body["code"] == 422 and body["message"]
    assert "packets" in body["errors"]["json"]
    assert stored(app) == []


def test_batch_sent_as_text_plain_is_accepted(client, app):
    """sendBeacon may flush the offline queue as text/plain."""
    data = json.dumps(envelope([make_packet(), make_packet()]))
    response = client.post(INGEST, data=data, content_type="text/plain;charset=UTF-8")
    assert response.status_code == 200
    assert len(stored(app)) == 2


def test_ems_and_gurukul_packets_mix_in_one_batch(client, app):
    """Each packet keeps its own identity rules inside a batch."""
    response = client.post(
        INGEST, json=envelope([fixture("ems_packet.json"), fixture("gurukul_packet.json")])
    )
    assert response.status_code == 200
    rows = {row["user_id"]: row for row in stored(app)}
    assert rows["emp_0387"]["employee_id"] == "emp_0387"
    assert rows["emp_0387"]["cognitive_state"] is None
    assert rows["emp_0387"]["state"] == "WORKING"
    assert rows["stu_1042"]["raw_signals"] == fixture("gurukul_packet.json")["raw_signals"]


def test_nul_in_one_packet_rejects_only_that_packet(client, app):
    """A packet PostgreSQL could not store is rejected alone; the rest of the batch is stored."""
    signals = {"label": "x\u0000y"}
    packets = [make_packet(user_id="bad\u0000"), make_packet(raw_signals=signals)]
    response = client.post(INGEST, json=envelope(packets))
    assert response.status_code == 207
    assert [r["status"] for r in response.json["results"]] == ["rejected", "ingested"]
    (row,) = stored(app)
    assert row["raw_signals"] == signals


def test_a_batch_is_stored_with_one_insert_statement(app, client):
    """Fifty packets reach the database in one INSERT, not one per packet."""
    with captured_statements(app) as statements:
        response = client.post(INGEST, json=envelope([make_packet() for _ in range(50)]))
    assert response.status_code == 200
    inserts = [sql for sql in statements if "INSERT INTO packets " in sql]
    assert len(inserts) == 1, statements
    assert len(stored(app)) == 50


def test_batch_rows_carry_every_field_like_single_ingest(client, app):
    """Batch storage keeps timestamps as UTC instants and the packet fields intact."""
    packet = make_packet(
        timestamp="2026-11-28T15:30:00.250+05:30",
        focus_score=None,
        integrity_score=0.5,
        raw_signals={"deep": {"list": [1, 2.5, None, True]}},
    )
    client.post(INGEST, json=envelope([packet, make_packet()]))
    polled = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    match = [p for p in polled if p["raw_signals"] == packet["raw_signals"]]
    assert len(match) == 1
    assert match[0]["client_timestamp"].startswith("2026-11-28T10:00:00.250")
    assert match[0]["focus_score"] is None and match[0]["integrity_score"] == 0.5
    assert match[0]["delivery_state"] == "leased"


def test_packets_of_a_batch_are_served_in_batch_order(client):
    """Packet ids are time-ordered with a per-millisecond counter, so a batch keeps its order."""
    packets = [make_packet(user_id=f"order_{i}") for i in range(40)]
    posted = client.post(INGEST, json=envelope(packets))
    assert posted.status_code == 200
    ids_in_batch = [result["packet_id"] for result in posted.json["results"]]
    assert ids_in_batch == sorted(ids_in_batch)

    served = client.get(f"{API}/packets/pending?limit=40").json["packets"]
    assert [p["packet_id"] for p in served] == ids_in_batch
    assert [p["user_id"] for p in served] == [f"order_{i}" for i in range(40)]


@pytest.mark.parametrize(
    "transport", [{"batch_size": "3 packets"}, {"sent_at": 1764324000000}, {"batch_size": None}]
)
def test_envelope_transport_fields_never_sink_the_packets(client, app, transport):
    """batch_size and sent_at are the bridge's transport fields: any value is tolerated."""
    body = {"packets": [make_packet(), make_packet()], **transport}
    response = client.post(INGEST, json=body)
    assert response.status_code == 200, response.json
    assert response.json["accepted"] == 2
    assert len(stored(app)) == 2
