"""What a packet's leaf commits to: every stored field, in PostgreSQL's binary record format.

The packets table is written once and never changed; a leaf covers everything the browser
sent and the service derived at ingest (identity keys, ``seq``, ``received_at``), and leaves
out delivery state, which lives in ``deliveries`` and changes. The bytes are exactly what
PostgreSQL's ``record_send`` gives for ``ROW(packet_id::text, seq::int8, …)`` over
``LEAF_COLUMNS``: a 4-byte field count, then per field its type OID, its length (-1 for NULL)
and its binary value (UTF-8 text, big-endian int8 and float8, timestamps as microseconds since
2000-01-01 UTC). PostgreSQL computes them in C while sealing (``LEAF_SQL``), and
``leaf_content`` builds the same bytes from a row in Python, for SQLite, for ``verify`` and
for the artifact endpoint; ``tools/verify_proof.py`` decodes them with the standard library.
``raw_signals`` is its stored JSON text, which ingest writes canonically (keys sorted at every
depth, no whitespace: ``bucket.jsonutil.canonical_json``); a packet stored compact on
PostgreSQL (migration 0020: a key set and the values) gives the same text rebuilt
(``services/signals``), so its leaf is the one it would have had stored in full.

The field list is fixed here, not read off the model: a column added to ``packets`` must not
change the bytes of packets sealed before it (``tests/test_audit_content.py`` fails until the
new column is placed deliberately).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from bucket.models import PACKET_ID, Packet
from bucket.services.audit.merkle import leaf_hash
from bucket.services.codes import DECODED, as_shown, decoded_sql
from bucket.services.signals import KEYS_JOIN, TEXT_SQL, stored_signals_text

T = Packet.__table__
GENESIS = "0" * 64
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FIELD_HEAD = struct.Struct(">Ii")  # type OID, length


def _text(value: str) -> bytes:
    return value.encode()


def _int8(value: int) -> bytes:
    return struct.pack(">q", value)


def _float8(value: float) -> bytes:
    return struct.pack(">d", value)


SIGNALS_TEXT = TEXT_SQL.format(p="packets", s="signal_set")


def _bool(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def _timestamp(value: datetime) -> bytes:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - POSTGRES_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return struct.pack(">q", micros)


@dataclass(frozen=True)
class FieldType:
    """One leaf field's PostgreSQL type: its OID, its SQL cast and its binary encoder."""

    oid: int
    sql: str
    encode: Callable[[Any], bytes]

    def expression(self, name: str) -> str:
        """The column as this field's SQL value: cast to the field's type, a uuid column as
        the text it was stored as before migration 0016 (the leaf's bytes must not change)."""
        if name in DIGEST_UUIDS:
            return f"replace({name}::text, '-', '')::{self.sql}"
        return f"{name}::{self.sql}"


# Columns stored as uuid on PostgreSQL since migration 0016 whose text form is the 32 hex
# digits without hyphens (``models.UuidString(hyphens=False)``). ``packet_id``'s text form is
# the hyphenated one it always had, so ``packet_id::text`` gives its old bytes unchanged.
DIGEST_UUIDS = frozenset(("dedup_key",))


TEXT = FieldType(25, "text", _text)
INT8 = FieldType(20, "int8", _int8)
FLOAT8 = FieldType(701, "float8", _float8)
TIMESTAMP = FieldType(1114, "timestamp", _timestamp)
BOOL = FieldType(16, "bool", _bool)

# Leaf formats 1 and 2 (seals made before migration 0010): the packet as first stored.
LEAF_COLUMNS_V2: tuple[tuple[str, FieldType], ...] = (
    ("packet_id", TEXT),
    ("seq", INT8),
    ("dedup_key", TEXT),
    ("idempotency_key", TEXT),
    ("user_id", TEXT),
    ("employee_id", TEXT),
    ("session_id", TEXT),
    ("lesson_id", TEXT),
    ("task_id", TEXT),
    ("system_type", TEXT),
    ("role", TEXT),
    ("client_timestamp", TIMESTAMP),
    ("cognitive_state", TEXT),
    ("state", TEXT),
    ("active_seconds", FLOAT8),
    ("idle_seconds", FLOAT8),
    ("away_seconds", FLOAT8),
    ("focus_score", FLOAT8),
    ("integrity_score", FLOAT8),
    ("raw_signals", TEXT),
    ("received_at", TIMESTAMP),
)
# Leaf format 3: the same, then who sent it and whether it arrived stale (README,
# "Authenticated ingest"), so the outcome a consumer is shown is sealed with the packet.
LEAF_COLUMNS: tuple[tuple[str, FieldType], ...] = (
    *LEAF_COLUMNS_V2,
    ("auth_outcome", TEXT),
    ("auth_subject", TEXT),
    ("stale", BOOL),
)
FIELDS = tuple(name for name, _ in LEAF_COLUMNS)
FIELDS_V2 = tuple(name for name, _ in LEAF_COLUMNS_V2)
JSON_FIELDS = frozenset(("raw_signals",))
_NULLS = {kind.oid: _FIELD_HEAD.pack(kind.oid, -1) for _, kind in LEAF_COLUMNS}

