"""Retention: drop whole days of packets (PostgreSQL), or delete processed (and, on request,
dead) packets in short, bounded batches (SQLite, and PostgreSQL on request).

By days (``purge_days``, PostgreSQL): every day partition (and the legacy partition of an
upgraded deployment) whose end lies more than N days back goes whole. First everything stored
is booked and sealed; a day holding a packet not sealed yet, or one still unfinished (pending
or leased), or dead (unless ``include_dead``), is kept whole and reported with its counts:
no packet that still matters is lost, and the next purge tries again. Otherwise, in one short
transaction: the day's rows are locked against change, the audit log records the runs of
``seq`` the day held (``audit_purged_ranges``: every sealed packet inside a run was in the day,
computed from the day's count and bounds when its unique index on seq (migration 0017) and
a count as wide as the bounds prove it one run, else from one ordered pass over that index,
and from the seals' bounds, reading the
leaves of only the seals that skip a seq, so ``verify`` tells each of them "purged by
retention" and still calls any other missing packet deleted), the counters are lowered, the
day's dead deliveries removed, and the partition detached with its partition of processed deliveries
(``deliveries_processed_pYYYYMMDD``, migration 0014), and both detached tables are dropped
(a run interrupted there is finished by the next purge): on a connection and a thread of
their own, since deleting a day's files is most of a purge's time, while the purge goes on to
the next day and to the days of keys; a drop that fails is reported (``undropped``) and the
table, detached, waits for the next purge.

Then the days of keys (``packet_keys``, partitioned by the client timestamp's day, migration
0015) that ended more than N days back go whole too (detached in one short transaction and
dropped in the next, so ingest, which inserts through ``packet_keys``, never waits while the
day's files are deleted), each once none of its keys names a packet still stored: a key is
dropped only after its packet (a packet kept because it is unfinished or dead keeps its key,
and a copy resent meanwhile is still its duplicate). Until then a copy
of a packet already purged is answered as the duplicate of the purged packet, and afterwards
it is stored anew. With the day's keys go the Idempotency-Keys pointing into it. The check
reads the day's keys' reception times against the packets' partitions still attached,
through a BRIN index on them (migration 0017: only the blocks that could hold a live key),
under a lock that holds off inserts into that day only; keys of days long past
that reached the default partition are few, and go by rows. No packet, processed delivery
or key is deleted one by one, and no vacuum follows. Retention then counts from the day a
packet was received (and for keys from the client's day), not processed.

By rows (``purge_rows``): each batch is its own transaction deleting at most ``batch_size``
packets (and their deliveries, and on PostgreSQL their keys) picked through the queue index
(``delivery_state``, ``visible_at``, which holds the time a packet was processed or
dead-lettered); on PostgreSQL the deliveries are picked with ``FOR UPDATE SKIP LOCKED``, so a
purge never waits on, or blocks, the rows that ingest, polls and acks are touching. Run it on
a schedule (``flask bucket purge`` from a cron job) or on demand.
"""

from __future__ import annotations

import logging
import struct
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, select, text

from bucket.extensions import db
from bucket.models import (
    AuditPurge,
    AuditPurgedRange,
    Delivery,
    DeliveryState,
    Packet,
    PacketCounter,
    PacketIdempotencyKey,
    PacketKey,
)
from bucket.services import counters, partitions, sql
from bucket.services.audit.sealing import seal_everything, sealed_through
from bucket.services.bookkeeping import book_new_packets
from bucket.services.codes import as_shown
from bucket.services.ingest import IDENTITY_FIELDS, packet_identity
from bucket.timeutil import epoch_now, from_epoch, utc_now

T = Packet.__table__
D = Delivery.__table__
C = PacketCounter.__table__
K = PacketKey.__table__
IK = PacketIdempotencyKey.__table__
SECONDS_PER_DAY = 86400.0
# What a packet's identity is a digest of, as ingest saw it: the key of a packet stored since
# migration 0027 is not on its row (``ingest.packet_identity``).
IDENTITY_COLUMNS = tuple(as_shown(name) for name in IDENTITY_FIELDS)
log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    """How many packets a purge matched or deleted, and where it drew the line."""

    cutoff: datetime
    states: tuple[str, ...]
    packets: int
    batches: int
    dry_run: bool


