"""PostgreSQL: deliveries partitioned by state, so the table polls and acks touch holds only
unfinished and dead packets; the processed ones live in day partitions like the packets.

``deliveries`` becomes a table partitioned by LIST (delivery_state):

- ``deliveries_hot`` holds pending, leased and dead deliveries (dead stays: requeue and the
  dead-letter listing read it, and retention never drops a dead packet unasked). Its primary
  key is ``packet_id``; the queue index (delivery_state, visible_at) lives only here.
- ``deliveries_processed`` holds processed ones, itself partitioned by RANGE (received_at)
  with the packets' own bounds (``deliveries_processed_pYYYYMMDD``, ``…_legacy``,
  ``…_default``), indexed by ``packet_id`` only: what the user listing, the console's
  timeline and the audit read of a finished packet.

An acknowledgement's UPDATE to 'processed' moves the row from the hot partition to its day's
(row movement), a replay moves it back; retention drops a day's processed deliveries with the
day's packets instead of deleting them (``services/retention``). A unique key on a partitioned
table must include its partition keys, so the parent has none: the hot partition's primary
key and ingest (one insert per packet, after its key row in ``packet_keys``) keep one row per
packet.

Every delivery is copied once, in this transaction, with the tables locked against the old
version's writers: the only work here that grows with the table (about what a VACUUM FULL of
deliveries costs). Nothing changes state, so no packet is lost or delivered again. SQLite
keeps its one table.

Revision ID: 0014_hot_deliveries
Revises: 0013_lean_user_indexes
Create Date: 2026-12-06 02:30:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0014_hot_deliveries'
down_revision = '0013_lean_user_indexes'
branch_labels = None
depends_on = None

PACKET_PARTITIONS_SQL = (
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) "
    "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = 'packets'::regclass ORDER BY c.relname"
)


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE deliveries RENAME TO deliveries_flat")
    op.execute("ALTER TABLE deliveries_flat RENAME CONSTRAINT deliveries_pkey TO deliveries_flat_pkey")
    op.execute("ALTER INDEX ix_deliveries_queue RENAME TO ix_deliveries_flat_queue")
    op.execute(
        "CREATE TABLE deliveries (LIKE deliveries_flat INCLUDING DEFAULTS) "
        "PARTITION BY LIST (delivery_state)"
    )
    op.execute(
        "CREATE TABLE deliveries_hot PARTITION OF deliveries "
        "FOR VALUES IN ('pending', 'leased', 'dead')"
    )
    op.execute(
        "CREATE TABLE deliveries_processed PARTITION OF deliveries "
        "FOR VALUES IN ('processed') PARTITION BY RANGE (received_at)"
    )
    # One partition of processed deliveries for every partition of packets, same bounds.
    for name, bound in op.get_bind().execute(sa.text(PACKET_PARTITIONS_SQL)).all():
        suffix = name.removeprefix("packets_")
        op.execute(
            f"CREATE TABLE deliveries_processed_{suffix} PARTITION OF deliveries_processed {bound}"
        )
    op.execute(
        "INSERT INTO deliveries SELECT * FROM deliveries_flat ORDER BY delivery_state, received_at"
    )
    op.execute("DROP TABLE deliveries_flat")
    op.execute("ALTER TABLE deliveries_hot ADD CONSTRAINT deliveries_hot_pkey PRIMARY KEY (packet_id)")
    op.execute("CREATE INDEX ix_deliveries_queue ON deliveries_hot (delivery_state, visible_at)")
    op.execute("CREATE INDEX ix_deliveries_processed_packet ON deliveries_processed (packet_id)")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    op.execute("CREATE TABLE deliveries_flat (LIKE deliveries INCLUDING DEFAULTS)")
    op.execute("INSERT INTO deliveries_flat SELECT * FROM deliveries")
    op.execute("DROP TABLE deliveries")
    op.execute("ALTER TABLE deliveries_flat RENAME TO deliveries")
    op.execute("ALTER TABLE deliveries ADD CONSTRAINT deliveries_pkey PRIMARY KEY (packet_id)")
    op.execute("CREATE INDEX ix_deliveries_queue ON deliveries (delivery_state, visible_at)")
