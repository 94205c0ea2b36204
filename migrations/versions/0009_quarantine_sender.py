"""The quarantine keeps each entry's sender address, so eviction takes from the biggest sender.

Entries kept before have no sender (NULL) and count as one sender together.

Revision ID: 0009_quarantine_sender
Revises: 0008_leaf_format
Create Date: 2026-12-05 12:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0009_quarantine_sender'
down_revision = '0008_leaf_format'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('quarantine') as batch_op:
        batch_op.add_column(sa.Column('sender', sa.String(length=64), nullable=True))
        batch_op.create_index(
            'ix_quarantine_sender', ['sender', 'last_seen_at', 'id'], unique=False
        )


def downgrade():
    with op.batch_alter_table('quarantine') as batch_op:
        batch_op.drop_index('ix_quarantine_sender')
        batch_op.drop_column('sender')
