"""Each packet keeps who sent it: its authentication outcome and the token's subject, and
whether it arrived stale (README, "Authenticated ingest"; leaf format 3 seals them).

Packets stored before keep NULL (not checked) and ``stale`` false.

Revision ID: 0010_packet_auth
Revises: 0009_quarantine_sender
Create Date: 2026-12-05 12:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0010_packet_auth'
down_revision = '0009_quarantine_sender'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('packets') as batch_op:
        batch_op.add_column(sa.Column('auth_outcome', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('auth_subject', sa.String(length=256), nullable=True))
        batch_op.add_column(
            sa.Column('stale', sa.Boolean(), server_default=sa.text('false'), nullable=False)
        )


def downgrade():
    with op.batch_alter_table('packets') as batch_op:
        batch_op.drop_column('stale')
        batch_op.drop_column('auth_subject')
        batch_op.drop_column('auth_outcome')
