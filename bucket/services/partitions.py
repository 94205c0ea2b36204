"""Day partitions of the packets table (PostgreSQL): made ahead, watched, and adopted from the
default partition.

``packets`` is partitioned by range of ``received_at``, one partition a UTC day, named
``packets_pYYYYMMDD`` (migration 0012). The bookkeeper (every ``MAINTENANCE_INTERVAL``) and
``flask bucket partitions ensure`` create the days from today to ``BUCKET_PARTITION_DAYS_AHEAD``
ahead, so an insert always finds its day. ``packets_default`` takes whatever no day covers,
as a safety net only: status and ``/metrics`` show how many packets sit in it, and the next
maintenance moves them into a partition of their own day (created for them), keeping their
``seq`` and content, so the audit log's leaves still match. ``packets_legacy``, present after
an upgrade from the old layout, holds everything received before the upgrade's next day.

Processed deliveries are partitioned the same way (migration 0014): ``deliveries_processed``
has one partition per partition of ``packets``, same bounds, named after it
(``deliveries_processed_pYYYYMMDD``, ``…_legacy``, ``…_default``). Each day is created with
the packets' day, and retention drops both together (``services/retention``). Processed
deliveries that reached the default (their day had no partition yet) move with the packets.
Their day partitions order the columns so that a row wastes nothing on padding (migration
0021, ``create_partition_table``); PostgreSQL routes rows between partitions by name.

The packets' natural identities (``packet_keys``, migration 0015) are partitioned by the UTC
day of the client's timestamp (``packet_keys_pYYYYMMDD``, ``…_legacy`` for every day before
the migration, ``…_default``). The same maintenance creates their days from today to
BUCKET_PARTITION_DAYS_AHEAD plus the days BUCKET_MAX_CLOCK_SKEW lets a client's clock run
ahead, so every key ingest accepts finds its day; a key of a day already dropped (a packet
resent after longer than the retention period) lands in the default partition, watched like
the others. Keys of days still wanted that reached the default move into their day when it is
created; those of past days stay there (a client may name any day since 1900: one partition
each would be a way to make thousands).

Each partition of ``packets`` has its own unique index on ``seq``, ``<partition>_seq_key``
(migration 0017; a partitioned unique index would need ``received_at``): retention proves a
day one run of seqs from its count alone (``services/retention``). The maintenance creates it
with each day, and on any partition found without an index on seq (one an instance of the
version before 0017 created during the upgrade).

Creating a partition takes a short exclusive lock on ``packets``; it waits at most
``LOCK_TIMEOUT`` for queries in flight and otherwise tries again next time. One maintainer at
a time across every worker and instance (a transaction-scoped advisory lock). SQLite keeps
one table: every function here is a no-op there.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from flask import current_app
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from bucket.extensions import db
from bucket.services import sql
from bucket.services.dialect import dialect_name
from bucket.timeutil import utc_now

log = logging.getLogger(__name__)
DEFAULT = "packets_default"
LEGACY = "packets_legacy"
PROCESSED = "deliveries_processed"
PROCESSED_DEFAULT = "deliveries_processed_default"
KEYS = "packet_keys"
KEYS_DEFAULT = "packet_keys_default"
KEYS_LEGACY = "packet_keys_legacy"
DAY_NAME = re.compile(r"^packets_p(\d{8})$")
# pg_advisory_xact_lock key of the partition maintainer: "prana-part" as an integer.
MAINTAINER_LOCK = 0x7072616E61706172
LOCK_TIMEOUT = "2s"
# A table's columns in their order.
COLUMNS_SQL = (
    "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:parent AS regclass) "
    "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
)
# A table's columns ordered so that no value of a row is padded to its alignment: fixed-width
# ones by alignment, 8 bytes first (times, double), then 4, 2 and 1 (a uuid aligns on bytes),
# variable-width ones (text, json) last; among equals, the table's order. A NULL takes no room
# but its bit, so a processed delivery's row (migration 0021) with an empty list of karma
# actions takes 90 bytes, not 108 (96 and 112 once aligned in its page).
COMPACT_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = CAST(:parent AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY t.typlen = -1, position(t.typalign::text IN 'disc'), t.typlen DESC, a.attnum
"""
# A watched count: beyond this many rows the default partition is not counted further.
DEFAULT_COUNT_CAP = 1_000_000
# The partitions of packets with no valid index whose only key is seq, and no predicate.
UNINDEXED_SEQ_SQL = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'packets'::regclass AND c.relkind = 'r' AND NOT EXISTS (
  SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid
  AND a.attnum = x.indkey[0]
  WHERE x.indrelid = c.oid AND x.indnkeyatts = 1 AND a.attname = 'seq'
  AND x.indisvalid AND x.indpred IS NULL)
