"""Lease changes: a consumer extends the lease it holds, or releases it at once."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, select, update

from bucket.extensions import db, queue
from bucket.models import DeliveryState, is_packet_id
from bucket.services import counters, sql
from bucket.services.delivery.acks import AckOutcome, refused_outcome
from bucket.services.delivery.settings import RELEASED_LAST_ERROR, D, DeliverySettings
from bucket.timeutil import epoch_now, from_epoch


def change_visibility(packet_id: str, receipt: str, visibility_timeout: int) -> AckOutcome:
    """Extend a held lease, or release it at once with ``visibility_timeout`` 0."""
    if not is_packet_id(packet_id):  # names no stored packet (and no uuid PostgreSQL accepts)
        return refused_outcome(packet_id, None)
    settings = DeliverySettings.from_app()
    now = epoch_now()
    release = visibility_timeout == 0
    new_values = (
        release_values(now, settings) if release else {"visible_at": now + visibility_timeout}
    )
    row, current = sql.retrying(lambda: _change(packet_id, receipt, now, new_values))
    if row is None:
        outcome = refused_outcome(packet_id, None if current is None else tuple(current))
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


def _change(packet_id: str, receipt: str, now: float, new_values: dict[str, Any]):
    """The lease change in one transaction, committed: the row changed (or None) and, when
    none was, the packet's delivery as it stands."""
    row = db.session.execute(
        update(D)
        .where(
            D.c.packet_id == packet_id,
            D.c.delivery_state == DeliveryState.LEASED,
            D.c.lease_id == receipt,
            D.c.visible_at > now,
        )
        .values(**new_values)
        .returning(D.c.packet_id, D.c.delivery_state, D.c.delivery_count, D.c.visible_at)
    ).first()
    current = None
    if row is None:
        current = db.session.execute(
            select(D.c.packet_id, D.c.delivery_state, D.c.delivery_count, D.c.visible_at).where(
                D.c.packet_id == packet_id
            )
        ).first()
    elif row.delivery_state == DeliveryState.DEAD:
        counters.bump(counters.DEAD, 1)
    db.session.commit()
    return row, current


def release_values(now: float, settings: DeliverySettings) -> dict[str, Any]:
    """A released lease is visible again at once; on its last allowed delivery it is dead.

    As with SQS, a delivery counts when it is handed out, so a release does not give the packet
    another try; dead-lettering it here (with a reason) beats a silent reap at the next poll.
    """
    exhausted = D.c.delivery_count >= settings.max_attempts
    return {
        "delivery_state": case((exhausted, DeliveryState.DEAD), else_=DeliveryState.PENDING),
        "visible_at": now,
        "lease_id": None,
        "dead_at": case((exhausted, from_epoch(now)), else_=None),
        "last_error": case((exhausted, RELEASED_LAST_ERROR), else_=D.c.last_error),
    }
