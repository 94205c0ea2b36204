"""The standalone verifier's decoding, on bytes built here (no server): the edge values a
sealed packet can hold, and the JSON leaf format of the seals made before the binary one. Then
the verifier on a server's real answers: who sent the packet (leaf format 3) and the answers of
servers that did not state their leaf format."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime, timedelta

import pytest

from bucket.services.audit import merkle
from tests.test_audit import artifact, check_here, load_verifier, seal
from tests.test_ingest_auth import INGEST, bearer, iso, packet, rsa_settings, rsa_token

verifier = load_verifier()


def record(*fields: tuple[int, bytes | None]) -> bytes:
    """A binary record as PostgreSQL's record_send writes it: count, then OID, length, value."""
    out = struct.pack(">i", len(fields))
    for oid, value in fields:
        out += struct.pack(">Ii", oid, -1 if value is None else len(value)) + (value or b"")
    return out


def test_a_record_decodes_empty_text_negative_numbers_and_times_before_2000():
    """An empty string is not NULL; int8 and timestamps are signed (micros before 2000-01-01)."""
    before = -1_000_000  # one second before the PostgreSQL epoch
    content = record(
        (25, b""),
        (25, None),
        (25, "é".encode()),
        (20, struct.pack(">q", -5)),
        (701, struct.pack(">d", 1.5)),
        (1114, struct.pack(">q", before)),
        (16, b"\x00"),
        (16, b"\x01"),
    )
    assert verifier.decode_record(content) == [
        "",
        None,
        "é",
        -5,
        1.5,
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (record((23, struct.pack(">i", 1))), "^field of unknown type 23$"),
        (record((25, b"x")) + b"\x00", "^bytes left over after the last field$"),
        (record((16, b"\x02")), "^a bool that is neither 0 nor 1$"),
    ],
)
def test_a_record_that_is_not_one_is_refused_saying_why(content, message):
    with pytest.raises(ValueError, match=message):
        verifier.decode_record(content)


def test_an_unknown_leaf_format_is_refused_naming_it():
    with pytest.raises(ValueError, match="^unknown leaf format 4$"):
        verifier.fields_of(record(), 4)


def leaf_json(**changes) -> dict:
    stated = dict.fromkeys(verifier.LEAF_FIELDS_V2)  # the fields of formats 1 and 2
    stated.update(packet_id="p1", seq=1, received_at="2026-11-28T10:00:00.000001+00:00")
    return {**stated, **changes}


def test_the_json_leaf_format_reads_times_and_keeps_nulls():
    """Leaf format 1: sorted JSON; timestamps become datetimes, a null one stays null."""
    stated = verifier.fields_of(json.dumps(leaf_json(), sort_keys=True).encode(), 1)
    assert stated["received_at"] == datetime(2026, 11, 28, 10, 0, 0, 1, tzinfo=UTC)
    assert stated["client_timestamp"] is None
    assert stated["packet_id"] == "p1" and set(stated) == set(verifier.LEAF_FIELDS_V2)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps([1, 2]),
        json.dumps({k: v for k, v in leaf_json().items() if k != "role"}),
        json.dumps({**leaf_json(), "extra": 1}),
    ],
)
def test_json_that_is_not_a_packets_fields_is_refused(body):
    with pytest.raises(ValueError, match="^not the fields of a packet$"):
        verifier.fields_of(body.encode(), 1)


def test_a_binary_record_with_the_wrong_number_of_fields_is_refused():
    with pytest.raises(ValueError, match=f"^1 fields, not {len(verifier.LEAF_FIELDS)}$"):
        verifier.fields_of(record((25, b"x")))


def test_json_fields_compare_by_content_not_by_key_order():
    """raw_signals shown with its keys in another order is the same value; 1 is not true."""
    sealed = {"b": 1, "a": [True, None]}
    assert verifier.same("raw_signals", sealed, {"a": [True, None], "b": 1})
    assert not verifier.same("raw_signals", sealed, {"a": [1, None], "b": 1})
    assert not verifier.same("raw_signals", None, {})
    assert verifier.same("raw_signals", None, None)