ORDER BY c.relname
"""
PARTITIONS_OF_SQL = (
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint "
    "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = '{parent}'::regclass ORDER BY c.relname"
)


@dataclass
class Partition:
    """One partition of ``packets``: its name, the days it covers ([start, end) in UTC, None
    where unbounded) and PostgreSQL's estimate of its rows."""

    name: str
    start: datetime | None
    end: datetime | None
    estimated_rows: int

    @property
    def is_day(self) -> bool:
        return DAY_NAME.match(self.name) is not None


@dataclass
class Maintenance:
    """What one maintenance did: the partitions created, and the packets moved out of the
    default partition into their day's (by day)."""

    created: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


def partitioned() -> bool:
    """Whether packets are partitioned here (PostgreSQL)."""
    return dialect_name() == "postgresql"


def day_name(day: date) -> str:
    """The partition name of a UTC day."""
    return f"packets_p{day:%Y%m%d}"


def key_day_name(day: date) -> str:
    """The partition of ``packet_keys`` holding the keys of one client day."""
    return f"{KEYS}_p{day:%Y%m%d}"


def key_days_ahead(days: int) -> int:
    """Days after today the key partitions cover: the packets' ``days`` plus what
    BUCKET_MAX_CLOCK_SKEW lets a client's timestamp lie ahead of ours (a day partly counts)."""
    skew = current_app.config.get("BUCKET_MAX_CLOCK_SKEW")
    return days + (0 if skew is None else max(0, math.ceil(skew / 86400)))


def processed_name(packets_partition: str) -> str:
    """The partition of processed deliveries beside a partition of packets."""
    return f"{PROCESSED}_{packets_partition.removeprefix('packets_')}"


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def naive(moment: datetime) -> datetime:
    """UTC, as the table stores it (timestamp without time zone)."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def bound_literal(day: date) -> str:
    """A day's start as a partition bound literal (DDL takes no parameters)."""
    return f"'{day:%Y-%m-%d} 00:00:00'"


def _bound(expression: str, keyword: str) -> datetime | None:
    found = re.search(rf"{keyword} \('([^']+)'\)", expression)
    if found is None:
        return None
    return datetime.fromisoformat(found.group(1)).replace(tzinfo=UTC)


def lower_bound(expression: str) -> datetime | None:
    """Where a partition's range starts (its bound as ``pg_get_expr`` gives it), in UTC; None
    for the default partition and a range from MINVALUE."""
    return _bound(expression, "FROM")


def upper_bound(expression: str) -> datetime | None:
    """Where a partition's range ends (its bound as ``pg_get_expr`` gives it), in UTC; None
    for the default partition and a range up to MAXVALUE."""
    return _bound(expression, "TO")


def partitions(parent: str = "packets") -> list[Partition]:
    """Every partition of ``packets`` (or of ``PROCESSED``, the processed deliveries), oldest
    first, the default last (empty on SQLite)."""
    if not partitioned():
        return []
    rows = db.session.execute(text(PARTITIONS_OF_SQL.format(parent=parent))).all()
    db.session.commit()
    found = [
        Partition(name, _bound(bound, "FROM"), _bound(bound, "TO"), max(0, estimate))
        for name, bound, estimate in rows
    ]
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(found, key=lambda p: (p.name.endswith("_default"), p.start or epoch))


# Rows in one default partition, up to DEFAULT_COUNT_CAP, read on the autocommit connection:
# status reads three on every call, where three session reads with a commit each took 2.7 of
# its 6.8 ms.
HELD_SQL = "(SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT %(cap)s) AS held)"
DEFAULTS_HELD_SQL = "SELECT " + ", ".join(
    HELD_SQL.format(table=table) for table in (DEFAULT, PROCESSED_DEFAULT, KEYS_DEFAULT)
)


