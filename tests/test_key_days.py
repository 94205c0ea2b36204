"""Keys by client day (PostgreSQL, migration 0015): a resend days later still a duplicate, key
days made ahead and dropped whole by retention once their packets are gone, never before, and
the default partition of keys watched."""

from __future__ import annotations

import re
import threading
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import event

from bucket.extensions import db
from bucket.services import ingest, partitions, retention
from bucket.timeutil import utc_now
from tests.concurrency import join_all, wait_until
from tests.factories import make_packet
from tests.queue_helpers import API, ack, poll, sql, status
from tests.statements import captured_statements
from tests.test_ingest_coalescing import blocked_by, postgres_dsn
from tests.test_partitions import day_bodies, drop_partition, move_to_day, partition_of, stored

pytestmark = pytest.mark.parametrize("backend", ["postgres"])


def today() -> date:
    return utc_now().date()


def stamped(moment: datetime) -> dict:
    return make_packet(timestamp=moment.isoformat().replace("+00:00", "Z"))


def post(client, body: dict, **headers: str) -> dict:
    response = client.post(f"{API}/ingest", json=body, headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def key_partition(app, packet_id: str) -> str:
    ((name,),) = sql(
        app,
        "SELECT tableoid::regclass::text FROM packet_keys WHERE packet_id = CAST(:p AS uuid)",
        p=packet_id,
    )
    return name


def test_a_copy_resent_days_later_is_still_the_duplicate_of_the_packet(app, client, backend):
    """A packet stamped and received three days ago keeps its key in its client day's
    partition; the bridge's copy sent today (received on another day of packets) conflicts
    there and is answered with the original packet_id and reception time, and nothing more is
    stored. The same holds for an Idempotency-Key sent with a packet of another content."""
    day = today() - timedelta(days=3)
    (body,) = day_bodies(app, day, 1)
    first = post(client, body, **{"Idempotency-Key": "order-1"})
    move_to_day(app, [first["packet_id"]], day)
    assert key_partition(app, first["packet_id"]) == partitions.key_day_name(day)
    again = post(client, body)
    assert (again["packet_id"], again["duplicate"]) == (first["packet_id"], True)
    assert again["received_at"].startswith(day.isoformat())
    other = post(client, make_packet(), **{"Idempotency-Key": "order-1"})
    assert (other["packet_id"], other["duplicate"]) == (first["packet_id"], True)
    assert stored(app) == {first["packet_id"]}


def test_key_days_are_made_ahead_covering_the_clock_skew_ingest_accepts(make_app, backend):
    """The maintenance creates key days up to BUCKET_PARTITION_DAYS_AHEAD plus the days
    BUCKET_MAX_CLOCK_SKEW lets a client run ahead, moving into a new day the keys that had
    reached the default partition meanwhile; a copy is still their duplicate."""
    app = make_app(BUCKET_PARTITION_DAYS_AHEAD=2, BUCKET_MAX_CLOCK_SKEW=2 * 86400)
    client = app.test_client()
    ahead = utc_now() + timedelta(days=2) - timedelta(minutes=1)
    far = today() + timedelta(days=4)
    for day in (ahead.date(), far):
        sql(app, f"DROP TABLE IF EXISTS {partitions.key_day_name(day)}")
    body = stamped(ahead)
    early = post(client, body)["packet_id"]
    assert key_partition(app, early) == partitions.KEYS_DEFAULT
    assert status(client)["default_partition_keys"] == 1
    result = app.test_cli_runner().invoke(args=["bucket", "partitions", "ensure"])
    assert result.exit_code == 0, result.output
    assert f"created {partitions.key_day_name(far)}" in result.output
    assert f"created {partitions.key_day_name(ahead.date())}" in result.output
    assert key_partition(app, early) == partitions.key_day_name(ahead.date())
    assert status(client)["default_partition_keys"] == 0
    again = post(client, body)
    assert (again["packet_id"], again["duplicate"]) == (early, True)


def test_purge_drops_old_key_days_whole_and_keeps_those_of_packets_still_stored(
    app, client, backend
):
    """Three old days: one of processed packets only, one before it whose packet is dead, one
    after it whose packet was stamped there but arrived recently (a stale resend). The purge
    drops the day of processed packets' keys whole (no DELETE on packet_keys at all), with the
    Idempotency-Keys pointing into it and none of the days before or after it; the two others
    stay, each saying how many stored packets it names, and copies of their packets, or of
    their Idempotency-Keys, are still duplicates. A copy of a purged packet is stored anew."""
    dead_day, gone_day, stale_day = (today() - timedelta(days=n) for n in (50, 45, 40))
    for day in (gone_day, dead_day):
        sql(app, f"DROP TABLE IF EXISTS {partitions.day_name(day)}")
        with app.app_context():
            partitions.create_day(day, adopt=False)
    gone = day_bodies(app, gone_day, 2)
    (dead,) = day_bodies(app, dead_day, 1)
    (stale,) = day_bodies(app, stale_day, 1)
    ids = [post(client, gone[0], **{"Idempotency-Key": "k-0"})["packet_id"]]
    ids += [post(client, gone[1])["packet_id"]]
    ids += [
        post(client, body, **{"Idempotency-Key": key})["packet_id"]
        for body, key in ((dead, "k-dead"), (stale, "k-stale"))
    ]
    for packet in poll(client, limit=4)["packets"]:
        assert ack(client, packet["packet_id"], success=packet["packet_id"] != ids[2]).status_code
    sql(app, "UPDATE deliveries SET delivery_state = 'dead' WHERE packet_id = :p", p=ids[2])
    with app.app_context():
        from bucket.services.counters import recount

        recount()
    move_to_day(app, ids[:2], gone_day)
    move_to_day(app, ids[2:3], dead_day)  # the stale packet stays received today
    with captured_statements(app) as statements, app.app_context():
        report = retention.purge_days(30)
    outcomes = {k.partition: k for k in report.key_days}
    assert outcomes[partitions.key_day_name(gone_day)].kept is None
    names_one = "names 1 packets still stored (kept whole until they are purged)"
    assert outcomes[partitions.key_day_name(dead_day)].kept == names_one
    assert outcomes[partitions.key_day_name(stale_day)].kept == names_one
    touching = [s for s in statements if re.search(r"DELETE FROM packet_keys\b", s)]
    assert touching == []
    assert sql(app, f"SELECT to_regclass('{partitions.key_day_name(gone_day)}')") == [(None,)]
    kept_keys = sql(app, "SELECT client_day FROM packet_idempotency_keys ORDER BY client_day")
    assert kept_keys == [(dead_day,), (stale_day,)]
    assert stored(app) == set(ids[2:])
    for body, key, packet_id in ((dead, "k-dead", ids[2]), (stale, "k-stale", ids[3])):
        again = post(client, body)
        assert (again["packet_id"], again["duplicate"]) == (packet_id, True)
        keyed = post(client, make_packet(), **{"Idempotency-Key": key})
        assert (keyed["packet_id"], keyed["duplicate"]) == (packet_id, True)
    anew = post(client, gone[0], **{"Idempotency-Key": "k-0"})
    assert anew["packet_id"] != ids[0] and not anew.get("duplicate")
    # The day of keys is gone: the new copy's key waits in the default partition, watched.
    assert key_partition(app, anew["packet_id"]) == partitions.KEYS_DEFAULT


def test_a_key_of_a_day_without_partition_lands_in_the_default_and_is_reported(
    app, client, backend
):
    """A client clock decades behind names a day no partition covers: the key goes to the
    default partition, status and /metrics count it, a copy is still its duplicate, and once
    its packet is purged the purge removes it (the default is a safety net, emptied by rows)."""
    sql(app, f"DROP TABLE IF EXISTS {partitions.KEYS_LEGACY}")
    body = stamped(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC))
    first = post(client, body)["packet_id"]
    assert key_partition(app, first) == partitions.KEYS_DEFAULT
    assert status(client)["default_partition_keys"] == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "bucket_packet_keys_default_partition 1.0" in metrics
    assert post(client, body)["packet_id"] == first
    listed = app.test_cli_runner().invoke(args=["bucket", "partitions", "list"]).output
    assert "1 packet keys" in listed
    for packet in poll(client)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    old = today() - timedelta(days=60)
    sql(app, f"DROP TABLE IF EXISTS {partitions.day_name(old)}")
    with app.app_context():
        partitions.create_day(old, adopt=False)
    move_to_day(app, [first], old)
    with app.app_context():
        report = retention.purge_days(30)
    assert report.default_keys == 1
    assert status(client)["default_partition_keys"] == 0


