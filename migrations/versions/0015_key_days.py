"""PostgreSQL: packet_keys partitioned by the day of the client's timestamp, 16-byte keys, and
the Idempotency-Keys in a small table of their own.

``packet_keys`` (migration 0012) was one table for every day, so retention deleted its rows
in batches. The natural identity's digest covers the client's timestamp (in ms), so every
resend of one packet names the same UTC day: the table becomes partitioned by RANGE
(client_day), primary key (dedup_key, client_day), and a resend on any later day still
conflicts. Retention drops a day of keys whole once none of its packets is stored any more
(``services/retention``). The digest and the packet id (UUIDv7) are stored as uuid, 16 bytes
instead of 33 and 37.

The Idempotency-Key is chosen by the client and names no day, so its uniqueness cannot hold in
a partitioned table: it moves to ``packet_idempotency_keys`` (key → the natural identity it
was sent with, and that identity's client day), rare (only single-packet POSTs that send the
header), and emptied with the days of keys it points into.

Partitions: ``packet_keys_legacy`` from MINVALUE to today (UTC) holds every key moved here and
any later key of an earlier day, day partitions from today on (the bookkeeper and ``flask
bucket partitions ensure`` create the days ahead, covering BUCKET_MAX_CLOCK_SKEW), and
``packet_keys_default`` as a watched safety net. Every key row is copied once (its client day
read from its packet), with the tables locked against the old version's writers; a key whose
packet is gone keeps its reception day as its day. An Idempotency-Key stored before keys
were scoped and digested (not 32 hex digits) is kept as its md5, which no request can match
any more, as before. SQLite keeps its keys on the packets table.

Revision ID: 0015_key_days
Revises: 0014_hot_deliveries
Create Date: 2026-12-06 05:00:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0015_key_days'
down_revision = '0014_hot_deliveries'
branch_labels = None
depends_on = None

TODAY = "(now() AT TIME ZONE 'UTC')::date"
DIGEST = "CASE WHEN {0} ~ '^[0-9a-f]{{32}}$' THEN {0}::uuid ELSE md5({0})::uuid END"


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, packet_keys IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE packet_keys RENAME TO packet_keys_flat")
    op.execute("ALTER TABLE packet_keys_flat RENAME CONSTRAINT packet_keys_pkey TO packet_keys_flat_pkey")
    op.execute("DROP INDEX uq_packet_keys_idempotency_key")
    op.execute(
        "CREATE TABLE packet_keys (dedup_key uuid NOT NULL, client_day date NOT NULL, "
        "received_at timestamp without time zone NOT NULL, packet_id uuid NOT NULL, "
        "CONSTRAINT packet_keys_pkey PRIMARY KEY (dedup_key, client_day)) "
        "PARTITION BY RANGE (client_day)"
    )
    op.execute(
        "DO $$ BEGIN EXECUTE format('CREATE TABLE packet_keys_legacy PARTITION OF packet_keys "
        f"FOR VALUES FROM (MINVALUE) TO (%L)', {TODAY}); END $$"
    )
    for offset in range(3):
        op.execute(
            f"DO $$ DECLARE day date := {TODAY} + {offset}; BEGIN "
            "EXECUTE format('CREATE TABLE packet_keys_p%s PARTITION OF packet_keys "
            "FOR VALUES FROM (%L) TO (%L)', to_char(day, 'YYYYMMDD'), day, day + 1); END $$"
        )
    op.execute("CREATE TABLE packet_keys_default PARTITION OF packet_keys DEFAULT")
    op.execute(
        "INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id) "
        f"SELECT {DIGEST.format('k.dedup_key')}, "
        "coalesce(p.client_timestamp, k.received_at)::date, k.received_at, k.packet_id::uuid "
        "FROM packet_keys_flat k LEFT JOIN packets p "
        "ON p.packet_id = k.packet_id AND p.received_at = k.received_at"
    )
    op.execute(
        "CREATE TABLE packet_idempotency_keys (idempotency_key uuid NOT NULL, "
        "dedup_key uuid NOT NULL, client_day date NOT NULL, "
        "CONSTRAINT packet_idempotency_keys_pkey PRIMARY KEY (idempotency_key))"
    )
    op.execute(
        "INSERT INTO packet_idempotency_keys (idempotency_key, dedup_key, client_day) "
        f"SELECT {DIGEST.format('f.idempotency_key')}, k.dedup_key, k.client_day "
        "FROM packet_keys_flat f JOIN packet_keys k "
        f"ON k.dedup_key = {DIGEST.format('f.dedup_key')} AND k.packet_id = f.packet_id::uuid "
        "WHERE f.idempotency_key IS NOT NULL"
    )
    op.execute(
        "CREATE INDEX ix_packet_idempotency_keys_day ON packet_idempotency_keys (client_day)"
    )
    op.execute("DROP TABLE packet_keys_flat")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, packet_keys IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "CREATE TABLE packet_keys_flat (dedup_key varchar(32) NOT NULL, "
        "idempotency_key varchar(255), packet_id varchar(36) NOT NULL, "
        "received_at timestamp without time zone NOT NULL, "
        "CONSTRAINT packet_keys_flat_pkey PRIMARY KEY (dedup_key))"
    )
    op.execute(
        "INSERT INTO packet_keys_flat (dedup_key, idempotency_key, packet_id, received_at) "
        "SELECT replace(k.dedup_key::text, '-', ''), "
        "(SELECT replace(i.idempotency_key::text, '-', '') FROM packet_idempotency_keys i "
        " WHERE i.dedup_key = k.dedup_key AND i.client_day = k.client_day "
        " ORDER BY i.idempotency_key LIMIT 1), "
        "k.packet_id::text, k.received_at FROM packet_keys k"
    )
    op.execute("DROP TABLE packet_idempotency_keys")
    op.execute("DROP TABLE packet_keys")
    op.execute("ALTER TABLE packet_keys_flat RENAME TO packet_keys")
    op.execute("ALTER TABLE packet_keys RENAME CONSTRAINT packet_keys_flat_pkey TO packet_keys_pkey")
    op.create_index(
        'uq_packet_keys_idempotency_key', 'packet_keys', ['idempotency_key'],
        unique=True, postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
