"""A quarantined packet keeps the authentication outcome and subject it had when it arrived
(never the token), so a replay stores it with that outcome and, under
``BUCKET_INGEST_AUTH=require``, stores only verified ones (README, "Authenticated ingest").

Entries kept before have NULL: no outcome recorded (README says what a replay does with them).

Revision ID: 0011_quarantine_auth
Revises: 0010_packet_auth
Create Date: 2026-12-05 14:00:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011_quarantine_auth'
down_revision = '0010_packet_auth'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('quarantine') as batch_op:
        batch_op.add_column(sa.Column('auth_outcome', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('auth_subject', sa.String(length=256), nullable=True))


def downgrade():
    with op.batch_alter_table('quarantine') as batch_op:
        batch_op.drop_column('auth_subject')
        batch_op.drop_column('auth_outcome')
