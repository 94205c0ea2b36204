"""Create the packets table: one row per packet, its delivery state and the indexes of the hot queries.

Revision ID: 0001_create_packets
Revises: 
Create Date: 2026-11-29 01:25:56.681244

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001_create_packets'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('packets',
    sa.Column('packet_id', sa.String(length=36), nullable=False),
    sa.Column('dedup_key', sa.String(length=32), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('user_id', sa.String(length=256), nullable=False),
    sa.Column('employee_id', sa.String(length=256), nullable=True),
    sa.Column('session_id', sa.String(length=256), nullable=True),
    sa.Column('lesson_id', sa.String(length=256), nullable=True),
    sa.Column('task_id', sa.String(length=256), nullable=True),
    sa.Column('system_type', sa.String(length=16), nullable=True),
    sa.Column('role', sa.String(length=16), nullable=True),
    sa.Column('client_timestamp', sa.DateTime(), nullable=False),
    sa.Column('cognitive_state', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=True),
    sa.Column('active_seconds', sa.Float(), nullable=False),
    sa.Column('idle_seconds', sa.Float(), nullable=False),
    sa.Column('away_seconds', sa.Float(), nullable=False),
    sa.Column('focus_score', sa.Float(), nullable=True),
    sa.Column('integrity_score', sa.Float(), nullable=True),
    sa.Column('raw_signals', sa.JSON(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
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
    sa.PrimaryKeyConstraint('packet_id'),
    sa.UniqueConstraint('dedup_key', name='uq_packets_dedup_key'),
    sa.UniqueConstraint('idempotency_key', name='uq_packets_idempotency_key')
    )
    with op.batch_alter_table('packets', schema=None) as batch_op:
        batch_op.create_index('ix_packets_employee', ['employee_id', 'received_at', 'packet_id'], unique=False)
        batch_op.create_index('ix_packets_queue', ['delivery_state', 'visible_at'], unique=False)
        batch_op.create_index('ix_packets_user', ['user_id', 'received_at', 'packet_id'], unique=False)



def downgrade():
    with op.batch_alter_table('packets', schema=None) as batch_op:
        batch_op.drop_index('ix_packets_user')
        batch_op.drop_index('ix_packets_queue')
        batch_op.drop_index('ix_packets_employee')

    op.drop_table('packets')
