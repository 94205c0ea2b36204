"""Seals pack their leaves tightly (migration 0019): packet ids as 16 raw bytes, no seqs when
they are the seal's whole range. The leaves, roots, proofs and verify are those of the old
packing, which seals made before 0019 keep and which is read beside the new one.

Every test runs on SQLite + memory and on PostgreSQL + Redis.
"""

from __future__ import annotations

import struct
from datetime import timedelta

from bucket.extensions import db
from bucket.models import AuditSeal
from bucket.services import partitions, retention
from bucket.services.audit.content import Leaves
from bucket.timeutil import utc_now
from tests.queue_helpers import ack, ingest_many, poll, sql
from tests.test_audit import artifact, outside_check, seal, verify


def packing(app, seq: int) -> tuple[bytes, str | None, bytes | None]:
    """The seal's ``leaf_seqs``, ``leaf_ids`` and ``leaf_uuids`` as stored."""
    ((seqs, ids, uuids),) = sql(
        app, "SELECT leaf_seqs, leaf_ids, leaf_uuids FROM audit_seals WHERE seq = :s", s=seq
    )
    return (bytes(seqs), ids, None if uuids is None else bytes(uuids))


def seqs_of(app, ids: list[str]) -> list[int]:
    found = dict(sql(app, "SELECT packet_id, seq FROM packets"))
    return [found[packet_id] for packet_id in ids]


def as_before_0019(app, seq: int) -> None:
    """Write the seal in the packing seals made before migration 0019 keep: every seq, the
    ids as text one a line, no ``leaf_uuids`` (its header and hash do not cover them)."""
    with app.app_context():
        made = db.session.get(AuditSeal, seq)
        leaves = Leaves.of(made)
        made.leaf_seqs = struct.pack(f">{len(leaves.seqs)}q", *leaves.seqs)
        made.leaf_ids = "\n".join(leaves.ids)
        made.leaf_uuids = None
        db.session.commit()


def skip_seqs(app, backend: str, count: int) -> None:
    """Let ``count`` seqs go unused, as rolled-back inserts do."""
    if backend == "postgres":
        sql(
            app,
            "SELECT nextval(pg_get_serial_sequence('packets', 'seq')) FROM generate_series(1, :n)",
            n=count,
        )
    else:
        sql(
            app,
            "UPDATE packet_counters SET value = value + :n WHERE name = 'allocated' AND shard = 0",
            n=count,
        )


def proven(tmp_path, client, packet_id: str) -> dict:
    """The packet's artifact, its proof checked by tools/verify_proof.py against its seal."""
    answer = artifact(client, packet_id)
    assert answer["provenance"]["sealed"] and answer["provenance"]["matches_stored_content"]
    own = answer["provenance"]["seal"]["hash"]
    checked = outside_check(tmp_path, answer, "--seal-hash", own)
    assert checked.returncode == 0 and "proven" in checked.stdout, checked.stdout + checked.stderr
    return answer


def test_a_new_seal_keeps_its_ids_as_raw_bytes_and_no_seqs(app, client, tmp_path):
    """Five packets, one seal after the first: 80 bytes of ids, no seqs, no text; verify and
    the proof of each packet check out. (The first seal follows no seal: on PostgreSQL, whose
    seqs earlier tests used, its range starts at 1 and has holes.)"""
    ingest_many(client, 1)
    seal(app)
    ids = ingest_many(client, 5)
    (made,) = seal(app)
    seqs, text_ids, uuids = packing(app, made.seq)
    assert seqs == b"" and text_ids is None
    assert uuids == b"".join(bytes.fromhex(packet_id.replace("-", "")) for packet_id in ids)
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0 and "checked 2 seals and 6 packets" in result.output, result.output
    for index, packet_id in enumerate(ids):
        answer = proven(tmp_path, client, packet_id)
        assert answer["provenance"]["leaf_index"] == index