def default_rows(table: str = DEFAULT) -> int | None:
    """Rows in a default partition (``DEFAULT`` of packets, or ``PROCESSED_DEFAULT`` of the
    processed deliveries), up to ``DEFAULT_COUNT_CAP``; None on SQLite."""
    if not partitioned():
        return None
    ((count,),) = sql.run("SELECT " + HELD_SQL.format(table=table), {"cap": DEFAULT_COUNT_CAP})
    return count


def defaults_held() -> tuple[int, int, int] | tuple[None, None, None]:
    """``default_rows`` of the packets', the processed deliveries' and the keys' default
    partitions, read together; Nones on SQLite."""
    if not partitioned():
        return None, None, None
    ((packets, deliveries, keys),) = sql.run(DEFAULTS_HELD_SQL, {"cap": DEFAULT_COUNT_CAP})
    return packets, deliveries, keys


def days_ahead() -> int | None:
    """Whole days after today covered by day partitions without a gap (-1: not even today);
    None on SQLite."""
    if not partitioned():
        return None
    found = partitions()
    covered = {p.start.date() for p in found if p.is_day and p.start is not None}
    legacy_end = next((p.end for p in found if p.name == LEGACY), None)
    today = utc_now().date()
    if legacy_end is not None and legacy_end.date() > today:
        covered |= {today + timedelta(days=n) for n in range((legacy_end.date() - today).days)}
    ahead = -1
    while today + timedelta(days=ahead + 1) in covered:
        ahead += 1
    return ahead


def ensure_partitions(days: int | None = None) -> Maintenance:
    """Create the day partitions from today to ``days`` ahead (default
    BUCKET_PARTITION_DAYS_AHEAD), and move any packets in the default partition into their
    own day's partition, created for them. A no-op on SQLite."""
    report = Maintenance()
    if not partitioned():
        return report
    if days is None:
        days = current_app.config["BUCKET_PARTITION_DAYS_AHEAD"]
    if days < 0:
        raise ValueError("days must be >= 0")
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        if not session.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": MAINTAINER_LOCK}
        ).scalar_one():
            session.rollback()
            report.skipped = "another maintainer is at work"
            return report
        existing = partitions_in(session)
        processed = partitions_in(session, PROCESSED)
        stray = stray_days(session, DEFAULT)
        stray_processed = stray_days(session, PROCESSED_DEFAULT)
        session.commit()
    except Exception:
        session.rollback()
        raise
    today = utc_now().date()
    wanted = {today + timedelta(days=n) for n in range(days + 1)}
    for day in sorted(wanted | set(stray) | set(stray_processed)):
        packets_missing = not covered_by(existing, day)
        if not packets_missing and covered_by(processed, day):
            continue
        try:
            try:
                moved = create_day(day, day in stray, packets=packets_missing)
            except IntegrityError:  # the day's first packets reached the default meanwhile
                moved = create_day(day, True, packets=packets_missing)
        except Exception as exc:  # a lock not granted in time: the next maintenance retries
            db.session.rollback()
            if not sql.lock_not_granted(exc):
                raise
            report.skipped = f"packets stayed locked for {LOCK_TIMEOUT}"
            log.info("partition maintenance: %s", report.skipped)
            return report
        report.created.append(day_name(day) if packets_missing else processed_name(day_name(day)))
        if moved:
            report.moved[day_name(day)] = moved
            log.warning("moved %d packets from the default partition into %s", moved, day)
    index_seqs(report)
    ensure_key_days(today, key_days_ahead(days), report)
    return report


def index_seqs(report: Maintenance) -> None:
    """Give every partition of ``packets`` found without an index on seq its own, each in a
    short transaction (normally none is missing: every day is created with it); one that
    stays locked sets ``report.skipped`` and waits for the next maintenance."""
    session = db.session
    missing = session.execute(text(UNINDEXED_SEQ_SQL)).scalars().all()
    session.commit()
    for name in missing:
        try:
            session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MAINTAINER_LOCK})
            index_seq(session, name)
            session.commit()
        except Exception as exc:
            session.rollback()
            if not sql.lock_not_granted(exc):
                raise
            report.skipped = f"{name} stayed locked for {LOCK_TIMEOUT}"
            log.info("partition maintenance: %s", report.skipped)
            return
        report.created.append(seq_index_name(name))
        log.warning("created the missing index on seq of %s", name)


