"""What ``flask bucket verify`` and the proofs answer, line by line: each problem in its own
words, every seal counted, packets purged whole days at a time, and the answers of an empty
log. Closes the gaps mutation testing found in ``services/audit`` (docs/mutation.md, "audit:
verification, proofs, merkle").

Every test that needs a server runs on SQLite + memory and on PostgreSQL + Redis.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from bucket.extensions import db
from bucket.models import AuditSeal
from bucket.services.audit import merkle
from bucket.services.audit.content import LEAF_SELECT, PACKET_LAYOUT, Leaves, packet_leaf
from tests.factories import another_day
from tests.queue_helpers import ingest_many
from tests.test_audit import artifact, seal, sql, verify


def problems(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("PROBLEM")]


def seqs_of(app, ids: list[str]) -> list[int]:
    with app.app_context():
        found = dict(
            db.session.execute(
                text("SELECT packet_id, seq FROM packets WHERE packet_id IN :ids").bindparams(
                    db.bindparam("ids", expanding=True)
                ),
                {"ids": ids},
            ).all()
        )
        db.session.commit()
    return [found[i] for i in ids]


def seal_row(app, seq: int) -> dict:
    with app.app_context():
        row = dict(
            db.session.execute(text("SELECT * FROM audit_seals WHERE seq = :s"), {"s": seq})
            .mappings()
            .one()
        )
        db.session.commit()
    return row


def rewrite_leaf_seqs(app, seq: int, seqs: list[int]) -> None:
    """The seal's packed seqs replaced (its root covers the leaf hashes only)."""
    with app.app_context():
        made = db.session.get(AuditSeal, seq)
        leaves = Leaves.of(made)
        packed = Leaves(seqs, leaves.ids, leaves.hashes).packed(made.after_seq)
        made.leaf_seqs = packed["leaf_seqs"]
        db.session.commit()


# Forged ids: UUIDs, as every stored id is (PostgreSQL stores them as uuid: migration 0016),
# below every id the service hands out, so the forged rows are listed before the real ones.
FORGED_BEFORE = "00000000-0000-7000-8000-000000000001"
FORGED_IN_RANGE = "00000000-0000-7000-8000-000000000002"
RENAMED = "00000000-0000-7000-8000-000000000003"


def forge_copy(app, source: str, **changes) -> None:
    """Insert a copy of a stored packet's row with ``changes`` (a forger writing SQL)."""
    with app.app_context():
        row = (
            db.session.execute(
                text(
                    "SELECT *, CAST(raw_signals AS TEXT) AS as_text FROM packets "
                    "WHERE packet_id = :p"
                ),
                {"p": source},
            )
            .mappings()
            .one()
        )
        forged = dict(row, dedup_key=changes.pop("dedup_key", "f" * 32), **changes)
        forged["raw_signals"] = forged.pop("as_text")  # as stored, byte for byte
        columns = ", ".join(forged)
        db.session.execute(
            text(f"INSERT INTO packets ({columns}) VALUES ({', '.join(':' + c for c in forged)})"),
            forged,
        )
        db.session.commit()


def delete_packet(app, packet_id: str) -> None:
    sql(app, "DELETE FROM deliveries WHERE packet_id = :p", p=packet_id)
    sql(app, "DELETE FROM packets WHERE packet_id = :p", p=packet_id)


