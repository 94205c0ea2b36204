"""The quarantine: packets refused for their content, kept so that nothing is lost.

A browser cannot fix a packet it built, so a packet answered 422 (alone, or inside a batch) is
kept as received with its errors, when and from which ``Origin`` it came. Copies of the same
content (transport fields such as ``retry_count`` left out) share one entry whose
``seen_count`` grows. Anyone on the internet can post, so the quarantine is bounded: at most
``BUCKET_QUARANTINE_MAX_ROWS`` entries and ``BUCKET_QUARANTINE_MAX_BYTES`` of bodies (the
sender address holding the most gives way first, its least recently seen entries first, so
one sender cannot push everyone else's entries out) and ``BUCKET_QUARANTINE_RETENTION_DAYS``
since an entry was last seen; both kinds of drop are counted. Replay validates each entry
again under the rules in force now and ingests those that pass exactly as if they had just
arrived (so deduplication applies, and replaying twice stores nothing twice); the others stay,
with their new errors. An entry keeps the authentication outcome its packet had (never the
token), and is stored with it; under ``require`` only verified entries are.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import case, delete, func, literal, or_, select, update
from sqlalchemy.exc import OperationalError

from bucket.extensions import db
from bucket.jsonutil import SAFE_DEPTH, deeper_than, json_text_any_depth
from bucket.models import PacketCounter, QuarantinedPacket
from bucket.schemas import packet_rules
from bucket.services import counters, cursors
from bucket.services.dialect import upsert_insert
from bucket.services.ingest import store_packets
from bucket.services.tokens import REQUIRE, VERIFIED, PacketAuth, mode_of
from bucket.timeutil import utc_now

log = logging.getLogger(__name__)
Q = QuarantinedPacket.__table__
C = PacketCounter.__table__
ROWS, BYTES = "quarantine_rows", "quarantine_bytes"
EVICTED, EXPIRED = "quarantine_evicted", "quarantine_expired"
# Fields the bridge adds and changes on every resend; not part of the packet's content.
TRANSPORT_FIELDS = frozenset({"queued_at", "retry_count", "sent_at", "attempt", "batch_id"})
EVICTION_BATCH = 100
# The highest id the BIGINT column can hold: a larger one names no entry (not a driver error).
MAX_ID = 2**63 - 1


@dataclass
class Refused:
    """One packet refused for its content, as the request brought it."""

    body: Any
    errors: dict
    origin: str | None
    source: str  # "packet" or "batch"
    idempotency_key: str | None = None
    sender: str | None = None  # the client address it came from
    # Its authentication outcome when it arrived (None: not checked); never the token.
    auth: PacketAuth | None = None


@dataclass
class Limits:
    """The quarantine's bounds (README, "The quarantine")."""

    max_rows: int
    max_bytes: int
    retention_days: float

    @classmethod
    def from_app(cls) -> Limits:
        config = current_app.config
        return cls(
            config["BUCKET_QUARANTINE_MAX_ROWS"],
            config["BUCKET_QUARANTINE_MAX_BYTES"],
            config["BUCKET_QUARANTINE_RETENTION_DAYS"],
        )


def digest(body: Any) -> str:
    """The content's identity: canonical JSON without the transport fields (a body nesting
    too deep for the encoder is hashed as its plain JSON text)."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}
    if deeper_than(body, SAFE_DEPTH):
        canonical = json_text_any_depth(body).encode()
    else:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def storable_body(body: Any) -> tuple[Any, int]:
    """The body as the JSON column keeps it, and its size: as received, or, when it nests
    deeper than the encoders go (a refused packet may nest up to the parser's 1024 levels),
    its JSON text as one string, so that it is kept, listed and served like any other."""
    if deeper_than(body, SAFE_DEPTH):
        text = json_text_any_depth(body)
        return text, len(text.encode())
    return body, len(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS))


def storable(text: str | None, length: int) -> str | None:
    """A text column's value: cut to its length, NUL (which PostgreSQL text cannot hold, and a
    refused packet may well contain) shown as U+FFFD."""
    return text[:length].replace("\x00", "\ufffd") if text else None


def error_fields(errors: Any) -> str:
    """The refused fields as ",field,other,", so a filter by field is a portable LIKE."""
    names = sorted(errors) if isinstance(errors, dict) else []
    return "," + ",".join(names) + ","


def identity_of(body: Any) -> str | None:
    """The user the packet names, for an operator's filter."""
    if not isinstance(body, dict):
        return None
    user = body.get("user_id") or body.get("employee_id")
    return storable(user, 256) if isinstance(user, str) else None


