"""Deliveries: each packet's delivery bookkeeping moves to a narrow table of its own.

A claim or an acknowledgement then rewrites a small row with two index entries instead of the
wide packet row with six. The data is copied over in one statement, then the columns leave
packets (on PostgreSQL a quick catalog change; SQLite rebuilds the table).

Revision ID: 0004_deliveries
Revises: 0003_storage_order
Create Date: 2026-12-02 01:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004_deliveries'
down_revision = '0003_storage_order'
branch_labels = None
depends_on = None

DELIVERY_COLUMNS = (
    "delivery_state", "visible_at", "lease_id", "delivery_count", "last_error",
    "last_delivered_at", "processed_at", "processed_by_karma", "karma_actions", "dead_at",
)


def delivery_columns():
    return [
        sa.Column('delivery_state', sa.String(length=16), nullable=False),
        sa.Column('visible_at', sa.Float(), nullable=False),
        sa.Column('lease_id', sa.String(length=32), nullable=True),
        sa.Column('delivery_count', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('last_delivered_at', sa.DateTime(), nullable=True),
        sa.Column('processed_at', sa.DateTime(), nullable=True),
        sa.Column('processed_by_karma', sa.Boolean(), nullable=False),
        sa.Column('karma_actions', sa.JSON(), nullable=True),
        sa.Column('dead_at', sa.DateTime(), nullable=True),
    ]


def upgrade():
    op.create_table('deliveries',
    sa.Column('packet_id', sa.String(length=36), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    *delivery_columns(),
    sa.ForeignKeyConstraint(['packet_id'], ['packets.packet_id'], ),
    sa.PrimaryKeyConstraint('packet_id')
    )
    columns = ", ".join(("packet_id", "received_at") + DELIVERY_COLUMNS)
    op.execute(f"INSERT INTO deliveries ({columns}) SELECT {columns} FROM packets")
    op.create_index('ix_deliveries_queue', 'deliveries', ['delivery_state', 'visible_at'], unique=False)
    op.drop_index('ix_packets_queue', table_name='packets')
    with op.batch_alter_table('packets', schema=None) as batch_op:
        for name in DELIVERY_COLUMNS:
            batch_op.drop_column(name)


def downgrade():
    required = {"delivery_state", "visible_at", "delivery_count", "processed_by_karma"}
    with op.batch_alter_table('packets', schema=None) as batch_op:
        for column in delivery_columns():
            column.nullable = True  # filled below, then made NOT NULL again
            batch_op.add_column(column)
    for name in DELIVERY_COLUMNS:
        op.execute(
            f"UPDATE packets SET {name} = (SELECT d.{name} FROM deliveries d "
            "WHERE d.packet_id = packets.packet_id)"
        )
    with op.batch_alter_table('packets', schema=None) as batch_op:
        for column in delivery_columns():
            if column.name in required:
                batch_op.alter_column(column.name, existing_type=column.type, nullable=False)
    op.create_index('ix_packets_queue', 'packets', ['delivery_state', 'visible_at'], unique=False)
    op.drop_index('ix_deliveries_queue', table_name='deliveries')
    op.drop_table('deliveries')
