"""The fixture packets flow through ingest, pending and mark-processed on every backend."""

from tests.factories import fixture

API = "/api/v1/bucket/prana"


def test_fixture_packet_flows_through_pending_and_mark_processed(client):
    """A packet posted by the bridge is served once and recorded as processed."""
    posted = client.post(f"{API}/ingest", json=fixture("gurukul_packet.json"))
    assert posted.status_code == 200
    assert posted.json["status"] == "ingested"
    packet_id = posted.json["packet_id"]

    polled = client.get(f"{API}/packets/pending?limit=10")
    assert polled.status_code == 200
    assert [p["packet_id"] for p in polled.json["packets"]] == [packet_id]
    assert polled.json["queue_size"] == 0

    acked = client.post(
        f"{API}/packets/mark-processed",
        json={"packet_id": packet_id, "success": True, "karma_actions": [{"action": "x"}]},
    )
    assert acked.status_code == 200
    status = client.get(f"{API}/status").json
    assert status["processed_packets"] == 1
    assert status["pending_packets"] == 0