def keep(refused: list[Refused]) -> list[int]:
    """Keep refused packets (a resent copy only counts as seen again); their entry ids.

    Commits; evicts the least recently seen entries beyond the bounds, in the same
    transaction, so the bounds hold however many distinct packets arrive.
    """
    if not refused:
        return []
    limits = Limits.from_app()
    now = utc_now()
    ids, added_rows, added_bytes = [], 0, 0
    for item in refused:
        body, size = storable_body(item.body)
        values = {
            "digest": digest(item.body),
            "body": body,
            "errors": item.errors,
            "error_fields": error_fields(item.errors),
            "user_id": identity_of(item.body),
            "origin": storable(item.origin, 512),
            "sender": storable(item.sender, 64),
            "source": item.source,
            "idempotency_key": storable(item.idempotency_key, 255),
            "size_bytes": size,
            "auth_outcome": item.auth.outcome if item.auth is not None else None,
            "auth_subject": storable(item.auth.subject, 256) if item.auth is not None else None,
            "seen_count": 1,
            "first_seen_at": now,
            "last_seen_at": now,
        }
        statement = upsert_insert(Q).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[Q.c.digest],
            set_={
                "seen_count": Q.c.seen_count + 1,
                "last_seen_at": now,
                "errors": statement.excluded.errors,
                "error_fields": statement.excluded.error_fields,
                # A verified copy wins (the genuine sender's resend makes the entry
                # replayable under require); an unverified one never downgrades it.
                "auth_outcome": case(
                    (takes_new_outcome(statement), statement.excluded.auth_outcome),
                    else_=Q.c.auth_outcome,
                ),
                "auth_subject": case(
                    (takes_new_outcome(statement), statement.excluded.auth_subject),
                    else_=Q.c.auth_subject,
                ),
            },
        ).returning(Q.c.id, Q.c.seen_count)
        entry_id, seen = db.session.execute(statement).one()
        ids.append(entry_id)
        if seen == 1:
            added_rows += 1
            added_bytes += values["size_bytes"]
    gone_rows, gone_bytes = evict_beyond(limits, added_rows, added_bytes) if added_rows else (0, 0)
    # Counters last (services/counters.bump): their shard locks are then held only for the
    # commit, never while this transaction waits for an entry another one holds.
    counters.bump(ROWS, added_rows - gone_rows)
    counters.bump(BYTES, added_bytes - gone_bytes)
    counters.bump(EVICTED, gone_rows)
    db.session.commit()
    return ids


def takes_new_outcome(statement):
    """Whether a copy seen again replaces the entry's recorded outcome: when it is verified,
    or when the entry had none recorded."""
    return or_(statement.excluded.auth_outcome == VERIFIED, Q.c.auth_outcome.is_(None))


def keep_if_reachable(refused: list[Refused]) -> list[int | None]:
    """``keep``, or no entry ids while the database does not answer: the packet is refused
    with its 422 either way, and the bridge resends refused packets, so it is kept once the
    database is back (an outage must not turn bad input into a 503)."""
    try:
        return keep(refused)
    except OperationalError as exc:
        db.session.rollback()
        log.warning("refused packets not quarantined, database unavailable: %s", type(exc).__name__)
        return [None] * len(refused)


def totals() -> tuple[int, int]:
    """Entries and body bytes held, from their counters."""
    rows = dict(
        db.session.execute(
            select(C.c.name, func.coalesce(func.sum(C.c.value), 0))
            .where(C.c.name.in_((ROWS, BYTES)))
            .group_by(C.c.name)
        ).all()
    )
    return int(rows.get(ROWS, 0)), int(rows.get(BYTES, 0))