def seq_index_name(partition: str) -> str:
    """The unique index on seq of a partition of packets (migration 0017)."""
    return f"{partition}_seq_key"


def index_seq(session, name: str) -> None:
    """Create partition ``name``'s unique index on seq unless it has it, inside the caller's
    transaction. Where a seq already repeats (only ever by hand), a plain index instead:
    retention then reads the day's runs row by row, finds the repeat and keeps the day."""
    index = seq_index_name(name)
    try:
        with session.begin_nested():
            session.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {name} (seq)"))
    except IntegrityError:
        log.error("a seq repeats in %s: its index on seq is not unique", name)
        session.execute(text(f"CREATE INDEX IF NOT EXISTS {index} ON {name} (seq)"))


def ensure_key_days(today: date, ahead: int, report: Maintenance) -> None:
    """Create the missing day partitions of ``packet_keys`` from today to ``ahead`` days on
    (each moving its keys out of the default partition), adding them to ``report``."""
    session = db.session
    existing = partitions_in(session, KEYS)
    session.commit()
    for offset in range(ahead + 1):
        day = today + timedelta(days=offset)
        if covered_by(existing, day):
            continue
        try:
            moved = create_key_day(day)
        except Exception as exc:  # a lock not granted in time: the next maintenance retries
            db.session.rollback()
            if not sql.lock_not_granted(exc):
                raise
            report.skipped = f"packet_keys stayed locked for {LOCK_TIMEOUT}"
            log.info("partition maintenance: %s", report.skipped)
            return
        report.created.append(key_day_name(day))
        if moved:
            report.moved[key_day_name(day)] = moved
            log.warning("moved %d keys from the default partition into %s", moved, day)


def create_key_day(day: date) -> int:
    """Create the partition of ``packet_keys`` for one client day in one transaction, first
    moving that day's keys out of the default partition (which stays locked against inserts
    until the commit, so none slips in between); returns how many moved."""
    name = key_day_name(day)
    bounds = f"FOR VALUES FROM ('{day:%Y-%m-%d}') TO ('{day + timedelta(days=1):%Y-%m-%d}')"
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MAINTAINER_LOCK})
        if session.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar():
            session.rollback()  # another maintainer made it meanwhile
            return 0
        # Attaching builds the partitioned primary key (dedup_key, client_day) on it.
        moved = adopt_from_default(
            session, KEYS, KEYS_DEFAULT, name, bounds, "client_day = :day", {"day": day}
        )
        session.commit()
        return moved
    except Exception:
        session.rollback()
        raise


def stray_days(session, default: str) -> list[date]:
    """The days of the rows in a default partition, read inside the caller's transaction."""
    found = session.execute(text(f"SELECT DISTINCT date_trunc('day', received_at) FROM {default}"))
    return [moment.date() for (moment,) in found]


def partitions_in(
    session, parent: str = "packets"
) -> list[tuple[datetime | None, datetime | None]]:
    """The ranges of every bounded partition of ``parent`` (packets, or ``PROCESSED``), read
    inside the caller's transaction."""
    rows = session.execute(text(PARTITIONS_OF_SQL.format(parent=parent))).all()
    return [
        (_bound(bound, "FROM"), _bound(bound, "TO")) for _, bound, _ in rows if bound != "DEFAULT"
    ]


def covered_by(ranges: list[tuple[datetime | None, datetime | None]], day: date) -> bool:
    """Whether some partition's range overlaps this day."""
    start, end = day_start(day), day_start(day + timedelta(days=1))
    return any(
        (lower is None or lower < end) and (upper is None or upper > start)
        for lower, upper in ranges
    )