def test_every_leaf_of_trees_of_one_to_twelve_proves_against_the_servers_root():
    """The verifier's RFC 9162 walk agrees with the server's proofs at every index of every
    tree shape up to 12 leaves; a wrong index, a size it cannot have or a cut path do not."""
    for size in range(1, 13):
        leaves = [merkle.leaf_hash(f"packet {n}".encode()) for n in range(size)]
        root = merkle.root(leaves)
        for index in range(size):
            path = merkle.inclusion_proof(index, leaves)
            assert verifier.proof_root(leaves[index], index, size, path) == root, (size, index)
            assert verifier.proof_root(leaves[index], size, size, path) is None
            if path:
                assert verifier.proof_root(leaves[index], index, size, path[:-1]) is None
                assert verifier.proof_root(leaves[index], index, size, [*path, root]) is None
            if size > 1:
                other = (index + 1) % size
                assert verifier.proof_root(leaves[index], other, size, path) != root


def test_timestamps_compare_as_instants_and_other_fields_by_type():
    sealed = datetime(2026, 11, 28, 10, 0, 0, 1, tzinfo=UTC)
    assert verifier.same("received_at", sealed, "2026-11-28T10:00:00.000001")  # naive: UTC
    assert verifier.same("received_at", sealed, "2026-11-28T11:00:00.000001+01:00")
    assert not verifier.same("received_at", sealed, "2026-11-28T10:00:00")
    assert not verifier.same("received_at", sealed, "not a time")
    assert not verifier.same("received_at", sealed, None)
    assert not verifier.same("seq", 1, True)  # equal in Python, not the sealed value
    assert verifier.same("seq", 1, 1) and not verifier.same("seq", 1, 2)


def run_main(capsys, tmp_path, answer: dict) -> tuple[int, list[str]]:
    path = tmp_path / "artifact.json"
    path.write_text(json.dumps(answer))
    code = verifier.main([str(path)])
    return code, capsys.readouterr().out.splitlines()


def test_an_unsealed_answer_whose_bytes_are_no_packet_is_reported_not_a_crash(capsys, tmp_path):
    answer = {
        "artifact_id": "p1",
        "canonical": base64.b64encode(b"junk").decode(),
        "provenance": {"sealed": False},
    }
    assert run_main(capsys, tmp_path, answer) == (
        1,
        [
            "packet p1: user None, received None, focus None, state None, "
            "sender not sealed (leaf format before 3)",
            "FAILED: the packet is not sealed yet: ask again in a few seconds",
        ],
    )


def test_the_report_line_names_the_legacy_state_when_there_is_no_cognitive_state(capsys, tmp_path):
    leaf = leaf_json(user_id="emp_1", state="FAKING", focus_score=12.5)
    answer = {
        "artifact_id": "p1",
        "leaf_format": 1,
        "canonical": base64.b64encode(json.dumps(leaf).encode()).decode(),
        "provenance": {"sealed": False},
    }
    code, lines = run_main(capsys, tmp_path, answer)
    assert code == 1
    assert lines[0] == (
        "packet p1: user emp_1, received 2026-11-28 10:00:00.000001+00:00, focus 12.5, "
        "state FAKING, sender not sealed (leaf format before 3)"
    )


# --- on a server's real answers ---------------------------------------------------------------


