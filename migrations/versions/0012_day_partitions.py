"""PostgreSQL: packets partitioned by day on received_at; their unique keys in packet_keys;
retention records the seq ranges it drops in audit_purged_ranges.

No row is copied and none is re-delivered: the existing table itself becomes one partition,
``packets_legacy``, for everything received before tomorrow (UTC), under a new partitioned
``packets`` with the same columns and an identity sequence that resumes where the old one
stopped. A default partition catches what no day partition covers; the bookkeeper and
``flask bucket partitions`` create the days ahead (``services/partitions``).

A unique index on a partitioned table must contain the partition key, so the two unique keys
(the natural identity and the Idempotency-Key) move to ``packet_keys``, one table for every
day, filled here from the stored packets (one pass over the table and one index build: the
only work in this migration that grows with the table). The foreign key deliveries →
packets goes: it would have to name (packet_id, received_at), and every detach of a day
would re-check it against the whole delivery table; ingest writes both rows in one statement
and retention removes a day's deliveries with it.

The legacy partition is dropped whole, like a day, once everything in it is past the
retention period. SQLite keeps its one table; only the (empty) audit_purged_ranges is added.

Revision ID: 0012_day_partitions
Revises: 0011_quarantine_auth
Create Date: 2026-12-05 19:00:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0012_day_partitions'
down_revision = '0011_quarantine_auth'
branch_labels = None
depends_on = None

KEY_PRESENT = sa.text("idempotency_key IS NOT NULL")
# The indexes every partition has (the parent's, created on each partition by PostgreSQL).
INDEXES = {
    "ix_packets_seq": "(seq)",
    "ix_packets_user": "(user_id, received_at, packet_id)",
    "ix_packets_employee": "(employee_id, received_at, packet_id)",
}


def upgrade():
    op.create_table(
        'audit_purged_ranges',
        sa.Column('first_seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('last_seq', sa.BigInteger(), nullable=False),
        sa.Column('packet_count', sa.BigInteger(), nullable=False),
        sa.Column('partition', sa.String(length=64), nullable=False),
        sa.Column('purged_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('first_seq'),
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    # Writers of the old version wait here until the new layout is in place.
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    op.create_table(
        'packet_keys',
        sa.Column('dedup_key', sa.String(length=32), nullable=False),
        sa.Column('idempotency_key', sa.String(length=255), nullable=True),
        sa.Column('packet_id', sa.String(length=36), nullable=False),
        sa.Column('received_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('dedup_key'),
    )
    op.execute(
        "INSERT INTO packet_keys (dedup_key, idempotency_key, packet_id, received_at) "
        "SELECT dedup_key, idempotency_key, packet_id, received_at FROM packets"
    )
    op.create_index(
        'uq_packet_keys_idempotency_key', 'packet_keys', ['idempotency_key'],
        unique=True, postgresql_where=KEY_PRESENT,
    )
    op.drop_constraint('deliveries_packet_id_fkey', 'deliveries', type_='foreignkey')
    # The old table becomes the legacy partition: its names move aside for the parent's.
    op.execute("ALTER TABLE packets RENAME TO packets_legacy")
    op.execute("ALTER TABLE packets_legacy DROP CONSTRAINT uq_packets_dedup_key")
    op.execute("DROP INDEX uq_packets_idempotency_key")
    # A partition takes its primary key from the parent, (packet_id, received_at).
    op.execute("ALTER TABLE packets_legacy DROP CONSTRAINT packets_pkey")
    for name in INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {name.replace('packets', 'packets_legacy')}")
    op.execute(
        "CREATE TABLE packets (LIKE packets_legacy INCLUDING DEFAULTS INCLUDING IDENTITY) "
        "PARTITION BY RANGE (received_at)"
    )
    # The sequence never goes back, even where the newest packets were purged: a seq handed
    # out again would land in a sealed range.
    op.execute(
        "SELECT setval(pg_get_serial_sequence('packets', 'seq'), greatest("
        "coalesce(pg_sequence_last_value(pg_get_serial_sequence('packets_legacy', 'seq')), 0), "
        "(SELECT coalesce(max(seq), 0) FROM packets_legacy), 1))"
    )
    op.execute("ALTER TABLE packets_legacy ALTER COLUMN seq DROP IDENTITY")
    op.execute("ALTER TABLE packets ADD CONSTRAINT packets_pkey PRIMARY KEY (packet_id, received_at)")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON packets {columns}")
    op.execute("CREATE TABLE packets_default PARTITION OF packets DEFAULT")
    today = "date_trunc('day', now() AT TIME ZONE 'UTC')"
    legacy = op.get_bind().execute(sa.text("SELECT 1 FROM packets_legacy LIMIT 1")).first()
    if legacy is None:  # a new deployment: days only
        op.execute("DROP TABLE packets_legacy")
        first_day = 0
    else:
        # The legacy partition's own indexes of the same definition are attached, not
        # rebuilt; the new primary key is built over it once.
        op.execute(
            "ALTER TABLE packets ATTACH PARTITION packets_legacy FOR VALUES FROM (MINVALUE) "
            f"TO ({today} + interval '1 day')"
        )
        first_day = 1
    # Today (new deployments) and the next days, until the bookkeeper takes over.
    for offset in range(first_day, 3):
        op.execute(
            "DO $$ DECLARE day timestamp := "
            f"{today} + interval '{offset} day'; BEGIN "
            "EXECUTE format('CREATE TABLE packets_p%s PARTITION OF packets "
            "FOR VALUES FROM (%L) TO (%L)', to_char(day, 'YYYYMMDD'), day, "
            "day + interval '1 day'); END $$"
        )


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        # Every partition is copied back into one table (the reverse of the upgrade cannot
        # reuse a partition when there are several).
        op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
        op.execute(
            "CREATE TABLE packets_flat (LIKE packets INCLUDING DEFAULTS INCLUDING IDENTITY)"
        )
        op.execute("INSERT INTO packets_flat SELECT * FROM packets")
        op.execute(
            "SELECT setval(pg_get_serial_sequence('packets_flat', 'seq'), greatest("
            "coalesce(pg_sequence_last_value(pg_get_serial_sequence('packets', 'seq')), 0), "
            "(SELECT coalesce(max(seq), 0) FROM packets_flat), 1))"
        )
        op.execute("DROP TABLE packets")
        op.execute("ALTER TABLE packets_flat RENAME TO packets")
        op.execute("ALTER TABLE packets ADD CONSTRAINT packets_pkey PRIMARY KEY (packet_id)")
        # Packets stored since migration 0027 hold their key in packet_keys only: back on the
        # packet, where this layout's unique constraint deduplicates (every stored packet has
        # its key row: ingest writes both in one statement).
        op.execute(
            "UPDATE packets p SET dedup_key = k.dedup_key FROM packet_keys k "
            "WHERE p.dedup_key IS NULL AND k.packet_id = p.packet_id"
        )
        op.execute("ALTER TABLE packets ALTER COLUMN dedup_key SET NOT NULL")
        op.create_unique_constraint('uq_packets_dedup_key', 'packets', ['dedup_key'])
        op.create_index(
            'uq_packets_idempotency_key', 'packets', ['idempotency_key'],
            unique=True, postgresql_where=KEY_PRESENT,
        )
        for name, columns in INDEXES.items():
            op.execute(f"CREATE INDEX {name} ON packets {columns}")
        op.create_foreign_key(
            'deliveries_packet_id_fkey', 'deliveries', 'packets', ['packet_id'], ['packet_id']
        )
        op.drop_index('uq_packet_keys_idempotency_key', table_name='packet_keys')
        op.drop_table('packet_keys')
    op.drop_table('audit_purged_ranges')
