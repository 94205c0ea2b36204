"""Database models: the packet table is the source of truth for every packet's delivery state."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    and_,
    event,
    literal,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import UserDefinedType

from bucket.extensions import db
from bucket.jsonutil import expand_signals


class UTCDateTime(TypeDecorator):
    """Store naive UTC on every backend and hand back aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


# A packet id as the service hands it out (``timeutil.new_packet_id``): a UUID in lowercase,
# hyphenated. Anything else names no stored packet.
PACKET_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_packet_id(value: Any) -> bool:
    """Whether ``value`` could be a stored packet's id (an unknown one answers "not found"
    without reaching PostgreSQL, whose uuid columns refuse a malformed id)."""
    return isinstance(value, str) and PACKET_ID.fullmatch(value) is not None


class UuidString(TypeDecorator):
    """A 128-bit identifier handled as a string: native ``uuid`` on PostgreSQL (16 bytes in
    the row and in every index entry, not 37 as varchar(36)), the string itself on SQLite.

    ``hyphens=True``: a packet id, read back in its lowercase hyphenated form. ``False``: a
    32-hex-character digest (the dedup key, a blake2b-128), read back as those 32 characters.
    Hand-written statements read PostgreSQL's uuid as this text too (``bucket.database``)."""

    impl = String
    cache_ok = True

    def __init__(self, hyphens: bool = True) -> None:
        super().__init__(36 if hyphens else 32)
        self.hyphens = hyphens

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=True))
        return dialect.type_descriptor(String(self.impl.length))

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None or dialect.name != "postgresql":
            return value
        return value if isinstance(value, uuid.UUID) else uuid.UUID(value)

    def process_result_value(self, value: Any, dialect: Any) -> str | None:
        if value is None or dialect.name != "postgresql":
            return value
        text_form = str(value)
        return text_form if self.hyphens else text_form.replace("-", "")


