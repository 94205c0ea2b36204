"""Day partitions (PostgreSQL): made ahead, the default partition watched and emptied, whole days
dropped by retention without losing an unfinished or dead packet, and verify after it. SQLite
keeps one table and the batched delete; the same scenarios run there too."""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, date, datetime, time, timedelta

import psycopg
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from bucket import create_app
from bucket.extensions import db
from bucket.models import Delivery, DeliveryState, Packet, PacketKey
from bucket.services import partitions, retention
from bucket.services.audit.sealing import seal_everything, seal_new_packets
from bucket.services.bookkeeping import book_new_packets
from bucket.services.counters import recount
from bucket.services.ingest import identity_key
from bucket.services.partitions import naive
from bucket.timeutil import new_packet_id, utc_now
from tests import servers
from tests.concurrency import join_all
from tests.factories import make_packet, packed_as_before_0019
from tests.queue_helpers import (
    API,
    ack,
    ingest_many,
    poll,
    sealer_before_signal_key_sets,
    sql,
    status,
)
from tests.statements import captured_statements

P = Packet.__table__
D = Delivery.__table__
K = PacketKey.__table__


def today() -> date:
    return utc_now().date()


def drop_partition(app, day: date) -> None:
    """Remove an (empty) day partition a test needs absent."""
    sql(app, f"DROP TABLE IF EXISTS {partitions.day_name(day)}")


def seq_of(app, packet_id: str) -> int:
    ((seq,),) = sql(app, "SELECT seq FROM packets WHERE packet_id = :p", p=packet_id)
    return seq


def partition_of(app, packet_id: str) -> str:
    ((name,),) = sql(
        app, "SELECT tableoid::regclass::text FROM packets WHERE packet_id = :p", p=packet_id
    )
    return name


def move_to_day(app, ids: list[str], day: date) -> None:
    """Pretend these packets were received on ``day`` (and, for the batched delete, reached
    their state then): the packet, its delivery and its key move together."""
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    with app.app_context():
        for offset, packet_id in enumerate(ids):
            moment = start + timedelta(minutes=offset)
            db.session.execute(
                update(P).where(P.c.packet_id == packet_id).values(received_at=moment)
            )
            db.session.execute(
                update(D)
                .where(D.c.packet_id == packet_id)
                .values(received_at=moment, visible_at=min(moment, utc_now()).timestamp())
            )
            if partitions.partitioned():
                db.session.execute(
                    update(K).where(K.c.packet_id == packet_id).values(received_at=moment)
                )
        db.session.commit()


def states(app) -> dict[str, str]:
    with app.app_context():
        found = dict(db.session.execute(select(D.c.packet_id, D.c.delivery_state)).all())
        db.session.commit()
        return found


def stored(app) -> set[str]:
    with app.app_context():
        found = set(db.session.execute(select(P.c.packet_id)).scalars())
        db.session.commit()
        return found


def bookkeeper_task(app, name: str):
    (task,) = [t for t in app.extensions["bucket.bookkeeper"].tasks if t.name == name]
    return task


@pytest.mark.parametrize("backend", ["postgres"])
def test_partitions_are_made_ahead_by_the_workers_and_by_the_command(make_app, backend):
    """The bookkeeper's task creates the days up to BUCKET_PARTITION_DAYS_AHEAD; the command
    goes further on request; status and /metrics tell how far ahead the days exist."""
    app = make_app(BUCKET_PARTITION_DAYS_AHEAD=13)
    far, farther = today() + timedelta(days=13), today() + timedelta(days=14)
    for day in (far, farther):
        drop_partition(app, day)
    assert status(app.test_client())["partition_days_ahead"] < 13
    with app.app_context():
        bookkeeper_task(app, "partitions").run()
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["bucket", "partitions", "list"])
    assert partitions.day_name(far) in listed.output
    assert partitions.processed_name(partitions.day_name(far)) in listed.output
    assert partitions.day_name(farther) not in listed.output
    made = runner.invoke(args=["bucket", "partitions", "ensure", "--days-ahead", "14"])
    assert made.exit_code == 0, made.output
    assert f"created {partitions.day_name(farther)}" in made.output
    assert status(app.test_client())["partition_days_ahead"] >= 14
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    (ahead,) = re.findall(r"^bucket_partition_days_ahead (\S+)$", metrics, re.MULTILINE)
    assert float(ahead) >= 14
    # A packet received today lands in today's partition, not the default.
    (packet_id,) = ingest_many(app.test_client(), 1)
    assert partition_of(app, packet_id) == partitions.day_name(today())


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_maintenance_waits_for_no_long_query(app, backend):
    """A query holding the packets table makes the maintenance give up after its lock timeout
    (and say so) instead of queueing every insert behind it."""
    far = today() + timedelta(days=20)
    drop_partition(app, far)
    url = app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as other:
        other.execute("SELECT count(*) FROM packets")  # its lock lasts until the rollback
        result = app.test_cli_runner().invoke(
            args=["bucket", "partitions", "ensure", "--days-ahead", "20"]
        )
        other.rollback()
    assert result.exit_code == 1 and "not finished" in result.output, result.output
    again = app.test_cli_runner().invoke(
        args=["bucket", "partitions", "ensure", "--days-ahead", "20"]
    )
    assert again.exit_code == 0 and partitions.day_name(far) in again.output


