"""Queue and storage figures for status, polls, metrics and the CLI, in one bounded statement.

No figure walks the backlog or the table. Totals come from counters kept exact by the
transactions that change them (``services/counters``); the only rows read are the leased ones
and those waiting out a back-off (both bounded by consumers and failures, not by the backlog,
and capped at ``COUNT_CAP``), the first ``HEAD_ROWS`` rows of the queue, and packets stored
since the bookkeeper last booked (a few seconds' worth). So:

- ``queue_size`` = unfinished − leased − retrying + expired leases (suspects). It is exact
  (``queue_size_exact``) unless more than ``COUNT_CAP`` packets are leased or retrying; then
  the ones beyond the cap are counted as ready, so it is too high by at most the leased and
  retrying packets beyond the cap.
- ``oldest_pending_age_seconds`` is the oldest ``received_at`` among leased, retrying and the
  first ``HEAD_ROWS`` ready packets. It is exact (``oldest_pending_age_exact``) while at most
  ``HEAD_ROWS`` packets are ready; beyond, a packet that failed and came back behind newer ones
  may be older than the figure. In a backlog that drains in order it is still the true age.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from flask import current_app

from bucket.extensions import queue
from bucket.services import activity, partitions, sql
from bucket.timeutil import epoch_now, utc_now

COUNT_CAP = 10_000
HEAD_ROWS = 100

# Portable SQL (PostgreSQL and SQLite): every figure from one snapshot, so an ack committed
# between two reads can never be counted both as unfinished and as processed. The queue size's
# parts are shared with the claim's first statement (services/delivery/claims.py), which
# answers a poll's ``queue_size`` in the same round trip.
QUEUE_CTES = """
c AS (
  SELECT
    coalesce(sum(CASE WHEN name = 'stored' THEN value END), 0) AS stored,
    coalesce(sum(CASE WHEN name = 'processed' THEN value END), 0) AS processed,
    coalesce(sum(CASE WHEN name = 'dead' THEN value END), 0) AS dead,
    coalesce(max(CASE WHEN name = 'booked' THEN value END), 0) AS booked
  FROM packet_counters
), leased AS (
  SELECT visible_at, delivery_count, received_at FROM deliveries
  WHERE delivery_state = 'leased' LIMIT %(cap)s
), retrying AS (
  SELECT received_at FROM deliveries
  WHERE delivery_state = 'pending' AND visible_at > %(now)s LIMIT %(cap)s
)"""
QUEUE_COLUMNS = """c.stored, c.processed, c.dead,
  (SELECT count(*) FROM packets WHERE seq > c.booked),
  (SELECT count(*) FROM leased),
  (SELECT count(*) FROM leased WHERE visible_at <= %(now)s AND delivery_count < %(max)s),
  (SELECT count(*) FROM retrying)"""
STATUS_SQL = f"""
WITH {QUEUE_CTES}, head AS (
  SELECT received_at FROM deliveries
  WHERE delivery_state = 'pending' AND visible_at <= %(now)s ORDER BY visible_at LIMIT %(head)s
), q AS (
  SELECT
    coalesce(sum(CASE WHEN name = 'quarantine_rows' THEN value END), 0) AS quarantined,
    coalesce(sum(CASE WHEN name = 'quarantine_bytes' THEN value END), 0) AS bytes,
    coalesce(sum(CASE WHEN name = 'quarantine_evicted' THEN value END), 0) AS evicted,
    coalesce(sum(CASE WHEN name = 'quarantine_expired' THEN value END), 0) AS expired
  FROM packet_counters
)
SELECT {QUEUE_COLUMNS},
  (SELECT count(*) FROM head),
  (SELECT min(received_at) FROM leased),
  (SELECT min(received_at) FROM retrying),
  (SELECT min(received_at) FROM head),
  q.quarantined, q.bytes, q.evicted, q.expired
