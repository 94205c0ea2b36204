"""The audit log: seals over every stored packet, proofs an outsider can check, and a verifier
that names each packet altered, deleted or forged behind the log's back.

Every test runs on SQLite + memory and on PostgreSQL + Redis.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import struct
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from bucket.extensions import db
from bucket.models import AuditSeal
from bucket.services.audit import merkle
from bucket.services.audit.content import (
    LEAF_FORMAT,
    LEAF_SELECT,
    Leaves,
    json_leaf_content,
    seal_hash,
)
from bucket.services.audit.sealing import (
    LEAVES_SQL,
    SEALER_SETTINGS,
    seal_backlog,
    seal_everything,
    seal_new_packets,
    sealed_through,
)
from tests.concurrency import join_all
from tests.factories import another_day
from tests.queue_helpers import ingest_many

ROOT = Path(__file__).resolve().parent.parent
VERIFIER = ROOT / "tools" / "verify_proof.py"
FORGED_ID = "0f0f0f0f-0f0f-7f0f-8f0f-0f0f0f0f0f0f"


def content_of(answer: dict) -> dict:
    """The fields an artifact's canonical bytes state, read by the standalone verifier."""
    return load_verifier().fields_of(base64.b64decode(answer["canonical"]))


def load_verifier():
    # Named by its path, as mutation testing (tools/mutants.py) names its functions.
    spec = importlib.util.spec_from_file_location("tools.verify_proof", VERIFIER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seal(app) -> list:
    with app.app_context():
        return seal_everything()


def verify(runner, *args: str):
    return runner.invoke(args=["bucket", "verify", *args])


def artifact(client, packet_id: str) -> dict:
    response = client.get(f"/api/v1/audit/artifact/{packet_id}")
    assert response.status_code == 200, response.json
    return response.json


def sql(app, statement: str, **params) -> None:
    with app.app_context():
        db.session.execute(text(statement), params)
        db.session.commit()


def outside_check(tmp_path, answer: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the standalone verifier as an outsider would: plain python3, no project imports."""
    path = tmp_path / "artifact.json"
    path.write_text(json.dumps(answer))
    return subprocess.run(
        [sys.executable, "-I", str(VERIFIER), str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_here(tmp_path, answer: dict, *args: str) -> subprocess.CompletedProcess:
    """The same verifier's main() in this process (so mutation testing sees what it runs)."""
    path = tmp_path / "artifact.json"
    path.write_text(json.dumps(answer))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = load_verifier().main([str(path), *args])
    return subprocess.CompletedProcess(["verify_proof.py"], code, printed.getvalue(), "")


def test_every_packet_lands_in_exactly_one_seal_and_late_ones_in_the_next(app, client):
    """Seals cover contiguous ranges, chained by hash; nothing is sealed twice or skipped."""
    first = ingest_many(client, 5)
    (one,) = seal(app)
    assert one.packet_count == 5
    later = ingest_many(client, 3)
    assert [s.packet_count for s in seal(app)] == [3]
    assert seal(app) == []  # nothing new: no empty seal
    with app.app_context():
        seals = db.session.execute(select(AuditSeal).order_by(AuditSeal.seq)).scalars().all()
        assert [i for seal in seals for i in Leaves.of(seal).ids] == first + later
        assert [s.seq for s in seals] == [1, 2]
        assert seals[0].previous_hash == "0" * 64 and seals[1].previous_hash == seals[0].hash
        assert seals[1].after_seq == seals[0].last_seq
        hashes = [s.hash for s in seals]
        db.session.commit()
    latest = client.get("/api/v1/bucket/latest-hash").json
    assert latest["latest_hash"] == hashes[1] and latest["packets_sealed"] == 8
    assert latest["seal"]["seq"] == 2 and latest["seal"]["packet_count"] == 3
    chain = client.get("/api/v1/bucket/audit/seals?from=1&to=2").json
    assert [s["hash"] for s in chain] == hashes
    assert client.get("/api/v1/bucket/audit/seals?from=2").json == chain[1:]


def test_a_packet_not_sealed_yet_says_so(client):
    (packet_id,) = ingest_many(client, 1)
    answer = artifact(client, packet_id)
    assert answer["provenance"]["sealed"] is False
    assert "not sealed yet" in answer["provenance"]["message"].lower()
    assert answer["data"]["packet_id"] == packet_id
    missing = client.get("/api/v1/audit/artifact/no-such-packet")
    assert missing.status_code == 404 and missing.json["code"] == 404


def test_an_inclusion_proof_checks_out_with_the_standalone_verifier(app, client, tmp_path):
    """The proof leads from the packet's bytes to its seal, and on to a later head."""
    ids = ingest_many(client, 7, user_id="disputed")
    seal(app)
    answer = artifact(client, ids[3])
    provenance = answer["provenance"]
    assert provenance["sealed"] and provenance["matches_stored_content"]
    assert provenance["previous_hash"] == artifact(client, ids[2])["provenance"]["current_hash"]
    stated = content_of(answer)
    assert stated["focus_score"] == answer["data"]["focus_score"] == 70.0
    assert stated["packet_id"] == ids[3] and stated["user_id"] == "disputed"
    root = bytes.fromhex(provenance["seal"]["root"])
    path = [bytes.fromhex(h) for h in provenance["inclusion_proof"]]
    leaf = bytes.fromhex(provenance["current_hash"])
    assert merkle.verify_inclusion(leaf, 3, 7, path, root)
    own_seal = provenance["seal"]["hash"]
    proven = outside_check(tmp_path, answer, "--seal-hash", own_seal)
    assert proven.returncode == 0 and "proven" in proven.stdout, proven.stdout + proven.stderr

    ingest_many(client, 2)
    seal(app)
    head = client.get("/api/v1/bucket/latest-hash").json["latest_hash"]
    seals_file = tmp_path / "seals.json"
    seals_file.write_text(json.dumps(client.get("/api/v1/bucket/audit/seals?from=1").json))
    onward = check_here(tmp_path, answer, "--seal-hash", head, "--seals", str(seals_file))
    assert onward.returncode == 0, onward.stdout
    received = datetime.fromisoformat(answer["data"]["received_at"]).replace(tzinfo=UTC)
    assert onward.stdout.splitlines() == [
        f"packet {ids[3]}: user disputed, received {received}, focus 70.0, state ON_TASK, "
        "sender not checked",
        f"proven: included in seal 1 (hash {own_seal})",
    ]
    untrusted = check_here(tmp_path, answer)  # no kept hash: proven, with a reminder
    assert untrusted.returncode == 0
    assert untrusted.stdout.splitlines()[-1].startswith("note: compare that seal hash")
    unlinked = check_here(tmp_path, answer, "--seal-hash", head)
    assert unlinked.returncode == 1 and "does not reach" in unlinked.stdout

    forged = json.loads(json.dumps(answer))
    content = base64.b64decode(forged["canonical"])
    assert content.count(struct.pack(">d", 70.0)) == 1
    forged["canonical"] = base64.b64encode(
        content.replace(struct.pack(">d", 70.0), struct.pack(">d", 99.0))
    ).decode()
    forged["data"]["focus_score"] = 99.0
    refused = check_here(tmp_path, forged, "--seal-hash", own_seal)
    assert refused.returncode == 1 and "do not hash to its leaf" in refused.stdout
    told = json.loads(json.dumps(answer))
    told["data"]["focus_score"] = 99.0  # the answer's data, not its sealed bytes, changed
    refused = check_here(tmp_path, told, "--seal-hash", own_seal)
    assert refused.returncode == 1 and "data differs from its canonical bytes: focus_score" in (
        refused.stdout
    )
    for change, named in (
        ({"raw_signals": {**answer["data"]["raw_signals"], "tab_visible": 1}}, "raw_signals"),
        ({"focus_score": 70}, "focus_score"),  # an integer where a double was sealed
        ({"delivery_state": "processed"}, "delivery_state"),  # never sealed: not proven
    ):
        told = json.loads(json.dumps(answer))
        told["data"].update(change)
        refused = check_here(tmp_path, told, "--seal-hash", own_seal)
        assert refused.returncode == 1 and f"canonical bytes: {named}" in refused.stdout, change
    relabelled = dict(json.loads(json.dumps(answer)), artifact_id=ids[2])
    refused = check_here(tmp_path, relabelled, "--seal-hash", own_seal)
    assert refused.returncode == 1 and "artifact_id is not the sealed packet" in refused.stdout
    bent = json.loads(json.dumps(answer))
    bent["provenance"]["inclusion_proof"][0] = "00" * 32
    assert check_here(tmp_path, bent, "--seal-hash", own_seal).returncode == 1


def test_the_standalone_verifier_refuses_a_forged_seal_that_does_not_link_to_the_chain(app, client):
    """A forged seal (new packet bytes, new root, a header that hashes to its own hash) followed
    by the real later seals up to a trusted head: the next real seal does not name the forged
    one as its previous_hash, so the proof fails."""
    ids = []
    for _ in range(3):  # three seals of one packet each
        ids += ingest_many(client, 1)
        seal(app)
    seals = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert [s["packet_count"] for s in seals] == [1, 1, 1]
    head = seals[-1]["hash"]
    verifier = load_verifier()
    genuine = artifact(client, ids[1])
    assert verifier.check(genuine, head, seals) == []
    assert verifier.check(artifact(client, ids[0]), head, seals) == []  # two seals on to head

    forged = json.loads(json.dumps(genuine))
    content = base64.b64decode(forged["canonical"]).replace(
        struct.pack(">d", 70.0), struct.pack(">d", 99.0)
    )
    forged["canonical"] = base64.b64encode(content).decode()
    forged["data"]["focus_score"] = 99.0
    leaf = hashlib.sha256(b"\x00" + content).hexdigest()
    provenance = forged["provenance"]
    provenance["current_hash"] = leaf
    provenance["seal"]["root"] = leaf  # a tree of one leaf: the root is the leaf
    provenance["seal"]["hash"] = verifier.seal_hash(provenance["seal"])
    assert provenance["seal"]["hash"] != seals[1]["hash"]
    # Everything but the link holds: bytes, leaf, proof and the forged header.
    assert verifier.check(forged, provenance["seal"]["hash"], []) == []
    assert verifier.check(forged, head, seals) == [
        "seal 3 does not follow seal 2",
        "the chain does not reach the seal hash you trust",
    ]


def test_the_standalone_verifier_names_each_failure(app, client):
    """Each kind of tampering is named in words, and only it."""
    ids = ingest_many(client, 3, user_id="named")
    seal(app)
    ingest_many(client, 1)
    seal(app)
    seals = client.get("/api/v1/bucket/audit/seals?from=1").json
    head = seals[-1]["hash"]
    check = load_verifier().check
    genuine = artifact(client, ids[1])
    assert check(genuine, head, seals) == []

    def changed(change) -> dict:
        copy = json.loads(json.dumps(genuine))
        change(copy)
        return copy

    def bend(a):
        a["provenance"]["inclusion_proof"][0] = "00" * 32

    def resize(a):
        a["provenance"]["tree_size"] = 4

    def reseal(a):
        a["provenance"]["seal"]["sealed_at"] = "2020-01-01T00:00:00"

    def tell(a):
        a["data"].update(focus_score=1.0, user_id="someone")

    def relabel(a):
        a["artifact_id"] = ids[0]

    assert check(changed(bend), head, seals) == [
        "the inclusion proof does not lead to the seal's root"
    ]
    # Index 1's path is the same in a tree of 3 and of 4: only the count gives it away.
    assert check(changed(resize), head, seals) == [
        "the proof's tree size is not the seal's packet count"
    ]
    assert check(changed(reseal), None, []) == [
        "the seal's header does not hash to the seal's hash"
    ]
    assert check(changed(tell), head, seals) == [
        "the answer's data differs from its canonical bytes: user_id, focus_score"
    ]
    assert check(changed(relabel), head, seals) == [
        "the answer's artifact_id is not the sealed packet's id"
    ]
    broken = json.loads(json.dumps(seals))
    broken[1]["packet_count"] += 1
    assert check(genuine, head, broken) == [
        "seal 2's header does not hash to its hash",
        "the chain does not reach the seal hash you trust",
    ]
    junk = changed(lambda a: a.update(canonical=base64.b64encode(b"junk").decode()))
    failures = check(junk, head, seals)
    assert failures[0] == "the packet's canonical bytes do not hash to its leaf"
    assert failures[1].startswith("the packet's canonical bytes are not a packet record: ")
    assert failures[2:] == ["the inclusion proof does not lead to the seal's root"]


def test_the_standalone_verifier_reads_the_artifact_from_stdin(app, client, monkeypatch, capsys):
    """``verify_proof.py -`` reads the artifact answer from standard input."""
    (packet_id,) = ingest_many(client, 1)
    seal(app)
    answer = artifact(client, packet_id)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(answer)))
    own_seal = answer["provenance"]["seal"]["hash"]
    assert load_verifier().main(["-", "--seal-hash", own_seal]) == 0
    assert f"proven: included in seal 1 (hash {own_seal})" in capsys.readouterr().out