def test_an_insert_for_a_day_without_partition_is_kept_watched_and_moved(app, client, backend):
    """PostgreSQL: with today's partition missing (the thread and the command both stopped),
    ingest still stores the packet, in the default partition; status and /metrics show it;
    the maintenance creates the day and moves it there, seq and content unchanged (verify
    agrees), and the packet is served. A packet arriving for a later day with no partition
    goes the same way. SQLite: one table, nothing to watch."""
    far = today() + timedelta(days=400)
    if backend == "postgres":
        drop_partition(app, today())
        drop_partition(app, far)
    (packet_id,) = ingest_many(client, 1)
    (later,) = ingest_many(client, 1)
    move_to_day(app, [later], far)
    figures = status(client)
    metrics = client.get("/metrics").get_data(as_text=True)
    ensured = app.test_cli_runner().invoke(args=["bucket", "partitions", "ensure"])
    assert ensured.exit_code == 0, ensured.output
    if backend == "sqlite":
        assert figures["default_partition_packets"] is None
        assert figures["default_partition_deliveries"] is None
        assert figures["partition_days_ahead"] is None
        assert "bucket_packets_default_partition" not in metrics
        assert "nothing to do" in ensured.output
    else:
        assert partition_of(app, packet_id) == partitions.day_name(today())
        assert figures["default_partition_packets"] == 2
        assert figures["partition_days_ahead"] == -1
        assert "bucket_packets_default_partition 2.0" in metrics
        for day in (today(), far):
            name = partitions.day_name(day)
            assert f"created {name} (1 packets moved from the default)" in ensured.output
        assert partition_of(app, later) == partitions.day_name(far)
        assert status(client)["default_partition_packets"] == 0
    assert stored(app) == {packet_id, later}
    assert sorted(p["packet_id"] for p in poll(client)["packets"]) == sorted([packet_id, later])
    with app.app_context():
        seal_everything()
    verified = app.test_cli_runner().invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "checked 1 seals and 2 packets" in verified.output
    if backend == "postgres":
        sql(app, "TRUNCATE packets, packet_keys, deliveries")
        drop_partition(app, far)


PARTITIONS_OF_PACKETS_SQL = (
    "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'packets'::regclass"
)
SEQ_INDEXES_SQL = (
    "SELECT c.relname, x.indexrelid::regclass::text, x.indisunique FROM pg_inherits i "
    "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_index x ON x.indrelid = c.oid "
    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = x.indkey[0] "
    "WHERE i.inhparent = 'packets'::regclass AND x.indnkeyatts = 1 AND a.attname = 'seq'"
)