class InternalChar(UserDefinedType):
    """PostgreSQL's one-byte ``"char"`` (not ``char(1)``, a varlena of two bytes or more)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return '"char"'


# The codes of the five low-cardinality strings a packet carries (PostgreSQL, migration 0022,
# which holds the same table): fixed, never reassigned (stored rows name them; a new value
# gets a new letter here and in a migration). A value not listed is stored as text.
STATE_CODES = {
    "DEEP_FOCUS": "D",
    "ON_TASK": "O",
    "THINKING": "T",
    "IDLE": "I",
    "DISTRACTED": "X",
    "AWAY": "A",
    "OFF_TASK": "F",
    "WORKING": "W",
    "FAKING": "K",
}
PACKET_CODES: dict[str, dict[str, str]] = {
    "system_type": {"gurukul": "g", "ems": "e"},
    "role": {"student": "s", "employee": "e"},
    "cognitive_state": STATE_CODES,
    "state": STATE_CODES,
    "auth_outcome": {"verified": "v", "missing": "m", "invalid": "i", "mismatch": "x"},
}


def _coded_string(name: str) -> property:
    """The packet's ``name`` as every reader shows it: its text, else its code's value."""
    values = {code: value for value, code in PACKET_CODES[name].items()}

    def read(packet: Any) -> str | None:
        stored = getattr(packet, f"{name}_text")
        return stored if stored is not None else values.get(getattr(packet, f"{name}_code"))

    return property(read, doc=f"The packet's {name}, whichever form it was stored in.")


# The numbers a packet carries with few decimals in a small range, and the factor that makes
# each value a bridge sends an integer (milliseconds of the 5-second window; hundredths of the
# 0-100 focus score; ten-thousandths of the 0-1 integrity score). Fixed, like the codes:
# stored rows hold values multiplied by them (migration 0026).
PACKET_SCALES = {
    "active_seconds": 1000,
    "idle_seconds": 1000,
    "away_seconds": 1000,
    "focus_score": 100,
    "integrity_score": 10_000,
}


def _scaled_number(name: str) -> property:
    """The packet's ``name`` as every reader shows it: the float stored, else its integer
    divided by the scale (the same float: ``services/codes.scaled``)."""
    scale = PACKET_SCALES[name]

    def read(packet: Any) -> float | None:
        stored = getattr(packet, f"{name}_float")
        scaled = getattr(packet, f"{name}_scaled")
        return stored if stored is not None or scaled is None else scaled / scale

    return property(read, doc=f"The packet's {name}, whichever form it was stored in.")


# A one-byte code: ``"char"`` on PostgreSQL, a one-character string on SQLite (never filled).
CODE = String().with_variant(InternalChar(), "postgresql")


class DeliveryState:
    """Values of ``Packet.delivery_state``."""

    PENDING = "pending"  # waiting for a consumer (possibly until a retry backoff ends)
    LEASED = "leased"  # handed to a consumer until ``visible_at``
    PROCESSED = "processed"  # acknowledged with success; its life in the queue is over
    DEAD = "dead"  # failed ``BUCKET_MAX_ATTEMPTS`` deliveries; kept until requeued or purged

    UNFINISHED = (PENDING, LEASED)
    ALL = (PENDING, LEASED, PROCESSED, DEAD)


class Packet(db.Model):
    """One 5-second telemetry window of one user, as received: written once, never changed.

    Its delivery bookkeeping lives in ``Delivery``, a narrow row of its own: a claim or an
    acknowledgement rewrites that row and its two index entries, not this wide one and its
    six (measured: half the database CPU and two thirds of the WAL of a drain).

    On PostgreSQL the table is partitioned by day on ``received_at`` (migration 0012,
    ``services/partitions``): its primary key there is (packet_id, received_at), and the two
    unique keys below, which a partitioned table cannot hold across days, live in
    ``PacketKey`` and ``PacketIdempotencyKey``. SQLite keeps one table with the keys as
    written here. ``packet_id`` and ``dedup_key`` are native uuid on PostgreSQL (migration
    0016, ``UuidString``), as in the key tables (migration 0015).
    """

    __tablename__ = "packets"

    packet_id: Mapped[str] = mapped_column(UuidString(), primary_key=True)
    # Storage order: an identity on PostgreSQL, assigned in the write transaction on SQLite.
    # The bookkeeper counts (and seals) packets by ranges of it (services/bookkeeping.py).
    seq: Mapped[int] = mapped_column(BigInteger, Identity())
    # Digest of (system_type, user_id, session_id, timestamp in ms), scoped by the
    # authentication outcome (``ingest.identity_scope``): the natural identity.
    # SQLite only since migration 0027 (its unique constraint below is its deduplication);
    # PostgreSQL keeps it in ``PacketKey`` only and stores NULL here (``ingest.packet_identity``
    # recomputes it from the packet; packets stored before 0027 keep theirs).
    dedup_key: Mapped[str | None] = mapped_column(UuidString(hyphens=False))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))

    user_id: Mapped[str] = mapped_column(String(256))
    employee_id: Mapped[str | None] = mapped_column(String(256))
    session_id: Mapped[str | None] = mapped_column(String(256))
    lesson_id: Mapped[str | None] = mapped_column(String(256))
    task_id: Mapped[str | None] = mapped_column(String(256))
    system_type_text: Mapped[str | None] = mapped_column(String(16))
    role_text: Mapped[str | None] = mapped_column(String(16))
    client_timestamp: Mapped[datetime] = mapped_column(UTCDateTime())
    cognitive_state_text: Mapped[str | None] = mapped_column(String(32))
    state_text: Mapped[str | None] = mapped_column(String(32))
    # The five numbers as received, unless stored scaled below (``<name>_scaled``); named
    # ``<name>_float`` since migration 0026, for the reason of migration 0024's renames.
    active_seconds_float: Mapped[float | None] = mapped_column(Float)
    idle_seconds_float: Mapped[float | None] = mapped_column(Float)
    away_seconds_float: Mapped[float | None] = mapped_column(Float)
    focus_score_float: Mapped[float | None] = mapped_column(Float)
    integrity_score_float: Mapped[float | None] = mapped_column(Float)
    # As received, canonical JSON (``bucket.jsonutil.canonical_json``). NULL on PostgreSQL for
    # a packet stored compact since migration 0020: its key set and values below instead.
    raw_signals: Mapped[dict | None] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Who sent it (README, "Authenticated ingest"): verified, missing, invalid or mismatch, and
    # the valid token's subject; NULL when ingest did not check tokens (BUCKET_INGEST_AUTH=off).
    auth_outcome_text: Mapped[str | None] = mapped_column(String(16))
    auth_subject: Mapped[str | None] = mapped_column(String(256))
    # The client's timestamp lay more than BUCKET_STALE_AFTER before its arrival.
    stale: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # PostgreSQL, since migration 0020 (``services/signals``): raw_signals as the id of its key
    # set in ``SignalKeySet`` and its values' canonical JSON texts in key order, joined by
    # U+001F (``bucket.jsonutil.SIGNAL_SEPARATOR``). Both NULL for a packet stored in full
    # (every packet on SQLite, and those stored before the migration).
    signal_keys: Mapped[int | None] = mapped_column(Integer)
    signal_values: Mapped[str | None] = mapped_column(Text)
    # PostgreSQL, since migration 0022 (``services/codes``): a known value of the five
    # low-cardinality strings as a one-byte code, its ``<name>_text`` column NULL; a value
    # outside the code table stays in the text column, code NULL. ``employee_is_user``: true
    # when the packet's employee_id is its user_id, then stored NULL (EMS packets); NULL
    # otherwise. All NULL on SQLite, which stores every value as text. The text columns were
    # named without ``_text`` before migration 0024, which renamed them so that an instance of
    # an earlier release, still serving during an upgrade, fails on every statement that
    # reads or writes packets instead of serving coded strings as null (``services/codes``).
    system_type_code: Mapped[str | None] = mapped_column(CODE)
    role_code: Mapped[str | None] = mapped_column(CODE)
    cognitive_state_code: Mapped[str | None] = mapped_column(CODE)
    state_code: Mapped[str | None] = mapped_column(CODE)
    auth_outcome_code: Mapped[str | None] = mapped_column(CODE)
    employee_is_user: Mapped[bool | None] = mapped_column(Boolean)
    # PostgreSQL, since migration 0026 (``services/codes``): a number of ``PACKET_SCALES``
    # that a smallint holds exactly once multiplied by its scale (every value a bridge sends
    # with few decimals) as that integer, its ``<name>_float`` NULL; any other as the float.
    # All NULL on SQLite, which stores every number as received.
    active_seconds_scaled: Mapped[int | None] = mapped_column(SmallInteger)
    idle_seconds_scaled: Mapped[int | None] = mapped_column(SmallInteger)
    away_seconds_scaled: Mapped[int | None] = mapped_column(SmallInteger)
    focus_score_scaled: Mapped[int | None] = mapped_column(SmallInteger)
    integrity_score_scaled: Mapped[int | None] = mapped_column(SmallInteger)

    # ``flask shell``: the coded strings and scaled numbers by their field names, read-only.
    system_type = _coded_string("system_type")
    role = _coded_string("role")
    cognitive_state = _coded_string("cognitive_state")
    state = _coded_string("state")
    auth_outcome = _coded_string("auth_outcome")
    active_seconds = _scaled_number("active_seconds")
    idle_seconds = _scaled_number("idle_seconds")
    away_seconds = _scaled_number("away_seconds")
    focus_score = _scaled_number("focus_score")
    integrity_score = _scaled_number("integrity_score")

    __table_args__ = (
        UniqueConstraint("dedup_key", name="uq_packets_dedup_key"),
        # Partial: most packets carry no key, and a NULL entry per row would cost every insert.
        Index(
            "uq_packets_idempotency_key",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        # On PostgreSQL a unique index of its own in each partition instead (migration 0017:
        # a partitioned unique index would need received_at), ``<partition>_seq_key``.
        Index("ix_packets_seq", "seq"),
        # The user endpoint: newest first, cursor on (received_at, packet_id); ties within one
        # microsecond are sorted, not indexed (migration 0013: 41 bytes a packet, not 86).
        # PostgreSQL builds it on the user id's 8-byte key instead (migration 0028,
        # ``user_key``): readers find a user's packets with ``of_user``.
        Index("ix_packets_user", "user_id", "received_at"),
        # Only EMS packets name an employee: NULL entries would cost every learner's insert.
        Index(
            "ix_packets_employee",
            "employee_id",
            "received_at",
            postgresql_where=text("employee_id IS NOT NULL"),
            sqlite_where=text("employee_id IS NOT NULL"),
        ),
    )


@event.listens_for(Packet, "load")
def expand_signals_on_load(packet: Packet, context: Any) -> None:
    """A compact packet loaded through the model (``flask shell``) shows its raw_signals and
    its employee_id as every reader does: rebuilt from its key set and from its user_id (its
    coded strings read through the properties above)."""
    if packet.employee_id is None and packet.employee_is_user:
        set_committed_value(packet, "employee_id", packet.user_id)
    if packet.raw_signals is not None or packet.signal_keys is None:
        return
    found = text("SELECT keys FROM signal_key_sets WHERE id = :id")
    keys = context.session.connection().execute(found, {"id": packet.signal_keys}).scalar()
    if keys is not None:
        signals = orjson.loads(expand_signals(keys, packet.signal_values or ""))
        set_committed_value(packet, "raw_signals", signals)


class user_key(FunctionElement):
    """A user id's 64-bit key, what PostgreSQL's ``ix_packets_user`` is built on (migration
    0028: the first 16 hex digits of its md5, SQL function ``packet_user_key``): 8 bytes in
    every index entry whatever the id's length. SQLite indexes the user id itself: 0."""

    type = BigInteger()
    inherit_cache = True


