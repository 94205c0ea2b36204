"""Storing packets: validated rows in, one INSERT per write (a request, or several sharing it)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring_ascii as quote_json
from typing import Any

import orjson
from flask import current_app
from psycopg.types.json import Json
from sqlalchemy import insert, or_, select, text
from sqlalchemy.dialects import postgresql

from bucket.exceptions import ConflictVanished
from bucket.extensions import db, queue
from bucket.jsonutil import canonical_json
from bucket.models import Delivery, DeliveryState, Packet
from bucket.services import sql
from bucket.services.coalescing import Submission, coalescer
from bucket.services.codes import encode_rows
from bucket.services.dialect import dialect_name, holds_sqlite_turn, upsert_insert
from bucket.services.signals import compact_rows, key_sets
from bucket.services.tokens import VERIFIED, PacketAuth
from bucket.timeutil import new_packet_id, utc_now

PACKET_TABLE = Packet.__table__
DELIVERY_TABLE = Delivery.__table__
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every column but ``seq``, which PostgreSQL's identity fills (and SQLite's allocation below).
PACKET_COLUMNS = tuple(column.name for column in PACKET_TABLE.c if column.name != "seq")
JSON_COLUMNS = frozenset(("raw_signals",))
# PostgreSQL: the packets table is partitioned by day (services/partitions) and cannot hold a
# unique key across days, so each packet claims its natural identity in ``packet_keys``
# (partitioned by the client timestamp's day, which every copy of a packet shares) first and
# goes in only if that row did (ON CONFLICT DO NOTHING, as the packet table's own keys did
# before): two copies racing on two workers, or a copy resent days later, still end as one
# row. A packet sent with an Idempotency-Key claims it first (``packet_idempotency_keys``,
# pointing to its identity) and claims its identity only if the key went in: a key taken
# already makes it the duplicate of the packet that key points to, and a key claimed by a
# copy whose identity is stored already points to that packet, so no key row ever names a
# packet not stored. Keys, packet and pending delivery go in one statement. Columns are named
# on both sides, so the statement does not depend on the physical column order.
# Packet ids and dedup keys are uuid in every table here (migrations 0015 and 0016): they
# move between them uncast. The Idempotency-Key stays text on ``packets`` (its scoped
# digest's 32 hex digits) and is cast to its key table's uuid. The dedup key goes into
# ``packet_keys`` only, the packet's own column left NULL (migration 0027: it repeated the
# key row's 16 bytes in every packet; ``packet_identity`` recomputes it from the packet).
_STORED_COLUMNS = ", ".join("NULL" if name == "dedup_key" else name for name in PACKET_COLUMNS)
_CLAIM_AND_STORE = (
    "idempotent AS (INSERT INTO packet_idempotency_keys (idempotency_key, dedup_key, client_day) "
    "SELECT idempotency_key::uuid, dedup_key, client_timestamp::date FROM incoming "
    "WHERE idempotency_key IS NOT NULL ON CONFLICT DO NOTHING RETURNING dedup_key), "
    "claimed AS (INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id) "
    "SELECT dedup_key, client_timestamp::date, received_at, packet_id FROM incoming "
    "WHERE idempotency_key IS NULL OR dedup_key IN (SELECT dedup_key FROM idempotent) "
    "ON CONFLICT DO NOTHING RETURNING packet_id, dedup_key), "
    f"stored AS (INSERT INTO packets ({', '.join(PACKET_COLUMNS)}) "
    f"SELECT {_STORED_COLUMNS} FROM incoming "
    "WHERE packet_id IN (SELECT packet_id FROM claimed) "
    "RETURNING packet_id, received_at), "
    "delivered AS (INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, "
    "delivery_count, processed_by_karma) "
    "SELECT packet_id, received_at, 'pending', extract(epoch FROM received_at)::float8, 0, false "
    "FROM stored) "
    # Every claimed packet is stored (the same statement; one that fails fails it all).
    "SELECT replace(dedup_key::text, '-', '') FROM claimed"
)
# A packet stored compact names a key set this process has cached (services/signals); one the
# dictionary no longer holds (restored from a backup, emptied by hand) would leave its signals
# unreadable, so such a packet does not go in at all (not even its identity), and
# ``_store_postgres`` writes it again in full.
_KNOWN_SET = (
    "given.signal_keys IS NULL OR EXISTS "
    "(SELECT 1 FROM signal_key_sets s WHERE s.id = given.signal_keys)"
)
BATCH_INSERT_SQL = (
    f"WITH incoming AS (SELECT {', '.join(PACKET_COLUMNS)} "
    f"FROM json_populate_recordset(NULL::packets, %(doc)s::json) AS given WHERE {_KNOWN_SET}), "
    + _CLAIM_AND_STORE
)


def _postgres_type(column) -> str:
    """The column's type without a length: a value too long must fail the INSERT, as it did,
    not be cut by the cast."""
    return re.sub(r"\(\d+\)", "", column.type.compile(dialect=postgresql.dialect()))


# A single packet's values as typed parameters (a NULL must still know its column's type).
SINGLE_INSERT_SQL = (
    "WITH given AS (SELECT "
    + ", ".join(
        f"CAST(%s AS {_postgres_type(PACKET_TABLE.c[name])}) AS {name}" for name in PACKET_COLUMNS
    )
    + f"), incoming AS (SELECT * FROM given WHERE {_KNOWN_SET}), "
    + _CLAIM_AND_STORE
)
# Two index lookups, not an OR (which would need a bitmap scan, off on this pool); the client
# days prune the identities' lookup to the days of the copies (a key lives in its own day
# only), the Idempotency-Keys' goes through the identity they point to.
EXISTING_SQL = (
    "SELECT k.packet_id::text, replace(k.dedup_key::text, '-', ''), NULL, k.received_at "
    "FROM packet_keys k WHERE k.dedup_key = ANY(%(keys)s::uuid[]) "
    "AND k.client_day = ANY(%(days)s::date[]) "
    "UNION ALL SELECT k.packet_id::text, replace(k.dedup_key::text, '-', ''), "
    "replace(i.idempotency_key::text, '-', ''), k.received_at "
    "FROM packet_idempotency_keys i JOIN packet_keys k "
    "ON k.dedup_key = i.dedup_key AND k.client_day = i.client_day "
    "WHERE i.idempotency_key = ANY(%(idems)s::uuid[])"
)


@dataclass(frozen=True)
class IngestOutcome:
    """What became of one valid packet."""

    packet_id: str
    received_at: datetime
    duplicate: bool


@dataclass
class BatchSummary:
    """A batch envelope's outcome: one result per packet, in request order, and the totals."""

    results: list[dict]
    accepted: int
    duplicates: int
    rejected: int

    @property
    def status(self) -> str:
        if not self.rejected:
            return "ingested"
        return "partial" if self.accepted else "rejected"

    @property
    def http_status(self) -> int:
        """200 when every packet was accepted, 207 when some were rejected, 422 when none was."""
        if not self.rejected:
            return 200
        return 207 if self.accepted else 422


