"""Compacting the indexes of past days (PostgreSQL): every b-tree index of a day that is over,
rebuilt packed (fillfactor 100) once, without a lock that holds ingest.

A b-tree grows with room to spare. ``ix_packets_user`` (the user id's key, received_at) and
``ix_packets_employee`` take inserts at one place per learner, and ``packet_keys_pkey`` random
16-byte digests anywhere: a page that splits in the middle stays half empty (a day's index
1.2-1.4 times its packed size, BENCHMARKS.md). The others grow at their right edge (packets'
primary key on a time-ordered uuid, the day's unique index on seq, processed deliveries'
packet_id), where a b-tree fills each page to its fillfactor, 90 %: the tenth kept free for
inserts in the middle. A day that is over takes (nearly) none. A partition of ``packets``
takes no more inserts at all (a late resend is received today, so it lands in today's
partition). A day of keys (by the client's day) takes only the trickle of packets resent from
offline queues once ``SETTLE`` has passed after it (late packets stop being routine an hour
after their day: BUCKET_STALE_AFTER). A day of processed deliveries takes the
acknowledgements of its packets still unfinished: it is compacted ``SETTLE`` after it ended
and once none of its packets is pending or leased (a backlog older than a day holds it back).
What still comes later (a dead packet or a processed one requeued by hand and processed again
lands in its old day) splits the pages it lands on; the day is not compacted again.

``ALTER INDEX .. SET (fillfactor = 100)`` (a SHARE UPDATE EXCLUSIVE lock on the index alone),
then ``REINDEX INDEX CONCURRENTLY``, which keeps the option, builds the copy beside the index
and swaps them under SHARE UPDATE EXCLUSIVE locks, which no insert, query or acknowledgement
waits for. It does wait for the transactions in flight (twice) and for locks held by DDL (a
purge detaching a day), at most ``lock_timeout`` each time; a wait that times out leaves the
half-built copy (``<index>_ccnew``, invalid), which is dropped at once, and the run stops
there; the next one goes on (the index keeps its fillfactor meanwhile, which only decides how
full a page that splits is left). A day of 5M packets takes seconds an index (0.4 s for a day
of 667,000 in the storage benchmark), so it runs from cron (``flask bucket partitions
compact``), never in the bookkeeper's maintenance step.

A compacted index carries a comment saying so (``COMPACTED``, the date and its bytes before
and after) and its fillfactor of 100: both are written in the same catalogs as the index, cost
nothing to read, survive the swap and go with the index when retention drops the day, so no
table of compactions has to follow the partitions. An index an earlier release compacted at
the default fillfactor (a comment, no option) is rebuilt once more; its comment goes first, so
a rebuild that gives up after setting the fillfactor leaves it marked neither way. One
compaction at a time across every instance (a session-level advisory lock).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from bucket.extensions import db
from bucket.services import sql
from bucket.services.partitions import (
    KEYS,
    PROCESSED,
    day_start,
    lower_bound,
    partitioned,
    upper_bound,
)
from bucket.timeutil import utc_now

log = logging.getLogger(__name__)
# The partitioned tables whose days' b-tree indexes are compacted, and how long after its day
# ended a partition of each is compacted (the days of keys and of processed deliveries take
# late rows for a while: the module's docstring).
SETTLE = {
    "packets": timedelta(0),
    PROCESSED: timedelta(days=1),
    KEYS: timedelta(days=1),
}
COMPACTED = "compacted"
FILLFACTOR = 100
PACKED = f"fillfactor={FILLFACTOR}"  # as pg_class.reloptions lists it
DEFAULT_LOCK_TIMEOUT = 5.0
# pg_try_advisory_lock key of the compaction: "prana-cmp" as an integer.
COMPACTOR_LOCK = 0x7072616E61636D70
# Every valid b-tree index of each partition of a table (not the keys' BRIN on received_at,
# which a rebuild would not make smaller): whether it is marked compacted, and packed.
CANDIDATES_SQL = """
SELECT part.relname, pg_get_expr(part.relpartbound, part.oid), ix.relname,
  pg_relation_size(ix.oid),
  starts_with(coalesce(obj_description(ix.oid, 'pg_class'), ''), :compacted)
    AND coalesce(ix.reloptions, '{}') @> ARRAY[CAST(:packed AS text)]