FROM c, q
"""


@dataclass
class QueueStats:
    """Every figure the status endpoint reports."""

    queue_size: int
    queue_size_exact: bool
    redis_connected: bool
    queue_backend: str
    total_packets: int
    processed_packets: int
    pending_packets: int
    leased_packets: int
    retrying_packets: int
    dead_packets: int
    oldest_pending_age_seconds: float | None
    oldest_pending_age_exact: bool
    quarantined_packets: int
    quarantine_bytes: int
    quarantine_evicted: int
    quarantine_expired: int
    default_partition_packets: int | None
    default_partition_deliveries: int | None
    default_partition_keys: int | None
    partition_days_ahead: int | None
    consumer_auth: bool
    ingest_auth: str
    auth_refused: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueueFigures:
    """The counts behind status and a poll's ``queue_size``."""

    total: int
    processed: int
    dead: int
    unfinished: int
    leased: int
    retrying: int
    queue_size: int
    exact: bool
    oldest: datetime | None
    oldest_exact: bool
    quarantine: tuple[int, int, int, int] = (0, 0, 0, 0)


def as_utc(value: datetime | str | None) -> datetime | None:
    """A timestamp from either backend (SQLite hands back text) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def queue_params(now: float) -> dict:
    """The parameters of ``QUEUE_CTES`` and ``QUEUE_COLUMNS``."""
    return {"now": now, "cap": COUNT_CAP, "max": current_app.config["BUCKET_MAX_ATTEMPTS"]}


def figures_from(columns, head: int = 0, oldest=()) -> QueueFigures:
    """QueueFigures from the values of ``QUEUE_COLUMNS`` (and, for status, the head's)."""
    stored, processed, dead, unbooked, leased, suspects, retrying = columns
    stored, processed, dead = int(stored), int(processed), int(dead)  # NUMERIC sums on PG
    total = stored + unbooked
    unfinished = max(0, total - processed - dead)
    exact = leased < COUNT_CAP and retrying < COUNT_CAP
    ready = max(0, unfinished - leased - retrying) + suspects
    moments = [moment for moment in map(as_utc, oldest) if moment is not None]
    return QueueFigures(
        total=total,
        processed=processed,
        dead=dead,
        unfinished=unfinished,
        leased=leased,
        retrying=retrying,
        queue_size=ready,
        exact=exact,
        oldest=min(moments) if moments and unfinished else None,
        oldest_exact=exact and head < HEAD_ROWS,
    )


def queue_figures() -> QueueFigures:
    """Read the figures in one statement (and commit, so no transaction is left open)."""
    params = {**queue_params(epoch_now()), "head": HEAD_ROWS}
    ((*row,),) = sql.run(STATUS_SQL, params)
    sql.finish()
    columns, (head, *oldest), held = row[:7], row[7:11], row[11:]
    figures = figures_from(columns, head, oldest)
    # Rows, bytes, evicted, expired: counters of services/quarantine.
    figures.quarantine = tuple(int(value) for value in held)
    return figures


def collect_stats() -> QueueStats:
    """Every status figure."""
    figures = queue_figures()
    oldest_age = (utc_now() - figures.oldest).total_seconds() if figures.oldest else None
    held_packets, held_deliveries, held_keys = partitions.defaults_held()
    return QueueStats(
        queue_size=figures.queue_size,
        queue_size_exact=figures.exact,
        redis_connected=queue.redis_connected(),
        queue_backend=queue.backend_name,
        total_packets=figures.total,
        processed_packets=figures.processed,
        pending_packets=figures.unfinished,
        leased_packets=figures.leased,
        retrying_packets=figures.retrying,
        dead_packets=figures.dead,
        oldest_pending_age_seconds=oldest_age,
        oldest_pending_age_exact=figures.oldest_exact,
        quarantined_packets=figures.quarantine[0],
        quarantine_bytes=figures.quarantine[1],
        quarantine_evicted=figures.quarantine[2],
        quarantine_expired=figures.quarantine[3],
        default_partition_packets=held_packets,
        default_partition_deliveries=held_deliveries,
        default_partition_keys=held_keys,
        partition_days_ahead=partitions.days_ahead(),
        consumer_auth=bool(current_app.config.get("BUCKET_CONSUMER_TOKEN")),
        ingest_auth=current_app.config.get("BUCKET_INGEST_AUTH") or "off",
        auth_refused=activity.refusals(),
    )