def seq_indexes(app) -> dict[str, list[tuple[str, bool]]]:
    """Each partition of packets: its indexes on seq alone, (name, unique)."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for table, index, unique in sql(app, SEQ_INDEXES_SQL):
        found.setdefault(table, []).append((index, unique))
    return found


@pytest.mark.parametrize("backend", ["postgres"])
def test_every_partition_of_packets_has_a_unique_index_on_seq_of_its_own(app, client, backend):
    """Migration 0017: a day made ahead, a day made for a packet found in the default
    partition, and the default, each have a unique index on seq of their own, which refuses a
    repeated seq; a partition made without one (by the version before 0017 during an upgrade)
    gets it at the next maintenance, a plain one where a seq already repeats, and only once."""
    ahead, adopted, bare, odd, alone = (today() + timedelta(days=n) for n in (20, 400, 30, 31, 32))
    for day in (ahead, adopted, bare, odd, alone):
        drop_partition(app, day)
    (stray,) = ingest_many(client, 1)
    move_to_day(app, [stray], adopted)
    assert partition_of(app, stray) == partitions.DEFAULT
    with app.app_context():
        partitions.create_day(alone, adopt=False)
    name = partitions.day_name(alone)
    assert seq_indexes(app)[name] == [(f"{name}_seq_key", True)]
    with app.app_context():
        partitions.ensure_partitions(20)
    assert partition_of(app, stray) == partitions.day_name(adopted)
    found = seq_indexes(app)
    for day in (ahead, adopted):
        name = partitions.day_name(day)
        assert found[name] == [(f"{name}_seq_key", True)], name
    for name in (partitions.DEFAULT,):
        assert found[name] == [(f"{name}_seq_key", True)], name
    assert set(found) == {name for (name,) in sql(app, PARTITIONS_OF_PACKETS_SQL)}
    (other,) = ingest_many(client, 1)
    move_to_day(app, [other], adopted)
    with pytest.raises(IntegrityError, match=f"{partitions.day_name(adopted)}_seq_key"):
        sql(
            app,
            "UPDATE packets SET seq = (SELECT seq FROM packets WHERE packet_id = :a) "
            "WHERE packet_id = :b",
            a=stray,
            b=other,
        )
    for day in (bare, odd):  # as the version before 0017 made a day
        end = partitions.bound_literal(day + timedelta(days=1))
        sql(
            app,
            f"CREATE TABLE {partitions.day_name(day)} PARTITION OF packets "
            f"FOR VALUES FROM ({partitions.bound_literal(day)}) TO ({end})",
        )
    twice = ingest_many(client, 2)
    move_to_day(app, twice, odd)
    sql(
        app,
        "UPDATE packets SET seq = (SELECT seq FROM packets WHERE packet_id = :a) "
        "WHERE packet_id = :b",
        a=twice[0],
        b=twice[1],
    )
    assert partitions.day_name(bare) not in seq_indexes(app)
    with app.app_context():
        made = partitions.ensure_partitions(20)
        again = partitions.ensure_partitions(20)
    assert sorted(made.created) == [f"{partitions.day_name(day)}_seq_key" for day in (bare, odd)]
    assert again.created == []
    found = seq_indexes(app)
    assert found[partitions.day_name(bare)] == [(f"{partitions.day_name(bare)}_seq_key", True)]
    assert found[partitions.day_name(odd)] == [(f"{partitions.day_name(odd)}_seq_key", False)]


def test_retention_keeps_every_unfinished_and_dead_packet_and_verify_tells_purged(
    app, client, backend
):
    """Old days: one of processed packets only, one also holding a leased packet, one also a
    dead one. PostgreSQL drops the first whole, keeps the others whole and says why, and the
    dead one's day goes only with --include-dead; SQLite deletes the old processed rows. No
    unfinished or dead packet is lost on either, and verify reports exactly the purged ones
    as purged: a packet deleted by hand between two purged ones is still called deleted."""
    first, second, third = (today() - timedelta(days=n) for n in (40, 41, 42))
    if backend == "postgres":
        for day in (first, second, third):
            drop_partition(app, day)
            with app.app_context():
                partitions.create_day(day, adopt=False)
    days = (first, second, first, second, third, third)
    bodies = [day_bodies(app, day, 1)[0] for day in days]
    a, b, c, d, e, f = (
        client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies
    )
    served = [p["packet_id"] for p in poll(client, limit=6)["packets"]]
    assert sorted(served) == sorted([a, b, c, d, e, f])
    for packet_id in (a, b, c, e):
        assert ack(client, packet_id).status_code == 200
    with app.app_context():  # f dead-lettered by hand, then recounted (README)
        db.session.execute(
            update(D).where(D.c.packet_id == f).values(delivery_state=DeliveryState.DEAD)
        )
        db.session.commit()
        recount()
    # The first day holds a and c, whose seqs lie on either side of b's (the second day).
    move_to_day(app, [a, c], first)
    move_to_day(app, [b, d], second)
    move_to_day(app, [e, f], third)
    runner = app.test_cli_runner()
    purged = runner.invoke(args=["bucket", "purge"])
    assert purged.exit_code == 0, purged.output
    if backend == "postgres":
        names = [partitions.day_name(day) for day in (first, second, third)]
        assert f"dropped {names[0]}: 2 packets (0 dead), 2 seq ranges" in purged.output
        assert f"kept {names[1]}: holds 1 unfinished and 0 dead packets" in purged.output
        assert f"kept {names[2]}: holds 0 unfinished and 1 dead packets" in purged.output
        assert "--include-dead" in purged.output
        assert stored(app) == {b, d, e, f}
        listed = runner.invoke(args=["bucket", "partitions", "list"]).output
        assert names[0] not in listed
        assert partitions.processed_name(names[0]) not in listed
        assert partitions.processed_name(names[1]) in listed
        purged_count = 2
    else:
        assert "purged 4 processed packets" in purged.output
        assert stored(app) == {d, f}
        purged_count = 4
    left = states(app)
    assert left[d] == DeliveryState.LEASED and left[f] == DeliveryState.DEAD
    figures = status(client)
    assert figures["total_packets"] == 6 - purged_count
    assert figures["dead_packets"] == 1 and figures["pending_packets"] == 1
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0, verified.output
    assert verified.output.count("purged by retention on") == purged_count
    if backend == "sqlite":
        assert_resent_is_new(client, bodies[0], a)
        return
    sql(app, "DELETE FROM packets WHERE packet_id = :p", p=b)
    sql(app, "DELETE FROM deliveries WHERE packet_id = :p", p=b)
    deleted = runner.invoke(args=["bucket", "verify"])
    assert deleted.exit_code == 1 and f"packet {b}: sealed, gone" in deleted.output
    assert deleted.output.count("purged by retention on") == 2
    with_dead = runner.invoke(args=["bucket", "purge", "--include-dead"])
    assert f"dropped {names[2]}: 2 packets (1 dead)" in with_dead.output, with_dead.output
    assert f"kept {names[1]}" in with_dead.output
    assert stored(app) == {d}
    assert states(app) == {d: DeliveryState.LEASED}
    assert status(client)["dead_packets"] == 0
    again = runner.invoke(args=["bucket", "verify"])
    assert again.output.count("purged by retention on") == 4
    assert "1 problems" in again.output  # b, deleted by hand, and nothing else
    assert_resent_is_new(client, bodies[0], a)


# The factory's packets are stamped from 2025-11-28 on, a few days at most.
KEY_LEGACY_END = date(2026, 1, 1)


def shrink_key_legacy(app) -> None:
    """Let the legacy partition of packet_keys (migration 0015: every day before the upgrade)
    end where the factory's timestamps do, so the tests' past days can have partitions."""
    with app.app_context():
        found = partitions.partitions(partitions.KEYS)
    legacy = [p for p in found if p.name == partitions.KEYS_LEGACY]
    if not legacy or legacy[0].end.date() <= KEY_LEGACY_END:  # dropped by an earlier purge
        return
    sql(app, f"ALTER TABLE {partitions.KEYS} DETACH PARTITION {partitions.KEYS_LEGACY}")
    sql(
        app,
        f"ALTER TABLE {partitions.KEYS} ATTACH PARTITION {partitions.KEYS_LEGACY} "
        f"FOR VALUES FROM (MINVALUE) TO ('{KEY_LEGACY_END}')",
    )


def day_bodies(app, day: date, count: int) -> list[dict]:
    """``count`` packets whose clients stamped them on ``day``, as a packet received that day
    is: on PostgreSQL their keys then live in that day's partition of packet_keys (created
    here), which retention drops once none of its packets is stored (migration 0015)."""
    with app.app_context():
        postgres = partitions.partitioned()
    if postgres:
        shrink_key_legacy(app)
        sql(app, f"DROP TABLE IF EXISTS {partitions.key_day_name(day)}")
        with app.app_context():
            partitions.create_key_day(day)
    bodies = [make_packet() for _ in range(count)]
    for body in bodies:
        moment = datetime.combine(day, time(10), tzinfo=UTC) + timedelta(
            seconds=5 * body["raw_signals"]["n"] % 50_000
        )
        body["timestamp"] = moment.isoformat().replace("+00:00", "Z")
    return bodies


def processed_on(app, client, day: date, count: int) -> tuple[list[dict], list[str]]:
    """``count`` packets of ``day`` (``day_bodies``) in a fresh partition of that day,
    ingested, processed and moved there; their bodies and ids."""
    drop_partition(app, day)
    with app.app_context():
        partitions.create_day(day, adopt=False)
    bodies = day_bodies(app, day, count)
    ids = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies]
    for packet in poll(client, limit=count)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids, day)
    return bodies, ids


def assert_resent_is_new(client, body: dict, purged_id: str) -> None:
    """A purged packet's keys went with it (its day of keys dropped once none of that day's
    packets was stored): the same packet sent again is stored anew, as after any purge."""
    answer = client.post(f"{API}/ingest", json=body).json
    assert answer["packet_id"] != purged_id and not answer.get("duplicate")


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_by_days_keeps_recent_and_dead_days_and_forgets_every_purged_key(
    app, client, backend
):
    """``purge_days`` with its defaults (dead kept, not a dry run) drops the day that ended more
    than N days ago and keeps a recent day and a day holding a dead packet; the dropped day's
    keys go in batches of one, down to the first packet's, so each purged packet sent again is
    stored anew; no detached table is left behind."""
    old, dead_day, recent = (today() - timedelta(days=n) for n in (50, 40, 2))
    for day in (old, dead_day, recent):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    bodies = day_bodies(app, old, 3) + day_bodies(app, recent, 1) + day_bodies(app, dead_day, 1)
    ids = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies]
    for packet in poll(client, limit=5)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    sql(app, "UPDATE deliveries SET delivery_state = 'dead' WHERE packet_id = :p", p=ids[4])
    with app.app_context():
        recount()  # the dead-lettering was by hand (README)
    move_to_day(app, ids[:3], old)
    move_to_day(app, ids[3:4], recent)
    move_to_day(app, ids[4:], dead_day)
    with app.app_context():
        report = retention.purge_days(30, batch_size=1)
    name = partitions.day_name(old)
    assert (report.dry_run, report.packets) == (False, 3)
    mine = {name, partitions.day_name(dead_day), partitions.day_name(recent)}
    assert [day.partition for day in report.dropped if day.partition in mine] == [name]
    assert [(d.partition, d.packets, d.dead) for d in report.kept if d.partition in mine] == [
        (partitions.day_name(dead_day), 1, 1)  # a kept day still counts what it holds
    ]
    assert stored(app) == set(ids[3:])
    left = sql(
        app,
        "SELECT relname FROM pg_class WHERE relname IN (:a, :b)",
        a=name,
        b=partitions.processed_name(name),
    )
    assert left == []
    keys = sql(app, "SELECT packet_id::text FROM packet_keys ORDER BY received_at")
    assert [packet_id for (packet_id,) in keys] == [ids[4], ids[3]]
    assert partitions.key_day_name(old) in [day.partition for day in report.key_days]
    assert sql(app, f"SELECT to_regclass('{partitions.key_day_name(old)}')") == [(None,)]
    for body, purged_id in zip(bodies[:3], ids[:3], strict=True):
        assert_resent_is_new(client, body, purged_id)
    again = client.post(f"{API}/ingest", json=bodies[3]).json
    assert (again["packet_id"], again.get("duplicate")) == (ids[3], True)


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_next_purge_finishes_a_day_an_earlier_one_detached_but_a_dry_run_does_not(
    app, client, backend
):
    """A purge stopped after detaching a day (``drop_day`` done, ``clear_detached`` not) left
    the day's tables and keys: a dry run leaves them too, the next purge drops both tables and
    forgets the keys, and a processed deliveries' table left detached alone is dropped."""
    old, older = today() - timedelta(days=50), today() - timedelta(days=60)
    for day in (old, older):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    bodies = day_bodies(app, old, 2) + day_bodies(app, older, 1)
    ids = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies]
    for packet in poll(client, limit=3)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids[:2], old)
    move_to_day(app, ids[2:], older)
    name, alone = partitions.day_name(old), partitions.processed_name(partitions.day_name(older))
    with app.app_context():
        assert retention.purge_days(30, dry_run=True).packets == 3  # books and seals
        (part,) = [p for p in partitions.partitions() if p.name == name]
        outcome = retention.drop_day(part, retention.sealed_through(), False, False)
        assert (outcome.kept, outcome.packets) == (None, 2)
    sql(app, f"ALTER TABLE {partitions.PROCESSED} DETACH PARTITION {alone}")
    tables = "SELECT relname FROM pg_class WHERE relname IN (:a, :b, :c) ORDER BY relname"
    names = {"a": name, "b": partitions.processed_name(name), "c": alone}
    before = sorted(names.values())
    with app.app_context():
        retention.purge_days(30, dry_run=True)
    assert [relname for (relname,) in sql(app, tables, **names)] == before
    with app.app_context():
        report = retention.purge_days(30, batch_size=1)
    assert partitions.day_name(older) in [day.partition for day in report.dropped]
    assert sql(app, tables, **names) == []
    assert sql(app, "SELECT packet_id FROM packet_keys") == []
    for body, purged_id in zip(bodies, ids, strict=True):
        assert_resent_is_new(client, body, purged_id)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_whose_drop_fails_is_named_and_fails_the_purge_and_the_next_purge_drops_it(
    app, client, backend
):
    """The detached days are dropped on a thread of their own while the purge goes on to the
    days of keys: a drop that fails (an operator's view still reads the day) does not stop
    them; ``flask bucket purge`` reports what it purged, names the day it could not drop and
    why, and exits 1; the day stays detached, out of every read. While it cannot be dropped it
    holds up no other day's purge, and once it can, the next purge drops it (on its own thread
    too, while it books and seals)."""
    old, later = today() - timedelta(days=50), today() - timedelta(days=45)
    bodies, ids = processed_on(app, client, old, 2)
    name = partitions.day_name(old)
    detached = "SELECT relispartition FROM pg_class WHERE relname = :name"
    purge = ["bucket", "purge", "--older-than-days", "30"]
    sql(app, f"CREATE VIEW operator_look AS SELECT packet_id FROM {name}")
    try:
        failed = app.test_cli_runner().invoke(args=purge)
        assert failed.exit_code == 1, failed.output
        assert f"dropped {name}: 2 packets" in failed.output
        assert f"dropped {partitions.key_day_name(old)}" in failed.output
        assert f"could not drop {name}: " in failed.output
        assert "depend" in failed.output and "the next purge drops it" in failed.output
        assert sql(app, detached, name=name) == [(False,)]
        assert stored(app) == set()
        assert sql(app, f"SELECT to_regclass('{partitions.key_day_name(old)}')") == [(None,)]
        purged = "SELECT packet_count FROM audit_purged_ranges WHERE partition = :name"
        assert sql(app, purged, name=name) == [(2,)]
        # A later day comes due while the view still holds the first: it goes, the first is
        # named again.
        processed_on(app, client, later, 1)
        stuck = app.test_cli_runner().invoke(args=purge)
        assert stuck.exit_code == 1, stuck.output
        assert f"dropped {partitions.day_name(later)}: 1 packets" in stuck.output
        assert f"could not drop {name}: " in stuck.output
        assert sql(app, detached, name=partitions.day_name(later)) == []
    finally:
        sql(app, "DROP VIEW IF EXISTS operator_look")
    again = app.test_cli_runner().invoke(args=purge)
    assert again.exit_code == 0, again.output
    assert "could not drop" not in again.output
    assert sql(app, detached, name=name) == []
    for body, purged_id in zip(bodies, ids, strict=True):
        assert_resent_is_new(client, body, purged_id)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_leftover_with_its_processed_partition_attached_waits_for_no_reader_past_the_lock_timeout(
    app, client, backend
):
    """A purge of the version before migration 0014 stopped after detaching a day: the day's
    packets detached, its processed deliveries' partition still attached. The next purge
    detaches and drops that partition, but waits for a reader of the processed deliveries no
    longer than its lock timeout: it names the day as not dropped, with the lock timeout,
    instead of hanging (and making every ack wait behind its lock), and leaves both tables as
    they were; the rest of the purge is not held up by it (the day's keys go, since none of
    their packets is stored). Once the reader is done, the purge after it drops both tables."""
    old = today() - timedelta(days=55)
    bodies, ids = processed_on(app, client, old, 2)
    name = partitions.day_name(old)
    processed = partitions.processed_name(name)
    with app.app_context():
        assert retention.purge_days(30, dry_run=True).packets == 2  # books and seals
        (part,) = [p for p in partitions.partitions() if p.name == name]
        outcome = retention.drop_day(part, retention.sealed_through(), False, False)
        assert (outcome.kept, outcome.packets) == (None, 2)
        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    bounds = f"FROM ('{old.isoformat()}') TO ('{(old + timedelta(days=1)).isoformat()}')"
    sql(app, f"ALTER TABLE {partitions.PROCESSED} ATTACH PARTITION {processed} FOR VALUES {bounds}")
    tables = "SELECT relname, relispartition FROM pg_class WHERE relname IN (:a, :b) ORDER BY 1"
    left = [(processed, True), (name, False)]
    assert sql(app, tables, a=name, b=processed) == left
    answer: dict = {}

    def purge() -> None:
        with app.app_context():
            try:
                answer["report"] = retention.purge_days(30, batch_size=1)
            except Exception as exc:  # noqa: BLE001 - surfaced below, not lost in the thread
                answer["error"] = exc

    worker = threading.Thread(target=purge, daemon=True)
    with psycopg.connect(dsn) as reader:
        reader.execute(f"SELECT count(*) FROM {partitions.PROCESSED}")  # its transaction stays open
        worker.start()
        # Ends within the lock timeout (1 s); the deadline only keeps a broken purge from
        # hanging the test, since the reader would never finish while it waits.
        worker.join(60)
        waited = worker.is_alive()
        reader.rollback()
    join_all([worker], 60, "purge")
    assert not waited, "the purge waited for the reader past its lock timeout"
    assert "error" not in answer, answer
    ((undropped, reason),) = answer["report"].undropped
    assert undropped == name and "lock timeout" in reason
    assert sql(app, tables, a=name, b=processed) == left
    assert not {key for (key,) in sql(app, "SELECT packet_id::text FROM packet_keys")} & set(ids)
    with app.app_context():
        assert retention.purge_days(30, batch_size=1).undropped == []
    assert sql(app, tables, a=name, b=processed) == []
    for body, purged_id in zip(bodies, ids, strict=True):
        assert_resent_is_new(client, body, purged_id)


