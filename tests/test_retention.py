"""Retention: old processed packets are purged in short batches; everything else is kept."""

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import select, update

from bucket.extensions import db
from bucket.models import Delivery, DeliveryState, Packet
from bucket.services import retention
from bucket.services.audit.sealing import seal_new_packets, sealed_through
from bucket.services.counters import recount
from bucket.services.retention import purge_rows as purge
from tests.factories import make_packet
from tests.queue_helpers import ingest_many as ingest

API = "/api/v1/bucket/prana"
T = Delivery.__table__  # the delivery columns these tests set and read
P = Packet.__table__
DAY = 86400.0


def process_all(client):
    """Poll and acknowledge everything ready, with success."""
    while packets := client.get(f"{API}/packets/pending?limit=100").json["packets"]:
        results = [{"packet_id": p["packet_id"], "success": True} for p in packets]
        answer = client.post(f"{API}/packets/mark-processed", json={"results": results})
        assert answer.status_code == 200, answer.json
        assert [r["status"] for r in answer.json["results"]] == ["processed"] * len(packets)


def age(app, ids, days):
    """Pretend these packets reached their current state ``days`` ago."""
    with app.app_context():
        db.session.execute(
            update(T).where(T.c.packet_id.in_(ids)).values(visible_at=time.time() - days * DAY)
        )
        db.session.commit()


def states(app):
    with app.app_context():
        rows = db.session.execute(select(T.c.packet_id, T.c.delivery_state)).all()
        db.session.commit()
        return dict(rows)


def seq_of(app, packet_id):
    with app.app_context():
        found = db.session.execute(select(P.c.seq).where(P.c.packet_id == packet_id)).scalar_one()
        db.session.commit()
        return found


def make_dead(app, ids):
    """Dead-letter by hand, then recount (as the README says to after hand-written SQL)."""
    with app.app_context():
        db.session.execute(
            update(T).where(T.c.packet_id.in_(ids)).values(delivery_state=DeliveryState.DEAD)
        )
        db.session.commit()
        recount()


def test_purge_deletes_only_old_processed_packets_in_batches(app, client):
    """Five old processed packets go in batches of two; recent, pending and dead ones stay."""
    old = ingest(client, 5)
    recent = ingest(client, 2)
    process_all(client)
    waiting = ingest(client, 2)
    dead = ingest(client, 1)
    make_dead(app, dead)
    age(app, old + dead + waiting, 40)
    with app.app_context():
        report = purge(30, batch_size=2)
    assert report.packets == 5 and report.batches == 3 and report.dry_run is False
    left = states(app)
    assert set(left) == set(recent + waiting + dead)
    assert left[dead[0]] == DeliveryState.DEAD


def test_dead_packets_go_only_when_asked(app, client):
    """include_dead purges old dead packets as well."""
    dead = ingest(client, 2)
    make_dead(app, dead)
    age(app, dead, 40)
    with app.app_context():
        assert purge(30).packets == 0
        assert purge(30, include_dead=True).packets == 2
    assert states(app) == {}


def test_dry_run_counts_and_deletes_nothing(app, client):
    """A dry run reports what would go and leaves the table alone."""
    ids = ingest(client, 3)
    process_all(client)
    age(app, ids, 31)
    with app.app_context():
        report = purge(30, dry_run=True)
    assert report.dry_run and report.packets == 3 and report.batches == 0
    assert report.states == (DeliveryState.PROCESSED,)
    line = datetime.now(UTC) - timedelta(days=30)
    assert abs((report.cutoff - line).total_seconds()) < 60
    assert len(states(app)) == 3


def test_retention_never_purges_packets_not_sealed_yet(app, client, monkeypatch):
    """With the sealer lagging (after a burst), old processed packets that no seal covers yet
    stay: the audit log must be able to speak for every packet it lets go."""
    ids = ingest(client, 5)
    process_all(client)
    age(app, ids, 40)
    # The purge's own sealing round gets through the first two packets only.
    monkeypatch.setattr(retention, "seal_everything", lambda: seal_new_packets(max_packets=2))
    second = seq_of(app, ids[1])
    with app.app_context():
        assert purge(30).packets == 2
        assert sealed_through() == second
        db.session.commit()
    assert set(states(app)) == set(ids[2:])


