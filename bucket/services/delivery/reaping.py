"""Reaping: packets whose last allowed lease expired are dead-lettered, and the queue rebuilt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, select, update

from bucket.extensions import db, queue
from bucket.models import DeliveryState
from bucket.services import counters
from bucket.services.delivery.settings import EXHAUSTED_LEASE_ERROR, D, DeliverySettings
from bucket.timeutil import epoch_now, from_epoch


def reap_exhausted(
    now: float, settings: DeliverySettings, states: tuple[str, ...] = (DeliveryState.LEASED,)
) -> int:
    """Dead-letter packets whose last allowed lease expired, in the session's transaction, and
    count them as dead: a poison packet cannot loop forever.

    Polls reap expired leases only (few rows, straight off the queue index); the operator's
    rebuild also reaps pending packets left over after ``BUCKET_MAX_ATTEMPTS`` was lowered.
    """
    victims = (
        select(D.c.packet_id)
        .where(
            D.c.delivery_state.in_(states),
            D.c.visible_at <= now,
            D.c.delivery_count >= settings.max_attempts,
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = db.session.execute(
        update(D)
        # On PostgreSQL this keeps the UPDATE on the hot partition (and off the queue index).
        .where(D.c.delivery_state != DeliveryState.PROCESSED, D.c.packet_id.in_(victims))
        .values(
            delivery_state=DeliveryState.DEAD,
            visible_at=now,
            lease_id=None,
            dead_at=from_epoch(now),
            last_error=case(
                (D.c.delivery_state == DeliveryState.LEASED, EXHAUSTED_LEASE_ERROR),
                else_=D.c.last_error,
            ),
        )
    )
    reaped = result.rowcount or 0
    counters.bump(counters.DEAD, reaped)
    return reaped


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
    served alone), and readiness is announced so every waiting long poll looks at once. The
    figures count the unfinished rows, so this reads the whole backlog: an operator's tool.
    """
    settings = DeliverySettings.from_app()
    now = epoch_now()
    dead = reap_exhausted(now, settings, DeliveryState.UNFINISHED)
    leased = D.c.delivery_state == DeliveryState.LEASED
    pending = D.c.delivery_state == DeliveryState.PENDING
    visible = D.c.visible_at <= now
    row = db.session.execute(
        select(
            func.count().filter(and_(leased, visible)).label("expired"),
            func.count().filter(and_(pending, visible)).label("ready"),
            func.count().filter(and_(pending, ~visible)).label("retrying"),
            func.count().filter(and_(leased, ~visible)).label("leased"),
        ).where(D.c.delivery_state.in_(DeliveryState.UNFINISHED))
    ).one()
    db.session.commit()
    queue.publish_ready()
    return QueueRebuild(dead, row.expired, row.ready, row.retrying, row.leased, queue.backend_name)