def test_a_day_of_keys_is_kept_while_its_packet_waits_in_the_default_partition(
    app, client, backend
):
    """A packet received on a day that has no partition of packets waits in the default
    partition, which retention never drops: its day of keys, however old, is kept as long (the
    days of the default partition's rows count as stored), and a copy is still its duplicate.
    Only that day: the keys of a packet received the next day, purged with its day, go."""
    old, after = today() - timedelta(days=50), today() - timedelta(days=49)
    (body,) = day_bodies(app, old, 1)
    (next_body,) = day_bodies(app, after, 1)
    drop_partition(app, old)
    drop_partition(app, after)
    with app.app_context():
        partitions.create_day(after, adopt=False)
    packet_id = post(client, body)["packet_id"]
    next_id = post(client, next_body)["packet_id"]
    for packet in poll(client)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, [packet_id], old)
    move_to_day(app, [next_id], after)
    assert partition_of(app, packet_id) == partitions.DEFAULT
    with app.app_context():
        report = retention.purge_days(30)
    assert partitions.day_name(after) in {d.partition for d in report.dropped}
    outcomes = {k.partition: k.kept for k in report.key_days}
    assert outcomes[partitions.key_day_name(old)] == (
        "names 1 packets still stored (kept whole until they are purged)"
    )
    assert outcomes[partitions.key_day_name(after)] is None
    assert key_partition(app, packet_id) == partitions.key_day_name(old)
    again = post(client, body)
    assert (again["packet_id"], again["duplicate"]) == (packet_id, True)


