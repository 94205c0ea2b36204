"""PostgreSQL: a packet's five numbers as smallints of the value times a fixed scale, where
that gives back the very float received; the float columns renamed ``<name>_float``.

``active_seconds``, ``idle_seconds``, ``away_seconds`` (the 5-second window's split),
``focus_score`` (0-100) and ``integrity_score`` (0-1) arrive with a decimal or two, and cost
8 bytes each of every row as float8. Since this revision ingest stores such a value as
``<name>_scaled`` (a smallint: milliseconds, hundredths, ten-thousandths; the same scales as
``bucket.models.PACKET_SCALES``) with ``<name>_float`` NULL, when the integer divided by its
scale is exactly the float received; any other value stays a float. Readers and the audit
leaf divide it back (``bucket/services/codes.py``), to the same float8: seals keep verifying.

The float columns are renamed ``<name>_float`` (a catalogue change, no rewrite; on PostgreSQL
the partitions follow their parent), for the reason of migration 0024: an instance of the
release before this one, still answering during a rolling deploy, would read a scaled
packet's numbers as NULL and serve them so; with the columns renamed every statement of its
that reads or writes packets fails, and its client retries on a new instance. The three
durations become nullable (one of the two columns holds each value).

Existing rows keep their floats: readers take either form, so no row is rewritten. Downgrade
writes the floats back into the rows stored scaled (a rewrite of those rows), then drops the
five columns and gives the float columns their names back.

SQLite stores every number as received: the columns are renamed and added, and stay NULL.

Revision ID: 0026_scaled_numbers
Revises: 0025_hot_fillfactor
Create Date: 2026-12-07 21:10:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0026_scaled_numbers'
down_revision = '0025_hot_fillfactor'
branch_labels = None
depends_on = None

# The fields and their scales, as in bucket.models.PACKET_SCALES on the day of this revision.
SCALES = {
    "active_seconds": 1000,
    "idle_seconds": 1000,
    "away_seconds": 1000,
    "focus_score": 100,
    "integrity_score": 10_000,
}
# Required by the packet schema: NOT NULL as floats before this revision.
REQUIRED = ("active_seconds", "idle_seconds", "away_seconds")


def upgrade():
    # SQLite renames a column in place too (3.25 and later).
    for name in SCALES:
        op.execute(f"ALTER TABLE packets RENAME COLUMN {name} TO {name}_float")
    with op.batch_alter_table('packets') as batch_op:
        for name in REQUIRED:
            batch_op.alter_column(f'{name}_float', existing_type=sa.Float(), nullable=True)
        for name in SCALES:
            batch_op.add_column(sa.Column(f'{name}_scaled', sa.SmallInteger(), nullable=True))


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE packets SET "
            + ", ".join(
                f"{name}_float = coalesce({name}_float, {name}_scaled::float8 / {scale}::float8)"
                for name, scale in SCALES.items()
            )
            + " WHERE "
            + " OR ".join(f"{name}_scaled IS NOT NULL" for name in SCALES)
        )
    with op.batch_alter_table('packets') as batch_op:
        for name in reversed(list(SCALES)):
            batch_op.drop_column(f'{name}_scaled')
        for name in REQUIRED:
            batch_op.alter_column(f'{name}_float', existing_type=sa.Float(), nullable=False)
    for name in SCALES:
        op.execute(f"ALTER TABLE packets RENAME COLUMN {name}_float TO {name}")