def purge_rows(
    older_than_days: float,
    include_dead: bool = False,
    batch_size: int = 1000,
    dry_run: bool = False,
) -> PurgeReport:
    """Delete packets processed (or dead, with ``include_dead``) more than N days ago."""
    if older_than_days < 0 or batch_size < 1:
        raise ValueError("older_than_days must be >= 0 and batch_size >= 1")
    cutoff = epoch_now() - older_than_days * SECONDS_PER_DAY
    states = (
        (DeliveryState.PROCESSED, DeliveryState.DEAD)
        if include_dead
        else (DeliveryState.PROCESSED,)
    )
    # Only booked packets: the stored counter has counted them, so it can count them out.
    # Booking first makes that every packet stored up to now.
    book_new_packets()
    booked = select(C.c.value).where(C.c.name == counters.BOOKED).scalar_subquery()
    # Only sealed packets too: the audit log keeps their leaves, and records their purge here,
    # so `flask bucket verify` tells a purge from a deletion behind the log's back.
    seal_everything()
    sealed = sealed_through()
    expired = (
        select(D.c.packet_id)
        .join(T, T.c.packet_id == D.c.packet_id)
        .where(
            D.c.delivery_state.in_(states),
            D.c.visible_at < cutoff,
            T.c.seq <= booked,
            T.c.seq <= sealed,
        )
    )
    if dry_run:
        count = db.session.execute(
            select(func.count()).select_from(expired.subquery())
        ).scalar_one()
        db.session.commit()
        return PurgeReport(from_epoch(cutoff), states, count, 0, True)
    deleted = batches = 0
    while True:
        victims = (
            expired.limit(batch_size).with_for_update(skip_locked=True, of=D).scalar_subquery()
        )
        gone = db.session.execute(
            delete(D).where(D.c.packet_id.in_(victims)).returning(D.c.packet_id, D.c.delivery_state)
        ).all()
        if gone:
            ids = [pid for pid, _ in gone]
            removed = (
                db.session.execute(
                    delete(T)
                    .where(T.c.packet_id.in_(ids))
                    .returning(T.c.seq, T.c.packet_id, T.c.dedup_key, *IDENTITY_COLUMNS)
                )
                .mappings()
                .all()
            )
            if partitions.partitioned():  # the keys a resent copy would have been matched on
                forget_keys(
                    [
                        (row["dedup_key"] or packet_identity(row), row["client_timestamp"])
                        for row in removed
                    ]
                )
            now = utc_now()
            db.session.execute(
                insert(AuditPurge.__table__),
                [
                    {"packet_seq": row["seq"], "packet_id": row["packet_id"], "purged_at": now}
                    for row in removed
                ],
            )
        count = len(gone)
        states_gone = [state for _, state in gone]
        counters.bump(counters.PROCESSED, -states_gone.count(DeliveryState.PROCESSED))
        counters.bump(counters.DEAD, -states_gone.count(DeliveryState.DEAD))
        counters.bump(counters.STORED, -count)
        db.session.commit()
        batches += 1
        deleted += count
        if count < batch_size:
            return PurgeReport(from_epoch(cutoff), states, deleted, batches, False)


def forget_keys(identities: list[tuple[str, datetime]]) -> None:
    """PostgreSQL: remove the key rows of these (dedup key, client timestamp) identities, and
    the Idempotency-Keys pointing to them, in the session's transaction."""
    if not identities:
        return
    pairs = {"keys": [key for key, _ in identities]}
    pairs["days"] = [moment.astimezone(UTC).date() for _, moment in identities]
    for table in (IK.name, K.name):
        db.session.execute(
            text(
                f"DELETE FROM {table} t USING unnest(CAST(:keys AS uuid[]), "
                "CAST(:days AS date[])) AS gone(key, day) "
                "WHERE t.dedup_key = gone.key AND t.client_day = gone.day"
            ),
            pairs,
        )


