"""A quarantined packet keeps the authentication outcome it had when it arrived (never the
token), and a replay stores it with that outcome: under ``require`` an entry that was not
verified stays in the quarantine, counted and named (README, "Authenticated ingest").

Each test runs on SQLite + memory and PostgreSQL + Redis through the HTTP API and the database.
"""

from __future__ import annotations

from sqlalchemy import select, update

from bucket.extensions import db
from bucket.models import QuarantinedPacket
from tests.test_ingest_auth import (
    API,
    INGEST,
    bearer,
    packet,
    rsa_settings,
    rsa_token,
    stored,
    unsigned,
)

QUARANTINE = f"{API}/quarantine"
# THINKING is refused until the operator allows it, then the entries replay cleanly.
STRICT = {"BUCKET_COGNITIVE_STATES": ["ON_TASK"]}
Q = QuarantinedPacket.__table__


def entries(app) -> dict[int, dict]:
    with app.app_context():
        rows = db.session.execute(select(Q)).mappings().all()
        db.session.commit()
        return {row["id"]: dict(row) for row in rows}


def refused(client, body: dict, headers: dict | None = None) -> int:
    response = client.post(INGEST, json=body, headers=headers or {})
    assert response.status_code == 422, response.json
    return response.json["quarantine_id"]


def replay(client, **body) -> dict:
    response = client.post(f"{QUARANTINE}/replay", json=body)
    assert response.status_code == 200, response.json
    return response.json


def quarantine_each_outcome(app) -> dict[str, int]:
    """Under observe, one refused packet of stu_a per outcome, single and in a batch; their
    entry ids by outcome (``batch-verified``, ``batch-mismatch`` for the batch's two)."""
    client = app.test_client()
    token = rsa_token()
    ids = {
        "verified": refused(client, packet(cognitive_state="THINKING"), bearer(token)),
        "missing": refused(client, packet(cognitive_state="THINKING")),
        "invalid": refused(client, packet(cognitive_state="THINKING"), bearer(unsigned())),
        "mismatch": refused(client, packet(cognitive_state="THINKING"), bearer(rsa_token("stu_b"))),
    }
    batch = {"packets": [packet(cognitive_state="THINKING"), packet("stu_b", "s_b")]}
    batch["packets"][1]["cognitive_state"] = "THINKING"
    response = client.post(INGEST, json=batch, headers=bearer(token))
    assert response.status_code == 422, response.json
    first, second = response.json["results"]
    ids["batch-verified"], ids["batch-mismatch"] = first["quarantine_id"], second["quarantine_id"]
    return ids


EXPECTED = {
    "verified": ("verified", "stu_a"),
    "missing": ("missing", None),
    "invalid": ("invalid", None),
    "mismatch": ("mismatch", "stu_b"),
    "batch-verified": ("verified", "stu_a"),
    "batch-mismatch": ("mismatch", "stu_a"),
}