def create_day(day: date, adopt: bool, packets: bool = True) -> int:
    """Create one day's partitions, of packets (unless ``packets`` is false) and of processed
    deliveries (unless it exists), in one transaction; with ``adopt``, first move that day's
    packets out of the default partition into it (else creating it would fail: the default
    partition may not hold rows of a range another partition covers). The day's processed
    deliveries in their default partition always move. Returns the number of packets moved."""
    name = day_name(day)
    start, end = day_start(day), day_start(day + timedelta(days=1))
    bounds = f"FOR VALUES FROM ({bound_literal(day)}) TO ({bound_literal(day + timedelta(days=1))})"
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MAINTAINER_LOCK})
        moved = 0
        create_processed_day(session, day, bounds)
        if not packets:
            session.commit()
            return 0
        if not adopt:
            session.execute(
                text(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF packets {bounds}")
            )
        else:
            moved = adopt_from_default(
                session,
                "packets",
                DEFAULT,
                name,
                bounds,
                "received_at >= :start AND received_at < :end",
                {"start": naive(start), "end": naive(end)},
            )
        index_seq(session, name)
        session.commit()
        return moved
    except Exception:
        session.rollback()
        raise


def create_processed_day(session, day: date, bounds: str) -> None:
    """Create one day's partition of processed deliveries, inside the caller's transaction,
    unless it exists; the day's rows in the default partition move into it first (an ack
    of a packet whose day had no partition yet put them there). The default stays locked
    against such acks until the commit, so none can slip in between."""
    name = processed_name(day_name(day))
    if session.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar() is not None:
        return
    start, end = day_start(day), day_start(day + timedelta(days=1))
    # Attaching builds the partitioned index (packet_id) on it.
    adopt_from_default(
        session,
        PROCESSED,
        PROCESSED_DEFAULT,
        name,
        bounds,
        "received_at >= :start AND received_at < :end",
        {"start": naive(start), "end": naive(end)},
    )


def adopt_from_default(
    session, parent: str, default: str, name: str, bounds: str, rows: str, params: dict
) -> int:
    """Create partition ``name`` of ``parent`` holding the rows of its default partition that
    ``rows`` selects (they may not stay there once a partition covers them), inside the
    caller's transaction; returns how many moved. The default stays locked against inserts
    routed to it until the commit, so none slips in between; attaching builds the parent's
    indexes on the new partition."""
    session.execute(text(f"LOCK TABLE {default} IN EXCLUSIVE MODE"))
    listed = ", ".join(create_partition_table(session, parent, name))
    moved = session.execute(
        text(
            f"WITH moved AS (DELETE FROM {default} WHERE {rows} RETURNING {listed}) "
            f"INSERT INTO {name} ({listed}) SELECT {listed} FROM moved"
        ),
        params,
    ).rowcount
    session.execute(text(f"ALTER TABLE {parent} ATTACH PARTITION {name} {bounds}"))
    return moved


def create_partition_table(session, parent: str, name: str) -> list[str]:
    """Create table ``name``, to be attached to ``parent``, with the parent's columns; return
    their names. A partition of processed deliveries orders them so that none is padded
    (migration 0021); any other partition takes the parent's order."""
    if parent != PROCESSED:
        session.execute(text(f"CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS)"))
        return list(session.execute(text(COLUMNS_SQL), {"parent": parent}).scalars())
    columns = session.execute(text(COMPACT_COLUMNS_SQL), {"parent": parent}).all()
    definitions = ", ".join(
        f"{column} {kind}{' NOT NULL' if not_null else ''}" for column, kind, not_null in columns
    )
    session.execute(text(f"CREATE TABLE {name} ({definitions})"))
    return [column for column, _, _ in columns]


def backfill_keys(since: datetime) -> int | None:
    """Give every packet received at or after ``since`` that has none its key row, and return
    how many were added (None on SQLite). For the packets that instances of the version before
    migration 0012 stored while the upgrade rolled out (they wrote no key): a copy of one of
    them sent afterwards is then a duplicate again. Where such a copy was stored already, both
    rows stay; the first keeps the key. A packet without its key on the row (stored since
    migration 0027) has its key row already: ingest wrote them together."""
    if not partitioned():
        return None
    since_naive = naive(since)
    added = db.session.execute(
        text(
            "INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id) "
            "SELECT dedup_key, client_timestamp::date, received_at, packet_id "
            "FROM packets WHERE received_at >= :since AND dedup_key IS NOT NULL "
            "ORDER BY seq ON CONFLICT DO NOTHING"
        ),
        {"since": since_naive},
    ).rowcount
    db.session.execute(
        text(
            "INSERT INTO packet_idempotency_keys (idempotency_key, dedup_key, client_day) "
            "SELECT idempotency_key::uuid, dedup_key, client_timestamp::date FROM packets "
            "WHERE received_at >= :since AND idempotency_key IS NOT NULL "
            "AND dedup_key IS NOT NULL "
            "ORDER BY seq ON CONFLICT DO NOTHING"
        ),
        {"since": since_naive},
    )
    db.session.commit()
    return added