@compiles(user_key)
def _user_key(element: user_key, compiler: Any, **kw: Any) -> str:
    return "0"


@compiles(user_key, "postgresql")
def _user_key_postgres(element: user_key, compiler: Any, **kw: Any) -> str:
    return f"packet_user_key({compiler.process(element.clauses, **kw)})"


def of_user(user_id: str) -> ColumnElement[bool]:
    """The condition that finds a user's packets through ``ix_packets_user`` on either backend:
    the key (its index condition; among N users some two share one with a chance of about
    N**2 / 2**65) and the id, which keeps another user's packets out when they do."""
    packets = Packet.__table__
    return and_(
        user_key(packets.c.user_id) == user_key(literal(user_id, String())),
        packets.c.user_id == user_id,
    )


class SignalKeySet(db.Model):
    """PostgreSQL only (migration 0020): the dictionary of raw_signals' key sets.

    A bridge sends the same keys every 5 s; a packet whose keys are all plain names
    (``services/signals.PLAIN_KEY``, at most ``MAX_SIGNAL_KEYS``) stores the id of its set
    here and only its values (``Packet.signal_keys``, ``Packet.signal_values``). The keys are
    sorted, as canonical JSON orders them; each set is here once (ingest inserts ON CONFLICT).
    Rows are never deleted (packets of any age name them); ``BUCKET_SIGNAL_KEY_SETS_MAX``
    bounds how many there are: beyond it packets are stored in full. Each worker caches the
    ids it has seen; ingest's statement stores a packet compact only under a set that is
    still here (a set gone, it writes the packet in full and the worker forgets its ids), but
    a restore that gives an id to another set is not detected: the table is not re-created
    under running workers (a restore of it, or a downgrade past 0020 and back, is followed by
    a restart, as a release is). No foreign key: its KEY SHARE lock on the set's row would
    be taken by every insert.
    """

    __tablename__ = "signal_key_sets"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    keys: Mapped[list[str]] = mapped_column(postgresql.ARRAY(Text))

    __table_args__ = (UniqueConstraint("keys", name="uq_signal_key_sets_keys"),)


