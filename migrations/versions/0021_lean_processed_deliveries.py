"""PostgreSQL: a processed delivery's row without padding, a second clock or its id twice.

A processed packet's row in ``deliveries_processed`` cost 141.6 bytes of heap a packet
(BENCHMARKS.md, "The full storage run again"): 25 bytes of tuple header padded to 32, and the
columns in the parent's order (uuid, timestamp, text, double, ...) padded to their alignment
between them, with ``processed_at``, 8 bytes, holding the instant ``visible_at`` holds too (the
acknowledgement sets both from one clock reading). Since this revision:

- ``processed_at`` is NULL in processed rows: readers convert ``visible_at`` back with the very
  function that made ``processed_at`` (``datetime.fromtimestamp``), so the listing shows the
  same value. Existing rows are converted only where ``processed_at`` is exactly that value
  (computed here as Python computes it: whole seconds, then the fraction's microseconds
  rounded half to even); any other keeps its own.
- The packet's own id inside its karma actions (the Karma Tracker names it in each action) is
  stored as a mark, a TAB and ``0`` (valid JSON: whitespace and a number), wherever a JSON
  string equal to it stands as a value; the readers put it back, so they see the very text
  that was acknowledged (``services/delivery/actions``). A TAB never stands outside a string
  in the text the service stores, so a mark is never mistaken.
- Each partition of processed deliveries orders its columns so that no value is padded:
  8-byte times and the double first, then the integer, the uuid and the boolean, text and
  json last (``services/partitions.create_partition_table`` makes new days the same way).
  PostgreSQL maps rows between partitions by column name, so the hot partition and the
  parent keep their order.

No column changes type: a running process of the version before keeps its prepared statements
(a type change would fail each one returning the column, "cached plan must not change result
type", every poll and ack until it restarts; ``delivery_count`` as a smallint would save 8
bytes more on a row with an empty list of actions, not worth that). Such a process keeps
ingesting, serving and acknowledging; the processed rows it writes keep their
``processed_at`` and their actions as they came, which the readers show as before, while its
own listing shows the lean rows without ``processed_at`` and with the mark (``0``) for the
id, until it is replaced.

Every partition of processed deliveries is detached, copied once into its lean shape and
attached again (attaching checks its bounds and builds its ``packet_id`` index), in this
transaction, with the tables locked against writers meanwhile: work that grows with the
processed rows stored, like 0014's copy (a VACUUM FULL of them). The hot partition is not
touched. No delivery changes state, so no packet is lost or delivered again. Downgrade copies
them back in the parent's order with ``processed_at`` and the ids written out again.

SQLite keeps its one table as it is.

Revision ID: 0021_lean_processed_deliveries
Revises: 0020_signal_key_sets
Create Date: 2026-12-07 01:30:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0021_lean_processed_deliveries'
down_revision = '0020_signal_key_sets'
branch_labels = None
depends_on = None

PROCESSED = "deliveries_processed"
CHILDREN_SQL = (
    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) "
    "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    f"WHERE i.inhparent = '{PROCESSED}'::regclass ORDER BY c.relname"
)
# The parent's columns: in its order, or ordered so that none is padded (as
# services/partitions.COMPACT_COLUMNS_SQL orders them).
COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = 'deliveries'::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY {order}
"""
PARENT_ORDER = "a.attnum"
COMPACT_ORDER = (
    "t.typlen = -1, position(t.typalign::text IN 'disc'), t.typlen DESC, a.attnum"
)
# A processed row's karma actions with the packet's id marked, and put back (as
# services/delivery/actions.PG_MARKED and PG_RESTORED).
MARKED = (
    "CAST(regexp_replace(CAST(karma_actions AS TEXT), '([[,:])\"' || CAST(packet_id AS TEXT) "
    "|| '\"(?=[],}])', '\\1' || chr(9) || '0', 'g') AS JSON)"
)
RESTORED = (
    "CASE WHEN strpos(CAST(karma_actions AS TEXT), chr(9)) > 0 THEN CAST(replace(CAST("
    "karma_actions AS TEXT), chr(9) || '0', '\"' || CAST(packet_id AS TEXT) || '\"') AS JSON) "
    "ELSE karma_actions END"
)
# visible_at as the naive UTC timestamp Python's datetime.fromtimestamp(visible_at, UTC) gives:
# the whole seconds, plus the fraction's microseconds rounded half to even (round() on a
# double is rint() in PostgreSQL, as in Python's C code).
FROM_EPOCH = (
    "(timestamp '1970-01-01' + floor(visible_at)::bigint * interval '1 second'"
    " + round((visible_at - floor(visible_at)) * 1000000)::bigint * interval '1 microsecond')"
)


def columns(order: str) -> list[tuple[str, str, bool]]:
    return [tuple(row) for row in op.get_bind().execute(sa.text(COLUMNS_SQL.format(order=order)))]


def rebuild(order: str, processed_at: str, karma_actions: str) -> None:
    """Copy every partition of processed deliveries into a table with the parent's columns in
    ``order`` and ``processed_at`` and ``karma_actions`` as the expressions given, and attach
    it in its place."""
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    shape = columns(order)
    definitions = ", ".join(
        f"{column} {kind}{' NOT NULL' if not_null else ''}" for column, kind, not_null in shape
    )
    names = [column for column, _, _ in shape]
    listed = ", ".join(names)
    computed = {"processed_at": processed_at, "karma_actions": karma_actions}
    values = ", ".join(computed.get(column, column) for column in names)
    for name, bound in op.get_bind().execute(sa.text(CHILDREN_SQL)).all():
        op.execute(f"ALTER TABLE {PROCESSED} DETACH PARTITION {name}")
        op.execute(f"ALTER TABLE {name} RENAME TO {name}_old")
        op.execute(f"CREATE TABLE {name} ({definitions})")
        op.execute(
            f"INSERT INTO {name} ({listed}) SELECT {values} FROM {name}_old "
            "ORDER BY received_at, packet_id"
        )
        op.execute(f"DROP TABLE {name}_old")
        op.execute(f"ALTER TABLE {PROCESSED} ATTACH PARTITION {name} {bound}")


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    rebuild(
        COMPACT_ORDER,
        f"CASE WHEN processed_at = {FROM_EPOCH} THEN NULL ELSE processed_at END",
        MARKED,
    )


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    rebuild(PARENT_ORDER, f"coalesce(processed_at, {FROM_EPOCH})", RESTORED)