def test_verify_prints_each_problem_in_full_and_counts_every_seal(app, client):
    """One line per problem: kind, seal (or ``log``), packet when there is one, and what is
    wrong; the summary counts every seal checked, not just one."""
    first = ingest_many(client, 3)
    seal(app)
    second = ingest_many(client, 3)
    seal(app)
    third = ingest_many(client, 2)
    seal(app)
    clean = verify(app.test_cli_runner())
    assert clean.exit_code == 0, clean.output
    assert clean.output.splitlines() == [
        "checked 3 seals and 8 packets; 0 purged by retention, 0 not sealed yet, 0 problems"
    ]
    # seal 1's header edited: its hash no longer matches (seal 2 still names the stored hash)
    sql(app, "UPDATE audit_seals SET sealed_at = '2020-01-01 00:00:00' WHERE seq = 1")
    sql(app, "UPDATE packets SET focus_score_float = 99 WHERE packet_id = :p", p=first[1])
    delete_packet(app, second[1])
    # a row forged with a sealed packet's seq, listed before it; and one before the first seal
    victim = second[2]
    with app.app_context():
        row = dict(
            db.session.execute(text("SELECT * FROM packets WHERE packet_id = :p"), {"p": victim})
            .mappings()
            .one()
        )
        db.session.commit()
    forge_copy(app, victim, packet_id=FORGED_IN_RANGE, received_at=another_day(row["received_at"]))
    delete_packet(app, victim)
    forge_copy(
        app,
        FORGED_IN_RANGE,
        packet_id=victim,
        dedup_key=row["dedup_key"],
        received_at=row["received_at"],
    )
    forge_copy(app, third[0], packet_id=FORGED_BEFORE, dedup_key="e" * 32, seq=0)
    # a sealed packet renamed: its seq holds another id only
    renamed_seq = seqs_of(app, [third[1]])[0]
    delete_packet(app, third[1])
    forge_copy(app, FORGED_BEFORE, packet_id=RENAMED, dedup_key="d" * 32, seq=renamed_seq)
    sql(
        app,
        "UPDATE packets SET seq = :s, focus_score_float = 1 WHERE packet_id = :p",
        s=renamed_seq,
        p=RENAMED,
    )
    forged_seq = seqs_of(app, [victim])[0]
    result = verify(app.test_cli_runner())
    assert result.exit_code == 1
    assert problems(result) == [
        "PROBLEM seal-edited: seal 1: its header does not hash to its hash",
        f"PROBLEM altered: seal 1 packet {first[1]}: its stored content is not what was sealed",
        f"PROBLEM deleted: seal 2 packet {second[1]}: sealed, gone, and not purged by retention",
        f"PROBLEM inserted: seal 2 packet {FORGED_IN_RANGE}: seq {forged_seq} lies in a sealed "
        "range but was never sealed",
        f"PROBLEM altered: seal 3 packet {RENAMED}: its stored content is not what was sealed",
        f"PROBLEM inserted: log packet {FORGED_BEFORE}: seq 0 lies before the first seal",
    ], result.output
    assert result.output.splitlines()[-1] == (
        "checked 3 seals and 7 packets; 0 purged by retention, 0 not sealed yet, 6 problems"
    )


def test_verify_names_a_missing_seal_and_each_broken_link_in_full(app, client):
    for _ in range(3):
        ingest_many(client, 2)
        seal(app)
    sql(app, "DELETE FROM audit_seals WHERE seq = 2")
    result = verify(app.test_cli_runner())
    assert problems(result) == [
        "PROBLEM chain-broken: seal 3: seal 2 is missing",
        "PROBLEM chain-broken: seal 3: previous_hash is not the hash of the seal before it",
        "PROBLEM chain-broken: seal 3: its range does not follow the seal before it",
    ], result.output


def test_verify_since_names_a_missing_seal_before_the_first_it_checks(app, client):
    for _ in range(3):
        ingest_many(client, 1)
        seal(app)
    since = seal_row(app, 2)["sealed_at"]
    sql(app, "DELETE FROM audit_seals WHERE seq = 1")
    result = verify(app.test_cli_runner(), "--since", str(since).replace(" ", "T"))
    assert problems(result) == [
        "PROBLEM chain-broken: seal 2: the seal before it is missing",
        "PROBLEM chain-broken: seal 2: previous_hash is not the hash of the seal before it",
        "PROBLEM chain-broken: seal 2: its range does not follow the seal before it",
    ], result.output
    assert "checked 2 seals and 2 packets" in result.output


def test_verify_on_a_log_without_seals_counts_every_packet_as_not_sealed_yet(app, client):
    ingest_many(client, 3)
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "checked 0 seals and 0 packets; 0 purged by retention, 3 not sealed yet, 0 problems"
    ]