def store_batch(
    size: int,
    valid: list[tuple[int, dict[str, Any]]],
    errors: dict[int, dict],
    auths: dict[int, PacketAuth] | None = None,
    charges: Any = None,
) -> BatchSummary:
    """Store a batch's valid packets (by request index) in one statement and report each packet
    (``auths``: each valid packet's authentication outcome, when ingest checks tokens;
    ``charges``: its rate limits, when its packets share a write, see ``store_packets``)."""
    results: list[dict] = [
        {"index": index, "status": "rejected", "errors": errors[index]}
        for index in range(size)
        if index in errors
    ]
    by_index = {result["index"]: result for result in results}
    if valid:
        outcomes = store_packets(
            [packet for _, packet in valid],
            auths=[auths[index] for index, _ in valid] if auths is not None else None,
            charges=charges,
        )
        for (index, _), outcome in zip(valid, outcomes, strict=True):
            by_index[index] = {
                "index": index,
                "status": "duplicate" if outcome.duplicate else "ingested",
                "packet_id": outcome.packet_id,
            }
    ordered = [by_index[index] for index in range(size)]
    duplicates = sum(1 for item in ordered if item["status"] == "duplicate")
    return BatchSummary(ordered, len(valid), duplicates, len(errors))


# Unverified packets (a token missing, invalid or another user's) hold their identities in a
# namespace of their own: a forged copy posted first can never make the genuine, verified
# packet a "duplicate" of it (README, "Authenticated ingest"). Verified packets, and every
# packet while authentication is off, keep the plain identity.
UNVERIFIED_SCOPE = "unverified"


