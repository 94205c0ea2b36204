"""The user listing's indexes without packet_id, and the employee one only where there is one.

Measured by the storage scenario (``python -m bench.storage --quick``, indexes built afresh):
``ix_packets_user`` on (user_id, received_at, packet_id) took 86 bytes a packet, 41 without
packet_id; ``ix_packets_employee`` took 78 bytes a packet for a column that is NULL on every
learner's packet, 9 over the packets that carry one. The listing's cursor still orders by
(received_at, packet_id): PostgreSQL uses the row comparison's leading column as the index
condition and sorts the rare ties of one microsecond on packet_id (incremental sort).

Each index is dropped and built again in the migration's one transaction; on PostgreSQL
building it on the partitioned parent builds it on every partition. On a large deployment, build the same
definition on each partition first with ``CREATE INDEX CONCURRENTLY``: the parent's build then
attaches those instead of building under a lock (README, "Retention and partitions").

Revision ID: 0013_lean_user_indexes
Revises: 0012_day_partitions
Create Date: 2026-12-06 02:30:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0013_lean_user_indexes'
down_revision = '0012_day_partitions'
branch_labels = None
depends_on = None

HAS_EMPLOYEE = sa.text("employee_id IS NOT NULL")


def replace(name, columns, **where):
    # One transaction: readers never see the table without the index.
    op.drop_index(name, table_name="packets")
    op.create_index(name, "packets", columns, **where)


def upgrade():
    replace("ix_packets_user", ["user_id", "received_at"])
    replace(
        "ix_packets_employee", ["employee_id", "received_at"],
        postgresql_where=HAS_EMPLOYEE, sqlite_where=HAS_EMPLOYEE,
    )


def downgrade():
    replace("ix_packets_user", ["user_id", "received_at", "packet_id"])
    replace("ix_packets_employee", ["employee_id", "received_at", "packet_id"])
