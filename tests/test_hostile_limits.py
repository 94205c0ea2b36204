"""Hostile input against the limits (issue 18, findings 3-5): the per-user limit cannot be
dodged or turned on a victim, bytes are bounded as well as packets, one sender cannot empty
the quarantine of everyone else's entries, and metric labels come from fixed sets.

Every test runs on SQLite + memory and on PostgreSQL + Redis unless it says otherwise.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select, update

from bucket.extensions import db
from bucket.models import Packet, QuarantinedPacket
from tests.factories import make_packet

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
QUARANTINE = f"{API}/quarantine"
TOKEN = "operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def limited(make_app, **overrides):
    """An app with rate limiting on (the test config turns it off for other suites)."""
    return make_app(BUCKET_RATE_LIMIT_ENABLED=True, BUCKET_CONSUMER_TOKEN=[TOKEN], **overrides)


def post(client, body, address="198.51.100.10"):
    return client.post(INGEST, json=body, environ_base={"REMOTE_ADDR": address})


def invalid(user_id: str, n: int = 0, **fields) -> dict:
    """A packet refused for its content (focus score out of range) naming ``user_id``."""
    return make_packet(user_id=user_id, focus_score=1000 + n, **fields)


def stored_for(app, user_id: str) -> int:
    with app.app_context():
        count = db.session.execute(
            select(func.count()).select_from(Packet).where(Packet.user_id == user_id)
        ).scalar_one()
        db.session.commit()
        return count


def quarantined_ids(client) -> set[int]:
    response = client.get(f"{QUARANTINE}?limit=500", headers=AUTH)
    assert response.status_code == 200, response.json
    return {entry["id"] for entry in response.json}


# Finding 3: the per-user limit.


def test_every_packet_of_a_batch_is_charged_to_its_own_user(make_app):
    """`[packet of A] + packets of B` charges B for its packets, not A: B cannot store more
    than its allowance by hiding behind a different first packet."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="50 per minute")
    client = app.test_client()
    first = {"packets": [make_packet(user_id="a1")] + [make_packet(user_id="b") for _ in range(30)]}
    assert post(client, first).status_code == 200
    hidden = [make_packet(user_id="b") for _ in range(30)]
    response = post(client, {"packets": [make_packet(user_id="a2"), *hidden]})
    assert response.status_code == 429, response.json
    assert "user" in response.json["message"]
    assert stored_for(app, "b") == 30
    # The refused batch cost nobody anything: a2 and the rest of b's allowance are intact.
    assert post(client, make_packet(user_id="a2")).status_code == 200
    batch = {"packets": [make_packet(user_id="b") for _ in range(20)]}
    assert post(client, batch).status_code == 200


def test_refused_packets_never_charge_the_user_they_name(make_app):
    """Refused (422) packets naming a victim, alone or in batches, do not lock the victim out."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="3 per minute")
    client = app.test_client()
    for n in range(4):
        batch = {"packets": [invalid("victim", 10 * n + i) for i in range(5)]}
        assert post(client, batch, "203.0.113.66").status_code == 422
        assert post(client, invalid("victim", 100 + n), "203.0.113.66").status_code == 422
    for _ in range(3):
        assert post(client, make_packet(user_id="victim"), "192.0.2.5").status_code == 200
    assert post(client, make_packet(user_id="victim"), "192.0.2.5").status_code == 429


def test_the_valid_part_of_a_partial_batch_is_charged_to_its_users(make_app):
    """In a 207 batch the accepted packets count for their users and the refused ones do not."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="4 per minute")
    client = app.test_client()
    batch = {"packets": [make_packet(user_id="mixed"), invalid("mixed"), invalid("mixed", 1)]}
    assert post(client, batch).status_code == 207
    for _ in range(3):
        assert post(client, make_packet(user_id="mixed")).status_code == 200
    assert post(client, make_packet(user_id="mixed")).status_code == 429