def _json_part(value: str | int | None) -> str:
    """One element of a digest's JSON array, exactly as ``json.dumps`` writes it."""
    if value is None:
        return "null"
    if type(value) is str:
        return quote_json(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value)


def _digest(*parts: str | int | None) -> str:
    """blake2b-128 of the parts as a compact JSON array (``json.dumps`` with ``(",", ":")``
    separators, non-ASCII escaped), the form every stored key was hashed from. Joined here
    from the C string escaper ``json.dumps`` itself uses, at less than half its cost."""
    text = "[" + ",".join([_json_part(part) for part in parts]) + "]"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def identity_key(
    system_type: str | None,
    user_id: str,
    session_id: str | None,
    ts: datetime,
    scope: str | None = None,
) -> str:
    """Digest of the natural identity: nulls equal, the timestamp as a UTC instant in ms."""
    millis = (ts - EPOCH) // timedelta(milliseconds=1)
    if scope is None:
        return _digest(system_type, user_id, session_id, millis)
    return _digest(scope, system_type, user_id, session_id, millis)


def identity_scope(auth_outcome: str | None) -> str | None:
    """The namespace of a packet's identity: none while tokens are not checked (``None``) or
    for a verified packet, ``UNVERIFIED_SCOPE`` for any other outcome."""
    return None if auth_outcome is None or auth_outcome == VERIFIED else UNVERIFIED_SCOPE


# A stored packet's fields its identity is a digest of (as every reader shows them).
IDENTITY_FIELDS = ("system_type", "user_id", "session_id", "client_timestamp", "auth_outcome")


def packet_identity(packet: Mapping[str, Any]) -> str:
    """The dedup key ingest claimed for a stored packet (a mapping over ``IDENTITY_FIELDS``),
    recomputed from the fields it covers: PostgreSQL keeps the key in ``packet_keys`` only
    (migration 0027), and retention forgets a purged packet's key by it."""
    return identity_key(
        packet["system_type"],
        packet["user_id"],
        packet["session_id"],
        packet["client_timestamp"],
        identity_scope(packet["auth_outcome"]),
    )


def scoped_idempotency_key(user_id: str, key: str | None, scope: str | None = None) -> str | None:
    """The key as stored, scoped to its user: two browsers choosing one key never collide."""
    if key is None:
        return None
    return _digest(user_id, key) if scope is None else _digest(scope, user_id, key)


def packet_user(data: dict[str, Any]) -> str:
    """A validated packet's user: ``user_id``, or the EMS ``employee_id`` without one."""
    return data.get("user_id") or data["employee_id"]


