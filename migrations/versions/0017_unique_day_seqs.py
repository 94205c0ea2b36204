"""PostgreSQL: seq unique within each partition of packets, and a BRIN index on the keys'
reception time, so that retention drops a day of millions of packets without reading it all.

Retention records the runs of ``seq`` a dropped day held (``services/retention``). It found
them with one pass over the day's index on seq numbering every row (``seq - row_number()``),
3.1 s for a day of 5M packets. A unique index on seq in the day's partition lets one count do
it: with no seq repeated, ``count(*) = max(seq) - min(seq) + 1`` proves the day one run, and
the numbering pass is left for a day that is not. PostgreSQL cannot hold a unique index on
the partitioned ``packets`` without its partition key (``received_at``), so the partitioned
``ix_packets_seq`` gives way to a unique index on seq in each partition,
``<partition>_seq_key``: the days, ``packets_legacy`` and ``packets_default``; the partition
maintenance gives every new day its own (``services/partitions``). The planner uses a
partition's own indexes for the queries on ``packets`` by seq, as it used the partitioned
one's. A partition where a seq already repeats (never written by the service: only by hand)
gets a plain index on seq instead, with a warning; retention then numbers its rows as before,
finds the repeat and keeps the day.

The check that a day of keys (``packet_keys``) names no packet still stored reads the keys'
reception times: every key of the day, 0.5 s at 5M. ``ix_packet_keys_received``, a BRIN index
on ``received_at`` (a few pages a day: keys are written in the order they arrive), lets it
read only the blocks whose reception times could be live (autosummarize: each block range is
summarised once it is full).

Measured with ``nice -n 10 python -m bench.purge_day --per-day 5000000 --days 2`` on the
shared 2-core machine (BENCHMARKS.md, "Purging a day", 2026-12-06): the day's runs 1.34 s ->
0.21 s (the count, a parallel index-only scan), the day of keys' check 0.31 s -> 0.002 s (15
blocks), all of the purge's SQL 1.69 s -> 0.26 s; the whole ``purge_days`` 3.09 s -> 1.75 s,
of which 1.33 s are the commits of its ``DROP TABLE``s (the file system deleting the day's
files). A day of 1M: 1.50 s -> 0.54 s.

Cost on an existing deployment: one index build a partition of packets (a sort of its seqs,
about what building ``ix_packets_seq`` cost) and one pass over ``packet_keys``, with packets
locked against writers meanwhile. No row changes. SQLite keeps its plain ``ix_packets_seq``.

Revision ID: 0017_unique_day_seqs
Revises: 0016_uuid_ids
Create Date: 2026-12-06 18:40:00.000000

"""

import logging

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0017_unique_day_seqs'
down_revision = '0016_uuid_ids'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")
PARTITIONS_SQL = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = 'packets'::regclass ORDER BY c.relname"
)


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets IN ACCESS EXCLUSIVE MODE")
    for (name,) in bind.execute(sa.text(PARTITIONS_SQL)).all():
        try:
            with bind.begin_nested():
                op.execute(f"CREATE UNIQUE INDEX {name}_seq_key ON {name} (seq)")
        except sa.exc.IntegrityError:
            log.warning(
                "a seq repeats in %s: its index on seq is not unique, and retention keeps "
                "that day until flask bucket verify's findings are dealt with",
                name,
            )
            op.execute(f"CREATE INDEX {name}_seq_key ON {name} (seq)")
    op.execute("DROP INDEX ix_packets_seq")
    op.execute(
        "CREATE INDEX ix_packet_keys_received ON packet_keys USING brin (received_at) "
        "WITH (autosummarize = on)"
    )


def downgrade():
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets IN ACCESS EXCLUSIVE MODE")
    op.execute("DROP INDEX ix_packet_keys_received")
    # First the partitions' own, so that none is attached to the partitioned index instead of
    # being built anew (a plain one would be).
    for (name,) in bind.execute(sa.text(PARTITIONS_SQL)).all():
        op.execute(f"DROP INDEX IF EXISTS {name}_seq_key")
    op.execute("CREATE INDEX ix_packets_seq ON packets (seq)")
