"""PostgreSQL: a packet's raw_signals as a key set of a dictionary and its values only.

A bridge sends the same keys every 5 s; stored as canonical JSON, ``raw_signals`` cost 164
bytes a packet, about 110 of them key names (BENCHMARKS.md, "The full storage run"). Since
this revision ingest stores a packet whose keys are all plain (``[A-Za-z0-9_.:-]{1,64}``, at
most ``MAX_SIGNAL_KEYS``) as the id of its key set in ``signal_key_sets`` (``signal_keys``)
and its values' canonical JSON texts in key order, joined by U+001F (``signal_values``; the
character never appears unescaped in JSON text), with ``raw_signals`` NULL. Anything else is
stored in full as before. The readers and the audit leaf rebuild the very same canonical text:
``format()`` over a template made of the keys (``bucket/services/signals.py``), so the leaves
of packets stored in either form are the same bytes and existing seals keep verifying.

Packets stored before this revision keep ``raw_signals`` as they are (the audit seals hash
them; no row is rewritten). No row changes on upgrade: one table created, two nullable columns
added (a catalog change), ``raw_signals`` allowed NULL. Downgrade writes ``raw_signals`` back
for the compact rows (the same text, as ``json`` keeps it) and drops the rest.

SQLite keeps its JSON column as it is: its two columns are added and stay NULL, and its
``raw_signals`` stays NOT NULL (its table is not rebuilt); no dictionary there.

Revision ID: 0020_signal_key_sets
Revises: 0019_packed_leaves
Create Date: 2026-12-06 21:40:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0020_signal_key_sets'
down_revision = '0019_packed_leaves'
branch_labels = None
depends_on = None

# A compact row's raw_signals text, as bucket/services/signals.py rebuilds it.
EXPANDED = (
    "format('{\"' || array_to_string(k.keys, '\":' || chr(37) || 's,\"') || '\":' || chr(37) "
    "|| 's}', "
    "VARIADIC string_to_array(p.signal_values, E'\\x1f'))"
)


def upgrade():
    op.add_column('packets', sa.Column('signal_keys', sa.Integer(), nullable=True))
    op.add_column('packets', sa.Column('signal_values', sa.Text(), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_table(
        'signal_key_sets',
        sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column('keys', sa.ARRAY(sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('keys', name='uq_signal_key_sets_keys'),
    )
    op.alter_column('packets', 'raw_signals', existing_type=sa.JSON(), nullable=True)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"UPDATE packets p SET raw_signals = {EXPANDED}::json FROM signal_key_sets k "
            "WHERE p.raw_signals IS NULL AND k.id = p.signal_keys"
        )
        op.alter_column('packets', 'raw_signals', existing_type=sa.JSON(), nullable=False)
        op.drop_table('signal_key_sets')
    with op.batch_alter_table('packets') as batch_op:
        batch_op.drop_column('signal_values')
        batch_op.drop_column('signal_keys')