def test_verify_is_clean_on_an_untouched_log(app, client):
    ingest_many(client, 4)
    seal(app)
    ingest_many(client, 2)  # stored, not sealed yet: reported, not a problem
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0, result.output
    assert "checked 1 seals and 4 packets" in result.output and "2 not sealed yet" in result.output
    assert "0 problems" in result.output


def test_verify_names_every_kind_of_tampering(app, client):
    """focus_score, a raw_signals value and received_at changed by SQL, a row deleted, a row
    forged inside a sealed range, a seal edited: each is found and named; exit non-zero."""
    ids = ingest_many(client, 8)
    seal(app)
    sql(app, "UPDATE packets SET focus_score_float = 99 WHERE packet_id = :p", p=ids[0])
    sql(
        app,
        """UPDATE packets SET raw_signals = '{"tab_visible": false, "n": 0}'
                WHERE packet_id = :p""",
        p=ids[1],
    )
    sql(
        app, "UPDATE packets SET received_at = '2020-01-01 00:00:00' WHERE packet_id = :p", p=ids[2]
    )
    sql(app, "DELETE FROM deliveries WHERE packet_id = :p", p=ids[3])
    sql(app, "DELETE FROM packets WHERE packet_id = :p", p=ids[3])
    with app.app_context():
        victim = (
            db.session.execute(text("SELECT * FROM packets WHERE packet_id = :p"), {"p": ids[4]})
            .mappings()
            .one()
        )
        # A UUID, as every stored id is (PostgreSQL stores them as uuid: migration 0016).
        forged = dict(
            victim,
            packet_id=FORGED_ID,
            dedup_key="f" * 32,
            focus_score_float=1.0,
            received_at=another_day(victim["received_at"]),
        )
        forged["raw_signals"] = json.dumps(forged["raw_signals"])
        columns = ", ".join(forged)
        db.session.execute(
            text(f"INSERT INTO packets ({columns}) VALUES ({', '.join(':' + c for c in forged)})"),
            forged,
        )
        db.session.commit()
    result = verify(app.test_cli_runner())
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("PROBLEM")]
    named = {
        (line.split(":")[0].split()[1], line.split("packet ")[-1].split(":")[0])
        for line in problems
    }
    assert ("altered", ids[0]) in named
    assert ("altered", ids[1]) in named
    assert ("altered", ids[2]) in named
    assert ("deleted", ids[3]) in named
    assert ("inserted", FORGED_ID) in named
    assert len(problems) == 5, result.output

    sql(app, "UPDATE audit_seals SET packet_count = packet_count + 1 WHERE seq = 1")
    edited = verify(app.test_cli_runner())
    assert edited.exit_code == 1
    assert "seal-edited: seal 1" in edited.output and "leaves-edited: seal 1" in edited.output