# The coded strings' text (migration 0022, services/codes) and the scaled numbers' float
# (migration 0026) in the leaf: the same bytes as the value stored as received.
LEAF_TYPES = dict(LEAF_COLUMNS)
DECODED_LEAF_VALUES = {
    name: f"({decoded_sql(name, 'packets')})::{LEAF_TYPES[name].sql}" for name in DECODED
}
# The leaf's bytes, computed by PostgreSQL (the sealer's statement on PostgreSQL), over
# ``LEAF_FROM``: the packets with the key set of each one stored compact (migration 0020),
# whose raw_signals text is rebuilt to the very text stored in full (services/signals), and
# the coded strings decoded.
LEAF_SQL = "record_send(ROW({}))".format(
    ", ".join(
        SIGNALS_TEXT
        if name == "raw_signals"
        else DECODED_LEAF_VALUES[name]
        if name in DECODED_LEAF_VALUES
        else kind.expression(name)
        for name, kind in LEAF_COLUMNS
    )
)
LEAF_FROM = "packets " + KEYS_JOIN.format(p="packets", s="signal_set")
# The columns ``leaf_content`` reads: JSON as its stored text, not parsed (rebuilt where stored
# compact).
LEAF_SELECT = tuple(
    stored_signals_text().label(name) if name in JSON_FIELDS else as_shown(name) for name in FIELDS
)


def leaf_content(row: Any, columns: tuple[tuple[str, FieldType], ...] = LEAF_COLUMNS) -> bytes:
    """The leaf bytes of one packet row (a mapping over ``LEAF_SELECT``), in the current
    format (or over ``columns``: ``LEAF_COLUMNS_V2`` for format 2)."""
    parts = [struct.pack(">i", len(columns))]
    for name, kind in columns:
        value = row[name]
        if value is None:
            parts.append(_NULLS[kind.oid])
        else:
            data = kind.encode(value)
            parts.append(_FIELD_HEAD.pack(kind.oid, len(data)))
            parts.append(data)
    return b"".join(parts)


def json_leaf_content(row: Any) -> bytes:
    """Leaf format 1, of the seals made before migration 0008: the same fields as sorted,
    compact JSON, datetimes in ISO 8601 UTC with microseconds, raw_signals parsed."""
    content = {name: row[name] for name in FIELDS_V2}
    for name in JSON_FIELDS:
        if content[name] is not None:
            content[name] = orjson.loads(content[name])
    for name, kind in LEAF_COLUMNS_V2:
        if kind is TIMESTAMP:
            content[name] = _plain(content[name])
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def leaf_content_v2(row: Any) -> bytes:
    """Leaf format 2, of the seals made between migrations 0008 and 0010."""
    return leaf_content(row, LEAF_COLUMNS_V2)


LEAF_FORMAT = 3  # what new seals use
# The migration that last changed how a packet's fields are stored (0026: numbers scaled),
# which every new seal names (migration 0023: a sealer of an earlier release cannot seal).
PACKET_LAYOUT = 26
ENCODINGS: dict[int, Callable[[Any], bytes]] = {
    1: json_leaf_content,
    2: leaf_content_v2,
    3: leaf_content,
}
# The fields each format's leaf states (and the artifact shows).
FORMAT_FIELDS = {1: FIELDS_V2, 2: FIELDS_V2, 3: FIELDS}


def packet_leaf(row: Any, leaf_format: int = LEAF_FORMAT) -> str:
    """The packet's leaf hash in a seal's leaf format, hex."""
    return leaf_hash(ENCODINGS[leaf_format](row)).hex()


def published(row: Any, leaf_format: int = LEAF_FORMAT) -> dict[str, Any]:
    """A packet's leaf fields (those its leaf format seals) as the artifact endpoint shows
    them: JSON parsed back."""
    shown = {name: row[name] for name in FORMAT_FIELDS[leaf_format]}
    for name in JSON_FIELDS:
        if shown[name] is not None:
            shown[name] = orjson.loads(shown[name])
    return shown


