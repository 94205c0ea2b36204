"""Per-minute roll-ups of ingested and processed packets for the console's charts.

Revision ID: 0007_activity_minutes
Revises: 0006_audit
Create Date: 2026-12-02 17:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0007_activity_minutes'
down_revision = '0006_audit'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('activity_minutes',
    sa.Column('minute', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('series', sa.String(length=96), nullable=False),
    sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('minute', 'series', 'shard')
    )


def downgrade():
    op.drop_table('activity_minutes')