def store_as_before_partitions(app, bodies: list[dict], received: datetime) -> list[str]:
    """Packets as the version before migration 0012 stored them (one packets table),
    processed at ``received``; their ids."""
    ids = []
    with app.app_context():
        for n, body in enumerate(bodies):
            packet_id, moment = new_packet_id(), naive(received + timedelta(seconds=n))
            timestamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
            db.session.execute(
                text(
                    "INSERT INTO packets (packet_id, dedup_key, user_id, session_id, "
                    "system_type, role, client_timestamp, cognitive_state, active_seconds, "
                    "idle_seconds, away_seconds, focus_score, raw_signals, received_at, stale) "
                    "VALUES (:id, :dedup, :user, :session, 'gurukul', 'student', :ts, "
                    "'ON_TASK', 4, 1, 0, 70, :raw, :received, false)"
                ),
                {
                    "id": packet_id,
                    "dedup": identity_key(
                        "gurukul", body["user_id"], body["session_id"], timestamp
                    ),
                    "user": body["user_id"],
                    "session": body["session_id"],
                    "ts": naive(timestamp),
                    "raw": json.dumps(body["raw_signals"]),
                    "received": moment,
                },
            )
            db.session.execute(
                text(
                    "INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, "
                    "delivery_count, processed_by_karma, processed_at) VALUES (:id, :received, "
                    "'processed', :visible, 1, true, :received)"
                ),
                {"id": packet_id, "received": moment, "visible": received.timestamp() + n},
            )
            ids.append(packet_id)
        db.session.commit()
        recount()
        book_new_packets()
    return ids