def sealed_senders(make_app) -> dict[str, dict]:
    """Artifact answers of three sealed packets: a verified sender, a token for another
    learner (mismatch), no token (missing); the server only observes. They arrive on time
    (the factory's packets are a year old: stale)."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = app.test_client()
    tokens = {"verified": rsa_token(), "mismatch": rsa_token("stu_b"), "missing": None}
    ids = {}
    for offset, (outcome, token) in enumerate(tokens.items()):
        on_time = packet(timestamp=iso(datetime.now(UTC) - timedelta(seconds=offset + 1)))
        sent = client.post(INGEST, json=on_time, headers=bearer(token) if token else {})
        assert sent.status_code == 200, sent.json
        ids[outcome] = sent.json["packet_id"]
    seal(app)
    return {outcome: artifact(client, packet_id) for outcome, packet_id in ids.items()}


def test_the_report_names_the_sender_and_its_subject_as_the_leaf_states_them(make_app, tmp_path):
    answers = sealed_senders(make_app)
    for outcome, named in (
        ("verified", "sender verified (stu_a)"),
        ("mismatch", "sender mismatch (stu_b)"),
        ("missing", "sender missing"),
    ):
        answer = answers[outcome]
        done = check_here(tmp_path, answer, "--seal-hash", answer["provenance"]["seal"]["hash"])
        assert done.returncode == 0, done.stdout
        assert done.stdout.splitlines()[0].endswith(f"state ON_TASK, {named}"), done.stdout


def test_sender_fields_beside_the_data_that_differ_from_the_leaf_are_named(make_app):
    """``authenticated``, ``auth_subject`` and ``stale`` beside ``data`` are what consumers
    read first: each must agree with the sealed leaf, or the answer is refused naming it. An
    answer without them (a server before leaf format 3) is still proven."""
    answers = sealed_senders(make_app)
    verified = answers["verified"]
    assert (verified["authenticated"], verified["auth_subject"], verified["stale"]) == (
        True,
        "stu_a",
        False,
    )
    assert verifier.check(verified, None, []) == []
    for name, told in (
        ("authenticated", False),
        ("auth_subject", "stu_b"),
        ("auth_subject", None),
        ("stale", True),
    ):
        changed = dict(verified, **{name: told})
        assert verifier.check(changed, None, []) == [
            f"the answer's data differs from its canonical bytes: {name} (beside data)"
        ], name
    claimed = dict(answers["mismatch"], authenticated=True)
    assert verifier.check(claimed, None, []) == [
        "the answer's data differs from its canonical bytes: authenticated (beside data)"
    ]
    beside = ("authenticated", "auth_subject", "stale")
    older = {name: value for name, value in verified.items() if name not in beside}
    assert verifier.check(older, None, []) == []


def test_an_answer_that_does_not_state_its_leaf_format_is_read_as_format_2(app, client, tmp_path):
    """Servers between migrations 0008 and the leaf format field answered binary records of
    format 2 without saying so; a kept answer of theirs must still prove and report."""
    from sqlalchemy import select, text

    from bucket.extensions import db
    from bucket.models import AuditSeal
    from bucket.services.audit import merkle as server_merkle
    from bucket.services.audit.content import LEAF_SELECT, Leaves, leaf_content_v2, seal_hash
    from tests.queue_helpers import ingest_many

    (packet_id,) = ingest_many(client, 1, user_id="kept")
    seal(app)
    with app.app_context():
        db.session.execute(text("UPDATE audit_seals SET leaf_format = 2"))
        made = db.session.get(AuditSeal, 1)
        rows = {r["packet_id"]: r for r in db.session.execute(select(*LEAF_SELECT)).mappings()}
        hashes = [server_merkle.leaf_hash(leaf_content_v2(rows[i])) for i in Leaves.of(made).ids]
        made.leaf_hashes, made.root = b"".join(hashes), server_merkle.root(hashes).hex()
        made.hash = seal_hash(made)
        db.session.commit()
    answer = artifact(client, packet_id)
    assert answer.pop("leaf_format") == 2
    own_seal = answer["provenance"]["seal"]["hash"]
    assert verifier.check(answer, own_seal, []) == []
    done = check_here(tmp_path, answer, "--seal-hash", own_seal)
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith(f"packet {packet_id}: user kept, received "), done.stdout
    assert "sender not sealed (leaf format before 3)" in done.stdout.splitlines()[0]
