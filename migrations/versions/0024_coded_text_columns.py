"""The five coded strings' text columns renamed ``<name>_text``: an instance of an earlier
release fails on packets instead of reading them wrong.

Since migrations 0020 and 0022 a packet's fields live in forms a release before them reads as
NULL: a compact packet's raw_signals, a coded ``system_type``, ``role``, ``cognitive_state``,
``state`` or ``auth_outcome``, an EMS packet's ``employee_id``. During a rolling deploy the
earlier release's instances keep answering beside the new ones after the migration ran, and
their polls would hand the Karma Tracker such packets with those fields null (it would book
them so and acknowledge them, for good), their listings would show them so. 0023 fenced their
sealer only. Every statement of theirs that reads or writes packets names ``system_type``
(the lease, the listings, the booking's roll-up, the leaves, ingest's INSERT): renamed, each
fails, and its client retries against a new instance (the bridge resends, the Karma Tracker
polls again, the acknowledgement of a lease they gave out still lands). The other four
follow for one naming rule: ``<name>_text`` beside ``<name>_code``. A catalogue change, no
rewrite; on PostgreSQL the partitions follow their parent.

Revision ID: 0024_coded_text_columns
Revises: 0023_seal_layout_fence
Create Date: 2026-12-07 04:50:00.000000

"""

from alembic import op


# revision identifiers, used by Alembic.
revision = '0024_coded_text_columns'
down_revision = '0023_seal_layout_fence'
branch_labels = None
depends_on = None

# The fields, as in bucket.models.PACKET_CODES on the day of this revision.
CODED = ("system_type", "role", "cognitive_state", "state", "auth_outcome")


def upgrade():
    # SQLite renames a column in place too (3.25 and later).
    for name in CODED:
        op.execute(f"ALTER TABLE packets RENAME COLUMN {name} TO {name}_text")


def downgrade():
    for name in CODED:
        op.execute(f"ALTER TABLE packets RENAME COLUMN {name}_text TO {name}")
