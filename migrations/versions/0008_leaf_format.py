"""Leaves become PostgreSQL's binary record of each packet (services/audit/content.py).

The seals made before keep their leaves and say so (``leaf_format`` 1, sorted JSON): verify
and the proofs still read them that way, and the first seal of the new format follows the
last old one in the same chain, so every head hash kept elsewhere stays good.

Revision ID: 0008_leaf_format
Revises: 0007_activity_minutes
Create Date: 2026-12-02 22:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008_leaf_format'
down_revision = '0007_activity_minutes'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('audit_seals') as batch_op:
        batch_op.add_column(
            sa.Column('leaf_format', sa.SmallInteger(), server_default=sa.text('1'), nullable=False)
        )


def downgrade():
    with op.batch_alter_table('audit_seals') as batch_op:
        batch_op.drop_column('leaf_format')