def test_retention_never_purges_packets_not_booked_yet(app, client, monkeypatch):
    """A packet the stored counter has not counted yet (its insert was still in flight when
    the purge booked) stays, so the counter is never lowered for a packet it never counted."""
    ids = ingest(client, 3)
    process_all(client)
    age(app, ids, 40)
    monkeypatch.setattr(retention, "book_new_packets", lambda: None)  # the booking lags
    with app.app_context():
        assert purge(30).packets == 0
    assert set(states(app)) == set(ids)


def test_purge_by_rows_forgets_the_keys_of_the_purged_packets_only(app, client):
    """A resent copy of a purged packet is stored anew (its key went with it, also from
    PostgreSQL's ``packet_keys``); a resent copy of a packet kept is still its duplicate."""
    gone, kept = make_packet(), make_packet()
    first = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in (gone, kept)]
    process_all(client)
    age(app, first[:1], 40)
    with app.app_context():
        assert purge(30).packets == 1
    again = client.post(f"{API}/ingest", json=kept)
    assert again.status_code == 200, again.json
    assert (again.json["packet_id"], again.json["duplicate"]) == (first[1], True)
    anew = client.post(f"{API}/ingest", json=gone)
    assert anew.status_code == 200, anew.json
    assert not anew.json.get("duplicate") and anew.json["packet_id"] != first[0]
    assert set(states(app)) == {first[1], anew.json["packet_id"]}


def test_purge_by_rows_forgets_the_keys_on_a_host_whose_zone_is_not_utc(app, client, monkeypatch):
    """A key's day is the UTC day of the client's timestamp, whatever the host's zone: on a
    host 14 hours ahead of UTC (or 12 behind) a packet sent in the afternoon (or morning)
    falls on another local day, and its key must still go with it."""
    body = make_packet()
    sent = datetime.fromisoformat(body["timestamp"])
    first = client.post(f"{API}/ingest", json=body).json["packet_id"]
    process_all(client)
    age(app, [first], 40)
    # POSIX zone names count the other way: Etc/GMT-14 is UTC+14.
    zone = "Etc/GMT-14" if sent.hour >= 12 else "Etc/GMT+12"
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert sent.astimezone().date() != sent.date()  # the local day is another day
        with app.app_context():
            assert purge(30).packets == 1
    finally:
        monkeypatch.undo()
        time.tzset()
    anew = client.post(f"{API}/ingest", json=body)
    assert anew.status_code == 200, anew.json
    assert not anew.json.get("duplicate") and anew.json["packet_id"] != first


def test_purge_refuses_a_negative_age_or_an_empty_batch(app):
    with app.app_context():
        for days, batch_size in ((-1, 10), (30, 0)):
            with pytest.raises(ValueError, match="older_than_days must be >= 0 and batch_size"):
                purge(days, batch_size=batch_size)


def test_a_purged_packet_leaves_status_consistent(app, client):
    """After a purge, status counts only what is left."""
    ids = ingest(client, 4)
    process_all(client)
    age(app, ids[:3], 60)
    with app.app_context():
        purge(30)
    status = client.get(f"{API}/status").json
    assert status["total_packets"] == 1 and status["processed_packets"] == 1


# SQLite has no row locks: each purge batch there is one short BEGIN IMMEDIATE instead.
@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_skips_rows_locked_by_others_and_never_waits(app, client, backend):
    """PostgreSQL: a row locked by a live transaction is skipped, not waited for, and ingest
    goes on while the purge runs."""
    ids = ingest(client, 6)
    process_all(client)
    age(app, ids, 45)
    url = app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as other:
        other.execute("SELECT 1 FROM deliveries WHERE packet_id = %s FOR UPDATE", (ids[0],))
        outcome = {}

        def run():
            with app.app_context():
                outcome["report"] = purge(30, batch_size=2)

        worker = threading.Thread(target=run)
        worker.start()
        (arrived,) = ingest(client, 1)
        worker.join(timeout=10)
        assert not worker.is_alive(), "purge waited on a locked row"
        other.rollback()
    assert outcome["report"].packets == 5
    assert states(app) == {ids[0]: DeliveryState.PROCESSED, arrived: DeliveryState.PENDING}


def test_retention_days_default_to_thirty(monkeypatch):
    """BUCKET_RETENTION_DAYS defaults to 30 and reads the environment."""
    from config import Config

    monkeypatch.delenv("BUCKET_RETENTION_DAYS", raising=False)
    assert Config().BUCKET_RETENTION_DAYS == 30
    monkeypatch.setenv("BUCKET_RETENTION_DAYS", "7")
    assert Config().BUCKET_RETENTION_DAYS == 7