# The day's runs of consecutive seqs, read in one ordered pass over its seq index (an
# index-only scan once vacuumed): seq - row_number() is constant along a run. Within a group
# the seqs are distinct (row numbers are); a duplicate seq shows as a group whose count is not
# its width, or as groups that overlap (``day_runs`` rejects both).
RUNS_SQL = """
SELECT min(seq), max(seq), count(*) FROM (
  SELECT seq, seq - row_number() OVER (ORDER BY seq) AS run FROM {day}
) AS numbered GROUP BY run ORDER BY 1
"""
# Whether the day's partition has a valid unique index whose only key is seq (migration 0017
# gives every partition one), and the day's count and bounds (the bounds from the index's
# ends; the count from an index-only pass, no window, no grouping).
UNIQUE_SEQ_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid
  AND a.attnum = x.indkey[0]
  WHERE x.indrelid = to_regclass(:day) AND x.indisunique AND x.indisvalid
  AND x.indnkeyatts = 1 AND a.attname = 'seq' AND x.indpred IS NULL)
"""
SPAN_SQL = (
    "SELECT (SELECT count(*) FROM {day}), (SELECT min(seq) FROM {day}), "
    "(SELECT max(seq) FROM {day})"
)
# The seals whose leaves could lie within lo..hi, in seq order. A seal's leaves are distinct
# seqs in after_seq + 1 .. last_seq, in order (the sealer checks it); when there are as many
# as that range is wide, the seal holds every seq of it and its leaves need not be read: only
# the others' are (octet_length reads the size without the value). Since migration 0019 such
# a seal stores no seqs at all (an empty ``leaf_seqs``, with as many packets as the range is
# wide); seals made before it store them all. A seal whose leaves do not add up gives its
# seqs as stored (empty: none), so its packets' day is kept.
SEALS_NEAR_SQL = """
SELECT after_seq, last_seq,
       CASE WHEN octet_length(leaf_seqs) / 8 = last_seq - after_seq
              OR (octet_length(leaf_seqs) = 0 AND packet_count = last_seq - after_seq)
            THEN NULL ELSE leaf_seqs END
FROM audit_seals WHERE last_seq >= :lo AND after_seq < :hi ORDER BY after_seq
"""


def day_runs(session, name: str) -> list[tuple[int, int, int]] | None:
    """The day's runs of consecutive seqs (first, last, count), or None when a seq repeats."""
    runs = [tuple(row) for row in session.execute(text(RUNS_SQL.format(day=name))).all()]
    for n, (first, last, size) in enumerate(runs):
        if size != last - first + 1 or (n and first <= runs[n - 1][1]):
            return None
    return runs


def one_run(session, name: str) -> list[tuple[int, int, int]] | None:
    """The day's seqs as one run [(first, last, count)] ([] for an empty day) when its count
    proves it: no seq repeats (a unique index says so) and as many rows as the run is wide.
    None otherwise: the caller reads the runs row by row (``day_runs``)."""
    if not session.execute(text(UNIQUE_SEQ_SQL), {"day": name}).scalar_one():
        return None
    count, first, last = session.execute(text(SPAN_SQL.format(day=name))).one()
    if not count:
        return []
    return [(first, last, count)] if count == last - first + 1 else None


def sealed_intervals(session, lo: int, hi: int) -> list[list[int]]:
    """The sealed seqs near lo..hi as maximal intervals [first, last], in order: a full seal is
    one interval, another seal's leaves are read and grouped into consecutive runs."""
    intervals: list[list[int]] = []

    def add(first: int, last: int) -> None:
        if intervals and first <= intervals[-1][1] + 1:
            intervals[-1][1] = max(intervals[-1][1], last)
        else:
            intervals.append([first, last])

    for after, last, leaves in session.execute(text(SEALS_NEAR_SQL), {"lo": lo, "hi": hi}):
        if leaves is None:
            if last > after:
                add(after + 1, last)
            continue
        for seq in struct.unpack(f">{len(leaves) // 8}q", leaves):
            add(seq, seq)
    return intervals


