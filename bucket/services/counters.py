"""Running packet counts kept exact in O(1): sharded counters changed with the rows they count.

Counting rows by state would walk the backlog or the whole table. Instead:

- ``processed`` and ``dead`` change in the same transaction as every move into or out of those
  states (acks, reaping, releases, requeues, replays, purges);
- ``stored`` counts the packets the bookkeeper has booked (``services/bookkeeping``), minus
  those purged; packets newer than the ``booked`` mark are counted directly, through the index
  on ``seq``, so ingest itself never writes a counter (measured: a counter upsert in the
  insert statement cost a quarter of PostgreSQL's insert throughput);
- ``booked`` (one row) is the highest ``seq`` booked so far, and on SQLite ``allocated`` is the
  last ``seq`` handed out.

Writers pick a random shard, so concurrent transactions seldom wait on one hot row; readers sum
the shards. A status read sees counters and rows in one statement, hence one snapshot.
"""

from __future__ import annotations

import random

from sqlalchemy import delete, func, insert, select, text

from bucket.extensions import db
from bucket.models import Delivery, DeliveryState, Packet, PacketCounter
from bucket.services.dialect import dialect_name, upsert_insert

C = PacketCounter.__table__
T = Packet.__table__
D = Delivery.__table__
PROCESSED = DeliveryState.PROCESSED
DEAD = DeliveryState.DEAD
STORED = "stored"
BOOKED = "booked"
ALLOCATED = "allocated"
# Enough shards that a handful of concurrent ack transactions rarely pick the same row.
SHARDS = 8


def random_shard() -> int:
    """The shard a writer adds to."""
    return random.randrange(SHARDS)


def bump(name: str, delta: int) -> None:
    """Add ``delta`` to one random shard of ``name`` in the session's transaction.

    Call it as the transaction's last statement before commit: the packet rows are locked
    first everywhere, so the shard's row lock is held only for the commit and two
    transactions can never wait on each other in opposite orders.
    """
    if not delta:
        return
    statement = upsert_insert(C).values(name=name, shard=random_shard(), value=delta)
    statement = statement.on_conflict_do_update(
        index_elements=[C.c.name, C.c.shard],
        set_={"value": C.c.value + statement.excluded.value},
    )
    db.session.execute(statement)


# The same upsert inside a PostgreSQL statement, for the hot paths that change counters in the
# statement that changes the rows. ``{source}`` is a query yielding (name, delta) pairs.
PG_BUMP = """
INSERT INTO packet_counters AS c (name, shard, value)
SELECT delta.name, %(shard)s, delta.value FROM ({source}) AS delta(name, value)
WHERE delta.value <> 0
ON CONFLICT (name, shard) DO UPDATE SET value = c.value + excluded.value
"""


def recount() -> dict[str, int]:
    """Set every counter from the rows themselves and commit; returns the new figures.

    For after hand-written SQL on the table, or acks answered by a version without counters
    during a deploy. It reads every row, so it is an operator's tool, not a hot path. On
    PostgreSQL the counter table is locked first: transactions still running wait, then add
    their change on top of counts that did not include them, so the result stays exact.
    Everything stored counts as booked afterwards.
    """
    if dialect_name() == "postgresql":
        db.session.execute(text("LOCK TABLE packet_counters IN EXCLUSIVE MODE"))
    by_state = dict(
        db.session.execute(
            select(D.c.delivery_state, func.count()).group_by(D.c.delivery_state)
        ).all()
    )
    highest = db.session.execute(select(func.coalesce(func.max(T.c.seq), 0))).scalar_one()
    figures = {
        PROCESSED: by_state.get(PROCESSED, 0),
        DEAD: by_state.get(DEAD, 0),
        STORED: sum(by_state.values()),
        BOOKED: highest,
    }
    names = list(figures)
    if dialect_name() == "sqlite":
        allocated = db.session.execute(
            select(func.coalesce(func.max(C.c.value), 0)).where(C.c.name == ALLOCATED)
        ).scalar_one()
        figures[ALLOCATED] = max(allocated, highest)
        names.append(ALLOCATED)
    db.session.execute(delete(C).where(C.c.name.in_(names)))
    db.session.execute(
        insert(C), [{"name": name, "shard": 0, "value": value} for name, value in figures.items()]
    )
    db.session.commit()
    return figures
