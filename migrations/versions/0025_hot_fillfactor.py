"""PostgreSQL: the hot partition of deliveries leaves room on each page, so that a claim
rewrites a delivery on its own page.

A pending delivery is inserted by ingest, rewritten once by the claim that leases it (its
state, lease, clock and count change: never a HOT update, the queue index holds the state and
the clock), and moved out by its acknowledgement. On a full page the claim's new version goes
to another page, and PostgreSQL first logs a lock of the old version (54 bytes) and then the
whole new row; on the same page it logs the new row compressed against the old one. A leased
row is larger than a pending one (its receipt and delivery time: about 105 bytes against 70),
so a page filled to 40 % by ingest takes every claim's new versions; at 50 % a quarter of them
still moved. Measured (BENCHMARKS.md, four batch consumers): 772-775 bytes of WAL a drained
packet at fillfactor 100, 718-719 at 50, 703-706 at 40. The price is pages: the hot partition
holds 40 % as many waiting packets a page. Existing pages keep their rows; new inserts follow
the setting. SQLite keeps one table: nothing to do.

Revision ID: 0025_hot_fillfactor
Revises: 0024_coded_text_columns
Create Date: 2026-12-07 13:15:00.000000

"""

from alembic import op

# revision identifiers, used by Alembic.
revision = '0025_hot_fillfactor'
down_revision = '0024_coded_text_columns'
branch_labels = None
depends_on = None

FILLFACTOR = 40


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE deliveries_hot SET (fillfactor = {FILLFACTOR})")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE deliveries_hot RESET (fillfactor)")
