"""PostgreSQL: packet ids and dedup keys stored as native uuid, 16 bytes instead of 37 and 33.

``packets.packet_id``, ``deliveries.packet_id`` and ``packets.dedup_key`` become ``uuid``:
every row and every index entry holding one shrinks (the packets' primary key (packet_id,
received_at), the hot deliveries' primary key, the processed deliveries' packet_id index).
The service still reads and answers them as strings: a packet id as its lowercase hyphenated
text, exactly the string it was stored as, and the dedup key (a blake2b-128 digest) as its 32
hex digits (``models.UuidString``; the audit leaves are built from these text forms, so every
seal made before this migration still verifies). ``packet_keys`` and
``packet_idempotency_keys`` hold their ids and digests as uuid already (migration 0015), so
the statements that move them between these tables need no cast any more; the
Idempotency-Key stays text on ``packets`` (it is part of each audit leaf).

The ALTERs run on the partitioned parents and reach every partition: each table is rewritten
once and its indexes rebuilt, in this transaction (about what a VACUUM FULL of packets and
deliveries costs), with the tables locked against writers meanwhile. Every stored id is the
text of a UUID (the service has only ever handed out UUIDs), so the cast loses nothing, and
the downgrade gives back the same strings. SQLite keeps its strings.

Revision ID: 0016_uuid_ids
Revises: 0015_key_days
Create Date: 2026-12-06 05:00:00.000000

"""

from alembic import op


# revision identifiers, used by Alembic.
revision = '0016_uuid_ids'
down_revision = '0015_key_days'
branch_labels = None
depends_on = None


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE packets ALTER COLUMN packet_id TYPE uuid USING packet_id::uuid, "
        "ALTER COLUMN dedup_key TYPE uuid USING dedup_key::uuid"
    )
    op.execute("ALTER TABLE deliveries ALTER COLUMN packet_id TYPE uuid USING packet_id::uuid")


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE packets, deliveries IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE packets ALTER COLUMN packet_id TYPE varchar(36) USING packet_id::text, "
        "ALTER COLUMN dedup_key TYPE varchar(32) USING replace(dedup_key::text, '-', '')"
    )
    op.execute(
        "ALTER TABLE deliveries ALTER COLUMN packet_id TYPE varchar(36) USING packet_id::text"
    )