class PacketKey(db.Model):
    """PostgreSQL only: the natural identity of every stored packet, partitioned by its day.

    A unique index on a partitioned table must contain the partition key, and a bridge
    resends a packet hours or days later: the key must hold across the days of ``packets``.
    The identity's digest covers the client's timestamp, so every copy of one packet names the
    same UTC day of it: the table is partitioned by RANGE (``client_day``) (migration 0015,
    ``services/partitions``) and a copy resent on any later day still conflicts. Ingest inserts
    the key row and the packet in one statement, the packet only if its key row went in
    (``services/ingest``); retention drops a day of keys once none of its packets is stored
    (``services/retention``). Digest and packet id are 16-byte uuids, as on ``packets`` and
    ``deliveries`` since migration 0016: the statements joining them need no cast.
    """

    __tablename__ = "packet_keys"

    dedup_key: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    # The UTC day of the client's timestamp: a function of the identity the digest covers.
    client_day: Mapped[date] = mapped_column(Date, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    packet_id: Mapped[str] = mapped_column(Uuid(as_uuid=False))

    # Retention's check that a day of keys names no packet still stored reads only the blocks
    # whose reception times could be live (migration 0017: a few pages a day, keys arrive in
    # order).
    __table_args__ = (
        Index(
            "ix_packet_keys_received",
            "received_at",
            postgresql_using="brin",
            postgresql_with={"autosummarize": "on"},
        ),
    )


class PacketIdempotencyKey(db.Model):
    """PostgreSQL only: an Idempotency-Key (scoped and digested, ``services/ingest``) and the
    natural identity of the packet it was first sent with (its ``packet_keys`` row).

    Chosen by the client, it names no day, so it cannot be unique in a partitioned table: a
    small table of its own (only single-packet POSTs send the header). Its rows go with the
    day of keys they point into (``client_day``), when retention drops that day."""

    __tablename__ = "packet_idempotency_keys"

    idempotency_key: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    dedup_key: Mapped[str] = mapped_column(Uuid(as_uuid=False))
    client_day: Mapped[date] = mapped_column(Date)

    __table_args__ = (Index("ix_packet_idempotency_keys_day", "client_day"),)


class Delivery(db.Model):
    """Where one packet stands with its consumers: its state, lease, attempts and outcome.

    On PostgreSQL the table is partitioned by ``delivery_state`` (migration 0014): pending,
    leased and dead rows in ``deliveries_hot`` (primary key and queue index here), processed
    ones in ``deliveries_processed``, partitioned by day on ``received_at`` like the packets
    and indexed by ``packet_id`` only. An acknowledgement moves its row out of the hot
    partition, so the table polls and acks touch follows the backlog. SQLite keeps one table.

    A processed row on PostgreSQL is lean (migration 0021): its ``processed_at`` is NULL, the
    acknowledgement's instant being its ``visible_at``, which the listing converts back
    (``api.presenters.processed_time``); the packet's own id inside ``karma_actions`` is a
    mark the listing replaces with the id (``services/delivery/actions``); its day's partition
    orders the columns so that none is padded (8-byte times first, text and json last).
    """

    __tablename__ = "deliveries"

    packet_id: Mapped[str] = mapped_column(
        UuidString(), ForeignKey("packets.packet_id"), primary_key=True
    )
    # The packet's, copied: status finds the oldest waiting packet without the wide table.
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivery_state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    # Epoch seconds of the state's clock: when a pending packet becomes visible, when a lease
    # expires, or when the packet was processed or dead-lettered (purge and requeue use it).
    visible_at: Mapped[float] = mapped_column(Float)
    lease_id: Mapped[str | None] = mapped_column(String(32))
    delivery_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    processed_by_karma: Mapped[bool] = mapped_column(Boolean, default=False)
    karma_actions: Mapped[Any | None] = mapped_column(JSON)
    dead_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        # Claims, lease reaping, status, purge and requeue walk this index.
        Index("ix_deliveries_queue", "delivery_state", "visible_at"),
    )