def test_leaves_out_of_order_repeated_or_outside_the_seals_range_are_edited(app, client):
    """The root covers the leaf hashes only: the packed seqs are checked on their own."""
    ingest_many(client, 2)
    seal(app)
    ingest_many(client, 4)
    seal(app)
    original = Leaves.of(SimpleNamespace(**seal_row(app, 2))).seqs
    edited = "PROBLEM leaves-edited: seal 2: its leaves do not make its root"
    after = seal_row(app, 2)["after_seq"]
    for seqs in (
        [original[0], original[2], original[1], original[3]],  # two neighbours swapped
        [original[0], original[0], *original[2:]],  # one seq twice
        [after, *original[1:]],  # the last seq of the seal before
    ):
        rewrite_leaf_seqs(app, 2, seqs)
        result = verify(app.test_cli_runner())
        assert problems(result) == [edited], (seqs, result.output)
    rewrite_leaf_seqs(app, 2, original)
    assert verify(app.test_cli_runner()).exit_code == 0


def test_packets_dropped_with_their_day_are_purged_at_either_end_of_a_range(app, client):
    """The runs of seq a dropped day held (``audit_purged_ranges``) excuse exactly their
    packets: a run starting at a seal's last packet, one ending at a seal's last packet, any
    order of recording; a packet outside them is still deleted."""
    first = ingest_many(client, 3)
    seal(app)
    second = ingest_many(client, 3)
    seal(app)
    seqs = seqs_of(app, first + second)
    gone = [first[2], second[0], second[2]]
    for packet_id in [*gone, second[1]]:
        delete_packet(app, packet_id)
    # recorded newest first: verify must not rely on the order rows come back in
    for low, high, day in ((seqs[5], seqs[5], "2026-11-30"), (seqs[2], seqs[3], "2026-11-29")):
        sql(
            app,
            "INSERT INTO audit_purged_ranges (first_seq, last_seq, packet_count, partition, "
            "purged_at) VALUES (:a, :b, :n, :p, :t)",
            a=low,
            b=high,
            n=high - low + 1,
            p=f"packets_p{day.replace('-', '')}",
            t=f"{day} 03:00:00",
        )
    result = verify(app.test_cli_runner())
    assert [line for line in result.output.splitlines() if line.startswith("purged")] == [
        f"purged: {first[2]} purged by retention on 2026-11-29",
        f"purged: {second[0]} purged by retention on 2026-11-29",
        f"purged: {second[2]} purged by retention on 2026-11-30",
    ], result.output
    assert problems(result) == [
        f"PROBLEM deleted: seal 2 packet {second[1]}: sealed, gone, and not purged by retention"
    ]


def test_a_purge_of_a_seals_last_packet_is_purged_not_deleted(app, client):
    ids = ingest_many(client, 2)
    seal(app)
    served = client.get("/api/v1/bucket/prana/packets/pending?limit=2").json["packets"]
    for packet in served:
        body = {"packet_id": packet["packet_id"], "success": True}
        assert (
            client.post("/api/v1/bucket/prana/packets/mark-processed", json=body).status_code == 200
        )
    purged = app.test_cli_runner().invoke(
        args=["bucket", "purge", "--by-rows", "--older-than-days", "0"]
    )
    assert "purged 2" in purged.output, purged.output
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0, result.output
    assert sorted(line.split()[1] for line in result.output.splitlines()[:2]) == sorted(ids)


def test_the_seal_chain_and_verify_read_seals_in_order_after_one_is_rewritten(app, client):
    """A row rewritten in place (PostgreSQL moves it to the end of the heap) still comes back
    in its place: the chain answer and verify order seals by number."""
    for _ in range(3):
        ingest_many(client, 1)
        seal(app)
    sql(app, "UPDATE audit_seals SET root = root WHERE seq = 1")
    chain = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert [s["seq"] for s in chain] == [1, 2, 3]
    assert verify(app.test_cli_runner()).exit_code == 0


def test_the_seal_chain_answers_at_most_1000_seals(app, client):
    ingest_many(client, 1)
    seal(app)
    row = seal_row(app, 1)
    # Above the real seal's range, whatever seqs earlier tests left the counter at (last_seq is
    # unique: a copy landing on the real one's would fail the insert).
    base = row["last_seq"]
    copies = [
        dict(row, seq=n, after_seq=base + n * 10, last_seq=base + n * 10 + 1, hash=f"{n:064x}")
        for n in range(2, 1003)
    ]
    with app.app_context():
        columns = ", ".join(row)
        db.session.execute(
            text(f"INSERT INTO audit_seals ({columns}) VALUES ({', '.join(':' + c for c in row)})"),
            copies,
        )
        db.session.commit()
    chain = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert len(chain) == 1000 and chain[0]["seq"] == 1 and chain[-1]["seq"] == 1000