def upgraded_with_legacy_days(app, bodies: list[dict]) -> list[str]:
    """A database at 0011 holding these packets (received 45 days ago, processed, sealed),
    upgraded to the latest layout as if 40 days ago: its legacy partitions (packets,
    processed deliveries, keys) end on that day. The packets' ids."""
    runner = app.test_cli_runner()
    upgraded = runner.invoke(args=["db", "upgrade", "0011_quarantine_auth"])
    assert upgraded.exit_code == 0, upgraded.output
    received = datetime.combine(today() - timedelta(days=45), time(9), tzinfo=UTC)
    old = store_as_before_partitions(app, bodies, received)
    with app.app_context(), packed_as_before_0019(), sealer_before_signal_key_sets():
        seal_everything()
    upgraded = runner.invoke(args=["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert {partition_of(app, packet_id) for packet_id in old} == {partitions.LEGACY}
    end = (today() - timedelta(days=40)).isoformat()
    for parent, child in (
        ("packets", partitions.LEGACY),
        (partitions.PROCESSED, "deliveries_processed_legacy"),
        (partitions.KEYS, partitions.KEYS_LEGACY),
    ):
        sql(app, f"ALTER TABLE {parent} DETACH PARTITION {child}")
        sql(
            app,
            f"ALTER TABLE {parent} ATTACH PARTITION {child} "
            f"FOR VALUES FROM (MINVALUE) TO ('{end}')",
        )
    return old


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_by_days_drops_the_legacy_partition_of_an_upgrade_once_its_days_are_past(
    empty_database, backend
):
    """After an upgrade from the single packets table (migration 0012), the packets stored
    before it sit in ``packets_legacy``, which has an end but no start (MINVALUE), and their
    processed deliveries in ``deliveries_processed_legacy`` (0014). Once its end lies more
    than N days back, ``purge_days`` drops it whole like a day: both tables gone, the
    counters lowered, the run of seqs recorded (verify calls each of its packets purged),
    its keys forgotten (a resent copy is stored anew); a packet of today stays."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": empty_database, "REDIS_URL": None}, testing=True)
    runner, client = app.test_cli_runner(), app.test_client()
    try:
        bodies = [make_packet() for _ in range(3)]
        old = upgraded_with_legacy_days(app, bodies)
        legacy = partitions.LEGACY
        with app.app_context():
            partitions.ensure_partitions(0)  # today, no longer the legacy partition's
        (fresh,) = ingest_many(client, 1, timestamp=utc_now().isoformat())
        for packet in poll(client)["packets"]:
            assert ack(client, packet["packet_id"]).status_code == 200
        with app.app_context():
            report = retention.purge_days(30, batch_size=2)
        assert [(d.partition, d.packets, d.ranges, d.kept) for d in report.days] == [
            (legacy, 3, 1, None)
        ]
        assert stored(app) == {fresh}
        left = sql(app, "SELECT relname FROM pg_class WHERE relname LIKE '%legacy%'")
        assert left == []
        assert sql(app, "SELECT packet_id::text FROM packet_keys") == [(fresh,)]
        figures = status(client)
        assert (figures["total_packets"], figures["processed_packets"]) == (1, 1)
        verified = runner.invoke(args=["bucket", "verify"])
        assert verified.exit_code == 0, verified.output
        assert verified.output.count("purged by retention on") == 3
        for body, purged_id in zip(bodies, old, strict=True):
            assert_resent_is_new(client, body, purged_id)
    finally:
        servers.dispose_engines(app)


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_of_keys_is_checked_while_the_legacy_partition_of_an_upgrade_is_kept(
    empty_database, backend
):
    """The legacy partition (no start: MINVALUE) kept by a purge for its dead packet is one of
    the stored ranges a day of keys is checked against: the purge goes through, keeps the
    legacy partition, and keeps a day of keys whose packet (a stale resend) is stored today."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": empty_database, "REDIS_URL": None}, testing=True)
    client = app.test_client()
    try:
        (old,) = upgraded_with_legacy_days(app, [make_packet()])
        sql(app, "UPDATE deliveries SET delivery_state = 'dead' WHERE packet_id = :p", p=old)
        with app.app_context():
            partitions.ensure_partitions(0)
            recount()
        stale_day = today() - timedelta(days=42)
        (stale,) = day_bodies(app, stale_day, 1)
        response = client.post(f"{API}/ingest", json=stale)
        assert response.status_code == 200, response.json
        stale_id = response.json["packet_id"]
        with app.app_context():
            report = retention.purge_days(30)
        assert [(d.partition, d.kept is not None) for d in report.days] == [
            (partitions.LEGACY, True)
        ]
        outcomes = {k.partition: k.kept for k in report.key_days}
        assert outcomes[partitions.key_day_name(stale_day)] == (
            "names 1 packets still stored (kept whole until they are purged)"
        )
        assert stored(app) == {old, stale_id}
        again = client.post(f"{API}/ingest", json=stale)
        assert (again.json["packet_id"], again.json["duplicate"]) == (stale_id, True)
    finally:
        servers.dispose_engines(app)


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_by_days_keeps_a_day_holding_a_packet_not_sealed_yet(
    app, client, backend, monkeypatch
):
    """With the sealer lagging, an old day whose last packet no seal covers yet stays whole,
    and the purge says why."""
    old = today() - timedelta(days=50)
    drop_partition(app, old)
    with app.app_context():
        partitions.create_day(old, adopt=False)
    ids = ingest_many(client, 3)
    for packet in poll(client, limit=3)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids, old)
    # The purge's own sealing round gets through the first two packets only.
    monkeypatch.setattr(retention, "seal_everything", lambda: seal_new_packets(max_packets=2))
    with app.app_context():
        report = retention.purge_days(30)
    found = {day.partition: day.kept for day in report.days}
    assert found[partitions.day_name(old)] == "holds packets not sealed yet"
    assert stored(app) == set(ids)


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_with_dead_drops_only_the_days_dead_and_keeps_a_day_whose_rows_mismatch_the_log(
    app, client, backend
):
    """``include_dead`` removes the dead deliveries of the day dropped only (a recent day's dead
    packet stays dead and counted); a day whose rows do not match the sealed leaves (two rows
    given one seq by hand) is kept, with the reason."""
    old, odd, recent = (today() - timedelta(days=n) for n in (50, 45, 2))
    for day in (old, odd, recent):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    ids = ingest_many(client, 5)
    for packet in poll(client, limit=5)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    for packet_id in (ids[0], ids[4]):
        sql(app, "UPDATE deliveries SET delivery_state = 'dead' WHERE packet_id = :p", p=packet_id)
    with app.app_context():
        recount()  # the dead-lettering was by hand (README)
    move_to_day(app, ids[:1], old)
    move_to_day(app, ids[1:3], odd)
    move_to_day(app, ids[3:], recent)
    with app.app_context():
        seal_everything()
    # A day's unique index on seq refuses a repeat: the day's index made plain, as migration
    # 0017 leaves it where a seq already repeated.
    odd_day = partitions.day_name(odd)
    sql(app, f"DROP INDEX {odd_day}_seq_key")
    sql(app, f"CREATE INDEX {odd_day}_seq_key ON {odd_day} (seq)")
    sql(
        app,
        "UPDATE packets SET seq = (SELECT seq FROM packets WHERE packet_id = :a) "
        "WHERE packet_id = :b",
        a=ids[1],
        b=ids[2],
    )
    with app.app_context():
        report = retention.purge_days(30, include_dead=True)
    mine = {partitions.day_name(day) for day in (old, odd, recent)}
    assert [day.partition for day in report.dropped if day.partition in mine] == [
        partitions.day_name(old)
    ]
    assert [(day.partition, day.kept) for day in report.kept if day.partition in mine] == [
        (
            partitions.day_name(odd),
            "its rows do not match the audit log's leaves (run flask bucket verify)",
        )
    ]
    assert states(app)[ids[4]] == DeliveryState.DEAD
    figures = status(client)
    assert (figures["processed_packets"], figures["dead_packets"]) == (3, 1)