def test_a_broken_chain_is_found(app, client):
    """A seal removed from the middle, or its previous_hash rewritten, breaks the chain."""
    for _ in range(3):
        ingest_many(client, 2)
        seal(app)
    assert verify(app.test_cli_runner()).exit_code == 0
    sql(app, "UPDATE audit_seals SET previous_hash = :h WHERE seq = 3", h="ab" * 32)
    rewritten = verify(app.test_cli_runner())
    assert rewritten.exit_code == 1 and "chain-broken: seal 3" in rewritten.output
    sql(app, "DELETE FROM audit_seals WHERE seq = 2")
    removed = verify(app.test_cli_runner())
    assert "seal 2 is missing" in removed.output


def test_retention_keeps_the_proof_and_tells_a_purge_from_a_deletion(app, client):
    """Purged packets are reported as purged on their day; the neighbours' proofs still
    check out; a packet deleted by hand is still named as deleted."""
    ids = ingest_many(client, 4)
    served = client.get("/api/v1/bucket/prana/packets/pending?limit=2").json["packets"]
    for packet in served:
        body = {"packet_id": packet["packet_id"], "success": True}
        assert (
            client.post("/api/v1/bucket/prana/packets/mark-processed", json=body).status_code == 200
        )
    purged = app.test_cli_runner().invoke(
        args=["bucket", "purge", "--by-rows", "--older-than-days", "0"]
    )
    assert purged.exit_code == 0 and "purged 2" in purged.output, purged.output
    result = verify(app.test_cli_runner())
    assert result.exit_code == 0, result.output
    assert sum("purged by retention on" in line for line in result.output.splitlines()) == 2
    answer = artifact(client, ids[3])
    assert answer["provenance"]["sealed"] and answer["provenance"]["tree_size"] == 4
    sql(app, "DELETE FROM deliveries WHERE packet_id = :p", p=ids[2])
    sql(app, "DELETE FROM packets WHERE packet_id = :p", p=ids[2])
    deleted = verify(app.test_cli_runner())
    assert deleted.exit_code == 1 and f"deleted: seal 1 packet {ids[2]}" in deleted.output


