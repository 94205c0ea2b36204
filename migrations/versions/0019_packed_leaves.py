"""Seals pack their leaves tighter: packet ids as 16 raw bytes, and no seqs when they are the
whole range (services/audit/content.py, ``Leaves``).

A seal kept 77 bytes a packet: its seq (8 bytes), its id as text and a newline (37) and its
leaf hash (32), 67.5 as PostgreSQL stores them (its TOAST compresses the seqs and the text). The ids are uuids (``models.PACKET_ID``): new seals keep them in
``leaf_uuids``, 16 bytes each, and leave ``leaf_ids`` NULL (a seal has one or the other; a
seal whose ids are not all canonical uuids keeps the text). The seqs of nearly every seal are
exactly ``after_seq + 1`` .. ``last_seq``: a new seal then leaves ``leaf_seqs`` empty, read as
that range; a seal with holes (a seq a rolled-back insert never used) keeps them. 48 bytes a
packet instead of 77: 51.1 stored (``nice -n 10 python -m bench.storage --quick``,
BENCHMARKS.md, "Packed leaves"). The leaves themselves, the roots, the seals' hashes and the proofs are
unchanged: only their packing is. Seals made before keep their packing and are read as
before.

Upgrade adds the column and lets ``leaf_ids`` be NULL: no row changes. Downgrade writes every
seal of the new packing back in the old one (ids as text, seqs in full), one seal a statement,
then drops the column.

Revision ID: 0019_packed_leaves
Revises: 0017_unique_day_seqs
Create Date: 2026-12-06 21:40:00.000000

"""

import struct

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0019_packed_leaves'
down_revision = '0017_unique_day_seqs'
branch_labels = None
depends_on = None

# The seals in the new packing, then each one's leaves (one at a time: a seal of 10,000
# packets holds 480 kB of them).
COMPACT_SQL = (
    "SELECT seq FROM audit_seals WHERE leaf_uuids IS NOT NULL OR length(leaf_seqs) = 0 "
    "ORDER BY seq"
)
SEAL_SQL = "SELECT after_seq, last_seq, leaf_seqs, leaf_uuids FROM audit_seals WHERE seq = :seq"


def upgrade():
    with op.batch_alter_table('audit_seals') as batch_op:
        batch_op.add_column(sa.Column('leaf_uuids', sa.LargeBinary(), nullable=True))
        batch_op.alter_column('leaf_ids', existing_type=sa.Text(), nullable=True)


def old_ids(raw: bytes) -> str:
    """Packed ids as the text the old packing keeps: canonical uuids, one a line."""
    digits = bytes(raw).hex()
    return "\n".join(
        f"{digits[i:i + 8]}-{digits[i + 8:i + 12]}-{digits[i + 12:i + 16]}-"
        f"{digits[i + 16:i + 20]}-{digits[i + 20:i + 32]}"
        for i in range(0, len(digits), 32)
    )


def downgrade():
    bind = op.get_bind()
    seals = sa.table(
        'audit_seals',
        sa.column('seq', sa.BigInteger()),
        sa.column('leaf_seqs', sa.LargeBinary()),
        sa.column('leaf_ids', sa.Text()),
        sa.column('leaf_uuids', sa.LargeBinary()),
    )
    for (seq,) in bind.execute(sa.text(COMPACT_SQL)).all():
        after, last, packed_seqs, uuids = bind.execute(sa.text(SEAL_SQL), {"seq": seq}).one()
        changes = {}
        if not packed_seqs:
            changes['leaf_seqs'] = struct.pack(f">{last - after}q", *range(after + 1, last + 1))
        if uuids is not None:
            changes['leaf_ids'] = old_ids(uuids)
            changes['leaf_uuids'] = None
        bind.execute(seals.update().where(seals.c.seq == seq).values(**changes))
    with op.batch_alter_table('audit_seals') as batch_op:
        batch_op.alter_column('leaf_ids', existing_type=sa.Text(), nullable=False)
        batch_op.drop_column('leaf_uuids')
