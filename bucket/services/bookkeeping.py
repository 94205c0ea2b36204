"""Bookkeeping: packets stored since the last booking are counted in, each exactly once.

Ingest writes no counter (it would cost every insert a contended row update). Instead every
few seconds one bookkeeper (one at a time across all workers and instances, decided by the
database) books the packets whose ``seq`` lies between the ``booked`` mark and a *horizon*
below which no insert can still be in flight, adds them to the ``stored`` counter and moves
the mark, in one transaction. A packet committed late has a ``seq`` above the last horizon, so
it is simply booked next time; none is booked twice, none is skipped.

The horizon on PostgreSQL: ``LOCK TABLE packets IN SHARE MODE`` waits for the inserts in
flight (every insert holds ROW EXCLUSIVE from before it draws its ``seq`` until it commits),
then ``max(seq)`` is read and the lock released at once: writers pause for about a
millisecond. A ``lock_timeout`` bounds that pause if a long transaction holds the table; the
booking is then skipped until the next round. On SQLite writers are serialised anyway, so the
``allocated`` counter read inside the booking's own transaction is the horizon.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text

from bucket.extensions import db
from bucket.services import activity, counters, sql
from bucket.services.dialect import dialect_name

log = logging.getLogger(__name__)
HORIZON_LOCK_TIMEOUT = "200ms"


@dataclass
class Booking:
    """One round of bookkeeping: the ``seq`` range booked and how many packets it held."""

    after: int
    through: int
    packets: int


def horizon_postgres() -> int | None:
    """The highest ``seq`` below which nothing can still be committed; None if the table lock
    was not granted within ``HORIZON_LOCK_TIMEOUT``."""
    with db.engine.connect() as connection:
        try:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{HORIZON_LOCK_TIMEOUT}'")
            connection.exec_driver_sql("LOCK TABLE packets IN SHARE MODE")
            horizon = connection.exec_driver_sql(
                "SELECT coalesce(max(seq), 0) FROM packets"
            ).scalar_one()
            connection.commit()
            return horizon
        except Exception as exc:  # noqa: BLE001 - a lock timeout or any failure: next round
            connection.rollback()
            if not sql.lock_not_granted(exc):
                raise
            log.info("bookkeeping skipped: packets stayed locked for %s", HORIZON_LOCK_TIMEOUT)
            return None


def horizon_sqlite() -> int:
    """SQLite's horizon: the last ``seq`` handed out, read inside the caller's write
    transaction (writers are serialised, so every packet up to it is committed)."""
    return (
        db.session.execute(
            text("SELECT value FROM packet_counters WHERE name = 'allocated' AND shard = 0")
        ).scalar()
        or 0
    )


def book_new_packets() -> Booking | None:
    """Book what was stored since the last booking and commit; None when another bookkeeper is
    at it (or the horizon could not be taken)."""
    postgres = dialect_name() == "postgresql"
    horizon = horizon_postgres() if postgres else None
    if postgres and horizon is None:
        return None
    session = db.session
    try:
        # The mark exists from the first migration on; after a TRUNCATE it starts again at 0.
        session.execute(
            text(
                "INSERT INTO packet_counters (name, shard, value) VALUES ('booked', 0, 0) "
                "ON CONFLICT (name, shard) DO NOTHING"
            )
        )
        lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
        booked = session.execute(
            text(f"SELECT value FROM packet_counters WHERE name = 'booked' AND shard = 0{lock}")
        ).scalar()
        if booked is None:  # another bookkeeper holds the mark
            session.rollback()
            return None
        if not postgres:
            horizon = horizon_sqlite()
        if horizon <= booked:
            session.commit()
            return Booking(booked, booked, 0)
        # Counted by minute, system and state for the console's charts, in this transaction.
        packets = activity.book(booked, horizon)
        counters.bump(counters.STORED, packets)
        session.execute(
            text("UPDATE packet_counters SET value = :through WHERE name = 'booked' AND shard = 0"),
            {"through": horizon},
        )
        session.commit()
        return Booking(booked, horizon, packets)
    except BaseException:
        session.rollback()
        raise