def purged_ranges(
    runs: list[tuple[int, int, int]], sealed: list[list[int]]
) -> list[tuple[int, int, int]] | None:
    """The ranges the audit log records for a day of these runs: each run must be sealed whole
    (else None: the day holds a packet the log's leaves do not), and two runs are one range
    when no sealed seq lies between them (the seqs in between were never sealed packets), so a
    range never spans a sealed packet the day did not hold, whether that packet is stored
    elsewhere, was purged before, or was deleted behind the log's back."""
    starts = [first for first, _ in sealed]
    ranges: list[list[int]] = []
    previous = None  # the index of the sealed interval holding the last run
    for first, last, size in runs:
        at = bisect_right(starts, first) - 1
        if at < 0 or sealed[at][1] < last:
            return None
        # Two runs in one sealed interval have sealed seqs between them; in two neighbouring
        # intervals, none when the first ends where its run does and the second starts with
        # this run.
        joined = (
            previous is not None
            and at == previous + 1
            and sealed[previous][1] == ranges[-1][1]
            and sealed[at][0] == first
        )
        if joined:
            ranges[-1][1] = last
            ranges[-1][2] += size
        else:
            ranges.append([first, last, size])
        previous = at
    return [tuple(r) for r in ranges]


LOCK_TIMEOUT = "1s"
# Tables an earlier purge detached from ``:parent`` (a day's or the legacy partition) and did
# not drop: it stopped in between.
LEFTOVERS_SQL = (
    "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
    "AND relname ~ ('^' || :parent || '_(p[0-9]{8}|legacy)$') ORDER BY relname"
)
ATTACHED_SQL = (
    "SELECT c.relispartition FROM pg_class c WHERE c.oid = to_regclass(:name) AND c.relkind = 'r'"
)


@dataclass
class DayOutcome:
    """One day partition a purge looked at: dropped (or would be), or kept and why."""

    partition: str
    packets: int
    dead: int = 0
    unfinished: int = 0
    ranges: int = 0
    kept: str | None = None


@dataclass
class KeyDayOutcome:
    """One day partition of ``packet_keys`` a purge looked at: dropped (or would be), or kept
    because it still names ``live`` packets stored."""

    partition: str
    live: int = 0
    kept: str | None = None


@dataclass
class DayPurgeReport:
    """What a purge by days did: the days dropped and kept, and where it drew the line."""

    cutoff: datetime
    dry_run: bool
    days: list[DayOutcome] = field(default_factory=list)
    # Days of keys (``packet_keys``), dropped or kept, with how many keys each held.
    key_days: list[KeyDayOutcome] = field(default_factory=list)
    # Keys of days long past removed from the default partition of ``packet_keys``.
    default_keys: int = 0
    # Detached tables whose DROP failed, with why: out of every read, dropped by a next purge.
    undropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dropped(self) -> list[DayOutcome]:
        return [day for day in self.days if day.kept is None]

    @property
    def kept(self) -> list[DayOutcome]:
        return [day for day in self.days if day.kept is not None]

    @property
    def packets(self) -> int:
        return sum(day.packets for day in self.dropped)


def purge_days(
    older_than_days: float,
    include_dead: bool = False,
    batch_size: int = 1000,
    dry_run: bool = False,
) -> DayPurgeReport:
    """PostgreSQL: drop the day partitions that ended more than N days ago, keeping whole any
    day with a packet unsealed, unfinished, or dead (unless ``include_dead``)."""
    if older_than_days < 0 or batch_size < 1:
        raise ValueError("older_than_days must be >= 0 and batch_size >= 1")
    cutoff = utc_now() - timedelta(days=older_than_days)
    report = DayPurgeReport(cutoff, dry_run)
    # A detached day's files are deleted when its DROP commits (most of a purge's time): on a
    # connection of its own, one table after another, while this one books, seals and goes
    # through the days, first the tables an earlier purge detached and did not drop.
    with DetachedDrops(db.engine) as drops:
        if not dry_run:
            for name in leftovers("packets"):
                drops.add(name)
            for name in leftovers(partitions.PROCESSED) + leftovers(partitions.KEYS):
                drops.add(name, alone=True)
            db.session.commit()
        purge_each_day(report, include_dead, drops)
    report.undropped = drops.failures
    return report