def packet_row(
    data: dict[str, Any],
    received_at: datetime,
    idempotency_key: str | None,
    auth: PacketAuth | None = None,
    stale_after: float | None = None,
) -> dict:
    """Turn a validated packet into a table row (EMS ``employee_id`` becomes the user), with
    its authentication outcome (None: not checked) and whether it arrived stale."""
    user_id = packet_user(data)
    timestamp = data["timestamp"]
    scope = identity_scope(auth.outcome if auth is not None else None)
    stale = stale_after is not None and (received_at - timestamp).total_seconds() > stale_after
    return {
        "packet_id": new_packet_id(),
        "dedup_key": identity_key(
            data.get("system_type"), user_id, data.get("session_id"), timestamp, scope
        ),
        "idempotency_key": scoped_idempotency_key(user_id, idempotency_key, scope),
        "user_id": user_id,
        "employee_id": data.get("employee_id"),
        "session_id": data.get("session_id"),
        "lesson_id": data.get("lesson_id"),
        "task_id": data.get("task_id"),
        "system_type_text": data.get("system_type"),
        "role_text": data.get("role"),
        "client_timestamp": timestamp,
        "cognitive_state_text": data.get("cognitive_state"),
        "state_text": data.get("state"),
        "active_seconds_float": data["active_seconds"],
        "idle_seconds_float": data["idle_seconds"],
        "away_seconds_float": data["away_seconds"],
        "focus_score_float": data.get("focus_score"),
        "integrity_score_float": data.get("integrity_score"),
        "raw_signals": data["raw_signals"],
        "received_at": received_at,
        "auth_outcome_text": auth.outcome if auth is not None else None,
        "auth_subject": auth.subject if auth is not None else None,
        "stale": stale,
        # Filled on PostgreSQL where the dictionary takes its keys (services/signals).
        "signal_keys": None,
        "signal_values": None,
        # Filled on PostgreSQL for known values and exact numbers (services/codes).
        "system_type_code": None,
        "role_code": None,
        "cognitive_state_code": None,
        "state_code": None,
        "auth_outcome_code": None,
        "employee_is_user": None,
        "active_seconds_scaled": None,
        "idle_seconds_scaled": None,
        "away_seconds_scaled": None,
        "focus_score_scaled": None,
        "integrity_score_scaled": None,
    }


def delivery_row(row: dict) -> dict:
    """The new packet's delivery: pending, visible from the moment it was received."""
    return {
        "packet_id": row["packet_id"],
        "received_at": row["received_at"],
        "delivery_state": DeliveryState.PENDING,
        "visible_at": row["received_at"].timestamp(),
        "delivery_count": 0,
        "processed_by_karma": False,
    }


def shares_write(count: int) -> bool:
    """Whether ``count`` packets stored now go to a write shared with other requests
    (``BUCKET_INGEST_COALESCE``), where the coalescer admits them (their rate limits)."""
    shared = coalescer()
    return shared is not None and count <= shared.max_items and not holds_sqlite_turn()


def store_packets(
    packets: list[dict[str, Any]],
    idempotency_key: str | None = None,
    auths: list[PacketAuth] | None = None,
    charges: Any = None,
) -> list[IngestOutcome]:
    """Store validated packets and commit; return one outcome per packet, in order (``auths``:
    each packet's authentication outcome, when ingest checks tokens).

    Duplicates (of stored packets or of each other) are detected by the unique keys, so two
    copies racing on two workers still end as one row. Nothing is acknowledged before COMMIT.
    With ``BUCKET_INGEST_COALESCE`` the packets share the statement and commit of other
    requests of this worker writing at the same time (bucket/services/coalescing.py), and the
    request's rate-limit ``charges`` (when ``shares_write`` said so) are decided with theirs
    just before the write: a request over a limit raises its 429 and stores nothing.
    """
    if charges is not None or shares_write(len(packets)):
        return coalescer().store(packets, idempotency_key, auths, charges)
    return write_submissions([Submission(packets, idempotency_key, auths)])[0]


def write_submissions(submissions: list[Submission]) -> list[list[IngestOutcome]]:
    """Store several requests' packets in one statement and commit; each request's outcomes.

    The packets are written as one batch envelope would be, each with its own request's
    ``Idempotency-Key``; a packet equal to an earlier one of the same write is its duplicate.
    """
    received_at = utc_now()
    stale_after = current_app.config.get("BUCKET_STALE_AFTER")
    rows_by_request = []
    for submission in submissions:
        judged = submission.auths or [None] * len(submission.items)
        rows_by_request.append(
            [
                packet_row(data, received_at, submission.idempotency_key, auth, stale_after)
                for data, auth in zip(submission.items, judged, strict=True)
            ]
        )
    first_by_key: dict[str, dict] = {}
    for rows in rows_by_request:
        for row in rows:
            first_by_key.setdefault(row["dedup_key"], row)
    fresh = list(first_by_key.values())
    store = _store_postgres if dialect_name() == "postgresql" else _store_sqlite
    inserted, existing = store(fresh)
    if inserted:
        queue.publish_ready()
    return [
        [outcome_of(row, first_by_key, inserted, existing, received_at) for row in rows]
        for rows in rows_by_request
    ]