def test_verify_since_checks_only_later_seals_but_their_link(app, client):
    ingest_many(client, 2)
    seal(app)
    with app.app_context():
        first = db.session.get(AuditSeal, 1).sealed_at
        db.session.commit()
    ids = ingest_many(client, 2)
    seal(app)
    sql(app, "UPDATE packets SET focus_score_float = 1 WHERE seq = (SELECT min(seq) FROM packets)")
    with app.app_context():
        second = db.session.get(AuditSeal, 2).sealed_at
        db.session.commit()
    assert second > first
    later = verify(app.test_cli_runner(), "--since", second.isoformat())
    assert later.exit_code == 0 and "checked 1 seals and 2 packets" in later.output
    with app.app_context():
        assert Leaves.of(db.session.get(AuditSeal, 2)).ids == ids  # the 2 packets checked
        db.session.commit()
    assert verify(app.test_cli_runner()).exit_code == 1


def test_concurrent_sealers_make_one_chain(make_app, backend):
    """Four sealers (apps sharing the database) racing while packets arrive: one chain, every
    packet in exactly one seal."""
    apps = [make_app(BUCKET_AUDIT_SEAL_MAX_PACKETS=7) for _ in range(4)]
    client = apps[0].test_client()
    stop = threading.Event()

    def sealer(app) -> None:
        with app.app_context():
            while not stop.is_set():
                seal_new_packets()
                db.session.remove()

    threads = [threading.Thread(target=sealer, args=(app,), daemon=True) for app in apps]
    for thread in threads:
        thread.start()
    try:
        ids = ingest_many(client, 60)
    finally:
        stop.set()
        join_all(threads, 30)
    seal(apps[0])
    with apps[0].app_context():
        seals = db.session.execute(select(AuditSeal)).scalars().all()
        leaves = [i for seal in seals for i in Leaves.of(seal).ids]
        db.session.commit()
    assert sorted(leaves) == sorted(ids)
    assert verify(apps[0].test_cli_runner()).exit_code == 0