FROM pg_inherits tp
JOIN pg_class part ON part.oid = tp.inhrelid
JOIN pg_index x ON x.indrelid = part.oid AND x.indisvalid
JOIN pg_class ix ON ix.oid = x.indexrelid
JOIN pg_am am ON am.oid = ix.relam AND am.amname = 'btree'
WHERE tp.inhparent = CAST(:table AS regclass)
ORDER BY part.relname, ix.relname
"""
UNFINISHED_DAYS_SQL = """
SELECT DISTINCT date_trunc('day', received_at) FROM deliveries
WHERE delivery_state IN ('pending', 'leased')
"""
# Copies a REINDEX CONCURRENTLY that gave up left behind (invalid), on one partition.
LEFTOVERS_SQL = """
SELECT ix.relname FROM pg_index x JOIN pg_class ix ON ix.oid = x.indexrelid
WHERE x.indrelid = CAST(:partition AS regclass) AND NOT x.indisvalid
  AND (starts_with(ix.relname, :index || '_ccnew') OR starts_with(ix.relname, :index || '_ccold'))
"""


@dataclass
class IndexCompaction:
    """One index of a past day: its partition, the bytes before and (once rebuilt) after, and
    what was done (``compacted``, ``would compact``, ``already compacted``)."""

    table: str
    partition: str
    index: str
    before: int
    after: int | None = None
    outcome: str = "would compact"


@dataclass
class Compaction:
    """What one run did: every index looked at, the half-built copies it dropped, and why it
    stopped early (``stopped``), if it did."""

    dry_run: bool
    indexes: list[IndexCompaction] = field(default_factory=list)
    dropped_leftovers: list[str] = field(default_factory=list)
    stopped: str | None = None

    def having(self, outcome: str) -> list[IndexCompaction]:
        return [index for index in self.indexes if index.outcome == outcome]


def compactable(
    table: str, bound: str, now: datetime, days_back: int | None, unfinished: list[datetime]
) -> bool:
    """Whether a partition of ``table`` (its bound as ``pg_get_expr`` gives it) is over for
    good: its day ended ``SETTLE[table]`` ago and, for processed deliveries, none of its
    packets is still pending or leased (received on one of the ``unfinished`` days); and,
    with ``days_back``, whether it is one of the last ``days_back`` days before today (counted
    from the day's end: a day of keys or of processed deliveries, settled a day later, needs
    ``days_back`` of 2 at least)."""
    end = upper_bound(bound)
    if end is None:  # the default partition: written whenever a day is missing
        return False
    if end + SETTLE[table] > now:
        return False
    start = lower_bound(bound)
    if table == PROCESSED and any(
        (start is None or start <= day) and day < end for day in unfinished
    ):
        return False
    return days_back is None or end > day_start(now.date() - timedelta(days=days_back))


def unfinished_days(connection) -> list[datetime]:
    """The days (UTC starts) that packets still pending or leased were received on: their
    acknowledgements are still to land in those days' processed deliveries."""
    found = connection.execute(text(UNFINISHED_DAYS_SQL)).scalars().all()
    return [day.replace(tzinfo=UTC) for day in found]


def candidates(connection, now: datetime, days_back: int | None) -> list[IndexCompaction]:
    """The b-tree indexes of the partitions over for good, by table, oldest day first."""
    found = []
    unfinished = unfinished_days(connection)
    for table in SETTLE:
        rows = connection.execute(
            text(CANDIDATES_SQL), {"table": table, "compacted": COMPACTED, "packed": PACKED}
        ).all()
        for partition, bound, index, size, done in rows:
            if not compactable(table, bound, now, days_back, unfinished):
                continue
            item = IndexCompaction(table, partition, index, size)
            if done:
                item.outcome = "already compacted"
            found.append(item)
    return found


