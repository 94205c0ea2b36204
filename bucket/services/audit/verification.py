"""Verification: recompute every seal from the stored rows and the chain of seals.

Names each packet altered (any stored field), deleted, or inserted behind the log's back, and
each seal edited or missing from the chain. A packet the retention purge deleted is reported
as purged, with the day, not as a problem: the purge records what it removes, packet by
packet (by rows) or as runs of seq that held only packets of the day it dropped (by days).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from bucket.extensions import db
from bucket.models import AuditPurge, AuditPurgedRange, AuditSeal, Packet
from bucket.services.audit.content import GENESIS, LEAF_SELECT, Leaves, packet_leaf, seal_hash
from bucket.services.audit.merkle import root

T = Packet.__table__
S = AuditSeal.__table__
P = AuditPurge.__table__
R = AuditPurgedRange.__table__


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
    ``since``, with the link to the seal before them). Seals are read one at a time, leaves
    and rows of one seal at a time, so memory stays bounded by the largest seal."""
    report = Verification()
    statement = select(S.c.seq).order_by(S.c.seq)
    if since is not None:
        statement = statement.where(S.c.sealed_at >= since)
    numbers = db.session.execute(statement).scalars().all()
    previous = None
    if numbers and numbers[0] > 1:
        previous = db.session.get(AuditSeal, numbers[0] - 1)
        if previous is None:
            report.problems.append(
                Problem("chain-broken", "the seal before it is missing", seal_seq=numbers[0])
            )
    first = last = None
    for number in numbers:
        seal = db.session.get(AuditSeal, number)
        check_link(seal, previous, report)
        check_seal(seal, report)
        if previous is not None:
            db.session.expunge(previous)
        previous = seal
        first = first or (seal.seq, seal.after_seq)
        last = seal.last_seq
    if since is None and first is not None:
        for row in db.session.execute(select(T).where(T.c.seq <= first[1])).mappings():
            report.problems.append(
                Problem(
                    "inserted", f"seq {row['seq']} lies before the first seal", row["packet_id"]
                )
            )
    if last is not None:
        report.unsealed = db.session.execute(
            select(func.count()).select_from(T).where(T.c.seq > last)
        ).scalar_one()
    elif since is None:
        report.unsealed = db.session.execute(select(func.count()).select_from(T)).scalar_one()
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
    leaves = Leaves.of(seal)
    counts = {len(leaves.seqs), len(leaves.ids), len(leaves.hashes)}
    in_order = all(a < b for a, b in zip(leaves.seqs, leaves.seqs[1:], strict=False))
    within = all(seal.after_seq < seq <= seal.last_seq for seq in leaves.seqs)
    if (
        counts != {seal.packet_count}
        or not in_order
        or not within
        or root(leaves.hashes).hex() != seal.root
    ):
        report.problems.append(
            Problem("leaves-edited", "its leaves do not make its root", seal_seq=seal.seq)
        )
        return
    in_range = (T.c.seq > seal.after_seq) & (T.c.seq <= seal.last_seq)
    rows: dict[int, list] = {}  # seq is not unique to the database: a forger may reuse one
    for row in db.session.execute(select(*LEAF_SELECT).where(in_range)).mappings():
        rows.setdefault(row["seq"], []).append(row)
    purges = {
        purge.packet_seq: purge
        for purge in db.session.execute(
            select(P).where(P.c.packet_seq > seal.after_seq, P.c.packet_seq <= seal.last_seq)
        )
    }
    ranges = db.session.execute(
        select(R.c.first_seq, R.c.last_seq, R.c.purged_at)
        .where(R.c.first_seq <= seal.last_seq, R.c.last_seq > seal.after_seq)
        .order_by(R.c.first_seq)
    ).all()
    starts = [first for first, _, _ in ranges]

    def purged_at(packet_seq: int) -> datetime | None:
        purge = purges.get(packet_seq)
        if purge is not None:
            return purge.purged_at
        at = bisect_right(starts, packet_seq) - 1
        if at >= 0 and packet_seq <= ranges[at].last_seq:
            return ranges[at].purged_at
        return None

    for packet_seq, packet_id, sealed in zip(leaves.seqs, leaves.ids, leaves.hashes, strict=True):
        candidates = rows.get(packet_seq, [])
        row = next((r for r in candidates if r["packet_id"] == packet_id), None)
        if row is None and candidates:
            row = candidates[0]
        if row is not None:
            candidates.remove(row)
        else:
            when = purged_at(packet_seq)
            if when is not None:
                report.purged.append(
                    f"{packet_id} purged by retention on {when.date().isoformat()}"
                )
            else:
                report.problems.append(
                    Problem(
                        "deleted",
                        "sealed, gone, and not purged by retention",
                        packet_id,
                        seal.seq,
                    )
                )
            continue
        report.packets += 1
        if row["packet_id"] != packet_id or packet_leaf(row, seal.leaf_format) != sealed.hex():
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