def outcome_of(
    row: dict,
    first_by_key: dict[str, dict],
    inserted: set[str],
    existing: Existing,
    received_at: datetime,
) -> IngestOutcome:
    """What became of one row of a write: stored, or the duplicate of which packet."""
    first = first_by_key[row["dedup_key"]]
    if row is first and row["dedup_key"] in inserted:
        return IngestOutcome(row["packet_id"], received_at, False)
    if first["dedup_key"] in inserted:
        return IngestOutcome(first["packet_id"], received_at, True)
    packet_id, original_received_at = existing[row["dedup_key"]]
    return IngestOutcome(packet_id, original_received_at, True)


Existing = dict[str, tuple[str, datetime]]


def _store_postgres(rows: list[dict]) -> tuple[set[str], Existing]:
    """The rows stored compact where the dictionary takes their keys (services/signals), in
    one statement; those that named a key set the dictionary no longer holds (this process's
    cache outlived it) written again in full, and the cache forgotten."""
    in_full = {row["dedup_key"]: row["raw_signals"] for row in rows}
    compact_rows(rows)
    encode_rows(rows)
    inserted, existing, dangling = _write_postgres(rows)
    if dangling:
        key_sets().forget()
        for row in dangling:
            row.update(raw_signals=in_full[row["dedup_key"]], signal_keys=None, signal_values=None)
        more_inserted, more_existing, _ = _write_postgres(dangling)
        inserted |= more_inserted
        existing.update(more_existing)
    return inserted, existing


def _write_postgres(rows: list[dict]) -> tuple[set[str], Existing, list[dict]]:
    """INSERT … ON CONFLICT DO NOTHING as one autocommit statement; then read back what the
    conflicting rows duplicate, and which compact rows went nowhere (their key set gone).
    A single packet's values go as parameters of a prepared
    statement; a batch goes as one JSON parameter instead of ~30 per row (the statement text
    stays small and cached, and PostgreSQL parses the rows server-side, several times faster)."""
    if len(rows) == 1:
        result = sql.run_postgres(SINGLE_INSERT_SQL, single_values(rows[0]))
    else:
        # Sorted keys: raw_signals is stored as canonical JSON (bucket.jsonutil); a compact
        # row's values are canonical JSON texts already (services/signals).
        doc = orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC | orjson.OPT_SORT_KEYS).decode()
        result = sql.run_postgres(BATCH_INSERT_SQL, {"doc": doc})
    inserted = {key for (key,) in result}
    missing = [row for row in rows if row["dedup_key"] not in inserted]
    if not missing:
        return inserted, {}, []
    found = sql.run_postgres(
        EXISTING_SQL,
        {
            "keys": [row["dedup_key"] for row in missing],
            "days": sorted({client_day(row) for row in missing}),
            "idems": idempotency_keys(missing),
        },
    )
    dedups = {dedup for _, dedup, _, _ in found}
    idems = {idem for _, _, idem, _ in found if idem}
    dangling, conflicting = [], []
    for row in missing:
        went_nowhere = (
            row["signal_keys"] is not None
            and row["dedup_key"] not in dedups
            and row["idempotency_key"] not in idems
        )
        (dangling if went_nowhere else conflicting).append(row)
    return inserted, match_existing(conflicting, found), dangling


