"""Verification: recompute every seal from the stored rows and the chain of seals.

Names each packet altered (any stored field), deleted, or inserted behind the log's back, and
each seal edited or missing from the chain. A packet the retention purge deleted is reported
as purged, with the day, not as a problem: the purge records what it removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from bucket.extensions import db
from bucket.models import AuditLeaf, AuditPurge, AuditSeal, Packet
from bucket.services.audit.content import GENESIS, packet_leaf, seal_hash
from bucket.services.audit.merkle import root

T = Packet.__table__
L = AuditLeaf.__table__
P = AuditPurge.__table__


@dataclass
class Problem:
    """One thing that is not as the log says."""

    kind: str  # altered, deleted, inserted, seal-edited, chain-broken, leaves-edited
    detail: str
    packet_id: str | None = None
    seal_seq: int | None = None

    def __str__(self) -> str:
        where = f"seal {self.seal_seq}" if self.seal_seq is not None else "log"
        name = f" packet {self.packet_id}" if self.packet_id else ""
        return f"{self.kind}: {where}{name}: {self.detail}"


@dataclass
class Verification:
    """What ``verify`` checked and found."""

    seals: int = 0
    packets: int = 0
    purged: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unsealed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(since: datetime | None = None) -> Verification:
    """Check the chain of seals and every sealed packet (of the seals made at or after
    ``since``, with the link to the seal before them)."""
    report = Verification()
    statement = select(AuditSeal).order_by(AuditSeal.seq)
    if since is not None:
        statement = statement.where(AuditSeal.sealed_at >= since)
    seals = db.session.execute(statement).scalars().all()
    previous = None
    if seals and seals[0].seq > 1:
        previous = db.session.get(AuditSeal, seals[0].seq - 1)
        if previous is None:
            report.problems.append(
                Problem("chain-broken", "the seal before it is missing", seal_seq=seals[0].seq)
            )
    for seal in seals:
        check_link(seal, previous, report)
        check_seal(seal, report)
        previous = seal
    if since is None and seals:
        for row in db.session.execute(select(T).where(T.c.seq <= seals[0].after_seq)).mappings():
            report.problems.append(
                Problem(
                    "inserted", f"seq {row['seq']} lies before the first seal", row["packet_id"]
                )
            )
    head = seals[-1] if seals else None
    if head is not None:
        report.unsealed = len(
            db.session.execute(select(T.c.seq).where(T.c.seq > head.last_seq)).all()
        )
    elif since is None:
        report.unsealed = len(db.session.execute(select(T.c.seq)).all())
    db.session.commit()
    return report


def check_link(seal: AuditSeal, previous: AuditSeal | None, report: Verification) -> None:
    """The seal's own hash, and its place in the chain."""
    report.seals += 1
    if seal_hash(seal) != seal.hash:
        report.problems.append(
            Problem("seal-edited", "its header does not hash to its hash", seal_seq=seal.seq)
        )
    expected_previous = previous.hash if previous else GENESIS
    expected_after = previous.last_seq if previous else 0
    if previous is not None and previous.seq != seal.seq - 1:
        report.problems.append(
            Problem("chain-broken", f"seal {seal.seq - 1} is missing", seal_seq=seal.seq)
        )
    if seal.previous_hash != expected_previous:
        report.problems.append(
            Problem(
                "chain-broken",
                "previous_hash is not the hash of the seal before it",
                seal_seq=seal.seq,
            )
        )
    if seal.after_seq != expected_after:
        report.problems.append(
            Problem(
                "chain-broken", "its range does not follow the seal before it", seal_seq=seal.seq
            )
        )


def check_seal(seal: AuditSeal, report: Verification) -> None:
    """The seal's leaves against its root, and every packet of its range against its leaf."""
    leaves = db.session.execute(
        select(L).where(L.c.seal_seq == seal.seq).order_by(L.c.leaf_index)
    ).all()
    hashes = [bytes.fromhex(leaf.leaf_hash) for leaf in leaves]
    if len(leaves) != seal.packet_count or root(hashes).hex() != seal.root:
        report.problems.append(
            Problem("leaves-edited", "its leaves do not make its root", seal_seq=seal.seq)
        )
    in_range = (T.c.seq > seal.after_seq) & (T.c.seq <= seal.last_seq)
    rows: dict[int, list] = {}  # seq is not unique to the database: a forger may reuse one
    for row in db.session.execute(select(T).where(in_range)).mappings():
        rows.setdefault(row["seq"], []).append(row)
    purges = {
        purge.packet_seq: purge
        for purge in db.session.execute(
            select(P).where(P.c.packet_seq > seal.after_seq, P.c.packet_seq <= seal.last_seq)
        )
    }
    for leaf in leaves:
        candidates = rows.get(leaf.packet_seq, [])
        row = next((r for r in candidates if r["packet_id"] == leaf.packet_id), None)
        if row is None and candidates:
            row = candidates[0]
        if row is not None:
            candidates.remove(row)
        else:
            purge = purges.get(leaf.packet_seq)
            if purge is not None:
                report.purged.append(
                    f"{leaf.packet_id} purged by retention on {purge.purged_at.date().isoformat()}"
                )
            else:
                report.problems.append(
                    Problem(
                        "deleted",
                        "sealed, gone, and not purged by retention",
                        leaf.packet_id,
                        seal.seq,
                    )
                )
            continue
        report.packets += 1
        if row["packet_id"] != leaf.packet_id or packet_leaf(row) != leaf.leaf_hash:
            report.problems.append(
                Problem(
                    "altered",
                    "its stored content is not what was sealed",
                    row["packet_id"],
                    seal.seq,
                )
            )
    for row in (row for found in rows.values() for row in found):
        report.problems.append(
            Problem(
                "inserted",
                f"seq {row['seq']} lies in a sealed range but was never sealed",
                row["packet_id"],
                seal.seq,
            )
        )
