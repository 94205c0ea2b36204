"""Acknowledgements: a consumer's outcome for its packets, retries with back-off, dead letters.

``success`` ends a packet's life in the queue. A failure returns it after an exponential,
jittered back-off, or dead-letters it on its last allowed delivery. A result naming a receipt
other than the packet's current lease is stale and changes nothing (409); one without a receipt
(the unchanged Karma Tracker poller) is accepted whoever holds the lease. All results of one
request are recorded by one statement, with the processed and dead counters, and committed.
With ``BUCKET_ACK_COALESCE`` concurrent requests of a worker that name different packets share
that statement and commit (bucket/services/coalescing.py); each gets its own outcomes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Float, String, and_, case, column, func, or_, select, text, update
from sqlalchemy.sql import Subquery

from bucket.extensions import db, queue
from bucket.models import DeliveryState, is_packet_id
from bucket.services import activity, counters, sql
from bucket.services.activity import PG_PROCESSED
from bucket.services.coalescing import ACK_EXTENSION_KEY, Submission, coalescer
from bucket.services.counters import PG_BUMP
from bucket.services.delivery.actions import PG_MARKED
from bucket.services.delivery.settings import D, DeliverySettings
from bucket.services.dialect import dialect_name, holds_sqlite_turn
from bucket.timeutil import epoch_now, from_epoch

FAILURE_MESSAGE = "consumer reported failure"
# The message of a successful single acknowledgement, by outcome ("Packet marked as processed"
# is the original's).
ACK_MESSAGES = {
    "processed": "Packet marked as processed",
    "already_processed": "Packet was already processed; its stored outcome is unchanged",
    "retry_scheduled": "Failure recorded; the packet is served again after a back-off",
    "dead": "Failure recorded on the last allowed delivery; the packet is dead-lettered",
}

# PostgreSQL, one statement. The rows are locked in packet_id order first, so concurrent acks
# of overlapping batches queue behind each other instead of deadlocking. Whether a result may
# change its packet is judged on what the lock read (the row as last committed, which nobody
# can change until this statement commits), and the UPDATE reaches packets only through the
# locked primary keys: a condition on the state would let the planner walk every unfinished
# delivery on stale statistics (measured: 6,800 pages for one ack with 30,000 waiting). Refused
# results are answered from the lock's read too, not from the statement's older snapshot
# (which would call an ack that lost a race "stale").
#
# Deliveries are partitioned by state on PostgreSQL (migration 0014): the lock and the UPDATE
# exclude 'processed' (``<>``, which prunes to the hot partition without matching the queue
# index, so the planner keeps to the primary key), and a success moves its row into
# its day's partition of processed deliveries. The packets not found hot (already processed,
# or unknown) are looked up there, by packet_id in each day's index; an ack naming only hot
# packets passes an empty array there, which no index descends. An ack racing another for
# the same packet can find its row moved away under its lock: PostgreSQL then refuses the
# statement (40001), and ``sql.run`` runs it again, when it finds the packet processed.
# A success writes no processed_at (migration 0021): its time is visible_at, set to the same
# instant, which readers convert back; and its karma actions with the packet's own id marked
# (services/delivery/actions), which the listing puts back.
# The ids arrive as text and are cast to uuid (migration 0016) on the parameter's side, never
# the column's, so each lookup stays an index probe; an id that is no UUID never gets here
# (``write_acks``: it names no packet).
_ATTEMPTS = (
    "CASE WHEN p.delivery_state = 'leased' THEN p.delivery_count ELSE p.delivery_count + 1 END"
)
_EXHAUSTED = f"({_ATTEMPTS}) >= %(max)s"
_MARKED_ACTIONS = PG_MARKED.format(actions="r.karma_actions", packet_id="r.packet_id")
PG_ACK = f"""
WITH r AS (
  SELECT * FROM json_to_recordset(%(doc)s::json) AS r(packet_id uuid, success boolean,
    receipt text, jitter float8, error_message text, karma_actions json)
), locked AS (
  SELECT packet_id, delivery_state, delivery_count, visible_at, lease_id FROM deliveries
  WHERE packet_id = ANY(%(ids)s::uuid[]) AND delivery_state <> 'processed'
  ORDER BY packet_id FOR UPDATE
), finished AS (
  SELECT packet_id, delivery_state, delivery_count, visible_at FROM deliveries
  WHERE delivery_state = 'processed' AND packet_id = ANY(ARRAY(
    SELECT unnest(%(ids)s::uuid[]) EXCEPT SELECT packet_id FROM locked))
), accepted AS (
  SELECT r.* FROM r JOIN locked USING (packet_id)
  WHERE locked.delivery_state IN ('pending', 'leased')
    AND (r.receipt IS NULL OR locked.lease_id = r.receipt)
), u AS (
  UPDATE deliveries p SET
    delivery_state = CASE WHEN r.success THEN 'processed'
                          WHEN {_EXHAUSTED} THEN 'dead' ELSE 'pending' END,
    delivery_count = {_ATTEMPTS},
    visible_at = CASE WHEN r.success OR {_EXHAUSTED} THEN %(now)s
                      ELSE %(now)s + r.jitter * least(%(backoff_max)s,
                           %(backoff)s * power(2, ({_ATTEMPTS}) - 1)) END,
    lease_id = NULL,
    last_error = CASE WHEN r.success THEN p.last_error
                      ELSE coalesce(r.error_message, %(failure)s) END,
    processed_at = NULL,
    processed_by_karma = r.success,
    karma_actions = CASE WHEN r.success THEN {_MARKED_ACTIONS} END,
    dead_at = CASE WHEN NOT r.success AND {_EXHAUSTED} THEN %(now_ts)s::timestamp END
  FROM accepted r
  WHERE p.packet_id = r.packet_id AND p.delivery_state <> 'processed'
  RETURNING p.packet_id, p.delivery_state, p.delivery_count, p.visible_at
), minutes AS ({
    PG_PROCESSED.format(source="SELECT count(*) FROM u WHERE delivery_state = 'processed'")
}), counted AS ({
    PG_BUMP.format(
        source="SELECT 'processed', count(*) FILTER (WHERE delivery_state = 'processed') FROM u "
        "UNION ALL SELECT 'dead', count(*) FILTER (WHERE delivery_state = 'dead') FROM u"
    )
})
SELECT packet_id, delivery_state, delivery_count, visible_at, true FROM u
UNION ALL
SELECT packet_id, delivery_state, delivery_count, visible_at, false FROM locked
WHERE packet_id NOT IN (SELECT packet_id FROM u)
UNION ALL
SELECT packet_id, delivery_state, delivery_count, visible_at, false FROM finished
"""


@dataclass
class AckOutcome:
    """What became of one acknowledgement (or lease change)."""

    packet_id: str
    code: int
    status: str
    delivery_count: int | None = None
    next_attempt_at: float | None = None
    message: str | None = None

    def as_dict(self) -> dict:
        body: dict[str, Any] = {
            "packet_id": self.packet_id,
            "status": self.status,
            "code": self.code,
        }
        if self.delivery_count is not None:
            body["delivery_count"] = self.delivery_count
        if self.next_attempt_at is not None:
            body["next_attempt_at"] = from_epoch(self.next_attempt_at).isoformat()
        if self.message:
            body["message"] = self.message
        return body

    def as_acknowledgement(self) -> dict:
        """A successful single acknowledgement in the original bucket's shape (``status: ok``,
        a message, the packet id), which deployed clients check; this service's outcome
        travels in ``outcome``."""
        body = self.as_dict()
        body["outcome"] = body.pop("status")
        body["message"] = ACK_MESSAGES.get(self.status, self.message or "Acknowledged")
        return {"status": "ok", **body}


def acknowledge(results: list[dict]) -> list[AckOutcome]:
    """Record consumer outcomes and commit; one outcome per result, in order.

    A packet named twice in one request is recorded once, by its first result.
    """
    keys = frozenset(item["packet_id"] for item in results)
    submission = Submission(results, keys=keys)
    shared = coalescer(ACK_EXTENSION_KEY)
    if shared is not None and len(results) <= shared.max_items and not holds_sqlite_turn():
        return shared.submit(submission)
    return write_acks([submission])[0]


def write_acks(submissions: list[Submission]) -> list[list[AckOutcome]]:
    """Record several requests' results in one statement and commit; each request's outcomes.

    The requests name different packets (the coalescer keeps a request that names a packet of
    another one for the next write), so the result is theirs one after another.
    """
    settings = DeliverySettings.from_app()
    unique: dict[str, dict] = {}
    for submission in submissions:
        for item in submission.items:
            if item["packet_id"] not in unique:
                unique[item["packet_id"]] = ack_item(item)
    record = _record_postgres if dialect_name() == "postgresql" else _record_sqlite
    # An id not in the form the service hands out names no stored packet: not found, unasked.
    known = [item for item in unique.values() if is_packet_id(item["packet_id"])]
    updated, current = record(known, settings) if known else ({}, {})
    if any(row[1] == DeliveryState.PENDING for row in updated.values()):
        queue.publish_ready()
    by_id: dict[str, AckOutcome] = {}
    for pid in unique:
        if pid in updated:
            by_id[pid] = updated_outcome(*updated[pid])
        else:
            by_id[pid] = refused_outcome(pid, current.get(pid))
    return [[by_id[item["packet_id"]] for item in submission.items] for submission in submissions]


def ack_item(result: dict) -> dict:
    """One consumer result as the acknowledgement statements read it, with its back-off jitter."""
    return {
        "packet_id": result["packet_id"],
        "success": bool(result["success"]),
        "receipt": result.get("receipt"),
        "jitter": random.uniform(0.5, 1.0),
        "error_message": result.get("error_message"),
        "karma_actions": result.get("karma_actions") if result["success"] else None,
    }


def ack_params(items: list[dict], settings: DeliverySettings, now: float) -> dict:
    """The parameters of ``PG_ACK`` for these items at ``now`` (epoch seconds)."""
    return {
        "doc": orjson.dumps(items).decode(),
        "ids": [item["packet_id"] for item in items],
        "now": now,
        "now_ts": from_epoch(now).replace(tzinfo=None),
        "max": settings.max_attempts,
        "backoff": settings.retry_backoff,
        "backoff_max": settings.retry_backoff_max,
        "failure": FAILURE_MESSAGE,
        "shard": counters.random_shard(),
        "minute": int(now // 60),
    }


Rows = dict[str, tuple]


def _record_postgres(items: list[dict], settings: DeliverySettings) -> tuple[Rows, Rows]:
    # Each refusal (40001) means a concurrent ack moved one of these rows to the processed
    # partition, where it stays: one more run per row named, besides the usual bound.
    retries = sql.MOVED_ROW_RETRIES + len(items)
    rows = sql.run(PG_ACK, ack_params(items, settings, epoch_now()), retries)
    updated = {row[0]: row[:4] for row in rows if row[4]}
    current = {row[0]: row[:4] for row in rows if not row[4]}
    return updated, current


def _results_table(items: list[dict]) -> Subquery:
    """SQLite: the acknowledgements as a derived table, passed as one JSON parameter."""
    names = ("packet_id", "success", "receipt", "jitter", "error_message", "karma_actions")
    statement = (
        "SELECT "
        + ", ".join(f"json_extract(value, '$.{name}') AS {name}" for name in names)
        + " FROM json_each(:doc)"
    )
    typed = [
        column("packet_id", String),
        column("success"),
        column("receipt", String),
        column("jitter", Float),
        column("error_message", String),
        column("karma_actions"),
    ]
    return text(statement).bindparams(doc=json.dumps(items)).columns(*typed).subquery("r")


def _record_sqlite(items: list[dict], settings: DeliverySettings) -> tuple[Rows, Rows]:
    """SQLite: the same transition as one UPDATE … FROM, counters after it, one transaction
    (rolled back on failure, so a coalescer's retry of each request alone starts clean)."""
    try:
        return _record_sqlite_once(items, settings)
    except Exception:
        db.session.rollback()
        raise


def _record_sqlite_once(items: list[dict], settings: DeliverySettings) -> tuple[Rows, Rows]:
    now = epoch_now()
    now_dt = from_epoch(now)
    r = _results_table(items)
    leased = D.c.delivery_state == DeliveryState.LEASED
    attempts = case((leased, D.c.delivery_count), else_=D.c.delivery_count + 1)
    exhausted = attempts >= settings.max_attempts
    backoff = case(
        *[(attempts == k, settings.backoff_for(k)) for k in range(1, settings.max_attempts + 1)],
        else_=settings.retry_backoff_max,
    )
    success = r.c.success == True  # noqa: E712 - SQL comparison, works on 1/0 and booleans
    statement = (
        update(D)
        .where(
            D.c.packet_id == r.c.packet_id,
            D.c.delivery_state.in_(DeliveryState.UNFINISHED),
            or_(r.c.receipt.is_(None), D.c.lease_id == r.c.receipt),
        )
        .values(
            delivery_state=case(
                (success, DeliveryState.PROCESSED),
                (exhausted, DeliveryState.DEAD),
                else_=DeliveryState.PENDING,
            ),
            delivery_count=attempts,
            visible_at=case((success, now), (exhausted, now), else_=now + r.c.jitter * backoff),
            lease_id=None,
            last_error=case(
                (success, D.c.last_error),
                else_=func.coalesce(r.c.error_message, FAILURE_MESSAGE),
            ),
            processed_at=case((success, now_dt), else_=None),
            processed_by_karma=success,
            karma_actions=case((success, r.c.karma_actions), else_=None),
            dead_at=case((and_(~success, exhausted), now_dt), else_=None),
        )
        .returning(D.c.packet_id, D.c.delivery_state, D.c.delivery_count, D.c.visible_at)
    )
    updated = {row.packet_id: tuple(row) for row in db.session.execute(statement)}
    others = [item["packet_id"] for item in items if item["packet_id"] not in updated]
    current = {}
    if others:
        current = {
            row.packet_id: tuple(row)
            for row in db.session.execute(
                select(D.c.packet_id, D.c.delivery_state, D.c.delivery_count, D.c.visible_at).where(
                    D.c.packet_id.in_(others)
                )
            )
        }
    # Only unfinished rows were updated, so every processed or dead row returned just got there.
    states = [row[1] for row in updated.values()]
    activity.processed(states.count(DeliveryState.PROCESSED), now)
    counters.bump(counters.PROCESSED, states.count(DeliveryState.PROCESSED))
    counters.bump(counters.DEAD, states.count(DeliveryState.DEAD))
    db.session.commit()
    return updated, current


def updated_outcome(packet_id: str, state: str, count: int, visible_at: float) -> AckOutcome:
    """The outcome of a result that changed its packet."""
    if state == DeliveryState.PROCESSED:
        return AckOutcome(packet_id, 200, "processed", count)
    if state == DeliveryState.DEAD:
        return AckOutcome(
            packet_id,
            200,
            "dead",
            count,
            message="failed on its last allowed delivery: dead-lettered",
        )
    return AckOutcome(packet_id, 200, "retry_scheduled", count, visible_at)


def refused_outcome(packet_id: str, row: tuple | None) -> AckOutcome:
    """The outcome of a result that changed nothing: unknown, finished, dead or stale."""
    if row is None:
        return AckOutcome(packet_id, 404, "not_found", message=f"Unknown packet_id {packet_id}.")
    state, count = row[1], row[2]
    if state == DeliveryState.PROCESSED:
        return AckOutcome(packet_id, 200, "already_processed", count)
    if state == DeliveryState.DEAD:
        return AckOutcome(
            packet_id,
            409,
            "dead",
            count,
            message="The packet is dead-lettered; requeue it before acknowledging.",
        )
    return AckOutcome(
        packet_id,
        409,
        "stale_receipt",
        count,
        message="The receipt is not the packet's current lease: it was redelivered.",
    )