class QuarantinedPacket(db.Model):
    """A packet refused for its content, kept as received so it can be repaired and replayed.

    One row per distinct content (``digest``, transport fields left out): a bridge resending
    the same refused packet forever only raises ``seen_count`` and ``last_seen_at``.
    """

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    body: Mapped[Any] = mapped_column(JSON)
    errors: Mapped[Any] = mapped_column(JSON)
    # ",field,other," for filtering by the fields that failed, portably.
    error_fields: Mapped[str] = mapped_column(Text)
    user_id: Mapped[str | None] = mapped_column(String(256))
    origin: Mapped[str | None] = mapped_column(String(512))
    # The client address that first sent it: the bounds evict from the biggest sender first.
    sender: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # "packet" or "batch"
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(Integer)
    seen_count: Mapped[int] = mapped_column(Integer, default=1)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The authentication outcome and subject the packet had when it was refused (never the
    # token): a replay stores it with them. NULL: not checked (auth off), or kept before
    # migration 0011.
    auth_outcome: Mapped[str | None] = mapped_column(String(16))
    auth_subject: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        # Oldest first when the bounds or the retention period drop entries.
        Index("ix_quarantine_last_seen", "last_seen_at"),
        Index("ix_quarantine_user", "user_id", "id"),
        Index("ix_quarantine_sender", "sender", "last_seen_at", "id"),
    )