def test_a_purge_keeps_keys_it_cannot_lock_says_the_day_is_busy_and_goes_on(app, client, backend):
    """Another transaction writing into an old day of keys, or into the default partition of
    keys, is not waited for past the lock timeout: the day of keys is kept and reported busy,
    the default partition's keys of purged packets stay (none counted), nothing is raised and
    the packets' day is still dropped. The next purge, once that transaction ended, drops the
    day of keys and removes the default partition's key."""
    old = today() - timedelta(days=50)
    drop_partition(app, old)
    with app.app_context():
        partitions.create_day(old, adopt=False)
    (body,) = day_bodies(app, old, 1)
    sql(app, f"DROP TABLE IF EXISTS {partitions.KEYS_LEGACY}")
    ids = [post(client, body)["packet_id"]]
    ids += [post(client, stamped(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)))["packet_id"]]
    for packet in poll(client, limit=2)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, ids, old)
    key_day = partitions.key_day_name(old)
    assert [key_partition(app, p) for p in ids] == [key_day, partitions.KEYS_DEFAULT]
    with app.app_context():
        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as other:
        for table, packet_id in zip((key_day, partitions.KEYS_DEFAULT), ids, strict=True):
            other.execute(
                f"UPDATE {table} SET received_at = received_at WHERE packet_id = CAST(%s AS uuid)",
                (packet_id,),
            )
        with app.app_context():
            report = retention.purge_days(30)
        other.rollback()
    busy = f"busy: a lock was not granted within {retention.LOCK_TIMEOUT}"
    assert {k.partition: k.kept for k in report.key_days}[key_day] == busy
    assert report.default_keys == 0
    assert partitions.day_name(old) in [day.partition for day in report.dropped]
    assert stored(app) == set()
    assert [key_partition(app, p) for p in ids] == [key_day, partitions.KEYS_DEFAULT]
    with app.app_context():
        again = retention.purge_days(30)
    assert {k.partition: k.kept for k in again.key_days}[key_day] is None
    assert again.default_keys == 1
    assert sql(app, "SELECT count(*) FROM packet_keys") == [(0,)]


