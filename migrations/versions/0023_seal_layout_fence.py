"""Every new seal names the packets' storage layout its sealer read; a sealer of an earlier
release, which names none, cannot seal.

Migrations 0020 and 0022 changed how a packet's fields are stored (raw_signals as a key set
and values; the low-cardinality strings as codes), and a release before them reads those rows
as NULL where the values now live elsewhere. During a rolling deploy its instances keep
serving beside the new ones after the migration ran, and their sealer would hash such rows
with NULLs into seals that ``verify`` then reports as altered, for good. Since this revision
``audit_seals.packet_layout`` is NOT NULL with no default: the new sealer writes the layout it
read (``bucket.services.audit.content.PACKET_LAYOUT``), an earlier sealer's INSERT names no
such column and is refused, so sealing waits for the new instances (the packets stay stored,
booked and delivered meanwhile). Existing seals get 0.

Revision ID: 0023_seal_layout_fence
Revises: 0022_packet_codes
Create Date: 2026-12-07 02:20:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0023_seal_layout_fence'
down_revision = '0022_packet_codes'
branch_labels = None
depends_on = None


def upgrade():
    # A default for the rows already there (PostgreSQL keeps it in the catalogue, no rewrite),
    # dropped at once: every INSERT from now on must name the column.
    with op.batch_alter_table("audit_seals") as batch:
        batch.add_column(
            sa.Column("packet_layout", sa.SmallInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("audit_seals") as batch:
        batch.alter_column("packet_layout", server_default=None)


def downgrade():
    with op.batch_alter_table("audit_seals") as batch:
        batch.drop_column("packet_layout")