def burn_seqs(app, count: int) -> None:
    """Let the sequence of seq skip ``count`` values, as rolled-back inserts make it do."""
    sql(
        app,
        "SELECT nextval(pg_get_serial_sequence('packets', 'seq')) FROM generate_series(1, :n)",
        n=count,
    )


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_is_recorded_as_its_runs_of_sealed_seqs_across_holes_never_sealed(
    app, client, backend
):
    """The ranges recorded for a dropped day join its seqs across values no packet ever had
    (seqs the sequence skipped), and split them at a sealed packet the day does not hold: one
    of another day between two holes, and one deleted behind the log's back before the purge,
    which verify still calls deleted, its neighbours purged."""
    old, recent = today() - timedelta(days=50), today() - timedelta(days=2)
    for day in (old, recent):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    (first,) = ingest_many(client, 1)
    burn_seqs(app, 5)
    (second,) = ingest_many(client, 1)
    burn_seqs(app, 5)
    (other,) = ingest_many(client, 1)
    burn_seqs(app, 5)
    third, gone, last = ingest_many(client, 3)
    ids = [first, second, other, third, gone, last]
    for packet in poll(client, limit=6)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, [first, second, third, gone, last], old)
    move_to_day(app, [other], recent)
    seqs = dict(sql(app, "SELECT packet_id, seq FROM packets"))
    assert [seqs[b] - seqs[a] for a, b in zip(ids, ids[1:], strict=False)] == [6, 6, 6, 1, 1]
    with app.app_context():
        seal_everything()
    sql(app, "DELETE FROM deliveries WHERE packet_id = :p", p=gone)
    sql(app, "DELETE FROM packets WHERE packet_id = :p", p=gone)
    with app.app_context():
        recount()
    runner = app.test_cli_runner()
    purged = runner.invoke(args=["bucket", "purge"])
    name = partitions.day_name(old)
    assert f"dropped {name}: 4 packets (0 dead), 3 seq ranges" in purged.output, purged.output
    recorded = sql(
        app,
        "SELECT first_seq, last_seq, packet_count FROM audit_purged_ranges "
        "WHERE partition = :n ORDER BY 1",
        n=name,
    )
    assert [tuple(r) for r in recorded] == [
        (seqs[first], seqs[second], 2),
        (seqs[third], seqs[third], 1),
        (seqs[last], seqs[last], 1),
    ]
    assert stored(app) == {other}
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 1 and f"packet {gone}: sealed, gone" in verified.output
    assert verified.output.count("purged by retention on") == 4
    assert "1 problems" in verified.output


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_of_one_run_of_seqs_is_proved_by_its_count_and_one_with_holes_is_numbered(
    app, client, backend
):
    """A day whose seqs are one run (no seq repeats: its index on seq is unique) is proved so
    by its count, as wide as its seqs, without numbering its rows; a day with a hole in its
    seqs is numbered row by row. Each records the ranges it always did."""
    whole, holed = today() - timedelta(days=50), today() - timedelta(days=49)
    for day in (whole, holed):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    ids = ingest_many(client, 3)
    burn_seqs(app, 3)
    (after_hole,) = ingest_many(client, 1)
    ids.append(after_hole)
    for packet in poll(client, limit=4)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids[:2], whole)
    move_to_day(app, ids[2:], holed)
    seqs = [seq_of(app, packet_id) for packet_id in ids]
    with app.app_context():
        seal_everything()
    with captured_statements(app) as statements, app.app_context():
        report = retention.purge_days(30)
    names = [partitions.day_name(day) for day in (whole, holed)]
    # Only these two days: an earlier test may leave an empty old day in the shared database.
    assert [(d.partition, d.packets, d.ranges, d.kept) for d in report.days if d.packets] == [
        (names[0], 2, 1, None),
        (names[1], 2, 1, None),
    ]
    numbered = [s for s in statements if "row_number()" in s and any(n in s for n in names)]
    assert numbered == [retention.RUNS_SQL.format(day=names[1])]
    recorded = sql(
        app, "SELECT first_seq, last_seq, packet_count, partition FROM audit_purged_ranges"
    )
    assert sorted(tuple(r) for r in recorded) == [
        (seqs[0], seqs[1], 2, names[0]),
        (seqs[2], seqs[3], 2, names[1]),
    ]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_spanning_several_seals_is_dropped_as_one_range_and_an_empty_day_too(
    app, client, backend
):
    """A day whose one run of seqs lies across two full seals (after ten packets of today,
    sealed before it) is dropped as one range: every seal near the day is read, from its first
    seq to its last. An old day partition that holds nothing is dropped with no range."""
    old, empty = today() - timedelta(days=50), today() - timedelta(days=49)
    for day in (old, empty):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    ingest_many(client, 10)
    with app.app_context():
        seal_everything()
    ids = ingest_many(client, 4)
    with app.app_context():
        assert [seal_new_packets(2).packet_count for _ in range(2)] == [2, 2]
    for packet in poll(client, limit=14)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids, old)
    seqs = sorted(seq_of(app, packet_id) for packet_id in ids)
    with app.app_context():
        report = retention.purge_days(30)
    names = [partitions.day_name(day) for day in (old, empty)]
    found = {d.partition: (d.packets, d.ranges, d.kept) for d in report.days}
    assert [found[name] for name in names] == [(4, 1, None), (0, 0, None)]
    recorded = sql(
        app,
        "SELECT first_seq, last_seq, packet_count FROM audit_purged_ranges WHERE partition = :n",
        n=names[0],
    )
    assert [tuple(r) for r in recorded] == [(seqs[0], seqs[-1], 4)]
    assert sql(app, "SELECT to_regclass(:n)", n=names[1]) == [(None,)]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_range_never_spans_a_sealed_packet_of_another_day_just_before_a_run(app, client, backend):
    """A day holding seqs s and s + 7, where s + 1 .. s + 5 were never a packet's and s + 6 is
    a sealed packet of another day: two ranges, never one across that packet."""
    old, recent = today() - timedelta(days=50), today() - timedelta(days=2)
    for day in (old, recent):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    (first,) = ingest_many(client, 1)
    burn_seqs(app, 5)
    other, second = ingest_many(client, 2)
    for packet in poll(client, limit=3)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, [first, second], old)
    move_to_day(app, [other], recent)
    a, b = seq_of(app, first), seq_of(app, second)
    assert (seq_of(app, other), b) == (a + 6, a + 7)
    with app.app_context():
        seal_everything()
        report = retention.purge_days(30)
    name = partitions.day_name(old)
    found = {d.partition: (d.packets, d.ranges, d.kept) for d in report.days}
    assert found[name] == (2, 2, None)
    recorded = sql(
        app,
        "SELECT first_seq, last_seq, packet_count FROM audit_purged_ranges "
        "WHERE partition = :n ORDER BY 1",
        n=name,
    )
    assert [tuple(r) for r in recorded] == [(a, a, 1), (b, b, 1)]
    assert stored(app) == {other}


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_holding_a_seq_no_seal_has_is_kept(app, client, backend):
    """A day row whose seq no seal's leaves hold (given by hand the one value the sequence
    skipped between two sealed packets) keeps the day whole, with the reason."""
    old = today() - timedelta(days=50)
    drop_partition(app, old)
    with app.app_context():
        partitions.create_day(old, adopt=False)
    (first,) = ingest_many(client, 1)
    burn_seqs(app, 1)
    ids = [first, *ingest_many(client, 2)]
    for packet in poll(client, limit=3)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids, old)
    with app.app_context():
        seal_everything()
    sql(app, "UPDATE packets SET seq = seq + 1 WHERE packet_id = :p", p=first)
    with app.app_context():
        report = retention.purge_days(30)
    found = {day.partition: day for day in report.days}[partitions.day_name(old)]
    assert found.kept == "its rows do not match the audit log's leaves (run flask bucket verify)"
    assert (found.packets, stored(app)) == (3, set(ids))


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_by_days_keeps_a_day_it_cannot_lock_and_says_it_is_busy(app, client, backend):
    """A day whose rows another transaction is changing is not waited for past the lock
    timeout: it is kept whole and reported busy with no packets counted, not raised."""
    old, later = today() - timedelta(days=50), today() - timedelta(days=45)
    for day in (old, later):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    ids = ingest_many(client, 3)
    for packet in poll(client, limit=3)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids[:2], old)
    move_to_day(app, ids[2:], later)
    name = partitions.day_name(old)
    with app.app_context():
        retention.book_new_packets()  # the open transaction below would hold both back
        seal_everything()
        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as other:
        other.execute(
            f"UPDATE {name} SET auth_subject = auth_subject WHERE packet_id = %s", (ids[0],)
        )
        with app.app_context():
            report = retention.purge_days(30)
        other.rollback()
    busy = f"busy: a lock was not granted within {retention.LOCK_TIMEOUT}"
    found = {day.partition: (day.packets, day.kept) for day in report.days}
    assert found[name] == (0, busy)
    assert set(ids[:2]) <= stored(app)