@contextmanager
def compactor(lock_timeout: float) -> Iterator[object | None]:
    """A connection of its own in autocommit (REINDEX CONCURRENTLY runs outside a transaction)
    with ``lock_timeout`` set, holding the compaction's advisory lock; None when another
    compaction holds it. The connection is discarded afterwards, its settings and lock with
    it."""
    connection = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        connection.execute(text(f"SET lock_timeout = '{int(lock_timeout * 1000)}ms'"))
        held = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": COMPACTOR_LOCK}
        ).scalar_one()
        yield connection if held else None
    finally:
        connection.invalidate()
        connection.close()


def drop_leftovers(connection, partition: str, index: str) -> list[str]:
    """Drop the invalid copies a REINDEX CONCURRENTLY of ``index`` left on ``partition``."""
    names = (
        connection.execute(text(LEFTOVERS_SQL), {"partition": partition, "index": index})
        .scalars()
        .all()
    )
    for name in names:
        connection.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
        log.warning("dropped %s, left by a rebuild of %s that gave up", name, index)
    return list(names)


def index_size(connection, index: str) -> int:
    return connection.execute(
        text("SELECT pg_relation_size(CAST(:index AS regclass))"), {"index": index}
    ).scalar_one()


def compact_partitions(
    days_back: int | None = None,
    dry_run: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Compaction | None:
    """Rebuild packed, one at a time and concurrently, the b-tree indexes of the day
    partitions of ``packets`` whose day ended and of processed deliveries and ``packet_keys``
    whose day settled (with ``days_back``, only those of the last ``days_back`` days before
    today), skipping those compacted already. With ``dry_run``, only name them. None on
    SQLite."""
    if not partitioned():
        return None
    if days_back is not None and days_back < 1:
        raise ValueError("days_back must be >= 1")
    report = Compaction(dry_run)
    with compactor(lock_timeout) as connection:
        if connection is None:
            report.stopped = "another compaction is running"
            return report
        report.indexes = candidates(connection, utc_now(), days_back)
        if dry_run:
            return report
        for item in report.indexes:
            try:
                report.dropped_leftovers += drop_leftovers(connection, item.partition, item.index)
                if item.outcome != "would compact":
                    continue
                rebuild(connection, item)
            except Exception as exc:
                if not sql.lock_not_granted(exc):
                    raise
                report.dropped_leftovers += drop_leftovers_quietly(connection, item)
                report.stopped = f"{item.index} waited longer than {lock_timeout:g} s for a lock"
                log.info("compaction: %s", report.stopped)
                return report
    return report


def rebuild(connection, item: IndexCompaction) -> None:
    """Rebuild one index concurrently at fillfactor 100 and mark it compacted, with its bytes
    before and after. A mark left by an earlier release goes first: should the rebuild give
    up, the index is not taken for compacted by its fillfactor and that mark together."""
    connection.execute(text(f'COMMENT ON INDEX "{item.index}" IS NULL'))
    connection.execute(text(f'ALTER INDEX "{item.index}" SET (fillfactor = {FILLFACTOR})'))
    connection.execute(text(f'REINDEX INDEX CONCURRENTLY "{item.index}"'))
    item.after = index_size(connection, item.index)
    item.outcome = "compacted"
    mark = f"{COMPACTED} {utc_now().date().isoformat()}: {item.before} -> {item.after} bytes"
    connection.execute(text(f"COMMENT ON INDEX \"{item.index}\" IS '{mark}'"))
    log.info("compacted %s: %d -> %d bytes", item.index, item.before, item.after)


def drop_leftovers_quietly(connection, item: IndexCompaction) -> list[str]:
    """After a rebuild gave up: its half-built copy goes now, or (if that too waits too long)
    at the start of the next run."""
    try:
        return drop_leftovers(connection, item.partition, item.index)
    except Exception as exc:
        if not sql.lock_not_granted(exc):
            raise
        return []
