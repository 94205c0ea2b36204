"""Handing packets to consumers: leases, acknowledgements, retries and dead letters.

Every transition is one atomic statement on the packets table (rows locked with SKIP LOCKED on
PostgreSQL; SQLite serialises writers with BEGIN IMMEDIATE), so the database alone decides who
holds a packet. The queue service only wakes long polls.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import Float, String, and_, case, column, func, or_, select, text, update
from sqlalchemy.sql import Subquery

from bucket.extensions import db, queue
from bucket.models import DeliveryState, Packet
from bucket.services import counters
from bucket.services.dialect import dialect_name
from bucket.timeutil import epoch_now, from_epoch

T = Packet.__table__
PACKET_COLUMNS = [c for c in T.c if c.name not in ("dedup_key", "idempotency_key")]
EXHAUSTED_LEASE_ERROR = "lease expired without acknowledgement on the last allowed delivery"
RELEASED_LAST_ERROR = "lease released by its consumer on the last allowed delivery"
# Heads a claim may find taken by concurrent claims before it answers "nothing visible".
CLAIM_ROUNDS = 3


@dataclass
class DeliverySettings:
    """The delivery knobs read from config."""

    visibility_timeout: int
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    long_poll_interval: float

    @classmethod
    def from_app(cls) -> DeliverySettings:
        config = current_app.config
        return cls(
            visibility_timeout=config["BUCKET_VISIBILITY_TIMEOUT"],
            max_attempts=config["BUCKET_MAX_ATTEMPTS"],
            retry_backoff=config["BUCKET_RETRY_BACKOFF"],
            retry_backoff_max=config["BUCKET_RETRY_BACKOFF_MAX"],
            long_poll_interval=config["BUCKET_LONG_POLL_INTERVAL"],
        )

    def backoff_for(self, attempt: int) -> float:
        """Base delay after the ``attempt``-th failed delivery, before jitter."""
        return min(self.retry_backoff_max, self.retry_backoff * 2 ** (attempt - 1))


@dataclass
class Claim:
    """The packets one poll leased, and whether they are suspects served apart."""

    rows: list[Any]
    receipt: str | None
    suspect: bool


def _visible(state: str, now: float):
    return and_(T.c.delivery_state == state, T.c.visible_at <= now)


def ready_condition(now: float, max_attempts: int):
    """The one definition of "a poll could take it now" (claims, ``queue_size``, status)."""
    return and_(
        T.c.delivery_state.in_(DeliveryState.UNFINISHED),
        T.c.visible_at <= now,
        T.c.delivery_count < max_attempts,
    )


def reap_exhausted(
    now: float, settings: DeliverySettings, states: tuple[str, ...] = (DeliveryState.LEASED,)
) -> int:
    """Dead-letter packets whose last allowed lease expired: a poison packet cannot loop forever.

    Polls reap expired leases only (few rows, straight off the queue index); the operator's
    rebuild also reaps pending packets left over after ``BUCKET_MAX_ATTEMPTS`` was lowered.
    """
    victims = (
        select(T.c.packet_id)
        .where(
            T.c.delivery_state.in_(states),
            T.c.visible_at <= now,
            T.c.delivery_count >= settings.max_attempts,
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = db.session.execute(
        update(T)
        .where(T.c.packet_id.in_(victims))
        .values(
            delivery_state=DeliveryState.DEAD,
            visible_at=now,
            lease_id=None,
            dead_at=from_epoch(now),
            last_error=case(
                (T.c.delivery_state == DeliveryState.LEASED, EXHAUSTED_LEASE_ERROR),
                else_=T.c.last_error,
            ),
        )
    )
    return result.rowcount or 0


def next_source(now: float) -> str | None:
    """Which kind of packet is at the head of the queue: healthy (pending) or suspect (leased).

    Suspects are packets whose lease expired unacknowledged; they take their turn in arrival
    order but are served alone, so a poison packet cannot drag its batch-mates with it.
    """

    def head(state: str):
        return select(func.min(T.c.visible_at)).where(_visible(state, now)).scalar_subquery()

    heads = db.session.execute(
        select(head(DeliveryState.PENDING), head(DeliveryState.LEASED))
    ).one()
    healthy_head, suspect_head = heads
    if suspect_head is not None and (healthy_head is None or suspect_head <= healthy_head):
        return DeliveryState.LEASED
    if healthy_head is not None:
        return DeliveryState.PENDING
    return None


def claim(limit: int, visibility_timeout: int | None = None) -> Claim:
    """Lease up to ``limit`` visible packets to one consumer and commit.

    The head is looked up before its rows are locked, so a concurrent claim can take it first;
    then the next head is looked up (a fresh snapshot per statement on PostgreSQL) instead of
    answering "empty" while other packets are still visible.
    """
    settings = DeliverySettings.from_app()
    timeout = visibility_timeout or settings.visibility_timeout
    for _ in range(CLAIM_ROUNDS):
        now = epoch_now()
        reap_exhausted(now, settings)
        source = next_source(now)
        if source is None:
            break
        suspect = source == DeliveryState.LEASED
        receipt = secrets.token_hex(8)
        rows = _lease(source, 1 if suspect else limit, receipt, now, timeout, settings)
        if rows:
            db.session.commit()
            rows.sort(key=lambda row: row.packet_id)
            return Claim(rows, receipt, suspect)
    db.session.commit()
    return Claim([], None, False)


def _lease(
    source: str, limit: int, receipt: str, now: float, timeout: int, settings: DeliverySettings
) -> list[Any]:
    """One UPDATE leasing the oldest visible rows of ``source`` that nobody else has locked."""
    candidates = (
        select(T.c.packet_id)
        .where(_visible(source, now), T.c.delivery_count < settings.max_attempts)
        # visible_at alone: the (delivery_state, visible_at) index yields this order, so the
        # scan stops after ``limit`` rows however long the backlog (ties are few and harmless).
        .order_by(T.c.visible_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return db.session.execute(
        update(T)
        .where(T.c.packet_id.in_(candidates))
        .values(
            delivery_state=DeliveryState.LEASED,
            lease_id=receipt,
            visible_at=now + timeout,
            delivery_count=T.c.delivery_count + 1,
            last_delivered_at=from_epoch(now),
        )
        .returning(*PACKET_COLUMNS)
    ).all()


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


def ready_count(now: float | None = None) -> int:
    """Packets a poll could take right now."""
    now = epoch_now() if now is None else now
    settings = DeliverySettings.from_app()
    return db.session.execute(
        select(func.count()).select_from(T).where(ready_condition(now, settings.max_attempts))
    ).scalar_one()


@dataclass
class AckOutcome:
    """What became of one acknowledgement."""

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


def _results_table(results: list[dict]) -> Subquery:
    """The acknowledgements as a derived table, passed as one JSON parameter."""
    doc = json.dumps(results)
    names = ("packet_id", "success", "receipt", "jitter", "error_message", "karma_actions")
    if dialect_name() == "postgresql":
        sql = (
            "SELECT * FROM json_to_recordset(CAST(:doc AS json)) AS r(packet_id text, success "
            "boolean, receipt text, jitter float8, error_message text, karma_actions json)"
        )
    else:
        sql = (
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
    return text(sql).bindparams(doc=doc).columns(*typed).subquery("r")


def acknowledge(results: list[dict]) -> list[AckOutcome]:
    """Record consumer outcomes in one statement and commit; one outcome per result, in order.

    ``success`` ends the packet's life in the queue. A failure returns it after an exponential,
    jittered back-off, or dead-letters it on its last allowed delivery. A result naming a
    receipt other than the packet's current lease is stale and changes nothing (409); one
    without a receipt is accepted whoever holds the lease.
    """
    settings = DeliverySettings.from_app()
    now = epoch_now()
    now_dt = from_epoch(now)
    unique: dict[str, dict] = {}
    for item in results:
        unique.setdefault(
            item["packet_id"],
            {
                "packet_id": item["packet_id"],
                "success": bool(item["success"]),
                "receipt": item.get("receipt"),
                "jitter": random.uniform(0.5, 1.0),
                "error_message": item.get("error_message"),
                "karma_actions": item.get("karma_actions") if item["success"] else None,
            },
        )
    # In packet_id order, so concurrent acks of overlapping batches lock their rows in one
    # order and queue behind each other instead of deadlocking.
    r = _results_table(sorted(unique.values(), key=lambda item: item["packet_id"]))
    leased = T.c.delivery_state == DeliveryState.LEASED
    attempts = case((leased, T.c.delivery_count), else_=T.c.delivery_count + 1)
    exhausted = attempts >= settings.max_attempts
    backoff = case(
        *[(attempts == k, settings.backoff_for(k)) for k in range(1, settings.max_attempts + 1)],
        else_=settings.retry_backoff_max,
    )
    success = r.c.success == True  # noqa: E712 - SQL comparison, works on 1/0 and booleans
    statement = (
        update(T)
        .where(
            T.c.packet_id == r.c.packet_id,
            T.c.delivery_state.in_(DeliveryState.UNFINISHED),
            or_(r.c.receipt.is_(None), T.c.lease_id == r.c.receipt),
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
                (success, T.c.last_error),
                else_=func.coalesce(r.c.error_message, "consumer reported failure"),
            ),
            processed_at=case((success, now_dt), else_=None),
            processed_by_karma=success,
            karma_actions=case((success, r.c.karma_actions), else_=None),
            dead_at=case((and_(~success, exhausted), now_dt), else_=None),
        )
        .returning(T.c.packet_id, T.c.delivery_state, T.c.delivery_count, T.c.visible_at)
    )
    updated = {row.packet_id: row for row in db.session.execute(statement)}
    others = [pid for pid in unique if pid not in updated]
    current = {}
    if others:
        current = {
            row.packet_id: row
            for row in db.session.execute(
                select(T.c.packet_id, T.c.delivery_state, T.c.delivery_count).where(
                    T.c.packet_id.in_(others)
                )
            )
        }
    # Only unfinished rows were updated, so every processed row returned was just processed.
    states = [row.delivery_state for row in updated.values()]
    counters.bump(counters.PROCESSED, states.count(DeliveryState.PROCESSED))
    db.session.commit()
    if any(row.delivery_state == DeliveryState.PENDING for row in updated.values()):
        queue.publish_ready()

    by_id: dict[str, AckOutcome] = {}
    for pid in unique:
        if pid in updated:
            by_id[pid] = _updated_outcome(updated[pid])
        else:
            by_id[pid] = _refused_outcome(pid, current.get(pid))
    return [by_id[item["packet_id"]] for item in results]


def _updated_outcome(row: Any) -> AckOutcome:
    if row.delivery_state == DeliveryState.PROCESSED:
        return AckOutcome(row.packet_id, 200, "processed", row.delivery_count)
    if row.delivery_state == DeliveryState.DEAD:
        return AckOutcome(
            row.packet_id,
            200,
            "dead",
            row.delivery_count,
            message="failed on its last allowed delivery: dead-lettered",
        )
    return AckOutcome(row.packet_id, 200, "retry_scheduled", row.delivery_count, row.visible_at)


def _refused_outcome(packet_id: str, row: Any | None) -> AckOutcome:
    if row is None:
        return AckOutcome(packet_id, 404, "not_found", message=f"Unknown packet_id {packet_id}.")
    if row.delivery_state == DeliveryState.PROCESSED:
        return AckOutcome(packet_id, 200, "already_processed", row.delivery_count)
    if row.delivery_state == DeliveryState.DEAD:
        return AckOutcome(
            packet_id,
            409,
            "dead",
            row.delivery_count,
            message="The packet is dead-lettered; requeue it before acknowledging.",
        )
    return AckOutcome(
        packet_id,
        409,
        "stale_receipt",
        row.delivery_count,
        message="The receipt is not the packet's current lease: it was redelivered.",
    )


def change_visibility(packet_id: str, receipt: str, visibility_timeout: int) -> AckOutcome:
    """Extend a held lease, or release it at once with ``visibility_timeout`` 0."""
    settings = DeliverySettings.from_app()
    now = epoch_now()
    release = visibility_timeout == 0
    new_values = (
        release_values(now, settings) if release else {"visible_at": now + visibility_timeout}
    )
    row = db.session.execute(
        update(T)
        .where(
            T.c.packet_id == packet_id,
            T.c.delivery_state == DeliveryState.LEASED,
            T.c.lease_id == receipt,
            T.c.visible_at > now,
        )
        .values(**new_values)
        .returning(T.c.packet_id, T.c.delivery_state, T.c.delivery_count, T.c.visible_at)
    ).first()
    current = None
    if row is None:
        current = db.session.execute(
            select(T.c.packet_id, T.c.delivery_state, T.c.delivery_count).where(
                T.c.packet_id == packet_id
            )
        ).first()
    db.session.commit()
    if row is None:
        outcome = _refused_outcome(packet_id, current)
        if outcome.code == 200 or outcome.status == "stale_receipt":
            # Processed packets have no lease; an expired or replaced lease cannot be changed.
            outcome = AckOutcome(
                packet_id,
                409,
                "not_leased",
                outcome.delivery_count,
                message="The receipt does not name a live lease of this packet.",
            )
        return outcome
    if row.delivery_state == DeliveryState.DEAD:
        return AckOutcome(packet_id, 200, "dead", row.delivery_count, message=RELEASED_LAST_ERROR)
    if release:
        queue.publish_ready()
        return AckOutcome(packet_id, 200, "released", row.delivery_count)
    return AckOutcome(packet_id, 200, "extended", row.delivery_count, row.visible_at)


def release_values(now: float, settings: DeliverySettings) -> dict[str, Any]:
    """A released lease is visible again at once; on its last allowed delivery it is dead.

    As with SQS, a delivery counts when it is handed out, so a release does not give the packet
    another try; dead-lettering it here (with a reason) beats a silent reap at the next poll.
    """
    exhausted = T.c.delivery_count >= settings.max_attempts
    return {
        "delivery_state": case((exhausted, DeliveryState.DEAD), else_=DeliveryState.PENDING),
        "visible_at": now,
        "lease_id": None,
        "dead_at": case((exhausted, from_epoch(now)), else_=None),
        "last_error": case((exhausted, RELEASED_LAST_ERROR), else_=T.c.last_error),
    }


def requeue(
    states: tuple[str, ...] = (DeliveryState.DEAD,),
    user_id: str | None = None,
    received_from=None,
    received_to=None,
    reset_attempts: bool = True,
) -> int:
    """Put matching packets back in the queue as fresh pending packets; returns how many.

    Processed packets (a replay) are updated by a statement of their own, whose row count is
    exactly how many left the processed state: the processed counter drops by that much in
    the same transaction.
    """
    conditions = []
    if user_id is not None:
        conditions.append(T.c.user_id == user_id)
    if received_from is not None:
        conditions.append(T.c.received_at >= received_from)
    if received_to is not None:
        conditions.append(T.c.received_at < received_to)
    now = epoch_now()
    values: dict[str, Any] = {
        "delivery_state": DeliveryState.PENDING,
        "visible_at": now,
        "lease_id": None,
        "dead_at": None,
        "processed_at": None,
        "processed_by_karma": False,
    }
    if reset_attempts:
        values["delivery_count"] = 0

    def requeue_from(chosen: tuple[str, ...]) -> int:
        statement = update(T).where(T.c.delivery_state.in_(chosen), *conditions).values(**values)
        return db.session.execute(statement).rowcount or 0

    others = tuple(state for state in states if state != DeliveryState.PROCESSED)
    count = requeue_from(others) if others else 0
    if DeliveryState.PROCESSED in states:
        replayed = requeue_from((DeliveryState.PROCESSED,))
        counters.bump(counters.PROCESSED, -replayed)
        count += replayed
    db.session.commit()
    if count:
        queue.publish_ready()
    return count


@dataclass
class QueueRebuild:
    """What ``rebuild_queue`` found and did."""

    dead_lettered: int
    expired_leases: int
    ready: int
    retrying: int
    leased: int
    queue_backend: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rebuild_queue() -> QueueRebuild:
    """Bring the queue in line with the database after an outage, a flush or a deploy.

    The database is the queue, so nothing is copied: exhausted expired leases are dead-lettered
    now (instead of at the next poll), the rest of the expired leases stay suspects (visible,
    served alone), and readiness is announced so every waiting long poll looks at once.
    """
    settings = DeliverySettings.from_app()
    now = epoch_now()
    dead = reap_exhausted(now, settings, DeliveryState.UNFINISHED)
    leased = T.c.delivery_state == DeliveryState.LEASED
    pending = T.c.delivery_state == DeliveryState.PENDING
    visible = T.c.visible_at <= now
    row = db.session.execute(
        select(
            func.count().filter(and_(leased, visible)).label("expired"),
            func.count().filter(and_(pending, visible)).label("ready"),
            func.count().filter(and_(pending, ~visible)).label("retrying"),
            func.count().filter(and_(leased, ~visible)).label("leased"),
        ).where(T.c.delivery_state.in_(DeliveryState.UNFINISHED))
    ).one()
    db.session.commit()
    queue.publish_ready()
    return QueueRebuild(dead, row.expired, row.ready, row.retrying, row.leased, queue.backend_name)
