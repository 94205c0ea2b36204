"""``flask bucket partitions compact``: every b-tree index of the days that ended rebuilt
packed (fillfactor 100), concurrently, once; today's never touched; a dry run changes
nothing; a rebuild that waits too long for a lock is undone; SQLite does nothing."""

from __future__ import annotations

from datetime import date, timedelta

import psycopg
import pytest

from bucket.services import partitions
from bucket.services.compaction import COMPACTED
from bucket.timeutil import utc_now
from tests.queue_helpers import ingest_many, sql

# Rows of a past day and of a day of keys: enough for indexes of many pages.
ROWS = 20_000
LEARNERS = 200
# A copy of one stored packet per row, with its own id, seq, key, learner and time (round-robin
# over the learners in time order, as a day is written: the user index splits half-full).
FILL_PACKETS = """
INSERT INTO packets OVERRIDING SYSTEM VALUE
SELECT (jsonb_populate_record(NULL::packets, to_jsonb(p) || jsonb_build_object(
  'packet_id', gen_random_uuid(), 'dedup_key', gen_random_uuid(),
  'seq', 1000000 + g, 'user_id', 'stu_' || (g % :learners),
  'received_at', CAST(:start AS timestamp) + g * interval '1 s'))).*
FROM packets p, generate_series(1, :rows) AS g WHERE p.packet_id = :model
"""
# Each copied packet processed, in its day's partition of processed deliveries.
FILL_PROCESSED = """
INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, delivery_count,
  processed_by_karma)
SELECT packet_id, received_at, 'processed', extract(epoch FROM received_at), 1, true
FROM packets WHERE seq > :first AND seq <= :first + :rows
"""
FILL_KEYS = """
INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id)
SELECT gen_random_uuid(), :day, CAST(:day AS timestamp), gen_random_uuid()
FROM generate_series(1, :rows)
"""
INDEXES = """
SELECT ix.relname, ix.relfilenode, pg_relation_size(ix.oid), x.indisvalid,
  coalesce(obj_description(ix.oid, 'pg_class'), ''), coalesce(ix.reloptions, '{}')
FROM pg_index x JOIN pg_class ix ON ix.oid = x.indexrelid
WHERE x.indrelid = CAST(:table AS regclass) ORDER BY ix.relname
"""


def indexes(app, table: str) -> dict[str, tuple]:
    """Each index of ``table``: (relfilenode, bytes, valid, comment, options)."""
    return {name: rest for name, *rest in sql(app, INDEXES, table=table)}


PARTITION_INDEX = """
SELECT ix.relname FROM pg_inherits i JOIN pg_class ix ON ix.oid = i.inhrelid
JOIN pg_index x ON x.indexrelid = ix.oid
WHERE i.inhparent = CAST(:parent AS regclass) AND x.indrelid = CAST(:table AS regclass)
"""
PARENT_INDEXES = {"user_id": "ix_packets_user", "employee_id": "ix_packets_employee"}


def user_index(app, table: str, column: str = "user_id") -> str:
    """The partition's index of ix_packets_user (or, by ``column``, of ix_packets_employee)."""
    (name,) = [n for (n,) in sql(app, PARTITION_INDEX, parent=PARENT_INDEXES[column], table=table)]
    return name


def btree_indexes(app, table: str) -> set[str]:
    """The b-tree indexes of ``table`` (not the keys' BRIN on received_at)."""
    return {
        name
        for (name,) in sql(
            app,
            "SELECT ix.relname FROM pg_index x JOIN pg_class ix ON ix.oid = x.indexrelid "
            "JOIN pg_am am ON am.oid = ix.relam "
            "WHERE x.indrelid = CAST(:table AS regclass) AND am.amname = 'btree'",
            table=table,
        )
    }


def exists(app, table: str) -> bool:
    return sql(app, "SELECT to_regclass(:table) IS NOT NULL", table=table)[0][0]


def drop_days(app, *days: date) -> None:
    for day in days:
        name = partitions.day_name(day)
        sql(app, f"DROP TABLE IF EXISTS {name}, {partitions.processed_name(name)}")
        sql(app, f"DROP TABLE IF EXISTS {partitions.key_day_name(day)}")


@pytest.fixture
def past_days(app, client):
    """Two days before today, full: packets (all processed) two days ago and yesterday, keys
    two days ago and yesterday; packets today too. Dropped afterwards (the test database is
    shared)."""
    today = utc_now().date()
    old, yesterday = today - timedelta(days=2), today - timedelta(days=1)
    drop_days(app, old, yesterday)
    # Migration 0015's legacy partition covers every client day before the upgrade.
    sql(app, f"DROP TABLE IF EXISTS {partitions.KEYS_LEGACY}")
    (model,) = ingest_many(client, 1)
    ingest_many(client, 3)
    with app.app_context():
        for day in (old, yesterday):
            partitions.create_day(day, adopt=False)
            partitions.create_key_day(day)
    for number, day in enumerate((old, yesterday)):
        start = f"{day.isoformat()} 00:00:00"
        first = 1_000_000 * (number + 1)
        fill = FILL_PACKETS.replace("1000000", str(first))
        sql(app, fill, learners=LEARNERS, start=start, rows=ROWS, model=model)
        sql(app, FILL_PROCESSED, first=first, rows=ROWS)
        sql(app, FILL_KEYS, day=day, rows=ROWS)
    sql(app, "ANALYZE packets")
    yield old, yesterday
    drop_days(app, old, yesterday)


