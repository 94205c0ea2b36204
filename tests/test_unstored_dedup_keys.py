"""PostgreSQL keeps a packet's dedup key in ``packet_keys`` only (migration 0027): the packet's
own ``dedup_key`` is NULL, since it repeated the key row's 16 bytes in every packet, and the
key is a digest of fields the packet keeps (system type, user, session, client timestamp,
authentication outcome). Deduplication, the Idempotency-Key, retention's forgetting of a
purged packet's key and the audit seals work as before; SQLite, whose unique constraint on
``packets`` is its deduplication, stores the key there as it always has.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from bucket.extensions import db
from bucket.services.ingest import IDENTITY_FIELDS, identity_key, packet_identity
from bucket.services.retention import purge_rows
from tests.factories import make_packet
from tests.queue_helpers import API
from tests.test_retention import age, process_all

STORED_SQL = (
    "SELECT CAST(packet_id AS TEXT), dedup_key FROM packets ORDER BY seq",
    "SELECT CAST(packet_id AS TEXT), replace(CAST(dedup_key AS TEXT), '-', '') FROM packet_keys",
)


def stored(app, backend: str) -> tuple[dict, dict]:
    """Each packet's own dedup_key, and (PostgreSQL) the key rows' packet ids by digest."""
    with app.app_context():
        own = dict(db.session.execute(text(STORED_SQL[0])).all())
        keys = {}
        if backend == "postgres":
            keys = {key: pid for pid, key in db.session.execute(text(STORED_SQL[1])).all()}
        db.session.rollback()
    own = {pid: (None if key is None else str(key).replace("-", "")) for pid, key in own.items()}
    return own, keys


def digest_of(body: dict) -> str:
    from datetime import datetime

    moment = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    user = body.get("user_id") or body["employee_id"]
    return identity_key(body.get("system_type"), user, body.get("session_id"), moment)


def test_the_key_is_kept_once_and_every_copy_is_still_its_duplicate(app, client, backend):
    """A single packet, a batch and a packet with an Idempotency-Key: on PostgreSQL each key
    is in ``packet_keys`` (naming its packet) and not on the packet; on SQLite on the packet.
    Every copy resent, alone or in a batch, is answered as the duplicate of the first."""
    single, first, second = make_packet(), make_packet(), make_packet()
    keyed = make_packet()
    stored_single = client.post(f"{API}/ingest", json=single).json
    batch = client.post(f"{API}/ingest", json={"packets": [first, second, first]}).json
    headers = {"Idempotency-Key": "retry-42"}
    stored_keyed = client.post(f"{API}/ingest", json=keyed, headers=headers).json
    ids = {
        digest_of(single): stored_single["packet_id"],
        digest_of(first): batch["results"][0]["packet_id"],
        digest_of(second): batch["results"][1]["packet_id"],
        digest_of(keyed): stored_keyed["packet_id"],
    }
    assert batch["results"][2]["packet_id"] == ids[digest_of(first)]

    own, keys = stored(app, backend)
    if backend == "postgres":
        assert own == dict.fromkeys(ids.values())
        assert keys == ids
    else:
        assert own == {pid: digest for digest, pid in ids.items()}

    again = client.post(f"{API}/ingest", json=single).json
    assert (again["packet_id"], again["duplicate"]) == (ids[digest_of(single)], True)
    resent = client.post(f"{API}/ingest", json={"packets": [second, first]}).json
    assert [r["packet_id"] for r in resent["results"]] == [
        ids[digest_of(second)],
        ids[digest_of(first)],
    ]
    assert resent["duplicates"] == 2
    other_copy = client.post(f"{API}/ingest", json=make_packet(), headers=headers).json
    assert (other_copy["packet_id"], other_copy["duplicate"]) == (ids[digest_of(keyed)], True)
    assert len(stored(app, backend)[0]) == 4


def test_the_identity_of_a_stored_row_is_the_key_ingest_claimed(app, client, backend):
    """``packet_identity`` (what retention forgets a purged packet's key by) recomputes from
    the stored row the very digest ingest claimed, for a Gurukul and an EMS packet."""
    from bucket.models import Packet

    bodies = [
        make_packet(),
        make_packet(
            system_type="ems",
            role="employee",
            user_id=None,
            employee_id="emp_0042",
            cognitive_state=None,
            state="WORKING",
            task_id="task_invoice_review",
            lesson_id=None,
            focus_score=None,
            integrity_score=0.92,
        ),
    ]
    ids = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies]
    with app.app_context():
        packets = {p.packet_id: p for p in db.session.query(Packet).all()}
        recomputed = [
            packet_identity({name: getattr(packets[pid], name) for name in IDENTITY_FIELDS})
            for pid in ids
        ]
        db.session.rollback()
    assert recomputed == [digest_of(body) for body in bodies]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # packet_keys is PostgreSQL's
def test_a_purged_packet_sent_with_a_refused_token_has_its_scoped_key_forgotten(make_app, backend):
    """With tokens observed, a packet whose token is missing is deduplicated under a key scoped
    to unverified senders; purging it by rows forgets that key, so a copy sent afterwards is
    stored anew, while a kept packet's copy is still its duplicate."""

    app = make_app(BUCKET_INGEST_AUTH="observe", BUCKET_INGEST_JWT_SECRET="s" * 32)
    client = app.test_client()
    gone, kept = make_packet(), make_packet()
    first = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in (gone, kept)]
    process_all(client)
    age(app, first[:1], 40)
    with app.app_context():
        assert purge_rows(30).packets == 1
    anew = client.post(f"{API}/ingest", json=gone).json
    assert not anew.get("duplicate") and anew["packet_id"] != first[0]
    again = client.post(f"{API}/ingest", json=kept).json
    assert (again["packet_id"], again["duplicate"]) == (first[1], True)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_the_seal_over_packets_without_their_key_verifies_and_names_an_altered_one(app, client):
    """The leaf holds the stored dedup key, NULL since migration 0027: a packet stored before
    it (its key on the row) and one after seal and verify together, and an altered field of
    the new one is named by verify."""
    old, new = make_packet(), make_packet()
    old_id = client.post(f"{API}/ingest", json=old).json["packet_id"]
    with app.app_context():  # as the release before 0027 stored it
        db.session.execute(
            text("UPDATE packets SET dedup_key = CAST(:key AS uuid) WHERE packet_id = :id"),
            {"key": digest_of(old), "id": old_id},
        )
        db.session.commit()
    new_id = client.post(f"{API}/ingest", json=new).json["packet_id"]
    runner = app.test_cli_runner()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "2 packets" in verified.output, verified.output
    artifact = client.get(f"/api/v1/audit/artifact/{new_id}").json
    assert artifact["data"]["dedup_key"] is None, artifact
    with app.app_context():
        db.session.execute(
            text("UPDATE packets SET session_id = 'sess_forged' WHERE packet_id = :id"),
            {"id": new_id},
        )
        db.session.commit()
    result = runner.invoke(args=["bucket", "verify"])
    assert result.exit_code != 0 and new_id in result.output and old_id not in result.output


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_backfilling_keys_skips_packets_whose_key_is_in_packet_keys_only(app, client):
    """``flask bucket partitions backfill-keys`` (for packets of instances before migration
    0012, which wrote no key row) passes over packets stored without their key on the row:
    each has its key row already."""
    from datetime import timedelta

    from bucket.services import partitions
    from bucket.timeutil import utc_now

    client.post(f"{API}/ingest", json=make_packet())
    with app.app_context():
        assert partitions.backfill_keys(utc_now() - timedelta(hours=1)) == 0
