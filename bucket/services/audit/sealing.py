"""Sealing: the packets stored since the last seal go into the next one, each exactly once.

One sealer at a time across every worker and instance, decided by the database: a
transaction-scoped advisory lock on PostgreSQL (SQLite serialises writers anyway), with the
seal's primary key as a backstop. The packets sealed are those with ``seq`` above the last
seal's ``last_seq`` and at most the *horizon* below which no insert is still in flight (the
bookkeeper's, ``services/bookkeeping``): a packet committed late has a higher ``seq`` and goes
into the next seal. Never in the ingest request: the workers' background thread seals every
``BUCKET_AUDIT_SEAL_INTERVAL`` seconds, and ``flask bucket seal`` does it on demand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import insert, select, text

from bucket.extensions import db
from bucket.models import AuditSeal, Packet
from bucket.services.audit.content import (
    GENESIS,
    LEAF_FORMAT,
    LEAF_FROM,
    LEAF_SELECT,
    LEAF_SQL,
    PACKET_LAYOUT,
    Leaves,
    leaf_content,
    seal_hash,
    unpack_ids,
)
from bucket.services.audit.merkle import leaf_hash, root
from bucket.services.bookkeeping import horizon_postgres, horizon_sqlite
from bucket.services.dialect import dialect_name
from bucket.timeutil import utc_now

T = Packet.__table__
S = AuditSeal.__table__
# pg_advisory_xact_lock key of the sealer: "prana-seal" as an integer.
SEALER_LOCK = 0x7072616E615F7365
# PostgreSQL encodes and hashes the leaves in C and hands them over as three values: the
# seqs and the ids (``uuid_send``: 16 raw bytes each, as the seal stores them) packed, and the
# leaf hashes (RFC 9162: SHA-256 of 0x00 and the leaf's bytes), 32 bytes each. Reading whole
# rows and encoding them in Python cost the workers 30-50 µs a packet; this leaves them the
# Merkle tree alone (BENCHMARKS.md), and an aggregate of 32 bytes a packet never nears
# PostgreSQL's 1 GB limit on a value. The rows come in seq order from an index range scan (the
# planner settings below: on a backlog, a bitmap scan and a sort would encode every row of the
# range, not only the first ``limit``); the three aggregates read them in that order, which
# ``read_leaves_postgres`` checks. (``packet_id::uuid`` changes nothing since migration 0016,
# which made the ids uuid; the layouts before it, which tests still seal on, kept them as text.)
LEAVES_SQL = (
    "SELECT string_agg(int8send(seq), ''::bytea), "
    "string_agg(uuid_send(packet_id::uuid), ''::bytea), "
    "string_agg(sha256('\\x00'::bytea || leaf), ''::bytea) "
    f"FROM (SELECT seq, packet_id, {LEAF_SQL} AS leaf FROM {LEAF_FROM} "
    "WHERE seq > %s AND seq <= %s ORDER BY seq LIMIT %s) AS chosen"
)
# Transaction-local: the index order above, and the leaves' text in UTF-8 whatever the
# database's or the client's default encoding (record_send converts text to the client's).
# And no JIT: the settings price every plan they rule out at PostgreSQL's disable cost, far
# above jit_above_cost, so each round compiled the statement (about 0.17 s of CPU with
# inlining and optimisation, even with nothing to seal), as on the hot pool (bucket.database).
SEALER_SETTINGS = (
    "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true), "
    "set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true), "
    "set_config('client_encoding', 'UTF8', true)"
)


# What every new seal says of how it was made: its leaves' encoding, and the packets' storage
# layout it read them in (migration 0023: a seal that names none is refused).
STAMP = {"leaf_format": LEAF_FORMAT, "packet_layout": PACKET_LAYOUT}


@dataclass
class Sealed:
    """One seal made: its number, the packets it covers and its hash."""

    seq: int
    packet_count: int
    hash: str


def head():
    """The newest seal's number, range end, hash and total, without its leaves (the session's
    transaction stays open); None before the first seal."""
    columns = (S.c.seq, S.c.last_seq, S.c.hash, S.c.packets_total)
    return db.session.execute(select(*columns).order_by(S.c.seq.desc()).limit(1)).first()


def seal_new_packets(max_packets: int | None = None) -> Sealed | None:
    """Seal the packets stored since the last seal (at most ``max_packets``, default
    BUCKET_AUDIT_SEAL_MAX_PACKETS) and commit; None when there was nothing to seal or another
    sealer is at it."""
    limit = max_packets or current_app.config["BUCKET_AUDIT_SEAL_MAX_PACKETS"]
    postgres = dialect_name() == "postgresql"
    horizon = horizon_postgres() if postgres else None
    if postgres and horizon is None:
        return None
    session = db.session
    try:
        if postgres:
            locked = session.execute(
                text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SEALER_LOCK}
            ).scalar()
            if not locked:
                session.rollback()
                return None
        else:
            horizon = horizon_sqlite()
        previous = head()
        after = previous.last_seq if previous else 0
        leaves, uuids = (read_leaves_postgres if postgres else read_leaves)(after, horizon, limit)
        if not leaves.seqs:
            session.commit()
            return None
        seal = {
            "seq": (previous.seq + 1) if previous else 1,
            "sealed_at": utc_now(),
            "after_seq": after,
            "last_seq": leaves.seqs[-1],
            "packet_count": len(leaves.seqs),
            "root": root(leaves.hashes).hex(),
            "previous_hash": previous.hash if previous else GENESIS,
        }
        seal["hash"] = seal_hash(seal)
        seal["packets_total"] = (previous.packets_total if previous else 0) + len(leaves.seqs)
        packed = leaves.packed(after, uuids)
        session.execute(insert(S).values(**seal, **packed, **STAMP))
        session.commit()
        return Sealed(seal["seq"], len(leaves.seqs), seal["hash"])
    except BaseException:
        session.rollback()
        raise


def read_leaves_postgres(after: int, horizon: int, limit: int) -> tuple[Leaves, bytes | None]:
    """The next leaves, encoded by PostgreSQL, in the session's transaction, and their ids
    as PostgreSQL packed them (16 bytes each, as the seal stores them)."""
    connection = db.session.connection().connection.driver_connection
    with connection.cursor(binary=True) as cursor:
        cursor.execute(SEALER_SETTINGS)
        packed_seqs, uuids, hashed = cursor.execute(LEAVES_SQL, (after, horizon, limit)).fetchone()
    if packed_seqs is None:
        return Leaves([], [], []), None
    seqs = list(struct.unpack(f">{len(packed_seqs) // 8}q", packed_seqs))
    if seqs != sorted(set(seqs)):
        raise RuntimeError("the leaves did not arrive in seq order: no seal made")
    hashes = [hashed[i : i + 32] for i in range(0, len(hashed), 32)]
    leaves = Leaves(seqs, unpack_ids(uuids), hashes)
    if not len(leaves.seqs) == len(leaves.ids) == len(leaves.hashes) == len(uuids) // 16:
        raise RuntimeError("the leaves PostgreSQL returned do not add up: no seal made")
    return leaves, bytes(uuids)


def read_leaves(after: int, horizon: int, limit: int) -> tuple[Leaves, None]:
    """The same, encoded in Python (SQLite); the ids are packed from their text."""
    rows = (
        db.session.execute(
            select(*LEAF_SELECT)
            .where(T.c.seq > after, T.c.seq <= horizon)
            .order_by(T.c.seq)
            .limit(limit)
        )
        .mappings()
        .all()
    )
    leaves = Leaves(
        [row["seq"] for row in rows],
        [row["packet_id"] for row in rows],
        [leaf_hash(leaf_content(row)) for row in rows],
    )
    return leaves, None


def seal_backlog(rounds: int = 20) -> int:
    """The background round: seal, and go on while each seal came out full (a backlog), at
    most ``rounds`` seals; the packets sealed."""
    limit = current_app.config["BUCKET_AUDIT_SEAL_MAX_PACKETS"]
    sealed = 0
    for _ in range(rounds):
        made = seal_new_packets(limit)
        if made is None:
            break
        sealed += made.packet_count
        if made.packet_count < limit:
            break
    return sealed


def seal_everything() -> list[Sealed]:
    """Seal until nothing stored before now is left unsealed; the seals made."""
    made = []
    while (sealed := seal_new_packets()) is not None:
        made.append(sealed)
    return made


def sealed_through() -> int:
    """The highest ``seq`` sealed so far (0 before the first seal)."""
    found = db.session.execute(select(S.c.last_seq).order_by(S.c.seq.desc()).limit(1)).scalar()
    return found or 0
