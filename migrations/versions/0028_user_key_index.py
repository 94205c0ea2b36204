"""PostgreSQL: the user listing's index on an 8-byte key of the user id instead of the id.

``ix_packets_user`` (user_id, received_at) holds every packet's user id in its entry: 36
bytes an entry for an id of 8 characters (the fixtures'), 60 for a uuid, padded to the
timestamp's alignment. It is built now on ``packet_user_key(user_id)``, the first 64 bits
of the id's md5 (an IMMUTABLE SQL function of this revision; md5 gives the same digits on
every PostgreSQL version, unlike the internal hash functions), and ``received_at``: 28 bytes
an entry whatever the id's length. The listing and requeue look a user up by the key (the
index condition, in the same order as before) and the id (a filter that drops the rare
packet of another user sharing the key: ``models.of_user``).

The index is dropped and built again in the migration's one transaction, as in 0013: on
PostgreSQL building it on the partitioned parent builds it on every partition, under a lock
that holds inserts back while it builds. On a large deployment, build the new definition on
each partition first with ``CREATE INDEX CONCURRENTLY`` (README, "Deploying"); the parent's
build then attaches those.

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


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(USER_KEY_FUNCTION)
    # One transaction: readers never see the table without the index.
    op.execute("DROP INDEX ix_packets_user")
    op.execute("CREATE INDEX ix_packets_user ON packets (packet_user_key(user_id), received_at)")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_packets_user")
    op.execute("CREATE INDEX ix_packets_user ON packets (user_id, received_at)")
    op.execute("DROP FUNCTION packet_user_key(text)")
