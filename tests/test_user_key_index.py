"""The user listing's index on PostgreSQL is built on an 8-byte key of the user id (migration
0028), not on the id: readers find a user's packets by the key (the index condition) and the
id (``models.of_user``), so a key two users share never mixes their packets."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select, text

from bucket.extensions import db
from bucket.models import DeliveryState, Packet, of_user
from bucket.services.delivery.requeue import requeue
from tests.factories import make_packet
from tests.queue_helpers import API, listing, sql

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

INDEX_SQL = "SELECT pg_get_indexdef(CAST('ix_packets_user' AS regclass))"


def reindex(app) -> None:
    """Build ix_packets_user again on every partition (outside a transaction, as PostgreSQL
    requires of a partitioned index)."""
    with app.app_context():
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("REINDEX INDEX ix_packets_user"))


def test_the_listing_finds_a_user_through_the_key_index(app, client):
    """The index is on (packet_user_key(user_id), received_at), the key the first 64 bits of
    the id's md5; the listing's statement scans it (sequential scans off, so a plan that
    could not use it would show one) and answers the user's packets only, newest first."""
    assert sql(app, INDEX_SQL) == [
        (
            "CREATE INDEX ix_packets_user ON ONLY public.packets "
            "USING btree (packet_user_key((user_id)::text), received_at)",
        )
    ]
    (key,) = sql(app, "SELECT packet_user_key('stu_a')")[0]
    assert key == int.from_bytes(hashlib.md5(b"stu_a").digest()[:8], "big", signed=True)
    mine = [
        client.post(f"{API}/ingest", json=make_packet(user_id="stu_a")).json["packet_id"]
        for _ in range(3)
    ]
    client.post(f"{API}/ingest", json=make_packet(user_id="stu_b"))
    assert [p["packet_id"] for p in listing(client, "stu_a")] == mine[::-1]
    statement = select(Packet.packet_id).where(of_user("stu_a")).order_by(Packet.received_at.desc())
    with app.app_context():
        compiled = statement.compile(db.engine, compile_kwargs={"literal_binds": True})
        db.session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = db.session.execute(text(f"EXPLAIN {compiled}")).scalars().all()
        db.session.rollback()
    assert "Seq Scan" not in " ".join(plan), plan
    # PostgreSQL inlines the SQL function: the key is the index condition, the id a filter.
    scans = [line for line in plan if "Index Scan" in line]
    conditions = [line for line in plan if "Index Cond:" in line]
    filters = [line for line in plan if "Filter:" in line]
    assert scans and all("packet_user_key_received_at_idx" in line for line in scans), plan
    assert len(conditions) == len(scans) and all("md5((user_id)" in c for c in conditions), plan
    assert len(filters) == len(scans) and all("'stu_a'" in f for f in filters), plan


def test_a_key_two_users_share_does_not_mix_their_packets(app, client):
    """Every user given one key (the function replaced and the index rebuilt with it): the
    listing and a requeue by user still reach only that user's packets, by the id checked
    beside the key."""
    ids = {
        user: client.post(f"{API}/ingest", json=make_packet(user_id=user)).json["packet_id"]
        for user in ("stu_a", "stu_b")
    }
    (original,) = sql(app, "SELECT pg_get_functiondef('packet_user_key(text)'::regprocedure)")[0]
    body = "SELECT ('x' || left(md5(user_id), 16))::bit(64)::bigint"
    assert body in original
    try:
        sql(app, original.replace(body, "SELECT 7::bigint"))
        reindex(app)
        assert sql(app, "SELECT DISTINCT packet_user_key(user_id) FROM packets") == [(7,)]
        assert [p["packet_id"] for p in listing(client, "stu_a")] == [ids["stu_a"]]
        assert [p["packet_id"] for p in listing(client, "stu_b")] == [ids["stu_b"]]
        with app.app_context():
            assert requeue(states=(DeliveryState.PENDING,), user_id="stu_b") == 1
    finally:
        sql(app, original)
        reindex(app)