def test_a_day_of_keys_is_kept_while_its_packet_sits_in_the_second_of_two_adjacent_days(
    app, client, backend
):
    """Two adjacent old days of packets, each holding a dead packet (so both kept whole), and a
    stale resend stamped on an old day but received today: the days of the second dead
    packet's keys and of the resend's are kept too, whatever the joining of the stored days'
    ranges."""
    first, second = today() - timedelta(days=51), today() - timedelta(days=50)
    for day in (first, second):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    (early,) = day_bodies(app, first, 1)
    (body,) = day_bodies(app, second, 1)
    stale_day = today() - timedelta(days=40)
    (stale,) = day_bodies(app, stale_day, 1)
    early_id, packet_id = post(client, early)["packet_id"], post(client, body)["packet_id"]
    sql(app, "UPDATE deliveries SET delivery_state = 'dead'")
    stale_id = post(client, stale)["packet_id"]
    with app.app_context():
        from bucket.services.counters import recount

        recount()
    move_to_day(app, [early_id], first)
    move_to_day(app, [packet_id], second)
    assert partition_of(app, packet_id) == partitions.day_name(second)
    with app.app_context():
        report = retention.purge_days(30)
    outcomes = {k.partition: k.kept for k in report.key_days}
    names_one = "names 1 packets still stored (kept whole until they are purged)"
    assert outcomes[partitions.key_day_name(second)] == names_one
    assert outcomes[partitions.key_day_name(stale_day)] == names_one
    for resent, stored_id in ((body, packet_id), (stale, stale_id)):
        again = post(client, resent)
        assert (again["packet_id"], again["duplicate"]) == (stored_id, True)


def test_a_day_of_keys_is_dropped_once_its_packets_day_after_two_adjacent_kept_days_is_gone(
    app, client, backend
):
    """Two adjacent old days of packets kept (a dead packet each) join into one range of
    stored days that ends where they end: a later old day whose processed packet is purged
    in the same run is not inside it, so that packet's day of keys is dropped."""
    first, second, later = (today() - timedelta(days=n) for n in (51, 50, 45))
    for day in (first, second, later):
        drop_partition(app, day)
        with app.app_context():
            partitions.create_day(day, adopt=False)
    (early,) = day_bodies(app, first, 1)
    (body,) = day_bodies(app, second, 1)
    (done,) = day_bodies(app, later, 1)
    kept = [post(client, early)["packet_id"], post(client, body)["packet_id"]]
    sql(app, "UPDATE deliveries SET delivery_state = 'dead'")
    done_id = post(client, done)["packet_id"]
    (polled,) = poll(client)["packets"]
    assert polled["packet_id"] == done_id
    assert ack(client, done_id).status_code == 200
    with app.app_context():
        from bucket.services.counters import recount

        recount()
    move_to_day(app, kept[:1], first)
    move_to_day(app, kept[1:], second)
    move_to_day(app, [done_id], later)
    with app.app_context():
        report = retention.purge_days(30)
    assert partitions.day_name(later) in {d.partition for d in report.dropped}
    outcomes = {k.partition: k.kept for k in report.key_days}
    assert outcomes[partitions.key_day_name(later)] is None  # dropped
    assert outcomes[partitions.key_day_name(second)] is not None  # kept with its dead packet
    again = post(client, done)
    assert not again.get("duplicate") and again["packet_id"] != done_id


def test_a_purge_leaves_the_days_of_keys_made_ahead_and_a_dry_run_drops_none(app, client, backend):
    """Only days of keys that ended before the cutoff are checked: today's and those made ahead
    (empty, so nothing would keep them) stay. A dry run reports an old empty day of keys as one
    that would go, and drops nothing; the real purge then drops it."""
    with app.app_context():
        partitions.ensure_partitions()
    ahead = [today() + timedelta(days=n) for n in range(3)]
    names = [partitions.key_day_name(day) for day in ahead]
    existing = "SELECT relname FROM pg_class WHERE relname = ANY(:names) ORDER BY relname"
    assert sql(app, existing, names=names) == [(name,) for name in names]
    old = partitions.key_day_name(today() - timedelta(days=45))
    day_bodies(app, today() - timedelta(days=45), 0)  # its day of keys, empty
    with app.app_context():
        dry = retention.purge_days(30, dry_run=True)
    assert {k.partition: k.kept for k in dry.key_days}[old] is None
    assert sql(app, f"SELECT to_regclass('{old}')::text") == [(old,)]
    with app.app_context():
        report = retention.purge_days(30)
    assert {k.partition: k.kept for k in report.key_days}[old] is None
    assert sql(app, f"SELECT to_regclass('{old}')") == [(None,)]
    assert sql(app, existing, names=names) == [(name,) for name in names]