@pytest.mark.parametrize("backend", ["postgres"])
def test_compact_rebuilds_past_days_packed_once_and_leaves_today_alone(app, past_days, backend):
    """Every b-tree index of the days of packets that ended, and of the days of processed
    deliveries and of keys that settled, is rebuilt at fillfactor 100, smaller or equal,
    valid, still used by the listing, and marked; a second run skips them; today's
    partitions, yesterday's processed deliveries and keys and the keys' BRIN keep their
    files."""
    old, yesterday = past_days
    today = utc_now().date()
    old_packets, new_packets = partitions.day_name(old), partitions.day_name(yesterday)
    old_processed = partitions.processed_name(old_packets)
    old_keys = partitions.key_day_name(old)
    watched = (
        old_packets,
        new_packets,
        old_processed,
        partitions.processed_name(new_packets),
        old_keys,
        partitions.key_day_name(yesterday),
        partitions.day_name(today),
        partitions.processed_name(partitions.day_name(today)),
        partitions.key_day_name(today),
        partitions.DEFAULT,
        partitions.PROCESSED_DEFAULT,
        partitions.KEYS_DEFAULT,
    )
    tomorrow = today + timedelta(days=1)
    ahead = (
        partitions.day_name(tomorrow),
        partitions.processed_name(partitions.day_name(tomorrow)),
        partitions.key_day_name(tomorrow),
    )
    watched += tuple(name for name in ahead if exists(app, name))
    before = {table: indexes(app, table) for table in watched}
    runner = app.test_cli_runner()

    result = runner.invoke(args=["bucket", "partitions", "compact"])

    assert result.exit_code == 0, result.output
    after = {table: indexes(app, table) for table in watched}
    rebuilt = {
        (table, name)
        for table in watched
        for name in after[table]
        if after[table][name][0] != before[table][name][0]
    }
    expected = {
        (table, name)
        for table in (old_packets, new_packets, old_processed, old_keys)
        for name in btree_indexes(app, table)
    }
    assert {name for _, name in expected} >= {
        f"{old_packets}_pkey",
        f"{old_packets}_seq_key",
        user_index(app, old_packets),
        user_index(app, old_packets, "employee_id"),
        f"{old_keys}_pkey",
    }
    assert len([1 for table, _ in expected if table == old_processed]) == 1
    assert rebuilt == expected, result.output
    for table, name in rebuilt:
        _, size, valid, comment, options = after[table][name]
        assert valid and comment.startswith(COMPACTED)
        assert "fillfactor=100" in options, (name, options)
        assert size <= before[table][name][1]
        assert f"compacted {name} ({table}): {before[table][name][1]:,} -> {size:,}" in (
            result.output
        )
    assert (
        after[old_packets][user_index(app, old_packets)][1]
        < (before[old_packets][user_index(app, old_packets)][1])
    ), "round-robin inserts leave the user index half-full: a rebuild packs it"
    seq_key = f"{old_packets}_seq_key"
    assert after[old_packets][seq_key][1] < 0.95 * before[old_packets][seq_key][1], (
        "seq grows at the right edge, where a b-tree leaves a tenth of each page free: "
        "packed at fillfactor 100 it is smaller still"
    )
    plan = sql(
        app,
        "EXPLAIN SELECT packet_id FROM packets WHERE packet_user_key(user_id) = "
        "packet_user_key('stu_7') AND user_id = 'stu_7' "
        "AND received_at >= :start AND received_at < :end ORDER BY received_at DESC LIMIT 50",
        start=old,
        end=old + timedelta(days=1),
    )
    assert user_index(app, old_packets) in " ".join(line for (line,) in plan)

    again = runner.invoke(args=["bucket", "partitions", "compact"])

    assert again.exit_code == 0, again.output
    assert not [name for _, name in rebuilt if f"compacted {name} " in again.output]
    assert {table: indexes(app, table) for table in watched} == after


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_dry_run_names_the_indexes_and_changes_nothing(app, past_days, backend):
    """--dry-run names what it would rebuild (--days-back narrows it to the days that ended
    within that many days) and rebuilds nothing."""
    old, yesterday = past_days
    tables = (partitions.day_name(old), partitions.day_name(yesterday))
    before = {table: indexes(app, table) for table in tables}
    runner = app.test_cli_runner()

    everything = runner.invoke(args=["bucket", "partitions", "compact", "--dry-run"])
    recent = runner.invoke(
        args=["bucket", "partitions", "compact", "--dry-run", "--days-back", "1"]
    )

    assert everything.exit_code == 0 and recent.exit_code == 0
    assert f"would compact {user_index(app, tables[0])} ({tables[0]})" in everything.output
    assert f"would compact {user_index(app, tables[1])} ({tables[1]})" in everything.output
    assert f"would compact {partitions.key_day_name(old)}_pkey" in everything.output
    assert f"{partitions.key_day_name(yesterday)}_pkey" not in everything.output
    assert tables[0] not in recent.output and tables[1] in recent.output
    assert {table: indexes(app, table) for table in tables} == before


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_rebuild_kept_waiting_is_undone_and_the_next_run_goes_on(app, past_days, backend):
    """A transaction in flight longer than --lock-timeout stops the run (exit 1) before any
    index is swapped, without leaving the half-built copy behind; the next run compacts."""
    old, _ = past_days
    table = partitions.day_name(old)
    # The first index the run takes, as an earlier release left it: marked, default fillfactor.
    first = user_index(app, table, "employee_id")
    sql(app, f"COMMENT ON INDEX {first} IS '{COMPACTED} 2026-12-01: 1 -> 1 bytes'")
    before = indexes(app, table)
    url = app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as other:
        other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        other.execute("SELECT count(*) FROM packet_counters")  # holds its snapshot
        stopped = app.test_cli_runner().invoke(
            args=["bucket", "partitions", "compact", "--lock-timeout", "0.5"]
        )
        other.rollback()

    assert stopped.exit_code == 1 and "not finished" in stopped.output, stopped.output
    # No copy left, nothing swapped or marked (the fillfactor set before the rebuild may stay:
    # it only decides how full a page that splits is left, and the next run rebuilds it); the
    # first index's old mark is gone, so that its fillfactor alone does not pass for packed.
    stopped_at = indexes(app, table)
    assert stopped_at[first][:3] == before[first][:3] and stopped_at[first][3] == ""
    unchanged = {name: found[:4] for name, found in before.items() if name != first}
    assert {name: found[:4] for name, found in stopped_at.items() if name != first} == unchanged
    done = app.test_cli_runner().invoke(args=["bucket", "partitions", "compact"])
    assert done.exit_code == 0, done.output
    assert f"compacted {user_index(app, table)} ({table})" in done.output
    assert f"compacted {first} ({table})" in done.output
    after = indexes(app, table)
    assert after[first][0] != before[first][0] and "fillfactor=100" in after[first][4]
    assert after[first][3].startswith(COMPACTED) and "2026-12-01" not in after[first][3]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_day_of_processed_deliveries_waits_for_its_unfinished_packets(app, past_days, backend):
    """A past day's processed deliveries are not compacted while one of its packets is still
    pending (its acknowledgement would land there); once it is processed, the next run
    compacts them. The day's packets are compacted either way."""
    old, _ = past_days
    table = partitions.day_name(old)
    processed = partitions.processed_name(table)
    (index,) = btree_indexes(app, processed)
    (waiting,) = sql(app, f"SELECT packet_id FROM {processed} LIMIT 1")[0]
    sql(
        app,
        "UPDATE deliveries SET delivery_state = 'pending', processed_by_karma = false "
        "WHERE packet_id = :id",
        id=waiting,
    )
    runner = app.test_cli_runner()

    held = runner.invoke(args=["bucket", "partitions", "compact"])

    assert held.exit_code == 0, held.output
    assert f"compacted {table}_pkey ({table})" in held.output
    assert index not in held.output
    sql(
        app,
        "UPDATE deliveries SET delivery_state = 'processed', processed_by_karma = true "
        "WHERE packet_id = :id",
        id=waiting,
    )
    done = runner.invoke(args=["bucket", "partitions", "compact"])
    assert done.exit_code == 0, done.output
    assert f"compacted {index} ({processed})" in done.output


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_index_compacted_by_an_earlier_release_is_packed_again(app, past_days, backend):
    """An index marked compacted but rebuilt at the default fillfactor (before every
    index was packed full) is rebuilt once more; one marked and packed is skipped."""
    old, _ = past_days
    table = partitions.day_name(old)
    earlier, packed = f"{table}_seq_key", f"{table}_pkey"
    for name in (earlier, packed):
        sql(app, f"COMMENT ON INDEX {name} IS '{COMPACTED} 2026-12-01: 1 -> 1 bytes'")
    sql(app, f"ALTER INDEX {packed} SET (fillfactor = 100)")
    before = indexes(app, table)

    result = app.test_cli_runner().invoke(args=["bucket", "partitions", "compact"])

    assert result.exit_code == 0, result.output
    after = indexes(app, table)
    assert after[earlier][0] != before[earlier][0] and "fillfactor=100" in after[earlier][4]
    assert f"compacted {earlier} ({table})" in result.output
    assert after[packed] == before[packed]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_has_nothing_to_compact(app, backend):
    """SQLite keeps one table: the command says so and does nothing."""
    result = app.test_cli_runner().invoke(args=["bucket", "partitions", "compact"])
    assert result.exit_code == 0
    assert result.output == "SQLite keeps one packets table: nothing to compact\n"
