"""PostgreSQL: the user listing's index on an 8-byte key of the user id instead of the id.

``ix_packets_user`` (user_id, received_at) holds every packet's user id in its entry: 36
bytes an entry for an id of 8 characters (the fixtures'), 60 for a uuid, padded to the
timestamp's alignment. It is built now on ``packet_user_key(user_id)``, the first 64 bits
of the id's md5 (an IMMUTABLE SQL function of this revision; md5 gives the same digits on
every PostgreSQL version, unlike the internal hash functions), and ``received_at``: 28 bytes
an entry whatever the id's length. The listing and requeue look a user up by the key (the
index condition, in the same order as before) and the id (a filter that drops the rare
packet of another user sharing the key: ``models.of_user``).

The new index is built beside the old one in the migration's one transaction, then the old
one dropped and the new one renamed: building it on the partitioned parent builds it on every
partition, under a SHARE lock that holds inserts back (reads go on) while it builds; the
drop's ACCESS EXCLUSIVE lock comes last, for a moment. On a large deployment, build the new
definition on each partition first with ``CREATE INDEX CONCURRENTLY`` (README, "Deploying");
the parent's build then attaches those.

The key is md5's: a PostgreSQL built to run OpenSSL in FIPS mode refuses md5, and with it
this migration.

SQLite keeps its index on the user id itself.

Revision ID: 0028_user_key_index
Revises: 0027_keys_in_packet_keys_only
Create Date: 2026-12-08 00:30:00.000000

"""

from alembic import op


# revision identifiers, used by Alembic.
revision = '0028_user_key_index'
down_revision = '0027_keys_in_packet_keys_only'
branch_labels = None
depends_on = None

USER_KEY_FUNCTION = (
    "CREATE OR REPLACE FUNCTION packet_user_key(user_id text) RETURNS bigint "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE "
    "AS $$ SELECT ('x' || left(md5(user_id), 16))::bit(64)::bigint $$"
)


def swap(definition):
    """Build the new index beside the old one (a SHARE lock: reads go on, inserts wait), then
    drop the old and give the new its name: the ACCESS EXCLUSIVE lock of the drop is taken
    last, just before the commit, and no reader ever finds the table without an index."""
    op.execute(f"CREATE INDEX ix_packets_user_next ON packets {definition}")
    op.execute("DROP INDEX ix_packets_user")
    op.execute("ALTER INDEX ix_packets_user_next RENAME TO ix_packets_user")


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(USER_KEY_FUNCTION)
    swap("(packet_user_key(user_id), received_at)")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    swap("(user_id, received_at)")
    op.execute("DROP FUNCTION packet_user_key(text)")