def evict_beyond(limits: Limits, adding_rows: int, adding_bytes: int) -> tuple[int, int]:
    """While the quarantine, with what this transaction adds, is over either bound, delete the
    least recently seen entries of the sender holding the most (bytes, when the byte bound is
    the one exceeded; entries otherwise); the entries and bytes deleted.

    Once over a bound, eviction goes 1% below it, so the search for the biggest sender (a
    scan of the table) runs once per many newcomers, not for each one.
    """
    held_rows, held_bytes = totals()
    rows, size = held_rows + adding_rows, held_bytes + adding_bytes
    if rows <= limits.max_rows and size <= limits.max_bytes:
        return 0, 0
    low_rows = limits.max_rows - limits.max_rows // 100
    low_bytes = limits.max_bytes - limits.max_bytes // 100
    dropped_rows = dropped_bytes = 0
    while rows > low_rows or size > low_bytes:
        by_bytes = size > low_bytes
        share = func.sum(Q.c.size_bytes) if by_bytes else func.count()
        biggest = db.session.execute(
            select(Q.c.sender).group_by(Q.c.sender).order_by(share.desc()).limit(1)
        ).first()
        if biggest is None:
            break
        # That sender's least recently seen entries, as many as cover the excess.
        weight = Q.c.size_bytes if by_bytes else literal(1)
        excess = size - low_bytes if by_bytes else rows - low_rows
        theirs = select(
            Q.c.id,
            weight.label("weight"),
            func.sum(weight).over(order_by=(Q.c.last_seen_at, Q.c.id)).label("running"),
        ).where(Q.c.sender.is_not_distinct_from(biggest.sender))
        theirs = theirs.subquery()
        oldest = (
            select(theirs.c.id)
            .where(theirs.c.running - theirs.c.weight < excess)
            .order_by(theirs.c.running)
            .limit(EVICTION_BATCH)
            .scalar_subquery()
        )
        statement = delete(Q).where(Q.c.id.in_(oldest)).returning(Q.c.size_bytes)
        gone = db.session.execute(statement).scalars().all()
        if not gone:  # another transaction is evicting the same entries
            break
        dropped_rows += len(gone)
        dropped_bytes += sum(gone)
        rows -= len(gone)
        size -= sum(gone)
    return dropped_rows, dropped_bytes


def drop(condition, reason: str | None) -> int:
    """Delete the entries matching ``condition`` with their counters (in the session's
    transaction); ``reason`` names the drop counter, None for an operator's purge."""
    gone = db.session.execute(delete(Q).where(condition).returning(Q.c.size_bytes)).scalars().all()
    counters.bump(ROWS, -len(gone))
    counters.bump(BYTES, -sum(gone))
    if reason:
        counters.bump(reason, len(gone))
    return len(gone)


def expire() -> int:
    """Drop the entries not seen within the retention period and commit; how many."""
    cutoff = utc_now() - timedelta(days=Limits.from_app().retention_days)
    old = select(Q.c.id).where(Q.c.last_seen_at < cutoff).limit(1000).scalar_subquery()
    count = drop(Q.c.id.in_(old), EXPIRED)
    db.session.commit()
    return count


@dataclass
class Filters:
    """Which entries an operator means."""

    user_id: str | None = None
    origin: str | None = None
    field: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list:
        found = []
        if self.user_id:
            found.append(Q.c.user_id == self.user_id)
        if self.origin:
            found.append(Q.c.origin == self.origin)
        if self.field:
            found.append(Q.c.error_fields.contains(f",{self.field},", autoescape=True))
        if self.since:
            found.append(Q.c.last_seen_at >= self.since)
        if self.until:
            found.append(Q.c.last_seen_at < self.until)
        return found


def entry_cursor(entry_id: int) -> int:
    """The quarantine listing's cursor: the last entry's id."""
    if not isinstance(entry_id, int) or isinstance(entry_id, bool) or not 0 < entry_id < 2**63:
        raise ValueError("not an id")  # the column is a signed 64-bit integer
    return entry_id


def entries(filters: Filters, limit: int, cursor: str | None = None) -> tuple[list, str | None]:
    """A page of entries, newest first, and the next page's cursor."""
    conditions = filters.conditions()
    if cursor:
        conditions.append(Q.c.id < cursors.decode(cursor, entry_cursor))
    rows = db.session.execute(
        select(Q).where(*conditions).order_by(Q.c.id.desc()).limit(limit + 1)
    ).all()
    db.session.commit()
    page = rows[:limit]
    return page, cursors.encode(page[-1].id) if len(rows) > limit else None