def encoded(content: bytes) -> str:
    """Leaf bytes as the artifact endpoint carries them: standard base64."""
    return base64.b64encode(content).decode()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def pack_ids(ids: list[str]) -> bytes | None:
    """Packet ids as their 16 raw bytes each (``leaf_uuids``); None when one is not a uuid's
    canonical text (lowercase, hyphenated: ``models.PACKET_ID``), which only the old packing
    (``leaf_ids``, one a line) keeps exactly."""
    if not all(PACKET_ID.fullmatch(packet_id) for packet_id in ids):
        return None
    return bytes.fromhex("".join(ids).replace("-", ""))


def unpack_ids(raw: bytes) -> list[str]:
    """The canonical texts of packed packet ids (16 bytes each)."""
    digits = raw.hex()
    return [
        f"{digits[i : i + 8]}-{digits[i + 8 : i + 12]}-{digits[i + 12 : i + 16]}-"
        f"{digits[i + 16 : i + 20]}-{digits[i + 20 : i + 32]}"
        for i in range(0, len(digits), 32)
    ]


@dataclass
class Leaves:
    """A seal's leaves in order: each packet's ``seq``, id and leaf hash, packed in the seal's
    row. Two packings, the same leaves (migration 0019):

    - ``leaf_seqs``: 8-byte big-endian seqs; empty when they are exactly ``after_seq + 1`` ..
      ``last_seq`` (nearly every seal), kept when the range has holes (a seq a rolled-back
      insert never used). Seals made before 0019 always hold them.
    - ids: ``leaf_uuids``, 16 raw bytes each, since 0019; before it ``leaf_ids``, their text
      one a line (37 bytes a packet), NULL in a seal that has ``leaf_uuids``.
    - ``leaf_hashes``: 32 bytes each, in both.
    """

    seqs: list[int]
    ids: list[str]
    hashes: list[bytes]

    @classmethod
    def of(cls, seal: Any) -> Leaves:
        if seal.leaf_seqs:
            count = len(seal.leaf_seqs) // 8
            seqs = list(struct.unpack(f">{count}q", seal.leaf_seqs))
        else:
            seqs = list(range(seal.after_seq + 1, seal.last_seq + 1))
        if seal.leaf_uuids is not None:
            ids = unpack_ids(seal.leaf_uuids)
        else:
            ids = seal.leaf_ids.split("\n") if seal.leaf_ids else []
        raw = seal.leaf_hashes
        hashes = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        return cls(seqs, ids, hashes)

    def packed(self, after_seq: int, uuids: bytes | None = None) -> dict[str, Any]:
        """The seal's leaf columns for a seal whose range starts after ``after_seq``
        (``uuids``: the ids already packed, as PostgreSQL hands them to the sealer)."""
        whole = self.seqs == list(range(after_seq + 1, after_seq + 1 + len(self.seqs)))
        if uuids is None:
            uuids = pack_ids(self.ids)
        return {
            "leaf_seqs": b"" if whole else struct.pack(f">{len(self.seqs)}q", *self.seqs),
            "leaf_ids": "\n".join(self.ids) if uuids is None else None,
            "leaf_uuids": uuids,
            "leaf_hashes": b"".join(self.hashes),
        }

    def index_of(self, seq: int) -> int | None:
        """The leaf of ``seq``; None when there is none, or when the leaves do not add up (a
        seal edited behind the log's back proves nothing: verify names it)."""
        if not len(self.seqs) == len(self.ids) == len(self.hashes):
            return None
        index = bisect.bisect_left(self.seqs, seq)
        return index if index < len(self.seqs) and self.seqs[index] == seq else None


SEAL_FIELDS = ("seq", "sealed_at", "after_seq", "last_seq", "packet_count", "root", "previous_hash")


def seal_header(seal: Any) -> dict[str, Any]:
    """What a seal's hash covers (a mapping or an AuditSeal row)."""
    get = seal.__getitem__ if isinstance(seal, dict) else lambda name: getattr(seal, name)
    return {name: _plain(get(name)) for name in SEAL_FIELDS}


def seal_hash(seal: Any) -> str:
    """SHA-256 of the seal's canonical header, hex: what the next seal and outsiders keep."""
    header = orjson.dumps(seal_header(seal), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(header).hexdigest()
