"""Leaves become PostgreSQL's binary record of each packet (services/audit/content.py).

Seals made with the earlier leaf format (canonical JSON) would no longer verify: they are
dropped, and the sealer seals every stored packet again in the new format, from the first.
Purge records stay: they name packets the retention purge removed.

Revision ID: 0008_leaf_format
Revises: 0007_activity_minutes
Create Date: 2026-12-02 22:00:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0008_leaf_format'
down_revision = '0007_activity_minutes'
branch_labels = None
depends_on = None


def upgrade():
    op.execute('DELETE FROM audit_seals')


def downgrade():
    op.execute('DELETE FROM audit_seals')