def test_refused_packets_are_charged_to_the_senders_address(make_app):
    """What a user is not charged for, the address that sent it is."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_IP="6 per minute")
    client = app.test_client()
    assert post(client, {"packets": [invalid("v", n) for n in range(4)]}).status_code == 422
    assert post(client, invalid("v", 9)).status_code == 422
    assert post(client, make_packet(user_id="w")).status_code == 200
    assert post(client, make_packet(user_id="w")).status_code == 429
    assert post(client, make_packet(user_id="w"), "198.51.100.11").status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"])
def test_without_redis_each_instance_keeps_its_own_counters(make_app, backend):
    """Memory counters belong to one instance (README): two instances each allow the limit."""
    one = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute").test_client()
    two = limited(make_app, BUCKET_RATE_LIMIT_INGEST_PER_USER="2 per minute").test_client()
    for client in (one, one, two, two):
        assert post(client, make_packet(user_id="split")).status_code == 200
    for client in (one, two):
        assert post(client, make_packet(user_id="split")).status_code == 429


# Finding 4: bytes.


def test_bytes_per_address_are_bounded_stored_and_quarantined_alike(make_app):
    """Past the address's byte allowance ingest answers 429, whether the packets would be
    stored or quarantined; another address is unaffected."""
    app = limited(make_app, BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP="30000 per minute")
    client = app.test_client()
    padding = {"pad": "x" * 9000}
    assert post(client, make_packet(raw_signals=padding)).status_code == 200
    assert post(client, invalid("big", raw_signals=padding)).status_code == 422
    assert post(client, make_packet(raw_signals=padding)).status_code == 200
    response = post(client, make_packet(raw_signals=padding))
    assert response.status_code == 429, response.json
    assert "bytes" in response.json["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert post(client, make_packet(raw_signals=padding), "198.51.100.99").status_code == 200


def test_the_default_byte_allowance_lets_a_classroom_through(make_app):
    """The defaults still let 60 learners behind one address flush 100 packets each."""
    client = limited(make_app).test_client()
    for n in range(60):
        batch = {"packets": [make_packet(user_id=f"kid{n}") for _ in range(100)]}
        assert post(client, batch, "203.0.113.7").status_code == 200


def test_raw_signals_over_the_limit_are_refused_and_quarantined_not_trimmed(make_app):
    """A packet whose raw_signals exceed BUCKET_RAW_SIGNALS_MAX_BYTES is a 422 on that field
    and kept in the quarantine whole; one under it is stored intact."""
    app = make_app(BUCKET_RAW_SIGNALS_MAX_BYTES=1000, BUCKET_CONSUMER_TOKEN=[TOKEN])
    client = app.test_client()
    big = make_packet(user_id="sig", raw_signals={"pad": "z" * 1200})
    response = post(client, big)
    assert response.status_code == 422, response.json
    assert "raw_signals" in response.json["errors"]["json"]
    assert "1000" in response.json["errors"]["json"]["raw_signals"][0]
    kept = client.get(f"{QUARANTINE}/{response.json['quarantine_id']}", headers=AUTH).json
    assert kept["body"]["raw_signals"] == big["raw_signals"]
    batch = post(client, {"packets": [big, make_packet(user_id="sig")]})
    assert batch.status_code == 207
    assert "raw_signals" in batch.json["results"][0]["errors"]
    small = make_packet(user_id="sig2", raw_signals={"pad": "z" * 900})
    assert post(client, small).status_code == 200
    listed = client.get(f"{API}/packets/user/sig2", headers=AUTH).json
    assert listed[0]["packet_id"]
    assert stored_for(app, "sig") == 1


def test_raw_signals_are_bounded_by_default(client):
    """The documented default (16384 bytes) refuses a 20 kB raw_signals."""
    response = post(client, make_packet(raw_signals={"pad": "q" * 20_000}))
    assert response.status_code == 422
    assert "raw_signals" in response.json["errors"]["json"]


def test_one_sender_cannot_evict_everyone_elses_quarantine_entries(make_app):
    """A flood of distinct refused packets from one address evicts that address's own
    entries; the other senders' entries stay."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=12, BUCKET_CONSUMER_TOKEN=[TOKEN])
    client = app.test_client()
    victims = set()
    for n, address in enumerate(("192.0.2.1", "192.0.2.2", "192.0.2.3")):
        for i in range(2):
            response = post(client, invalid(f"real{n}", i), address)
            victims.add(response.json["quarantine_id"])
    flood = [post(client, invalid("flood", n), "203.0.113.66") for n in range(50)]
    assert all(r.status_code == 422 for r in flood)
    held = quarantined_ids(client)
    assert victims <= held
    assert len(held) == 12
    assert {r.json["quarantine_id"] for r in flood[-6:]} <= held


def test_the_byte_bound_evicts_the_biggest_sender_first(make_app):
    """Under the byte bound too, the sender holding the most bytes gives way first."""
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=12_000, BUCKET_CONSUMER_TOKEN=[TOKEN])
    client = app.test_client()
    small = post(client, invalid("real", 1), "192.0.2.1").json["quarantine_id"]
    for n in range(20):
        response = post(client, invalid("flood", n, raw_signals={"pad": "p" * 2000}), "203.0.113.9")
        assert response.status_code == 422
    assert small in quarantined_ids(client)


# Finding 5: metric labels.


def test_invented_http_methods_add_no_metric_series(client):
    """Requests with made-up methods are counted under one fixed label, not their own."""
    for n in range(20):
        client.open(f"{API}/status", method=f"BREW{n}")
        client.open(f"/nowhere/{n}", method=f"PROPFIND{n}")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "BREW" not in metrics and "PROPFIND" not in metrics
    methods = set(re.findall(r'bucket_http_requests_total\{[^}]*method="([^"]*)"', metrics))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


def test_entries_kept_before_senders_were_recorded_count_as_one_sender(make_app):
    """Entries from before migration 0009 (no sender) are one sender among others: a flood
    from one address evicts its own entries, not theirs."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=10, BUCKET_CONSUMER_TOKEN=[TOKEN])
    client = app.test_client()
    legacy = {post(client, invalid("old", n), "192.0.2.40").json["quarantine_id"] for n in range(4)}
    with app.app_context():
        db.session.execute(update(QuarantinedPacket).values(sender=None))
        db.session.commit()
    for n in range(30):
        assert post(client, invalid("flood", n), "203.0.113.66").status_code == 422
    held = quarantined_ids(client)
    assert legacy <= held and len(held) == 10
