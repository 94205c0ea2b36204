"""Answers for outsiders: the head seal, the seal chain, one packet with its inclusion proof."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from bucket.extensions import db
from bucket.models import AuditLeaf, AuditSeal, Packet
from bucket.services.audit.content import FIELDS, canonical, packet_leaf, seal_header
from bucket.services.audit.merkle import inclusion_proof

T = Packet.__table__
S = AuditSeal.__table__
L = AuditLeaf.__table__
MAX_SEALS = 1000


def seal_out(seal: Any) -> dict[str, Any]:
    """A seal as published: its header and its hash."""
    return {**seal_header(seal), "hash": seal.hash}


def latest() -> dict[str, Any]:
    """The head seal and how many packets the log covers."""
    seal = db.session.execute(select(AuditSeal).order_by(AuditSeal.seq.desc()).limit(1)).scalar()
    covered = db.session.execute(select(func.count()).select_from(L)).scalar_one()
    db.session.commit()
    return {
        "latest_hash": seal.hash if seal else None,
        "seal": seal_out(seal) if seal else None,
        "packets_sealed": covered,
    }


def chain(first: int | None, last: int | None) -> list[dict[str, Any]]:
    """Seals ``first``..``last`` by number (at most MAX_SEALS), oldest first."""
    statement = select(AuditSeal).order_by(AuditSeal.seq).limit(MAX_SEALS)
    if first is not None:
        statement = statement.where(AuditSeal.seq >= first)
    if last is not None:
        statement = statement.where(AuditSeal.seq <= last)
    seals = db.session.execute(statement).scalars().all()
    db.session.commit()
    return [seal_out(seal) for seal in seals]


def artifact(packet_id: str) -> dict[str, Any] | None:
    """The packet as stored, its provenance in the original bucket's shape, and its inclusion
    proof up to its seal; None for an unknown packet."""
    row = db.session.execute(select(T).where(T.c.packet_id == packet_id)).mappings().first()
    if row is None:
        db.session.commit()
        return None
    leaf = db.session.execute(select(L).where(L.c.packet_seq == row["seq"])).first()
    current = packet_leaf(row)
    data = {name: row[name] for name in FIELDS}
    answer: dict[str, Any] = {
        "artifact_id": packet_id,
        "data": data,
        "canonical": canonical(row).decode(),
    }
    if leaf is None:
        db.session.commit()
        answer["provenance"] = {
            "sealed": False,
            "current_hash": current,
            "previous_hash": None,
            "message": "Not sealed yet: packets are sealed within seconds of being stored.",
        }
        return answer
    seal = db.session.get(AuditSeal, leaf.seal_seq)
    leaves = (
        db.session.execute(
            select(L.c.leaf_hash).where(L.c.seal_seq == leaf.seal_seq).order_by(L.c.leaf_index)
        )
        .scalars()
        .all()
    )
    db.session.commit()
    hashes = [bytes.fromhex(h) for h in leaves]
    previous = leaves[leaf.leaf_index - 1] if leaf.leaf_index > 0 else seal.previous_hash
    answer["provenance"] = {
        "sealed": True,
        "current_hash": leaf.leaf_hash,
        "previous_hash": previous,
        "matches_stored_content": current == leaf.leaf_hash,
        "leaf_index": leaf.leaf_index,
        "tree_size": seal.packet_count,
        "inclusion_proof": [h.hex() for h in inclusion_proof(leaf.leaf_index, hashes)],
        "seal": seal_out(seal),
    }
    return answer