def test_a_day_of_keys_is_dropped_once_detached_so_ingest_never_waits_for_its_files(
    app, client, backend
):
    """Dropping a table deletes its files at commit, which takes a while for a day of millions
    of keys (BENCHMARKS.md: 0.18-0.23 s for 5M). Done in the transaction that detached the day,
    the drop would hold ``packet_keys`` locked all that time, and every ingest (which inserts
    through it) would wait: when the day's ``DROP TABLE`` runs, another connection takes an
    insert's lock on ``packet_keys`` at once. A purge stopped between the two leaves the day
    detached with its Idempotency-Keys gone; the next purge drops it."""
    old = today() - timedelta(days=45)
    drop_partition(app, old)
    with app.app_context():
        partitions.create_day(old, adopt=False)
    (body,) = day_bodies(app, old, 1)
    post(client, body, **{"Idempotency-Key": "k-old"})
    (packet,) = poll(client, limit=1)["packets"]
    assert ack(client, packet["packet_id"]).status_code == 200
    move_to_day(app, [packet["packet_id"]], old)
    key_day = partitions.key_day_name(old)
    dsn = postgres_dsn(app)
    with app.app_context():
        engines = set(db.engines.values())
    inserts_waited: list[bool] = []

    def try_an_insert_lock(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith(f"DROP TABLE {key_day}"):
            with psycopg.connect(dsn) as other:
                other.execute("SET lock_timeout = '200ms'")
                try:
                    other.execute("LOCK TABLE packet_keys IN ROW EXCLUSIVE MODE")
                    inserts_waited.append(False)
                except psycopg.errors.LockNotAvailable:
                    inserts_waited.append(True)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", try_an_insert_lock)
    try:
        with app.app_context():
            report = retention.purge_days(30)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", try_an_insert_lock)
    assert {k.partition: k.kept for k in report.key_days}[key_day] is None
    assert inserts_waited == [False]
    assert sql(app, f"SELECT to_regclass('{key_day}')") == [(None,)]

    # A purge stopped after detaching a day of keys: the next one drops the table.
    later = today() - timedelta(days=40)
    (body,) = day_bodies(app, later, 1)
    post(client, body, **{"Idempotency-Key": "k-later"})
    later_day = partitions.key_day_name(later)
    sql(app, f"ALTER TABLE {partitions.KEYS} DETACH PARTITION {later_day}")
    sql(app, "DELETE FROM packet_idempotency_keys WHERE client_day = :day", day=later)
    with app.app_context():
        retention.purge_days(30, dry_run=True)
    assert sql(app, f"SELECT to_regclass('{later_day}')::text") == [(later_day,)]
    with app.app_context():
        retention.purge_days(30)
    assert sql(app, f"SELECT to_regclass('{later_day}')") == [(None,)]


def test_a_copy_whose_key_another_write_claims_meanwhile_is_answered_as_its_duplicate(
    app, client, backend
):
    """A copy's write on another worker claims the packet's identity while this one's is in
    flight: the identity's INSERT (ON CONFLICT DO NOTHING) waits for that write, finds the key
    taken once it commits, and the answer names the other copy's packet as the original, with
    nothing stored twice. (A plain INSERT of the keys no committed row holds would save the
    speculative insertion's 48 bytes of WAL a packet, and cost PostgreSQL more CPU than it
    saves: BENCHMARKS.md.)"""
    body = make_packet()
    moment = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    key = ingest.identity_key(
        body["system_type"], ingest.packet_user(body), body["session_id"], moment
    )
    theirs = "0190a5b4-0000-7000-8000-00000000c0de"
    dsn = postgres_dsn(app)
    answers = []
    with psycopg.connect(dsn) as other:
        other.execute(
            "INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id) "
            "VALUES (CAST(%s AS uuid), %s, now(), CAST(%s AS uuid))",
            (key, moment.date(), theirs),
        )
        (pid,) = other.execute("SELECT pg_backend_pid()").fetchone()
        sender = threading.Thread(
            target=lambda: answers.append(client.post(f"{API}/ingest", json=body))
        )
        sender.start()
        wait_until(lambda: blocked_by(dsn, pid) == 1, 10, "the ingest never waited for the key")
        other.commit()
        join_all([sender], 10, "ingest")
    (answer,) = answers
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert (answer.json["packet_id"], answer.json["duplicate"]) == (theirs, True)
    assert stored(app) == set()
    assert sql(app, "SELECT count(*) FROM packet_keys") == [(1,)]