def test_a_seal_of_the_old_packing_beside_new_ones_verifies_and_proves(app, client, tmp_path):
    """A seal made before 0019 (its ids as text, every seq), then two in the new packing: one
    chain, verify finds nothing, a packet of each has its proof; an edited id in either
    packing is found."""
    old = ingest_many(client, 3)
    seal(app)
    as_before_0019(app, 1)
    new = ingest_many(client, 2)
    seal(app)
    newer = ingest_many(client, 2)
    seal(app)
    seqs, text_ids, uuids = packing(app, 1)
    assert text_ids == "\n".join(old) and uuids is None and len(seqs) == 24
    assert packing(app, 2)[1:] == (None, b"".join(bytes.fromhex(i.replace("-", "")) for i in new))
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0 and "checked 3 seals and 7 packets" in result.output, result.output
    for packet_id in (old[1], new[1], newer[0]):
        proven(tmp_path, client, packet_id)
    assert [artifact(client, i)["provenance"]["seal"]["seq"] for i in (old[2], new[0])] == [1, 2]

    sql(app, "UPDATE audit_seals SET leaf_ids = :t WHERE seq = 1", t="\n".join(old[::-1]))
    sql(
        app,
        "UPDATE audit_seals SET leaf_uuids = :u WHERE seq = 2",
        u=b"".join(bytes.fromhex(i.replace("-", "")) for i in new[::-1]),
    )
    edited = verify(app.test_cli_runner())
    assert edited.exit_code == 1
    for packet_id in (old[0], old[2], new[0], new[1]):
        assert packet_id in edited.output, edited.output


def test_a_seal_with_holes_keeps_its_seqs(app, client, backend, tmp_path):
    """Seqs no packet took (one before the seal's first packet, one between two) are kept in
    the seal, exactly: verify and the proofs read the packets at their own seqs."""
    base = seqs_of(app, ingest_many(client, 2))[-1]
    seal(app)
    skip_seqs(app, backend, 1)
    (first,) = ingest_many(client, 1)
    skip_seqs(app, backend, 1)
    (second,) = ingest_many(client, 1)
    (made,) = seal(app)
    assert seqs_of(app, [first, second]) == [base + 2, base + 4]
    with app.app_context():
        sealed = db.session.get(AuditSeal, made.seq)
        assert (sealed.after_seq, sealed.last_seq, sealed.packet_count) == (base, base + 4, 2)
        db.session.commit()
    seqs, text_ids, uuids = packing(app, made.seq)
    assert struct.unpack(">2q", seqs) == (base + 2, base + 4)
    assert text_ids is None and len(uuids) == 32
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0 and "checked 2 seals and 4 packets" in result.output, result.output
    assert proven(tmp_path, client, second)["provenance"]["leaf_index"] == 1


def test_retention_purges_a_day_sealed_in_both_packings(app, client, backend):
    """A day's packets sealed partly before 0019 (old packing) and partly after (new), across
    a skipped seq: the purge drops them all, records them as purged (PostgreSQL: the day's
    partition as its runs of seqs), and verify calls each purged, none deleted."""
    old_day = utc_now().date() - timedelta(days=50)
    postgres = backend == "postgres"
    if postgres:
        sql(app, f"DROP TABLE IF EXISTS {partitions.day_name(old_day)}")
        with app.app_context():
            partitions.create_day(old_day, adopt=False)
    ids = ingest_many(client, 3)
    seal(app)
    as_before_0019(app, 1)
    ids += ingest_many(client, 2)
    skip_seqs(app, backend, 1)
    ids += ingest_many(client, 2)
    seal(app)
    assert len(packing(app, 2)[0]) == 32  # the new seal keeps its seqs: it has a hole
    ids += ingest_many(client, 2)
    seal(app)
    assert packing(app, 3)[0] == b""
    for packet in poll(client, limit=10)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    seqs = seqs_of(app, ids)
    if postgres:
        from tests.test_partitions import move_to_day

        move_to_day(app, ids, old_day)
        with app.app_context():
            report = retention.purge_days(30)
        name = partitions.day_name(old_day)
        found = [(d.partition, d.packets, d.ranges, d.kept) for d in report.days if d.packets]
        assert found == [(name, 9, 1, None)]
        recorded = sql(
            app,
            "SELECT first_seq, last_seq, packet_count FROM audit_purged_ranges "
            "WHERE partition = :n",
            n=name,
        )
        assert [tuple(r) for r in recorded] == [(seqs[0], seqs[-1], 9)]
    else:
        purged = app.test_cli_runner().invoke(
            args=["bucket", "purge", "--by-rows", "--older-than-days", "0"]
        )
        assert purged.exit_code == 0 and "purged 9" in purged.output, purged.output
    assert sql(app, "SELECT count(*) FROM packets") == [(0,)]
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0 and "checked 3 seals" in result.output, result.output
    assert result.output.count("purged by retention on") == 9
