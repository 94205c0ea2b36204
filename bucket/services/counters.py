"""Running packet counts kept exact in O(1): sharded counters bumped with the rows they count.

Counting processed packets with ``count(*)`` walks every processed row, and those are the bulk
of the table. Instead, each transaction that moves packets into or out of the processed state
(acks, replays, purges) adds its net change to one counter shard just before it commits, so
the counter commits or rolls back with the rows, and a status read sees both in one snapshot.
Ingest never touches a counter: new packets are pending, and those are counted from the index.
"""

from __future__ import annotations

import random

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.sql.elements import ColumnElement

from bucket.extensions import db
from bucket.models import DeliveryState, Packet, PacketCounter
from bucket.services.dialect import dialect_name, upsert_insert

C = PacketCounter.__table__
PROCESSED = DeliveryState.PROCESSED
# Enough shards that a handful of concurrent ack transactions rarely pick the same row.
SHARDS = 8


def bump(name: str, delta: int) -> None:
    """Add ``delta`` to one random shard of ``name`` in the caller's transaction.

    Call it as the transaction's last statement before commit: the packet rows are locked
    first everywhere, so the shard's row lock is held only for the commit and two
    transactions can never wait on each other in opposite orders.
    """
    if not delta:
        return
    statement = upsert_insert(C).values(name=name, shard=random.randrange(SHARDS), value=delta)
    statement = statement.on_conflict_do_update(
        index_elements=[C.c.name, C.c.shard],
        set_={"value": C.c.value + statement.excluded.value},
    )
    db.session.execute(statement)


def total(name: str) -> ColumnElement[int]:
    """The sum of ``name``'s shards, as a scalar subquery to read beside other figures."""
    return select(func.coalesce(func.sum(C.c.value), 0)).where(C.c.name == name).scalar_subquery()


def recount_processed() -> int:
    """Set the processed counter from the rows themselves and commit; returns the count.

    For after hand-written SQL on the table, or acks answered by a version without counters
    during a deploy. It reads every processed row, so it is an operator's tool, not a hot
    path. On PostgreSQL the counter table is locked first: acks still running wait, then add
    their change on top of a count that did not include them, so the result stays exact.
    """
    if dialect_name() == "postgresql":
        db.session.execute(text("LOCK TABLE packet_counters IN EXCLUSIVE MODE"))
    T = Packet.__table__
    count = db.session.execute(
        select(func.count()).select_from(T).where(T.c.delivery_state == PROCESSED)
    ).scalar_one()
    db.session.execute(delete(C).where(C.c.name == PROCESSED))
    db.session.execute(insert(C).values(name=PROCESSED, shard=0, value=count))
    db.session.commit()
    return count
