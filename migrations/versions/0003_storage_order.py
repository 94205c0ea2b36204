"""Storage order for bookkeeping: packets.seq, a partial idempotency index, stored and dead counters.

Status counts total and dead packets from counters from now on, and the bookkeeper counts new
packets by ranges of ``seq``: existing rows all count as booked. On PostgreSQL adding the
identity column rewrites the table (an ACCESS EXCLUSIVE lock for as long as that takes).

Revision ID: 0003_storage_order
Revises: 0002_packet_counters
Create Date: 2026-12-01 23:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003_storage_order'
down_revision = '0002_packet_counters'
branch_labels = None
depends_on = None

KEY_PRESENT = sa.text("idempotency_key IS NOT NULL")


def upgrade():
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.add_column("packets", sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False))
        op.drop_constraint("uq_packets_idempotency_key", "packets", type_="unique")
    else:
        op.add_column("packets", sa.Column("seq", sa.BigInteger(), nullable=True))
        op.execute("UPDATE packets SET seq = rowid")
        with op.batch_alter_table("packets", schema=None) as batch_op:
            batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
            batch_op.drop_constraint("uq_packets_idempotency_key", type_="unique")
    op.create_index("ix_packets_seq", "packets", ["seq"], unique=False)
    op.create_index(
        "uq_packets_idempotency_key",
        "packets",
        ["idempotency_key"],
        unique=True,
        postgresql_where=KEY_PRESENT,
        sqlite_where=KEY_PRESENT,
    )
    op.execute(
        "INSERT INTO packet_counters (name, shard, value) "
        "SELECT 'stored', 0, count(*) FROM packets"
    )
    op.execute(
        "INSERT INTO packet_counters (name, shard, value) "
        "SELECT 'dead', 0, count(*) FROM packets WHERE delivery_state = 'dead'"
    )
    op.execute(
        "INSERT INTO packet_counters (name, shard, value) "
        "SELECT 'booked', 0, coalesce(max(seq), 0) FROM packets"
    )
    if not postgres:
        op.execute(
            "INSERT INTO packet_counters (name, shard, value) "
            "SELECT 'allocated', 0, coalesce(max(seq), 0) FROM packets"
        )


def downgrade():
    op.execute(
        "DELETE FROM packet_counters WHERE name IN ('stored', 'dead', 'booked', 'allocated')"
    )
    op.drop_index("uq_packets_idempotency_key", table_name="packets")
    op.drop_index("ix_packets_seq", table_name="packets")
    with op.batch_alter_table("packets", schema=None) as batch_op:
        batch_op.drop_column("seq")
        batch_op.create_unique_constraint("uq_packets_idempotency_key", ["idempotency_key"])