@pytest.mark.parametrize("backend", ["postgres"])
def test_the_seal_endpoints_need_the_token(make_app, backend):
    app = make_app(BUCKET_CONSUMER_TOKEN=["audit-token"])
    client = app.test_client()
    for url, allowed in (
        ("/api/v1/bucket/latest-hash", 200),
        ("/api/v1/bucket/audit/seals", 200),
        ("/api/v1/audit/artifact/x", 404),  # let in, and told there is no such packet
    ):
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"X-API-Key": "audit-token"}).status_code == allowed, url


def test_seals_of_the_json_leaf_format_stay_verifiable_and_the_chain_goes_on(app, client, tmp_path):
    """After migration 0008 the seals made before it keep their JSON leaves (leaf_format 1):
    verify and the proofs read them that way, tampering with their packets is still named, and
    the first binary-format seal follows them in the same chain."""
    old = ingest_many(client, 3)
    seal(app)
    with app.app_context():  # what a seal made before 0008 looks like
        made = db.session.get(AuditSeal, 1)
        rows = {
            row["packet_id"]: row for row in db.session.execute(select(*LEAF_SELECT)).mappings()
        }
        hashes = [merkle.leaf_hash(json_leaf_content(rows[i])) for i in Leaves.of(made).ids]
        made.leaf_hashes, made.leaf_format = b"".join(hashes), 1
        made.root = merkle.root(hashes).hex()
        made.hash = seal_hash(made)
        old_head = made.hash
        db.session.commit()
    new = ingest_many(client, 2)
    seal(app)
    chain = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert [s["leaf_format"] for s in chain] == [1, LEAF_FORMAT]
    assert chain[1]["previous_hash"] == old_head
    assert verify(app.test_cli_runner()).exit_code == 0

    answer = artifact(client, old[1])
    assert answer["leaf_format"] == 1 and answer["provenance"]["matches_stored_content"]
    assert json.loads(base64.b64decode(answer["canonical"]))["packet_id"] == old[1]
    head = chain[1]["hash"]
    unlinked = check_here(tmp_path, answer, "--seal-hash", head)
    assert unlinked.returncode == 1 and "does not reach" in unlinked.stdout
    seals_file = tmp_path / "seals.json"
    seals_file.write_text(json.dumps(chain))
    proven = check_here(tmp_path, answer, "--seal-hash", head, "--seals", str(seals_file))
    assert proven.returncode == 0, proven.stdout + proven.stderr
    # The report line reads the JSON leaf too.
    assert proven.stdout.startswith(f"packet {old[1]}: user stu_test, received 20"), proven.stdout
    assert artifact(client, new[0])["leaf_format"] == LEAF_FORMAT

    sql(app, "UPDATE packets SET focus_score_float = 1 WHERE packet_id = :p", p=old[0])
    result = verify(app.test_cli_runner())
    assert result.exit_code == 1 and f"altered: seal 1 packet {old[0]}" in result.output