def test_a_quarantined_packet_keeps_its_auth_outcome_and_subject_never_the_token(make_app):
    """Single and batch, each outcome recorded with the entry (and shown to the operator);
    the token itself is nowhere in the quarantine."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    ids = quarantine_each_outcome(app)
    rows = entries(app)
    assert {
        name: (rows[i]["auth_outcome"], rows[i]["auth_subject"]) for name, i in ids.items()
    } == (EXPECTED)
    text = repr(rows)
    assert rsa_token().split(".")[1][:20] not in text and "Bearer" not in text
    shown = app.test_client().get(f"{QUARANTINE}/{ids['mismatch']}").json
    assert (shown["auth_outcome"], shown["auth_subject"]) == ("mismatch", "stu_b")


def test_with_auth_off_a_quarantined_packet_records_no_outcome(make_app):
    app = make_app(**STRICT)
    entry_id = refused(app.test_client(), packet(cognitive_state="THINKING"), bearer("x"))
    row = entries(app)[entry_id]
    assert (row["auth_outcome"], row["auth_subject"]) == (None, None)


def test_replay_under_observe_stores_each_entry_with_its_recorded_outcome(make_app):
    """A verified packet replayed stays verified, an unverified one stays unverified."""
    strict = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    ids = quarantine_each_outcome(strict)
    lenient = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    report = replay(lenient.test_client(), all=True)
    assert report["ingested"] == 6 and report["not_verified"] == 0, report
    by_entry = {item["id"]: item["packet_id"] for item in report["results"]}
    rows = {row["packet_id"]: row for row in stored(lenient)}
    got = {
        name: (rows[by_entry[i]]["auth_outcome"], rows[by_entry[i]]["auth_subject"])
        for name, i in ids.items()
    }
    assert got == EXPECTED
    assert entries(lenient) == {}
    pending = lenient.test_client().get(f"{API}/packets/pending?limit=10").json["packets"]
    verified = {by_entry[ids["verified"]], by_entry[ids["batch-verified"]]}
    assert {item["packet_id"] for item in pending if item["authenticated"]} == verified


def test_replay_under_require_stores_only_verified_entries_and_names_the_others(make_app):
    """Quarantined while observing, replayed after the move to require: the verified entries
    are stored verified; the others stay in the quarantine, counted and named with the
    reason, through the API and the CLI; replaying them again still stores nothing."""
    strict = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    ids = quarantine_each_outcome(strict)
    lenient = make_app(**rsa_settings())
    client = lenient.test_client()
    report = replay(client, all=True)
    assert (report["replayed"], report["ingested"], report["not_verified"]) == (6, 2, 4), report
    held = {item["id"]: item for item in report["results"] if item["status"] == "not_verified"}
    unverified = {ids[name] for name in ("missing", "invalid", "mismatch", "batch-mismatch")}
    assert set(held) == unverified
    assert "missing" in held[ids["missing"]]["reason"]
    assert "require" in held[ids["mismatch"]]["reason"]
    rows = stored(lenient)
    assert len(rows) == 2 and {row["auth_outcome"] for row in rows} == {"verified"}
    assert {row["auth_subject"] for row in rows} == {"stu_a"}
    assert set(entries(lenient)) == unverified
    again = lenient.test_cli_runner().invoke(args=["bucket", "quarantine", "replay", "--all"])
    assert again.exit_code == 0, again.output
    assert "not verified 4" in again.output
    for entry_id in unverified:
        assert str(entry_id) in again.output
    assert len(stored(lenient)) == 2 and set(entries(lenient)) == unverified


def test_under_require_a_verified_packet_quarantined_is_replayed_verified(make_app):
    """Only verified packets reach the quarantine under require; replayed, they are stored
    verified, with their subject, and deduplicate with the genuine packet as before."""
    strict = make_app(**rsa_settings(), **STRICT)
    client = strict.test_client()
    body = packet(cognitive_state="THINKING")
    entry_id = refused(client, body, bearer(rsa_token()))
    assert client.post(INGEST, json=body).status_code == 401
    lenient = make_app(**rsa_settings())
    report = replay(lenient.test_client(), ids=[entry_id])
    assert report["ingested"] == 1, report
    (row,) = stored(lenient)
    assert (row["auth_outcome"], row["auth_subject"]) == ("verified", "stu_a")
    resent = lenient.test_client().post(INGEST, json=body, headers=bearer(rsa_token()))
    assert resent.json["duplicate"] is True and resent.json["packet_id"] == row["packet_id"]


def test_a_replayed_forgery_does_not_shadow_the_genuine_packet(make_app):
    """Under observe an unverified entry replayed keeps the unverified namespace: the genuine
    verified packet sent afterwards is stored, not answered as its duplicate."""
    strict = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    genuine = packet(cognitive_state="THINKING")
    entry_id = refused(strict.test_client(), genuine)
    lenient = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = lenient.test_client()
    assert replay(client, ids=[entry_id])["ingested"] == 1
    real = client.post(INGEST, json=genuine, headers=bearer(rsa_token()))
    assert real.status_code == 200 and "duplicate" not in real.json
    assert sorted(row["auth_outcome"] for row in stored(lenient)) == ["missing", "verified"]


def forget_outcomes(app) -> None:
    """As entries quarantined before migration 0011 are: no outcome recorded."""
    with app.app_context():
        db.session.execute(update(Q).values(auth_outcome=None, auth_subject=None))
        db.session.commit()


def test_entries_without_a_recorded_outcome_stay_under_require(make_app):
    """Quarantined before the outcome was recorded: under require not stored, named."""
    strict = make_app(**rsa_settings(), **STRICT)
    entry_id = refused(
        strict.test_client(), packet(cognitive_state="THINKING"), bearer(rsa_token())
    )
    forget_outcomes(strict)
    lenient = make_app(**rsa_settings())
    report = replay(lenient.test_client(), all=True)
    assert (report["ingested"], report["not_verified"]) == (0, 1), report
    (item,) = report["results"]
    assert item["id"] == entry_id and "no authentication outcome" in item["reason"]
    assert stored(lenient) == [] and set(entries(lenient)) == {entry_id}


def test_entries_without_a_recorded_outcome_replay_as_not_checked_under_observe(make_app):
    """Under observe (and off) they are stored as before: outcome null, not authenticated."""
    strict = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    refused(strict.test_client(), packet(cognitive_state="THINKING"), bearer(rsa_token()))
    forget_outcomes(strict)
    lenient = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    assert replay(lenient.test_client(), all=True)["ingested"] == 1
    (row,) = stored(lenient)
    assert (row["auth_outcome"], row["auth_subject"]) == (None, None)


def test_a_verified_resend_makes_the_entry_verified_and_an_unverified_one_never_undoes_it(
    make_app,
):
    """Copies of one refused content share an entry: a forger's copy first records
    ``missing``; the genuine sender's verified resend records ``verified`` (so the entry
    replays under require); a later unverified copy does not take it back."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    client = app.test_client()
    body = packet(cognitive_state="THINKING")
    first = refused(client, body)
    assert refused(client, body, bearer(rsa_token())) == first
    assert refused(client, body, bearer(rsa_token("stu_b"))) == first
    assert refused(client, body) == first
    row = entries(app)[first]
    assert (row["auth_outcome"], row["auth_subject"], row["seen_count"]) == ("verified", "stu_a", 4)
    lenient = make_app(**rsa_settings())
    assert replay(lenient.test_client(), ids=[first])["ingested"] == 1
    (packet_row,) = stored(lenient)
    assert packet_row["auth_outcome"] == "verified"


def test_an_entry_kept_without_an_outcome_takes_the_outcome_of_the_next_copy(make_app):
    """Kept with auth off (no outcome), then seen again under observe: the entry records the
    new copy's outcome, whatever it is; the copy after that (verified or not) is judged as
    usual."""
    body = packet(cognitive_state="THINKING")
    entry_id = refused(make_app(**STRICT).test_client(), body)
    observe = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    assert refused(observe.test_client(), body, bearer(rsa_token("stu_b"))) == entry_id
    row = entries(observe)[entry_id]
    assert (row["auth_outcome"], row["auth_subject"]) == ("mismatch", "stu_b")


def test_a_subject_longer_than_its_column_is_kept_cut_to_256_characters(make_app):
    """A token's subject is the sender's to choose: a mismatch naming a 300-character
    subject keeps its first 256."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"), **STRICT)
    long_subject = "s" * 300
    entry_id = refused(
        app.test_client(), packet(cognitive_state="THINKING"), bearer(rsa_token(long_subject))
    )
    row = entries(app)[entry_id]
    assert (row["auth_outcome"], row["auth_subject"]) == ("mismatch", "s" * 256)
