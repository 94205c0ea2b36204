"""Requeue and replay: dead, retrying or processed packets back in the queue, as fresh ones."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from bucket.extensions import db, queue
from bucket.models import DeliveryState, is_packet_id, of_user
from bucket.services import counters, sql
from bucket.services.delivery.settings import D, T
from bucket.timeutil import epoch_now

# A state leaving for pending takes its count down with it (pending is counted from the rows).
COUNTED_STATES = {DeliveryState.PROCESSED: counters.PROCESSED, DeliveryState.DEAD: counters.DEAD}


def requeue(
    states: tuple[str, ...] = (DeliveryState.DEAD,),
    user_id: str | None = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
    reset_attempts: bool = True,
    packet_ids: list[str] | None = None,
) -> int:
    """Put matching packets back in the queue as fresh pending packets and commit; returns how
    many. Leased packets are never touched: their consumer still holds them.

    Each counted state is updated by a statement of its own, whose row count is exactly how
    many left that state: its counter drops by that much in the same transaction.
    """
    conditions = []
    if user_id is not None:
        conditions.append(D.c.packet_id.in_(select(T.c.packet_id).where(of_user(user_id))))
    if received_from is not None:
        conditions.append(D.c.received_at >= received_from)
    if received_to is not None:
        conditions.append(D.c.received_at < received_to)
    if packet_ids is not None:
        # An id not in the form the service hands out names no stored packet.
        conditions.append(D.c.packet_id.in_([pid for pid in packet_ids if is_packet_id(pid)]))
    values: dict[str, Any] = {
        "delivery_state": DeliveryState.PENDING,
        "visible_at": epoch_now(),
        "lease_id": None,
        "dead_at": None,
        "processed_at": None,
        "processed_by_karma": False,
    }
    if reset_attempts:
        values["delivery_count"] = 0
    count = sql.retrying(lambda: _requeue(states, conditions, values))
    if count:
        queue.publish_ready()
    return count


def _requeue(states: tuple[str, ...], conditions: list, values: dict[str, Any]) -> int:
    """The requeue's statements in one transaction, committed; how many rows moved. On
    PostgreSQL each names its state, so it reaches that state's partition only; a processed
    row goes back to the hot partition (migration 0014)."""
    count = 0
    # Pending ones first: rows moved to pending by a later statement must not match again.
    for state in sorted(set(states), key=lambda state: state != DeliveryState.PENDING):
        if state == DeliveryState.LEASED:
            continue
        statement = update(D).where(D.c.delivery_state == state, *conditions).values(**values)
        moved = db.session.execute(statement).rowcount or 0
        if state in COUNTED_STATES:
            counters.bump(COUNTED_STATES[state], -moved)
        count += moved
    db.session.commit()
    return count
