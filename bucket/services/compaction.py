"""Compacting the indexes of past days (PostgreSQL): rebuilt packed once, without a lock that
holds ingest.

Two kinds of index grow half-full: ``ix_packets_user`` (the user id's key, received_at) and
``ix_packets_employee`` take inserts at one place per learner, and ``packet_keys_pkey`` on
random 16-byte digests anywhere; a page that splits in the middle of an index stays half
empty (1.8 and 1.3 times their packed size, BENCHMARKS.md). Once a day is over its partition
of ``packets`` takes no more inserts (a late resend is received today, so it lands in today's
partition), and a day of keys (by the client's day) takes only the trickle of packets resent
from offline queues once ``KEY_DAY_SETTLE`` has passed after it (late packets stop being
routine an hour after their day: BUCKET_STALE_AFTER). Each of those indexes can then be
rebuilt packed once.

``REINDEX INDEX CONCURRENTLY`` builds the copy beside the index and swaps them under
SHARE UPDATE EXCLUSIVE locks, which no insert, query or acknowledgement waits for. It does
wait for the transactions in flight (twice) and for locks held by DDL (a purge detaching a
day), at most ``lock_timeout`` each time; a wait that times out leaves the half-built copy
(``<index>_ccnew``, invalid), which is dropped at once, and the run stops there (the next
one goes on). On a day of 5M packets a rebuild takes minutes, so it runs from cron
(``flask bucket partitions compact``), never in the bookkeeper's maintenance step.

A compacted index carries a comment saying so (``COMPACTED``, the date and its bytes before
and after): it is written in the same catalogs as the index, costs nothing to read, survives
the swap (``REINDEX CONCURRENTLY`` moves the comment to the new index), and goes with the
index when retention drops the day, so no table of compactions has to follow the partitions.
One compaction at a time across every instance (a session-level advisory lock).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import text

from bucket.extensions import db
from bucket.services import sql
from bucket.services.partitions import KEYS, day_start, partitioned, upper_bound
from bucket.timeutil import utc_now

log = logging.getLogger(__name__)
# The partitioned indexes whose partitions grow half-full, by table.
HALF_FULL = {
    "packets": ("ix_packets_user", "ix_packets_employee"),
    KEYS: ("packet_keys_pkey",),
}
# A day of keys is compacted once this long has passed since it ended.
KEY_DAY_SETTLE = timedelta(days=1)
COMPACTED = "compacted"
DEFAULT_LOCK_TIMEOUT = 5.0
# pg_try_advisory_lock key of the compaction: "prana-cmp" as an integer.
COMPACTOR_LOCK = 0x7072616E61636D70
CANDIDATES_SQL = """
SELECT part.relname, pg_get_expr(part.relpartbound, part.oid), ix.relname,
  pg_relation_size(ix.oid), coalesce(obj_description(ix.oid, 'pg_class'), '')
FROM pg_inherits tp
JOIN pg_class part ON part.oid = tp.inhrelid
JOIN pg_index x ON x.indrelid = part.oid AND x.indisvalid
JOIN pg_class ix ON ix.oid = x.indexrelid
JOIN pg_inherits ip ON ip.inhrelid = ix.oid
JOIN pg_class parent ON parent.oid = ip.inhparent
WHERE tp.inhparent = CAST(:table AS regclass) AND parent.relname = ANY(:indexes)
ORDER BY part.relname, ix.relname
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


def compactable(table: str, end: datetime | None, now: datetime, days_back: int | None) -> bool:
    """Whether a partition of ``table`` ending at ``end`` is over for good (a day of packets
    once it ended, a day of keys ``KEY_DAY_SETTLE`` later) and, with ``days_back``, one of the
    last ``days_back`` days before today."""
    if end is None:  # the default partition: written whenever a day is missing
        return False
    settled = end + (KEY_DAY_SETTLE if table == KEYS else timedelta(0))
    if settled > now:
        return False
    return days_back is None or end > day_start(now.date() - timedelta(days=days_back))


def candidates(connection, now: datetime, days_back: int | None) -> list[IndexCompaction]:
    """The half-full indexes of the partitions over for good, oldest day first."""
    found = []
    for table, indexes in HALF_FULL.items():
        rows = connection.execute(
            text(CANDIDATES_SQL), {"table": table, "indexes": list(indexes)}
        ).all()
        for partition, bound, index, size, comment in rows:
            if not compactable(table, upper_bound(bound), now, days_back):
                continue
            item = IndexCompaction(table, partition, index, size)
            if comment.startswith(COMPACTED):
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
    """Rebuild, one at a time and concurrently, the half-full indexes of the day partitions
    of ``packets`` whose day ended and of ``packet_keys`` whose day settled (with
    ``days_back``, only those of the last ``days_back`` days before today), skipping those
    compacted already. With ``dry_run``, only name them. None on SQLite."""
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
    """Rebuild one index concurrently and mark it compacted, with its bytes before and
    after."""
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