@pytest.mark.parametrize("backend", ["postgres"])
def test_purge_by_days_refuses_a_negative_age_or_an_empty_batch(app, backend):
    """The same checks as the purge by rows, with the message; 0 days and batches of 1 pass."""
    message = "older_than_days must be >= 0 and batch_size >= 1"
    with app.app_context():
        for days, size in ((-1, 10), (30, 0)):
            with pytest.raises(ValueError) as refused:
                retention.purge_days(days, batch_size=size)
            assert str(refused.value) == message
        assert retention.purge_days(0, batch_size=1).packets == 0


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_dry_run_names_the_days_and_drops_nothing(app, client, backend):
    """purge --dry-run tells which days would go and which stay, and changes nothing."""
    old = today() - timedelta(days=50)
    drop_partition(app, old)
    with app.app_context():
        partitions.create_day(old, adopt=False)
    ids = ingest_many(client, 2)
    for packet in poll(client, limit=2)["packets"]:
        ack(client, packet["packet_id"])
    move_to_day(app, ids, old)
    result = app.test_cli_runner().invoke(args=["bucket", "purge", "--dry-run"])
    assert f"would drop {partitions.day_name(old)}: 2 packets" in result.output, result.output
    assert stored(app) == set(ids)
    assert status(client)["total_packets"] == 2


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_resent_copy_is_a_duplicate_across_days(app, client, backend):
    """The bridge resends a packet the next day: its key, held across days, still matches, and
    the copy is answered as a duplicate of the original on its own day."""
    packet = make_packet()
    first = client.post(f"{API}/ingest", json=packet, headers={"Idempotency-Key": "k-1"}).json
    yesterday = today() - timedelta(days=1)
    with app.app_context():
        partitions.ensure_partitions()
        if partitions.day_name(yesterday) not in {p.name for p in partitions.partitions()}:
            partitions.create_day(yesterday, adopt=False)
    move_to_day(app, [first["packet_id"]], yesterday)
    assert partition_of(app, first["packet_id"]) == partitions.day_name(yesterday)
    again = client.post(f"{API}/ingest", json=packet).json
    keyed = client.post(
        f"{API}/ingest", json=make_packet(), headers={"Idempotency-Key": "k-1"}
    ).json
    assert again["packet_id"] == first["packet_id"] and again["duplicate"] is True
    assert keyed["packet_id"] == first["packet_id"] and keyed["duplicate"] is True
    assert stored(app) == {first["packet_id"]}