class AuditSeal(db.Model):
    """One seal of the audit log: the Merkle root over a contiguous range of stored packets
    (by ``seq``), chained to the seal before it by that seal's hash (services/audit).

    Its leaves travel with it, packed (one row a seal, not one a packet: sealing is cheap and
    the proofs of purged packets' neighbours stay checkable): ``leaf_seqs`` (8 bytes each, big
    endian; empty when they are exactly ``after_seq + 1`` .. ``last_seq``), the packet ids in
    ``leaf_uuids`` (16 raw bytes each; before migration 0019 in ``leaf_ids``, one a line) and
    ``leaf_hashes`` (32 bytes each). ``content.Leaves`` reads both packings."""

    __tablename__ = "audit_seals"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sealed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The packets with after_seq < seq <= last_seq, all of them, in seq order.
    after_seq: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    packet_count: Mapped[int] = mapped_column(Integer)
    packets_total: Mapped[int] = mapped_column(BigInteger)  # sealed by this seal and before
    root: Mapped[str] = mapped_column(String(64))
    previous_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    leaf_seqs: Mapped[bytes] = mapped_column(LargeBinary)
    # One or the other: the ids as text, one a line (seals made before migration 0019, or
    # whose ids are not all canonical uuids), or as 16 raw bytes each.
    leaf_ids: Mapped[str | None] = mapped_column(Text)
    leaf_uuids: Mapped[bytes | None] = mapped_column(LargeBinary)
    leaf_hashes: Mapped[bytes] = mapped_column(LargeBinary)
    # How its leaves encode a packet (services/audit/content.py): 1, sorted JSON (the seals
    # made before migration 0008); 2, PostgreSQL's binary record; 3, the same with the
    # authentication outcome, subject and staleness (migration 0010).
    leaf_format: Mapped[int] = mapped_column(SmallInteger, server_default=text("1"))
    # The packets' storage layout the sealer read them in (``content.PACKET_LAYOUT``; 0 for
    # seals made before migration 0023). No default: a sealer of an earlier release, which
    # would read rows of a newer layout as NULLs and seal them so, cannot insert a seal.
    packet_layout: Mapped[int] = mapped_column(SmallInteger)


class AuditPurgedRange(db.Model):
    """A run of sealed packets that retention dropped with their day's partition (PostgreSQL):
    every sealed packet with ``first_seq`` <= seq <= ``last_seq`` was in it, and no other.
    ``verify`` reports a packet missing there as purged, like one in ``AuditPurge``."""

    __tablename__ = "audit_purged_ranges"

    first_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    packet_count: Mapped[int] = mapped_column(BigInteger)
    # The partition it came from, e.g. packets_p20261205, and when it was dropped.
    partition: Mapped[str] = mapped_column(String(64))
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditPurge(db.Model):
    """A sealed packet the retention purge deleted, and when: ``verify`` tells it apart from a
    packet deleted behind the log's back."""

    __tablename__ = "audit_purges"

    packet_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    packet_id: Mapped[str] = mapped_column(String(36))
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ActivityMinute(db.Model):
    """Per-minute roll-ups for the console's charts, kept with the rows they count: packets
    ingested by system and cognitive state (added when the bookkeeper books them) and packets
    processed (added by the acknowledgement's own statement), so they cannot drift.

    ``minute`` is minutes since the epoch; ``series`` is ``processed`` or
    ``ingested:<system>:<state>``; acks spread over shards like the counters."""

    __tablename__ = "activity_minutes"

    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    series: Mapped[str] = mapped_column(String(96), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)


class PacketCounter(db.Model):
    """One shard of a running count of packets, summed by status instead of counting rows.

    Counting processed rows would walk every one of them; the counter is bumped in the same
    transaction as each change into or out of the counted state (see ``services/counters``).
    Writers pick a random shard, so concurrent acks seldom wait on one hot row.
    """

    __tablename__ = "packet_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