def _store_sqlite(rows: list[dict]) -> tuple[set[str], Existing]:
    """The same in the session's BEGIN IMMEDIATE transaction, committed before returning."""
    session = db.session
    try:
        allocate_seq(session, rows)
        statement = (
            upsert_insert(PACKET_TABLE).on_conflict_do_nothing().returning(PACKET_TABLE.c.dedup_key)
        )
        inserted = {
            key for (key,) in session.execute(statement, rows if len(rows) > 1 else rows[0])
        }
        if inserted:
            fresh = [delivery_row(row) for row in rows if row["dedup_key"] in inserted]
            session.execute(insert(DELIVERY_TABLE), fresh)
        missing = [row for row in rows if row["dedup_key"] not in inserted]
        existing: Existing = {}
        if missing:
            keys = [row["dedup_key"] for row in missing]
            condition = PACKET_TABLE.c.dedup_key.in_(keys)
            idempotency_keys_of_missing = idempotency_keys(missing)
            if idempotency_keys_of_missing:
                condition = or_(
                    condition, PACKET_TABLE.c.idempotency_key.in_(idempotency_keys_of_missing)
                )
            found = session.execute(
                select(
                    PACKET_TABLE.c.packet_id,
                    PACKET_TABLE.c.dedup_key,
                    PACKET_TABLE.c.idempotency_key,
                    PACKET_TABLE.c.received_at,
                ).where(condition)
            ).all()
            existing = match_existing(missing, [tuple(row) for row in found])
        session.commit()
        return inserted, existing
    except BaseException:
        session.rollback()
        raise


def client_day(row: dict) -> date:
    """The UTC day of a row's client timestamp: its key's partition (``packet_keys``)."""
    return row["client_timestamp"].astimezone(UTC).date()


def idempotency_keys(rows: list[dict]) -> list[str]:
    """The distinct idempotency keys of rows (each request of a shared write has its own)."""
    return sorted({row["idempotency_key"] for row in rows if row["idempotency_key"]})


def allocate_seq(session: Any, rows: list[dict]) -> None:
    """SQLite: hand out the next ``seq`` values in the write transaction (writers are
    serialised), from a counter that never goes back even when the newest rows are purged."""
    last = session.execute(
        text(
            "UPDATE packet_counters SET value = value + :n "
            "WHERE name = 'allocated' AND shard = 0 RETURNING value"
        ),
        {"n": len(rows)},
    ).scalar()
    if last is None:  # the counter was removed by hand: start above every stored packet
        last = session.execute(
            text(
                "INSERT INTO packet_counters (name, shard, value) "
                "SELECT 'allocated', 0, coalesce(max(seq), 0) + :n FROM packets RETURNING value"
            ),
            {"n": len(rows)},
        ).scalar_one()
    for offset, row in enumerate(rows):
        row["seq"] = last - len(rows) + 1 + offset


def single_values(row: dict) -> list[Any]:
    """A row as the single-packet statement's positional parameters (naive UTC timestamps, as
    ``UTCDateTime`` stores them)."""
    values = []
    for name in PACKET_COLUMNS:
        value = row.get(name)
        if name in JSON_COLUMNS and value is not None:
            value = Json(value, dumps=canonical_json)
        elif isinstance(value, datetime):
            value = value.astimezone(UTC).replace(tzinfo=None)
        values.append(value)
    return values


def match_existing(rows: list[dict], found: list[tuple]) -> Existing:
    """Map each conflicting row's dedup key to the stored packet it duplicates, from
    (packet_id, dedup_key, idempotency_key, received_at) rows."""
    by_dedup = {dedup: (pid, as_aware(at)) for pid, dedup, _, at in found}
    by_idem = {idem: (pid, as_aware(at)) for pid, _, idem, at in found if idem}
    result = {}
    for row in rows:
        key = row["dedup_key"]
        match = by_dedup.get(key) or by_idem.get(row["idempotency_key"])
        if match is None:
            # The conflicting row vanished between INSERT and SELECT (a purge): the caller retries.
            raise ConflictVanished(f"conflicting packet {key} disappeared")
        result[key] = match
    return result


def as_aware(moment: datetime) -> datetime:
    """Timestamps read by hand come back naive (UTC) from psycopg."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
