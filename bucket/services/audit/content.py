"""What a packet's leaf commits to: every stored field, canonically encoded.

Everything the browser sent and the service derived at ingest (identity keys, ``seq``,
``received_at``): the packets table is written once and never changed. Delivery state lives
in ``deliveries`` and is deliberately left out, since it changes. Datetimes are ISO-8601 in
UTC with microseconds, keys sorted at every depth, floats in their shortest round-trip form.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from bucket.models import Packet, UTCDateTime
from bucket.services.audit.merkle import leaf_hash

T = Packet.__table__
FIELDS = tuple(column.name for column in T.columns)
GENESIS = "0" * 64


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


DATETIME_FIELDS = tuple(column.name for column in T.columns if isinstance(column.type, UTCDateTime))
CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical(row: Any) -> bytes:
    """The canonical bytes of one packet row (a mapping of its columns)."""
    content = {name: row[name] for name in FIELDS}
    for name in DATETIME_FIELDS:
        content[name] = _plain(content[name])
    return orjson.dumps(content, option=CANONICAL)


def packet_leaf(row: Any) -> str:
    """The packet's leaf hash, hex."""
    return leaf_hash(canonical(row)).hex()


@dataclass
class Leaves:
    """A seal's leaves in order: each packet's ``seq``, id and leaf hash, packed in the seal's
    row (8-byte big-endian seqs, ids one a line, 32-byte hashes)."""

    seqs: list[int]
    ids: list[str]
    hashes: list[bytes]

    @classmethod
    def of(cls, seal: Any) -> Leaves:
        count = len(seal.leaf_seqs) // 8
        seqs = list(struct.unpack(f">{count}q", seal.leaf_seqs))
        ids = seal.leaf_ids.split("\n") if seal.leaf_ids else []
        raw = seal.leaf_hashes
        hashes = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        return cls(seqs, ids, hashes)

    def packed(self) -> dict[str, Any]:
        return {
            "leaf_seqs": struct.pack(f">{len(self.seqs)}q", *self.seqs),
            "leaf_ids": "\n".join(self.ids),
            "leaf_hashes": b"".join(self.hashes),
        }

    def index_of(self, seq: int) -> int | None:
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
