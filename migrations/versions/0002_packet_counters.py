"""Add packet_counters: sharded running counts, seeded from the packets already stored.

Revision ID: 0002_packet_counters
Revises: 0001_create_packets
Create Date: 2026-11-30 09:12:40.118204

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0002_packet_counters'
down_revision = '0001_create_packets'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('packet_counters',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('shard', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', 'shard')
    )
    # Status reads processed_packets from here from now on: start from the rows already there.
    # Acks answered meanwhile by a still-running older version are not counted; run
    # `flask bucket recount` once the deploy has finished if the service was live during it.
    op.execute(
        "INSERT INTO packet_counters (name, shard, value) "
        "SELECT 'processed', 0, count(*) FROM packets WHERE delivery_state = 'processed'"
    )


def downgrade():
    op.drop_table('packet_counters')