def test_the_background_round_seals_a_backlog_in_full_seals_up_to_its_rounds(make_app, backend):
    """``seal_backlog`` (the workers' periodic round): a backlog goes out in full seals of
    BUCKET_AUDIT_SEAL_MAX_PACKETS, one after another, at most ``rounds`` of them; it answers the
    packets sealed, and 0 when there is nothing to seal."""
    app = make_app(BUCKET_AUDIT_SEAL_MAX_PACKETS=2)
    client = app.test_client()
    with app.app_context():
        assert seal_backlog() == 0
        db.session.remove()
    ids = ingest_many(client, 9)
    with app.app_context():
        assert seal_backlog(rounds=2) == 4  # two full seals, then the round ends
        db.session.remove()
        assert seal_backlog() == 5  # 2 + 2 + 1: goes on while the seals come out full
        db.session.remove()
        seals = db.session.execute(select(AuditSeal).order_by(AuditSeal.seq)).scalars().all()
        assert [s.packet_count for s in seals] == [2, 2, 2, 2, 1]
        assert [i for s in seals for i in Leaves.of(s).ids] == ids
        db.session.commit()
    more = ingest_many(client, 4)  # exactly two full seals, then nothing left
    with app.app_context():
        assert seal_backlog() == 4
        db.session.remove()
        assert seal_backlog() == 0
        db.session.remove()
        seals = db.session.execute(select(AuditSeal).order_by(AuditSeal.seq)).scalars().all()
        assert [s.packet_count for s in seals] == [2, 2, 2, 2, 1, 2, 2]
        assert [i for s in seals for i in Leaves.of(s).ids] == ids + more
        db.session.commit()