def purge_each_day(report: DayPurgeReport, include_dead: bool, drops: DetachedDrops) -> None:
    """``purge_days`` once the leftovers are on their way: book and seal, then the days of
    packets (each dropped by ``drops``) and the days of keys."""
    cutoff, dry_run = report.cutoff, report.dry_run
    book_new_packets()
    seal_everything()
    booked = db.session.execute(
        select(C.c.value).where(C.c.name == counters.BOOKED)
    ).scalar_one_or_none()
    horizon = min(sealed_through(), booked or 0)
    db.session.commit()
    for part in partitions.partitions():
        if part.name == partitions.DEFAULT or part.end is None or part.end > cutoff:
            continue
        outcome = drop_day(part, horizon, include_dead, dry_run)
        report.days.append(outcome)
        if outcome.kept is not None:
            log.warning("retention kept %s: %s", part.name, outcome.kept)
        elif not dry_run:
            drops.add(part.name)
    if not dry_run:
        report.default_keys = forget_default_keys()
    for part in partitions.partitions(partitions.KEYS):
        if part.name == partitions.KEYS_DEFAULT or part.end is None or part.end > cutoff:
            continue
        outcome = drop_key_day(part, dry_run)
        report.key_days.append(outcome)
        if outcome.kept is not None:
            log.info("retention kept %s: %s", part.name, outcome.kept)


def leftovers(parent: str) -> list[str]:
    """The tables an earlier purge detached from ``parent`` and stopped before dropping."""
    return list(db.session.execute(text(LEFTOVERS_SQL), {"parent": parent}).scalars())


def live_condition(session) -> tuple[str, dict]:
    """A condition on ``received_at`` true for a packet still stored: inside a partition of
    ``packets`` still attached (a day, the legacy one), on a day of a packet in the default
    partition, or from today on (a packet stored while the caller looks). Read inside the
    caller's transaction, which holds the keys it checks against new inserts."""
    ranges = partitions.partitions_in(session)
    for day in partitions.stray_days(session, partitions.DEFAULT):
        ranges.append((partitions.day_start(day), partitions.day_start(day + timedelta(days=1))))
    ranges.append((partitions.day_start(utc_now().date()), None))
    merged: list[list] = []
    epoch = datetime.min.replace(tzinfo=UTC)
    for lower, upper in sorted(ranges, key=lambda r: r[0] or epoch):
        if merged and (merged[-1][1] is None or (lower is not None and lower <= merged[-1][1])):
            if merged[-1][1] is not None and (upper is None or upper > merged[-1][1]):
                merged[-1][1] = upper
            continue
        merged.append([lower, upper])
    clauses, params = [], {}
    for n, (lower, upper) in enumerate(merged):
        parts = []
        if lower is not None:
            parts.append(f"received_at >= :lo{n}")
            params[f"lo{n}"] = partitions.naive(lower)
        if upper is not None:
            parts.append(f"received_at < :hi{n}")
            params[f"hi{n}"] = partitions.naive(upper)
        clauses.append("(" + (" AND ".join(parts) or "true") + ")")
    return " OR ".join(clauses), params