def test_keys_missing_from_a_rolling_upgrade_are_backfilled(app, client, backend):
    """A packet stored without its key row (by an instance of the version before migration
    0012 while the upgrade rolled out) gets it from `partitions backfill-keys`; a copy sent
    afterwards is then a duplicate of it. SQLite: nothing to do."""
    body, old_id = make_packet(), new_packet_id()
    timestamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    received = utc_now()
    with app.app_context():  # what the previous version's ingest wrote: packet and delivery
        db.session.execute(
            P.insert().values(
                packet_id=old_id,
                dedup_key=identity_key("gurukul", body["user_id"], body["session_id"], timestamp),
                user_id=body["user_id"],
                session_id=body["session_id"],
                system_type_text="gurukul",
                client_timestamp=timestamp,
                active_seconds_float=4.0,
                idle_seconds_float=1.0,
                away_seconds_float=0.0,
                raw_signals=body["raw_signals"],
                received_at=received,
                **({} if backend == "postgres" else {"seq": 10_000}),
            )
        )
        db.session.execute(
            D.insert().values(
                packet_id=old_id,
                received_at=received,
                delivery_state=DeliveryState.PENDING,
                visible_at=received.timestamp(),
            )
        )
        db.session.commit()
    since = (received - timedelta(hours=1)).isoformat()
    result = app.test_cli_runner().invoke(
        args=["bucket", "partitions", "backfill-keys", "--since", since]
    )
    assert result.exit_code == 0, result.output
    if backend == "sqlite":
        assert "nothing to do" in result.output
    else:
        assert "added 1 missing packet keys" in result.output
    again = client.post(f"{API}/ingest", json=body).json
    assert again["packet_id"] == old_id and again["duplicate"] is True
