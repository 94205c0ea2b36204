"""PostgreSQL: a packet's dedup key kept in ``packet_keys`` only; ``packets.dedup_key``
nullable, NULL for every packet stored from this revision on.

Since migration 0015 every packet's natural identity (a blake2b-128 of its system type, user,
session, client timestamp and authentication scope) has a row of its own in ``packet_keys``,
where ingest claims it; the packet kept a copy in its own row: 16 bytes of every packet (2.7
% of what a stored packet costs). Ingest now writes NULL there (``services/ingest``), and
whatever needs the key of a stored packet recomputes it from the fields it is a digest of
(``ingest.packet_identity``: retention's purge by rows, forgetting a purged packet's key).

The audit leaf seals the column as stored: NULL for a packet stored from now on, its key for
one stored before. The fields the key is computed from are all in the leaf, so it commits to
the same identity; ``verify`` recomputes each leaf from the stored row, as before.

Existing rows keep their keys (no rewrite). On PostgreSQL the downgrade does not write the
keys back, nor make the column NOT NULL again: the seals made since committed to NULL, and a
key written back would make ``verify`` report every one of those packets as altered (SQLite's,
whose keys stayed on the packets, makes it NOT NULL again). The release before this
one reads a NULL key everywhere but in retention's purge by rows (which then leaves that
packet's key row behind until its day of keys is dropped) and in ``backfill-keys`` (for a
rolling upgrade from before migration 0012 only; it fails on such a packet). Below 0012 the
packets' own column is their deduplication again: that downgrade writes every missing key back
from ``packet_keys`` before dropping it (the seals made since this revision then no longer
match those packets' leaves there).

SQLite's unique constraint on ``packets.dedup_key`` is its deduplication: ingest there still
stores the key, and the column becomes nullable only so that both backends share one model.

Revision ID: 0027_keys_in_packet_keys_only
Revises: 0026_scaled_numbers
Create Date: 2026-12-08 00:10:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0027_keys_in_packet_keys_only'
down_revision = '0026_scaled_numbers'
branch_labels = None
depends_on = None


def upgrade():
    # PostgreSQL: a catalogue change, the partitions follow their parent, no row is read.
    with op.batch_alter_table('packets') as batch_op:
        batch_op.alter_column('dedup_key', existing_type=sa.String(32), nullable=True)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        return  # see the docstring: the keys stay in packet_keys, the column nullable
    with op.batch_alter_table('packets') as batch_op:
        batch_op.alter_column('dedup_key', existing_type=sa.String(32), nullable=False)