def test_an_empty_log_answers_no_head_and_nothing_sealed(client):
    assert client.get("/api/v1/bucket/latest-hash").json == {
        "latest_hash": None,
        "seal": None,
        "packets_sealed": 0,
    }


def test_an_unsealed_packets_provenance_is_its_current_leaf_and_nothing_before_it(app, client):
    (packet_id,) = ingest_many(client, 1)
    answer = artifact(client, packet_id)
    with app.app_context():
        row = db.session.execute(select(*LEAF_SELECT)).mappings().one()
        db.session.commit()
    assert answer["provenance"] == {
        "sealed": False,
        "current_hash": packet_leaf(row),
        "previous_hash": None,
        "message": "Not sealed yet: packets are sealed within seconds of being stored.",
    }


def test_each_proof_names_the_leaf_before_it_or_the_seal_before_for_a_first_leaf(app, client):
    first = ingest_many(client, 2)
    seal(app)
    second = ingest_many(client, 2)
    seal(app)
    answers = [artifact(client, i)["provenance"] for i in first + second]
    assert answers[0]["previous_hash"] == "0" * 64
    assert answers[1]["previous_hash"] == answers[0]["current_hash"]
    assert answers[2]["previous_hash"] == answers[0]["seal"]["hash"]
    assert answers[3]["previous_hash"] == answers[2]["current_hash"]


# --- the Merkle tree alone -------------------------------------------------------------------


def test_the_servers_own_inclusion_check_accepts_every_leaf_and_nothing_else():
    """RFC 9162 §2.1.3.2 at every index of trees of 1 to 12 leaves; a wrong index, size, root,
    a cut or lengthened path are refused."""
    for size in range(1, 13):
        leaves = [merkle.leaf_hash(f"packet {n}".encode()) for n in range(size)]
        root = merkle.root(leaves)
        for index in range(size):
            path = merkle.inclusion_proof(index, leaves)
            leaf = leaves[index]
            assert merkle.verify_inclusion(leaf, index, size, path, root), (size, index)
            assert not merkle.verify_inclusion(leaf, index, size, path, bytes(32))
            assert not merkle.verify_inclusion(leaf, size, size, path, root)
            assert not merkle.verify_inclusion(leaf, -1, size, path, root)
            assert not merkle.verify_inclusion(leaf, index, size, [*path, root], root)
            if path:
                assert not merkle.verify_inclusion(leaf, index, size, path[:-1], root)
            if size > 1:
                other = (index + 1) % size
                assert not merkle.verify_inclusion(leaf, other, size, path, root)
        with pytest.raises(IndexError, match=f"^leaf {size} is not in a tree of {size}$"):
            merkle.inclusion_proof(size, leaves)


def test_a_seal_written_as_an_earlier_release_writes_it_is_refused(app, client, runner):
    """During a rolling deploy an instance of a release before migration 0023 keeps running
    beside the new ones; it reads packets stored in a newer layout (codes, key sets) as NULLs,
    and a seal of those leaves would make ``verify`` report them altered. Its sealer names no
    ``packet_layout``: the database refuses that seal, and the new sealer seals the packets."""
    ingest_many(client, 3)
    assert seal(app)
    row = seal_row(app, 1)
    earlier = {name: value for name, value in row.items() if name != "packet_layout"}
    earlier.update(seq=2, after_seq=row["last_seq"], last_seq=row["last_seq"] + 1, hash="e" * 64)
    with app.app_context():
        columns = ", ".join(earlier)
        values = ", ".join(":" + name for name in earlier)
        with pytest.raises(IntegrityError):
            db.session.execute(
                text(f"INSERT INTO audit_seals ({columns}) VALUES ({values})"), earlier
            )
        db.session.rollback()
    assert row["packet_layout"] == PACKET_LAYOUT
    ingest_many(client, 2)
    assert [made.packet_count for made in seal(app)] == [2]
    result = verify(runner)
    assert result.exit_code == 0, result.output