def test_a_seal_takes_at_most_the_packets_asked_for_else_the_configured_maximum(make_app, backend):
    """``seal_new_packets(n)`` seals at most n packets; without n, at most
    BUCKET_AUDIT_SEAL_MAX_PACKETS."""
    app = make_app(BUCKET_AUDIT_SEAL_MAX_PACKETS=5)
    ingest_many(app.test_client(), 12)
    with app.app_context():
        assert seal_new_packets(3).packet_count == 3
        db.session.remove()
        assert seal_new_packets().packet_count == 5
        db.session.remove()
        assert seal_new_packets(100).packet_count == 4


def test_the_seal_command_names_each_seal_its_packets_and_hash(make_app, backend):
    """``flask bucket seal`` reports each seal made with its number, size and hash, as the
    chain endpoint shows them; nothing to seal says so."""
    app = make_app(BUCKET_AUDIT_SEAL_MAX_PACKETS=2)
    client = app.test_client()
    ingest_many(client, 3)
    made = app.test_cli_runner().invoke(args=["bucket", "seal"])
    assert made.exit_code == 0, made.output
    chain = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert [(s["seq"], s["packet_count"]) for s in chain] == [(1, 2), (2, 1)]
    assert made.output.splitlines() == [
        f"seal {s['seq']}: {s['packet_count']} packets, hash {s['hash']}" for s in chain
    ]
    again = app.test_cli_runner().invoke(args=["bucket", "seal"])
    assert again.output.startswith("nothing to seal")


def test_sealed_through_is_the_newest_seals_end_and_0_before_any_seal(app, client):
    """What retention may purge up to: 0 before the first seal, then the newest seal's
    ``last_seq`` (not an older one's)."""
    with app.app_context():
        assert sealed_through() == 0
        db.session.commit()
    ingest_many(client, 2)
    seal(app)
    ingest_many(client, 3)
    seal(app)
    with app.app_context():
        newest = db.session.get(AuditSeal, 2).last_seq
        assert newest > db.session.get(AuditSeal, 1).last_seq
        assert sealed_through() == newest
        db.session.commit()


def test_an_artifact_under_a_seal_whose_range_was_stretched_is_not_proven(app, client):
    """A seal whose ``last_seq`` was raised behind the log's back covers the range of the next
    packet without a leaf for it: that packet's artifact says it is not sealed (no error, no
    proof), and verify names the seal."""
    ingest_many(client, 2)
    seal(app)
    sql(app, "UPDATE audit_seals SET last_seq = last_seq + 1000 WHERE seq = 1")
    (later,) = ingest_many(client, 1)
    answer = artifact(client, later)
    assert answer["provenance"]["sealed"] is False
    assert verify(app.test_cli_runner()).exit_code == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_the_sealers_statement_is_not_compiled_by_jit(app, client):
    """The sealer reads its leaves in index order by turning sorts, bitmap scans and table
    scans off, which prices any plan needing one at PostgreSQL's disable cost, far above
    ``jit_above_cost``: with JIT on, every round compiled the statement with inlining and
    optimisation (about 0.17 s of CPU, with nothing or a thousand packets to seal, for well
    under a millisecond of work). Its settings turn JIT off with them."""
    ingest_many(client, 3)
    with app.app_context():
        connection = db.session.connection().connection.driver_connection
        with connection.cursor() as cursor:
            cursor.execute(SEALER_SETTINGS)
            for after, horizon in ((0, 0), (0, 3)):  # nothing to seal; three packets
                explained = LEAVES_SQL % (after, horizon, 1000)
                plan = cursor.execute(f"EXPLAIN (ANALYZE) {explained}").fetchall()
                assert not [line for (line,) in plan if line.startswith("JIT")], plan
        db.session.rollback()
