"""Claims: leasing the oldest visible packets to one consumer, and long polls that wait for them.

A claim first dead-letters exhausted expired leases, then looks at the two heads of the queue
(the oldest visible pending packet and the oldest expired lease, a *suspect*), then leases from
the head that came first: up to ``limit`` healthy packets, or one suspect alone, so a packet
that crashes its consumer cannot drag its batch-mates down with it. The database decides who
holds a packet: the lease locks its rows with SKIP LOCKED on PostgreSQL, and SQLite serialises
writers with BEGIN IMMEDIATE.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update

from bucket.extensions import db, queue
from bucket.models import DeliveryState
from bucket.services import codes, counters, signals, sql
from bucket.services.counters import PG_BUMP
from bucket.services.delivery.reaping import reap_exhausted
from bucket.services.delivery.settings import (
    CONTENT_COLUMNS,
    DELIVERY_COLUMN_NAMES,
    DELIVERY_COLUMNS,
    EXHAUSTED_LEASE_ERROR,
    PACKET_COLUMN_NAMES,
    D,
    DeliverySettings,
    T,
    visible,
)
from bucket.services.dialect import dialect_name
from bucket.services.stats import (
    QUEUE_COLUMNS,
    QUEUE_CTES,
    QueueFigures,
    figures_from,
    queue_figures,
    queue_params,
)
from bucket.timeutil import epoch_now, from_epoch

# Heads a claim may find taken by concurrent claims before it answers "nothing visible".
CLAIM_ROUNDS = 3

# PostgreSQL, one statement: reap exhausted expired leases (counting them as dead), read both
# heads and the queue size (so a poll answers ``queue_size`` without another round trip). All
# is read from the statement's snapshot, where a packet being reaped is still an exhausted
# lease: the suspect head skips it, and it counts as neither ready nor gone.
PG_HEADS = f"""
WITH reaped AS (
  UPDATE deliveries SET delivery_state = 'dead', visible_at = %(now)s, lease_id = NULL,
    dead_at = %(now_ts)s, last_error = %(exhausted_error)s
  WHERE delivery_state <> 'processed' AND packet_id = ANY(ARRAY(
    SELECT packet_id FROM deliveries
    WHERE delivery_state = 'leased' AND visible_at <= %(now)s AND delivery_count >= %(max)s
    FOR UPDATE SKIP LOCKED))
  RETURNING packet_id
), counted AS ({PG_BUMP.format(source="SELECT 'dead', count(*) FROM reaped")}),
{QUEUE_CTES}
SELECT
  (SELECT visible_at FROM deliveries
   WHERE delivery_state = 'pending' AND visible_at <= %(now)s
   ORDER BY visible_at LIMIT 1),
  (SELECT visible_at FROM deliveries
   WHERE delivery_state = 'leased' AND visible_at <= %(now)s AND delivery_count < %(max)s
   ORDER BY visible_at LIMIT 1),
  {QUEUE_COLUMNS}
FROM c
"""


def content_sql(name: str) -> str:
    """A packet column as the lease reads it: raw_signals and the coded strings in whichever
    form they were stored (services/signals, services/codes)."""
    if name == "raw_signals":
        return f"{signals.JSON_SQL.format(p='p', s='signal_set')} AS raw_signals"
    field = codes.field_name(name)
    if field in codes.DECODED:
        return f"{codes.decoded_sql(field, 'p')} AS {field}"
    return f"p.{name}"


# Lease the oldest visible deliveries of one head that nobody else has locked, and read their
# packets. ``visible_at`` alone orders them: the (delivery_state, visible_at) index yields that
# order, so the scan stops after ``limit`` rows however long the backlog. The chosen keys go
# to the UPDATE as an array (``= ANY(ARRAY(…))``), which leaves the planner no join to get
# wrong: as ``IN (subquery)`` it hashed every delivery once it could not see the LIMIT. The
# packet is found by its whole primary key, (packet_id, received_at): packets are partitioned
# by day on received_at (services/partitions), so each lookup probes one day's index, not all;
# a compact packet's key set by its own (services/signals).
# Every reference to deliveries names its states literally, so the plan holds only the hot
# partition (migration 0014: processed deliveries live in partitions of their own). The
# UPDATEs say so with ``<> 'processed'``, which prunes but matches no index: as ``IN`` it led
# the planner, on stale statistics, to walk the queue index filtering on packet_id.
PG_LEASE = f"""
WITH leased AS (
  UPDATE deliveries SET delivery_state = 'leased', lease_id = %(receipt)s,
    visible_at = %(until)s, delivery_count = delivery_count + 1, last_delivered_at = %(now_ts)s
  WHERE delivery_state <> 'processed' AND packet_id = ANY(ARRAY(
    SELECT packet_id FROM deliveries
    WHERE delivery_state = %(source)s AND delivery_state IN ('pending', 'leased')
      AND visible_at <= %(now)s AND delivery_count < %(max)s
    ORDER BY visible_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED))
  RETURNING packet_id, received_at, {", ".join(DELIVERY_COLUMN_NAMES)}
)
SELECT {", ".join(content_sql(c.name) for c in CONTENT_COLUMNS)},
  {", ".join(f"leased.{name}" for name in DELIVERY_COLUMN_NAMES)}
FROM leased JOIN packets p ON p.packet_id = leased.packet_id AND p.received_at = leased.received_at
{signals.KEYS_JOIN.format(p="p", s="signal_set")}
"""


@dataclass
class Claim:
    """The packets one poll leased (as column → value mappings), whether they are suspects
    served apart, and (on PostgreSQL) the queue's figures as the claim found them."""

    rows: list[dict[str, Any]]
    receipt: str | None
    suspect: bool
    figures: QueueFigures | None = None

    def queue_size(self) -> tuple[int, bool]:
        """Packets still waiting after this claim, and whether that is exact."""
        if self.figures is None:  # SQLite: read now, after the claim committed
            figures = queue_figures()
            return figures.queue_size, figures.exact
        return max(0, self.figures.queue_size - len(self.rows)), self.figures.exact