def entry(entry_id: int):
    """One entry, or None (also for an id out of the column's range, which names none)."""
    if not 0 < entry_id <= MAX_ID:
        return None
    found = db.session.execute(select(Q).where(Q.c.id == entry_id)).first()
    db.session.commit()
    return found


@dataclass
class Replay:
    """What a replay did: entries ingested (new or duplicate) and those still refused."""

    replayed: int = 0
    ingested: int = 0
    duplicates: int = 0
    still_refused: int = 0
    not_verified: int = 0  # valid, but kept back under require: not a verified packet
    remaining: int = 0
    next_after: int | None = None
    results: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def held_back(row, mode: str) -> str | None:
    """Why a valid entry is not stored now, or None: under require only an entry recorded as
    verified is (one kept with no outcome, before migration 0011 or with auth off, is not)."""
    if mode != REQUIRE or row.auth_outcome == VERIFIED:
        return None
    if row.auth_outcome is None:
        recorded = "no authentication outcome recorded (quarantined with auth off or before it was)"
    else:
        recorded = f"its token was {row.auth_outcome} when it arrived"
    return f"not verified: {recorded}; BUCKET_INGEST_AUTH=require stores only verified packets"


def replay(
    ids: list[int] | None = None,
    filters: Filters | None = None,
    limit: int = 500,
    after: int | None = None,
) -> Replay:
    """Validate entries again under the rules in force and ingest those that pass.

    Takes the entries matching ``filters`` (every entry, without any) and, when given, named
    by ``ids``, in id order after ``after``, up to ``limit`` of them; ``remaining`` says how
    many matching entries this replay did not reach, and ``next_after`` where the next one
    starts (entries that still fail stay where they are, so it never loops over them). Each
    entry ingested leaves the quarantine in the transaction that follows its ingest, so a
    replay interrupted midway only ever repeats work that deduplication absorbs. Each packet
    is stored with the authentication outcome recorded when it was quarantined; under
    ``BUCKET_INGEST_AUTH=require`` an entry not recorded as verified is not stored: it stays,
    counted in ``not_verified`` and named with the reason.
    """
    conditions = (filters or Filters()).conditions()
    if ids is not None:
        conditions.append(Q.c.id.in_([i for i in ids if 0 < i <= MAX_ID]))
    if after is not None:
        conditions.append(Q.c.id > after)
    chosen = db.session.execute(select(Q).where(*conditions).order_by(Q.c.id).limit(limit)).all()
    db.session.commit()
    rules, report, mode = packet_rules(), Replay(), mode_of(current_app.config)
    for row in chosen:
        report.replayed += 1
        try:
            packet = rules.load(row.body)
        except ValidationError as exc:
            errors = exc.normalized_messages()
            db.session.execute(
                update(Q)
                .where(Q.c.id == row.id)
                .values(errors=errors, error_fields=error_fields(errors))
            )
            db.session.commit()
            report.still_refused += 1
            report.results.append({"id": row.id, "status": "rejected", "errors": errors})
            continue
        reason = held_back(row, mode)
        if reason is not None:
            report.not_verified += 1
            report.results.append({"id": row.id, "status": "not_verified", "reason": reason})
            continue
        auth = PacketAuth(row.auth_outcome, row.auth_subject) if row.auth_outcome else None
        (outcome,) = store_packets([packet], row.idempotency_key, [auth] if auth else None)
        drop(Q.c.id == row.id, None)
        db.session.commit()
        if outcome.duplicate:
            report.duplicates += 1
        else:
            report.ingested += 1
        status = "duplicate" if outcome.duplicate else "ingested"
        report.results.append({"id": row.id, "status": status, "packet_id": outcome.packet_id})
    if chosen:
        last = chosen[-1].id
        report.remaining = db.session.execute(
            select(func.count()).select_from(Q).where(*conditions, Q.c.id > last)
        ).scalar_one()
        db.session.commit()
        report.next_after = last if report.remaining else None
    return report


def purge(filters: Filters | None = None, older_than_days: float | None = None) -> int:
    """Delete the matching entries (every entry, without filters) and commit; how many."""
    conditions = (filters or Filters()).conditions()
    if older_than_days is not None:
        conditions.append(Q.c.last_seen_at < utc_now() - timedelta(days=older_than_days))
    count = drop(Q.c.id.in_(select(Q.c.id).where(*conditions).scalar_subquery()), None)
    db.session.commit()
    return count
