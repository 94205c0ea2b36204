"""Queue and storage figures for status, metrics and the CLI, from indexed queries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flask import current_app
from sqlalchemy import and_, func, select

from bucket.extensions import db, queue
from bucket.models import DeliveryState, Packet
from bucket.services import counters
from bucket.services.delivery import ready_condition
from bucket.timeutil import epoch_now, utc_now

T = Packet.__table__


@dataclass
class QueueStats:
    """Every figure the status endpoint reports."""

    queue_size: int
    redis_connected: bool
    queue_backend: str
    total_packets: int
    processed_packets: int
    pending_packets: int
    leased_packets: int
    retrying_packets: int
    dead_packets: int
    oldest_pending_age_seconds: float | None
    consumer_auth: bool

    def as_dict(self) -> dict:
        return asdict(self)


def collect_stats() -> QueueStats:
    """Count unfinished and dead packets over the queue index; processed from its counter.

    No figure walks the processed rows, the bulk of the table: the counter is kept exact by
    the transactions that change it, and the total is the sum of the parts.
    """
    now = epoch_now()
    max_attempts = current_app.config["BUCKET_MAX_ATTEMPTS"]
    pending = T.c.delivery_state == DeliveryState.PENDING
    leased = T.c.delivery_state == DeliveryState.LEASED
    visible = T.c.visible_at <= now
    row = db.session.execute(
        select(
            func.count().filter(and_(pending, visible)).label("ready"),
            func.count().filter(and_(pending, ~visible)).label("retrying"),
            func.count().filter(leased).label("leased"),
            func.count().filter(ready_condition(now, max_attempts)).label("queue_size"),
            func.count().filter(T.c.delivery_state == DeliveryState.DEAD).label("dead"),
            func.min(T.c.received_at)
            .filter(T.c.delivery_state.in_(DeliveryState.UNFINISHED))
            .label("oldest"),
            # In the same statement, so every figure comes from one snapshot: an ack committed
            # between two reads would be counted both as unfinished and as processed.
            counters.total(counters.PROCESSED).label("processed"),
        ).where(T.c.delivery_state.in_((*DeliveryState.UNFINISHED, DeliveryState.DEAD)))
    ).one()
    db.session.commit()
    unfinished = row.ready + row.retrying + row.leased
    processed = int(row.processed)  # sum() of a BIGINT is NUMERIC on PostgreSQL
    oldest_age = (utc_now() - row.oldest).total_seconds() if row.oldest is not None else None
    return QueueStats(
        queue_size=row.queue_size,
        redis_connected=queue.redis_connected(),
        queue_backend=queue.backend_name,
        total_packets=processed + unfinished + row.dead,
        processed_packets=processed,
        pending_packets=unfinished,
        leased_packets=row.leased,
        retrying_packets=row.retrying,
        dead_packets=row.dead,
        oldest_pending_age_seconds=oldest_age,
        consumer_auth=bool(current_app.config.get("BUCKET_CONSUMER_TOKEN")),
    )