def drop_key_day(part: partitions.Partition, dry_run: bool) -> KeyDayOutcome:
    """Detach one day of keys and remove the Idempotency-Keys pointing into it in one
    transaction, then drop its table in another, unless one of its keys names a packet still
    stored (then it is kept whole). A purge stopped between the two leaves the table detached:
    the next one drops it (``leftovers``)."""
    name = part.name
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        # Inserts into this day wait (only a packet resent after the retention period has one).
        session.execute(text(f"LOCK TABLE {name} IN SHARE MODE"))
        live, params = live_condition(session)
        outcome = KeyDayOutcome(name)
        outcome.live = session.execute(
            text(f"SELECT count(*) FROM (SELECT 1 FROM {name} WHERE {live} LIMIT 1000) AS held"),
            params,
        ).scalar_one()
        if outcome.live:
            outcome.kept = (
                f"names {outcome.live if outcome.live < 1000 else 'at least 1000'} packets "
                "still stored (kept whole until they are purged)"
            )
        if outcome.kept or dry_run:
            session.rollback()
            return outcome
        session.execute(text(f"ALTER TABLE {partitions.KEYS} DETACH PARTITION {name}"))
        window = "client_day < :end" + (" AND client_day >= :start" if part.start else "")
        bounds = {"end": part.end.date()}
        if part.start is not None:
            bounds["start"] = part.start.date()
        session.execute(text(f"DELETE FROM {IK.name} WHERE {window}"), bounds)
        session.commit()
    except Exception as exc:
        session.rollback()
        if not sql.lock_not_granted(exc):
            raise
        return KeyDayOutcome(name, kept=f"busy: a lock was not granted within {LOCK_TIMEOUT}")
    # Its files are deleted at the DROP's commit: in a transaction of its own, which locks
    # only the detached table, not packet_keys, that every ingest inserts through.
    session.execute(text(f"DROP TABLE {name}"))
    session.commit()
    return outcome


def forget_default_keys() -> int:
    """Remove the keys in the default partition of ``packet_keys`` whose packets are no longer
    stored (keys of days long past: a packet resent after the retention period), with the
    Idempotency-Keys pointing to them; returns how many. The partition is a safety net and
    holds few rows, so they go by rows, in one statement."""
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        session.execute(text(f"LOCK TABLE {partitions.KEYS_DEFAULT} IN SHARE ROW EXCLUSIVE MODE"))
        live, params = live_condition(session)
        gone = session.execute(
            text(
                f"WITH gone AS (DELETE FROM {partitions.KEYS_DEFAULT} WHERE NOT ({live}) "
                f"RETURNING dedup_key, client_day), forgotten AS (DELETE FROM {IK.name} i "
                "USING gone WHERE i.dedup_key = gone.dedup_key AND i.client_day = gone.client_day) "
                "SELECT count(*) FROM gone"
            ),
            params,
        ).scalar_one()
        session.commit()
        return gone
    except Exception as exc:
        session.rollback()
        if not sql.lock_not_granted(exc):
            raise
        return 0