def choose_head(healthy: float | None, suspect: float | None) -> str | None:
    """The state to lease from: suspects keep their FIFO turn, but only their turn."""
    if suspect is not None and (healthy is None or suspect <= healthy):
        return DeliveryState.LEASED
    if healthy is not None:
        return DeliveryState.PENDING
    return None


def claim(limit: int, visibility_timeout: int | None = None) -> Claim:
    """Lease up to ``limit`` visible packets to one consumer, committed before it returns.

    The head is looked up before its rows are locked, so a concurrent claim can take it first;
    then the next head is looked up (a fresh snapshot per statement on PostgreSQL) instead of
    answering "empty" while other packets are still visible.
    """
    settings = DeliverySettings.from_app()
    timeout = visibility_timeout or settings.visibility_timeout
    lease = _lease_postgres if dialect_name() == "postgresql" else _lease_sqlite
    for _ in range(CLAIM_ROUNDS):
        claimed = lease(limit, timeout, settings)
        if claimed.rows or claimed.receipt is None:
            break
    if not claimed.rows:
        return Claim([], None, False, claimed.figures)
    claimed.rows.sort(key=lambda row: row["packet_id"])
    return claimed


def lease_params(
    now: float, max_attempts: int, *, receipt: str, until: float, source: str, limit: int
) -> dict:
    """The parameters of ``PG_LEASE``: lease up to ``limit`` visible packets of ``source``."""
    return {
        "now": now,
        "now_ts": from_epoch(now),
        "max": max_attempts,
        "receipt": receipt,
        "until": until,
        "source": source,
        "limit": limit,
    }


def _lease_postgres(limit: int, timeout: int, settings: DeliverySettings) -> Claim:
    """One round on PostgreSQL: heads (with reaping), then the lease; two autocommit statements.
    No receipt when nothing is visible; no rows when the head was taken meanwhile."""
    now = epoch_now()
    params = {**queue_params(now), "now_ts": from_epoch(now)}
    ((healthy, suspect, *columns),) = sql.run(
        PG_HEADS,
        {**params, "exhausted_error": EXHAUSTED_LEASE_ERROR, "shard": counters.random_shard()},
    )
    figures = figures_from(columns)
    source = choose_head(healthy, suspect)
    if source is None:
        return Claim([], None, False, figures)
    receipt = secrets.token_hex(8)
    is_suspect = source == DeliveryState.LEASED
    rows = sql.run(
        PG_LEASE,
        lease_params(
            now,
            settings.max_attempts,
            receipt=receipt,
            until=now + timeout,
            source=source,
            limit=1 if is_suspect else limit,
        ),
    )
    return Claim(
        [dict(zip(PACKET_COLUMN_NAMES, row, strict=True)) for row in rows],
        receipt,
        is_suspect,
        figures,
    )


def _lease_sqlite(limit: int, timeout: int, settings: DeliverySettings) -> Claim:
    """One round on SQLite, in one BEGIN IMMEDIATE transaction: reap, heads, lease, commit."""
    now = epoch_now()
    reap_exhausted(now, settings)

    def head(state: str, *extra):
        return select(func.min(D.c.visible_at)).where(visible(state, now), *extra).scalar_subquery()

    healthy, suspect = db.session.execute(
        select(
            head(DeliveryState.PENDING),
            head(DeliveryState.LEASED, D.c.delivery_count < settings.max_attempts),
        )
    ).one()
    source = choose_head(healthy, suspect)
    if source is None:
        db.session.commit()
        return Claim([], None, False)
    is_suspect = source == DeliveryState.LEASED
    receipt = secrets.token_hex(8)
    candidates = (
        select(D.c.packet_id)
        .where(visible(source, now), D.c.delivery_count < settings.max_attempts)
        .order_by(D.c.visible_at)
        .limit(1 if is_suspect else limit)
        .scalar_subquery()
    )
    leased = {
        row.packet_id: row._mapping
        for row in db.session.execute(
            update(D)
            .where(D.c.packet_id.in_(candidates))
            .values(
                delivery_state=DeliveryState.LEASED,
                lease_id=receipt,
                visible_at=now + timeout,
                delivery_count=D.c.delivery_count + 1,
                last_delivered_at=from_epoch(now),
            )
            .returning(D.c.packet_id, *DELIVERY_COLUMNS)
        )
    }
    contents = db.session.execute(
        select(*(c.label(codes.field_name(c.name)) for c in CONTENT_COLUMNS)).where(
            T.c.packet_id.in_(list(leased))
        )
    ).all()
    db.session.commit()
    rows = [{**content._mapping, **leased[content.packet_id]} for content in contents]
    return Claim(rows, receipt, is_suspect)


def poll(limit: int, visibility_timeout: int | None, wait: float) -> Claim:
    """Claim packets, holding the request up to ``wait`` seconds while the queue is empty.

    No database connection is held while waiting: each claim commits, and the wait is on the
    queue service's wake-up signal, with a bounded re-check for packets announced nowhere
    (ended back-offs, expired leases, an instance that could not reach Redis).
    """
    settings = DeliverySettings.from_app()
    deadline = time.monotonic() + wait
    while True:
        generation = queue.wake_generation()
        result = claim(limit, visibility_timeout)
        remaining = deadline - time.monotonic()
        if result.rows or remaining <= 0:
            return result
        db.session.remove()
        queue.wait_for_ready(generation, min(settings.long_poll_interval, remaining))
