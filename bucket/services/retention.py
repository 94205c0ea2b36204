"""Retention: delete processed (and, on request, dead) packets in short, bounded batches.

Each batch is its own transaction deleting at most ``batch_size`` packets (and their
deliveries) picked through the queue index (``delivery_state``, ``visible_at``, which holds the
time a packet was processed or dead-lettered); on PostgreSQL the deliveries are picked with
``FOR UPDATE SKIP LOCKED``, so a purge
never waits on, or blocks, the rows that ingest, polls and acks are touching. Run it on a
schedule (``flask bucket purge`` from a cron job) or on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, insert, select

from bucket.extensions import db
from bucket.models import AuditPurge, Delivery, DeliveryState, Packet, PacketCounter
from bucket.services import counters
from bucket.services.audit.sealing import seal_everything, sealed_through
from bucket.services.bookkeeping import book_new_packets
from bucket.timeutil import epoch_now, from_epoch, utc_now

T = Packet.__table__
D = Delivery.__table__
C = PacketCounter.__table__
SECONDS_PER_DAY = 86400.0


@dataclass
class PurgeReport:
    """How many packets a purge matched or deleted, and where it drew the line."""

    cutoff: datetime
    states: tuple[str, ...]
    packets: int
    batches: int
    dry_run: bool


def purge(
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
            removed = db.session.execute(
                delete(T)
                .where(T.c.packet_id.in_([pid for pid, _ in gone]))
                .returning(T.c.seq, T.c.packet_id)
            ).all()
            now = utc_now()
            db.session.execute(
                insert(AuditPurge.__table__),
                [{"packet_seq": seq, "packet_id": pid, "purged_at": now} for seq, pid in removed],
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