def drop_day(
    part: partitions.Partition, horizon: int, include_dead: bool, dry_run: bool
) -> DayOutcome:
    """Record, count out and detach one day partition in one transaction, unless it must be
    kept (the outcome says why)."""
    name = part.name
    window = "received_at < :end" + (" AND received_at >= :start" if part.start else "")
    bounds = {"end": partitions.naive(part.end)}
    if part.start is not None:
        bounds["start"] = partitions.naive(part.start)
    session = db.session
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        # Nobody changes the day's rows from here on (nobody should: they are old).
        session.execute(text(f"LOCK TABLE {name} IN SHARE MODE"))
        processed = partitions.processed_name(name)
        processed_attached = session.execute(text(ATTACHED_SQL), {"name": processed}).scalar()
        if processed_attached:
            session.execute(text(f"LOCK TABLE {processed} IN SHARE MODE"))
        highest = session.execute(text(f"SELECT coalesce(max(seq), 0) FROM {name}")).scalar()
        outcome = DayOutcome(name, 0)
        # Unfinished and dead packets are in the hot partition of deliveries (the state
        # prunes the statement to it), whatever the day's size.
        held = session.execute(
            text(
                "SELECT packet_id, delivery_state FROM deliveries "
                f"WHERE delivery_state IN ('pending', 'leased', 'dead') AND {window} FOR UPDATE"
            ),
            bounds,
        ).all()
        dead = [pid for pid, state in held if state == DeliveryState.DEAD]
        outcome.dead, outcome.unfinished = len(dead), len(held) - len(dead)
        if highest > horizon:
            outcome.kept = "holds packets not sealed yet"
        elif outcome.unfinished or (dead and not include_dead):
            outcome.kept = (
                f"holds {outcome.unfinished} unfinished and {outcome.dead} dead packets "
                "(kept whole until they are processed"
                + (")" if include_dead else ", or purged with --include-dead)")
            )
        runs = None
        if not outcome.kept:
            runs = one_run(session, name)
            if runs is None:
                runs = day_runs(session, name)
        ranges = []
        if runs:
            sealed = sealed_intervals(session, runs[0][0], runs[-1][1])
            ranges = purged_ranges(runs, sealed)
        if runs is None or ranges is None:
            count = session.execute(text(f"SELECT count(*) FROM {name}")).scalar()
        else:
            count = sum(size for _, _, size in runs)
        outcome.packets = count
        if not outcome.kept and (runs is None or ranges is None):
            outcome.kept = "its rows do not match the audit log's leaves (run flask bucket verify)"
        ranges = ranges or []
        outcome.ranges = len(ranges)
        if outcome.kept or dry_run:
            session.rollback()
            return outcome
        if dead:  # the state prunes the statement to the hot partition
            session.execute(
                delete(D).where(D.c.delivery_state == DeliveryState.DEAD, D.c.packet_id.in_(dead))
            )
        # Processed deliveries of the day that sat in the default partition (their day had no
        # partition when they were acknowledged): few, and normally none.
        session.execute(text(f"DELETE FROM {partitions.PROCESSED_DEFAULT} WHERE {window}"), bounds)
        session.execute(text(f"ALTER TABLE packets DETACH PARTITION {name}"))
        if processed_attached:
            session.execute(
                text(f"ALTER TABLE {partitions.PROCESSED} DETACH PARTITION {processed}")
            )
        now = utc_now()
        if ranges:
            session.execute(
                insert(AuditPurgedRange.__table__),
                [
                    {
                        "first_seq": first,
                        "last_seq": last,
                        "packet_count": size,
                        "partition": name,
                        "purged_at": now,
                    }
                    for first, last, size in ranges
                ],
            )
        counters.bump(counters.STORED, -count)
        counters.bump(counters.DEAD, -len(dead))
        counters.bump(counters.PROCESSED, -(count - len(dead)))
        session.commit()
        return outcome
    except Exception as exc:
        session.rollback()
        if not sql.lock_not_granted(exc):
            raise
        return DayOutcome(name, 0, kept=f"busy: a lock was not granted within {LOCK_TIMEOUT}")


def clear_detached(on, name: str) -> None:
    """Drop a detached day's table and its processed deliveries' (detached with it, or still
    attached when a purge of the version before migration 0014 stopped here: every row in it
    is of that day) on connection ``on`` (``DetachedDrops``' own) and commit. Its keys stay in
    their own days (``packet_keys``, migration 0015), which go once none of their packets is
    stored."""
    processed = partitions.processed_name(name)
    attached = on.execute(text(ATTACHED_SQL), {"name": processed}).scalar()
    if attached:
        on.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        on.execute(text(f"ALTER TABLE {partitions.PROCESSED} DETACH PARTITION {processed}"))
    if attached is not None:
        on.execute(text(f"DROP TABLE {processed}"))
    on.execute(text(f"DROP TABLE {name}"))
    on.commit()


class DetachedDrops:
    """Drops detached tables in order on a thread and a connection of its own, so that
    deleting one day's files overlaps the purge's work on the next day and on the days of
    keys. Leaving the block waits for every drop; ``failures`` names the tables whose DROP
    failed and why (they stay detached, out of every read, and the next purge drops them as
    ``leftovers``)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []
        self.failures: list[tuple[str, str]] = []

    def add(self, name: str, alone: bool = False) -> None:
        """Drop ``name``: a detached day of packets with its processed deliveries
        (``clear_detached``), or, ``alone``, one table."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="purge-drop")
        self._pending.append((name, self._pool.submit(self._drop, name, alone)))

    def _drop(self, name: str, alone: bool) -> None:
        with self._engine.connect() as connection:
            if alone:  # gone already when it was a leftover day's, dropped just before
                connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
                connection.commit()
            else:
                clear_detached(connection, name)

    def __enter__(self) -> DetachedDrops:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)
        for name, future in self._pending:
            failure = future.exception()
            if failure is not None:
                reason = str(getattr(failure, "orig", None) or failure).strip().splitlines()[0]
                log.error("retention could not drop %s, left detached: %s", name, reason)
                self.failures.append((name, reason))
