"""Answers for outsiders: the head seal, the seal chain, one packet with its inclusion proof."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from bucket.extensions import db
from bucket.models import AuditSeal, Packet, is_packet_id
from bucket.services.audit.content import (
    ENCODINGS,
    LEAF_FORMAT,
    LEAF_SELECT,
    Leaves,
    encoded,
    published,
    seal_header,
)
from bucket.services.audit.merkle import inclusion_proof, leaf_hash

T = Packet.__table__
S = AuditSeal.__table__
# A seal as published: everything but its packed leaves.
HEADER = (
    *(S.c[name] for name in ("seq", "sealed_at", "after_seq", "last_seq")),
    S.c.packet_count,
    S.c.root,
    S.c.previous_hash,
    S.c.hash,
    S.c.leaf_format,
)
MAX_SEALS = 1000


def seal_out(seal: Any) -> dict[str, Any]:
    """A seal as published: its header, its hash and how its leaves encode a packet (from a
    row or an AuditSeal)."""
    return {**seal_header(seal), "hash": seal.hash, "leaf_format": seal.leaf_format}


def latest() -> dict[str, Any]:
    """The head seal and how many packets the log covers."""
    found = db.session.execute(
        select(*HEADER, S.c.packets_total).order_by(S.c.seq.desc()).limit(1)
    ).first()
    db.session.commit()
    return {
        "latest_hash": found.hash if found else None,
        "seal": seal_out(found) if found else None,
        "packets_sealed": found.packets_total if found else 0,
    }


def chain(first: int | None, last: int | None) -> list[dict[str, Any]]:
    """Seals ``first``..``last`` by number (at most MAX_SEALS), oldest first."""
    statement = select(*HEADER).order_by(S.c.seq).limit(MAX_SEALS)
    if first is not None:
        statement = statement.where(S.c.seq >= first)
    if last is not None:
        statement = statement.where(S.c.seq <= last)
    seals = db.session.execute(statement).all()
    db.session.commit()
    return [seal_out(seal) for seal in seals]


def artifact(packet_id: str) -> dict[str, Any] | None:
    """The packet as stored, its provenance in the original bucket's shape, and its inclusion
    proof up to its seal; None for an unknown packet."""
    if not is_packet_id(packet_id):  # names no stored packet (and no uuid PostgreSQL accepts)
        return None
    row = (
        db.session.execute(select(*LEAF_SELECT).where(T.c.packet_id == packet_id))
        .mappings()
        .first()
    )
    if row is None:
        db.session.commit()
        return None
    seal = db.session.execute(
        select(AuditSeal)
        .where(AuditSeal.last_seq >= row["seq"], AuditSeal.after_seq < row["seq"])
        .order_by(AuditSeal.last_seq)
        .limit(1)
    ).scalar()
    leaves = Leaves.of(seal) if seal is not None else None
    index = leaves.index_of(row["seq"]) if leaves is not None else None
    leaf_format = seal.leaf_format if seal is not None else LEAF_FORMAT
    content = ENCODINGS[leaf_format](row)
    current = leaf_hash(content).hex()
    answer: dict[str, Any] = {
        "artifact_id": packet_id,
        "data": published(row, leaf_format),
        "canonical": encoded(content),
        "leaf_format": leaf_format,
        # What consumers see beside every packet (sealed in leaf format 3, in ``data``).
        "authenticated": row["auth_outcome"] == "verified",
        "auth_subject": row["auth_subject"],
        "stale": bool(row["stale"]),
    }
    if index is None or leaves.ids[index] != packet_id:
        db.session.commit()
        answer["provenance"] = {
            "sealed": False,
            "current_hash": current,
            "previous_hash": None,
            "message": "Not sealed yet: packets are sealed within seconds of being stored.",
        }
        return answer
    db.session.commit()
    sealed_leaf = leaves.hashes[index].hex()
    previous = leaves.hashes[index - 1].hex() if index > 0 else seal.previous_hash
    answer["provenance"] = {
        "sealed": True,
        "current_hash": sealed_leaf,
        "previous_hash": previous,
        "matches_stored_content": current == sealed_leaf,
        "leaf_index": index,
        "tree_size": seal.packet_count,
        "inclusion_proof": [h.hex() for h in inclusion_proof(index, leaves.hashes)],
        "seal": seal_out(seal),
    }
    return answer
