"""The quarantine: a packet refused for its content is kept, bounded, and can be replayed.

Every test runs on SQLite + memory and on PostgreSQL + Redis, through the HTTP API, the CLI and
the database.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from bucket.extensions import db
from bucket.models import Packet, QuarantinedPacket
from bucket.services import cursors, quarantine
from bucket.timeutil import utc_now
from tests.factories import make_packet
from tests.queue_helpers import ack, poll, status
from tests.statements import captured_statements

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
QUARANTINE = f"{API}/quarantine"
ORIGIN = "https://learn.example.org"
CONTRACT_STATES = "DEEP_FOCUS,ON_TASK,THINKING,IDLE,DISTRACTED,AWAY,OFF_TASK"


def refused(client, packet: dict, **headers) -> dict:
    """Post a packet that must be refused; return the 422 body."""
    response = client.post(INGEST, json=packet, headers={"Origin": ORIGIN, **headers})
    assert response.status_code == 422, response.json
    assert isinstance(response.json["quarantine_id"], int), response.json
    return response.json


def held(app) -> int:
    with app.app_context():
        count = db.session.execute(select(func.count()).select_from(QuarantinedPacket)).scalar()
        db.session.commit()
        return count


def stored(app) -> int:
    with app.app_context():
        count = db.session.execute(select(func.count()).select_from(Packet)).scalar()
        db.session.commit()
        return count


def entry(client, entry_id: int) -> dict:
    response = client.get(f"{QUARANTINE}/{entry_id}")
    assert response.status_code == 200, response.json
    return response.json


def replay(client, **body) -> dict:
    response = client.post(f"{QUARANTINE}/replay", json=body)
    assert response.status_code == 200, response.json
    return response.json


def test_a_refused_packet_is_kept_as_received_with_its_errors(client):
    """The 422 keeps its clear errors and adds the entry; the entry holds the JSON as sent."""
    packet = make_packet(focus_score=140, active_seconds=9.0, user_id="stu_q")
    answer = refused(client, packet)
    assert answer["code"] == 422 and answer["status"] == "Unprocessable Entity"
    assert {"focus_score", "active_seconds"} <= set(answer["errors"]["json"])
    kept = entry(client, answer["quarantine_id"])
    assert kept["body"] == packet  # transport fields and all, as received
    assert set(kept["errors"]) == set(answer["errors"]["json"])
    assert kept["origin"] == ORIGIN and kept["user_id"] == "stu_q" and kept["source"] == "packet"
    assert kept["seen_count"] == 1 and len(kept["digest"]) == 64
    assert kept["size_bytes"] == len(json.dumps(packet, separators=(",", ":")).encode())
    assert kept["first_seen_at"] == kept["last_seen_at"]


def test_a_resent_copy_counts_instead_of_adding_a_row(app, client):
    """The bridge resends with new transport fields: one entry, seen three times."""
    packet = make_packet(cognitive_state="SLEEPY")
    first = refused(client, packet)
    for attempt in (1, 2):
        again = refused(client, {**packet, "retry_count": attempt, "queued_at": f"t{attempt}"})
        assert again["quarantine_id"] == first["quarantine_id"]
    kept = entry(client, first["quarantine_id"])
    assert kept["seen_count"] == 3 and kept["last_seen_at"] > kept["first_seen_at"]
    assert held(app) == 1
    assert status(client)["quarantined_packets"] == 1


def test_rejected_packets_inside_a_batch_are_kept_one_by_one(app, client):
    """Each rejected packet of a batch gets its entry; good ones are stored as before."""
    good, bad_a, bad_b = make_packet(), make_packet(focus_score=-1), make_packet(state="NAPPING")
    response = client.post(INGEST, json={"packets": [good, bad_a, 7, bad_b]})
    assert response.status_code == 207
    results = response.json["results"]
    assert results[0]["status"] == "ingested" and "quarantine_id" not in results[0]
    assert results[2]["status"] == "rejected" and "quarantine_id" not in results[2]  # not a packet
    ids = [results[1]["quarantine_id"], results[3]["quarantine_id"]]
    assert [entry(client, i)["body"] for i in ids] == [bad_a, bad_b]
    assert {entry(client, i)["source"] for i in ids} == {"batch"}
    assert held(app) == 2 and stored(app) == 1


def test_bodies_that_are_not_packets_at_all_are_not_kept(app, client):
    """Not JSON, or over the body limit: answered as before (413 names the limit), not kept."""
    not_json = client.post(INGEST, data="{nope", content_type="text/plain")
    assert not_json.status_code == 400 and "quarantine_id" not in not_json.json
    huge = make_packet(raw_signals={"pad": "x" * 2_000_000})
    too_large = client.post(INGEST, json=huge)
    assert too_large.status_code == 413
    assert str(app.config["MAX_CONTENT_LENGTH"]) in too_large.json["message"]
    assert "capacity limit" not in too_large.json["message"]
    assert held(app) == 0


def test_bounds_drop_the_least_recently_seen_and_count_it(make_app):
    """A flood of distinct invalid packets stays within the row bound; drops are counted in
    status and /metrics; a resent old entry is fresh again and survives."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=5)
    client = app.test_client()
    first = [make_packet(focus_score=1000 + n) for n in range(5)]
    ids = [refused(client, packet)["quarantine_id"] for packet in first]
    assert refused(client, first[0])["quarantine_id"] == ids[0]  # seen again: the freshest
    later = [refused(client, make_packet(focus_score=2000 + n))["quarantine_id"] for n in range(3)]
    kept = {e["id"] for e in client.get(f"{QUARANTINE}?limit=50").json}
    assert kept == {ids[0], ids[4], *later}  # ids 1-3 were the least recently seen
    flood = [refused(client, make_packet(focus_score=3000 + n))["quarantine_id"] for n in range(40)]
    assert held(app) == 5
    assert {e["id"] for e in client.get(f"{QUARANTINE}?limit=50").json} == set(flood[-5:])
    figures = status(client)
    assert figures["quarantined_packets"] == 5 and figures["quarantine_evicted"] == 43
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "bucket_quarantine_packets 5.0" in metrics
    assert 'bucket_quarantine_dropped_total{reason="evicted"} 43.0' in metrics


def test_the_byte_bound_holds_too(make_app):
    """BUCKET_QUARANTINE_MAX_BYTES caps the bodies kept, whatever the row bound."""
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=3000)
    client = app.test_client()
    for n in range(12):
        refused(client, make_packet(focus_score=-n - 1, raw_signals={"pad": "y" * 400}))
    figures = status(client)
    assert 0 < figures["quarantine_bytes"] <= 3000
    assert figures["quarantined_packets"] == held(app) < 12
    assert figures["quarantine_evicted"] == 12 - held(app)


def test_a_flood_of_refused_packets_costs_valid_ingest_nothing(make_app):
    """Valid ingest never reads or writes the quarantine, however full it is."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=20)
    client = app.test_client()
    for n in range(60):
        refused(client, make_packet(user_id=f"flood{n}", focus_score=-5))
    with captured_statements(app) as statements:
        assert client.post(INGEST, json=make_packet()).status_code == 200
        batch = client.post(INGEST, json={"packets": [make_packet(), make_packet()]})
        assert batch.status_code == 200
    assert statements and not [s for s in statements if "quarantine" in s.lower()]
    assert held(app) == 20


def test_entries_past_the_retention_period_expire(app, client):
    """Not seen for BUCKET_QUARANTINE_RETENTION_DAYS: dropped, counted as expired."""
    old = refused(client, make_packet(focus_score=-1))["quarantine_id"]
    fresh = refused(client, make_packet(focus_score=-2))["quarantine_id"]
    with app.app_context():
        db.session.execute(
            text("UPDATE quarantine SET last_seen_at = '2020-01-01 00:00:00' WHERE id = :id"),
            {"id": old},
        )
        db.session.commit()
        assert quarantine.expire() == 1
    assert [e["id"] for e in client.get(QUARANTINE).json] == [fresh]
    figures = status(client)
    assert figures["quarantine_expired"] == 1 and figures["quarantined_packets"] == 1


def test_purge_older_than_days_drops_only_entries_not_seen_for_that_long(app, client, runner):
    """``flask bucket quarantine purge --older-than-days 7`` drops the entry last seen ten days
    ago and keeps the ones seen two days ago and now."""
    ids = [refused(client, make_packet(focus_score=-n))["quarantine_id"] for n in (1, 2, 3)]
    old, recent, fresh = ids
    with app.app_context():
        for entry_id, days in ((old, 10), (recent, 2)):
            db.session.execute(
                update(QuarantinedPacket.__table__)
                .where(QuarantinedPacket.__table__.c.id == entry_id)
                .values(last_seen_at=utc_now() - timedelta(days=days))
            )
        db.session.commit()
    purged = runner.invoke(args=["bucket", "quarantine", "purge", "--older-than-days", "7"])
    assert purged.exit_code == 0 and "purged 1 quarantine entries" in purged.output
    assert sorted(e["id"] for e in client.get(QUARANTINE).json) == sorted([recent, fresh])
    assert status(client)["quarantined_packets"] == 2


def test_listing_filters_and_pages_with_a_cursor(client):
    """Filters by user, origin and refused field; the Link header carries the next page."""
    for n in range(5):
        refused(client, make_packet(user_id="pager", focus_score=-n - 1))
    refused(client, make_packet(user_id="other", active_seconds=8.0), Origin="https://b.example")
    first = client.get(f"{QUARANTINE}?user_id=pager&limit=2")
    assert first.status_code == 200 and len(first.json) == 2
    seen = [e["id"] for e in first.json]
    link = first.headers["Link"]
    while link:
        url = link[link.index("<") + 1 : link.index(">")]
        page = client.get(url)
        seen += [e["id"] for e in page.json]
        link = page.headers.get("Link")
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    by_field = client.get(f"{QUARANTINE}?field=active_seconds").json
    assert [e["user_id"] for e in by_field] == ["other"]
    by_origin = client.get(f"{QUARANTINE}?origin=https://b.example").json
    assert [e["user_id"] for e in by_origin] == ["other"]
    bad = client.get(f"{QUARANTINE}?cursor=bm90LWEtY3Vyc29y")
    assert bad.status_code == 422 and "cursor" in bad.json["errors"]["query"]
    assert client.get(f"{QUARANTINE}/999999").status_code == 404


def test_replay_refuses_ids_that_name_no_entry_by_their_shape(client):
    """Empty, non-integer and out-of-range ids are a 422 naming the field."""
    for ids in ([], ["x"], [0], [2**63]):
        body = json.dumps({"ids": ids})  # the test client's orjson cannot write 2**63
        response = client.post(f"{QUARANTINE}/replay", data=body, content_type="application/json")
        assert response.status_code == 422, ids
        assert "ids" in response.json["errors"]["json"], response.json


def test_an_entry_id_of_2_to_the_63_the_first_out_of_range_is_a_404_not_a_500(client, runner):
    """The first id a BIGINT cannot hold, and one far past it, name no entry: 404 from the API
    and "no quarantine entry" from the CLI, never a 500 or a traceback."""
    for entry_id in (2**63 - 1, 2**63, 2**70):
        response = client.get(f"{QUARANTINE}/{entry_id}")
        assert response.status_code == 404, (entry_id, response.json)
        assert response.json["errors"] == {"entry_id": [f"No quarantine entry {entry_id}."]}
        shown = runner.invoke(args=["bucket", "quarantine", "show", str(entry_id)])
        assert shown.exit_code == 1 and f"no quarantine entry {entry_id}" in shown.output, (
            entry_id,
            shown.output,
        )
    replayed = runner.invoke(args=["bucket", "quarantine", "replay", str(2**63)])
    assert replayed.exit_code == 0 and "replayed 0" in replayed.output, replayed.output


def test_replay_goes_on_past_entries_that_still_fail(make_app):
    """In id order, ``limit`` at a time, resumed with ``after``: entries that still fail never
    hold the replay up, and ``remaining`` counts what it has not reached."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    client = strict.test_client()
    for n in range(3):
        refused(client, make_packet(user_id="stuck", focus_score=-1 - n))
    for _ in range(2):
        refused(client, make_packet(user_id="fixable", cognitive_state="THINKING"))
    lenient = make_app()
    client = lenient.test_client()
    first = replay(client, all=True, limit=2)
    assert (first["replayed"], first["still_refused"], first["remaining"]) == (2, 2, 3)
    second = replay(client, all=True, limit=2, after=first["next_after"])
    assert (second["still_refused"], second["ingested"], second["remaining"]) == (1, 1, 1)
    last = replay(client, all=True, limit=2, after=second["next_after"])
    assert (last["ingested"], last["remaining"], last["next_after"]) == (1, 0, None)
    assert stored(lenient) == 2 and held(lenient) == 3
    only = replay(client, user_id="stuck")
    assert only["replayed"] == 3 and only["still_refused"] == 3


def test_a_replay_that_still_fails_keeps_the_entry_with_new_errors(app, client):
    """Rules unchanged: the entry stays, and nothing is stored."""
    entry_id = refused(client, make_packet(focus_score=500))["quarantine_id"]
    report = replay(client, ids=[entry_id])
    assert report["replayed"] == 1 and report["still_refused"] == 1 and report["ingested"] == 0
    assert report["results"][0]["status"] == "rejected"
    assert "focus_score" in entry(client, entry_id)["errors"]
    assert stored(app) == 0


def test_legacy_ems_states_are_accepted_in_cognitive_state(client):
    """As the original did: "WORKING" in cognitive_state is stored and served as is."""
    response = client.post(INGEST, json=make_packet(cognitive_state="WORKING"))
    assert response.status_code == 200, response.json
    assert poll(client)["packets"][0]["cognitive_state"] == "WORKING"


@pytest.mark.parametrize("transport", ["single", "batch"])
def test_a_new_state_is_quarantined_then_configured_replayed_and_served_once(
    make_app, monkeypatch, transport
):
    """The story: the state engine ships FATIGUED before the bucket knows it. The bridge keeps
    resending the refused packets; the operator adds FATIGUED to BUCKET_COGNITIVE_STATES,
    restarts and replays. Every packet is stored once and served once; the quarantine ends
    empty, and the bridge's later resends are duplicates."""
    monkeypatch.setenv("BUCKET_COGNITIVE_STATES", CONTRACT_STATES)
    before = make_app()
    bridge = before.test_client()
    packets = [make_packet(user_id="tired", cognitive_state="FATIGUED") for _ in range(4)]

    def send_all(client, retry: int) -> list:
        resent = [{**p, "retry_count": retry} for p in packets]
        if transport == "single":
            return [client.post(INGEST, json=p, headers={"Origin": ORIGIN}) for p in resent]
        return [client.post(INGEST, json={"packets": resent}, headers={"Origin": ORIGIN})]

    for retry in range(3):  # the bridge's retries and offline-queue resends
        for response in send_all(bridge, retry):
            assert response.status_code == 422, response.json
    assert held(before) == 4 and stored(before) == 0
    assert {e["seen_count"] for e in bridge.get(QUARANTINE).json} == {3}

    monkeypatch.setenv("BUCKET_COGNITIVE_STATES", CONTRACT_STATES + ",FATIGUED")
    after = make_app()  # the restart
    operator = after.test_client()
    report = replay(operator, all=True)
    assert (report["replayed"], report["ingested"], report["remaining"]) == (4, 4, 0)
    assert held(after) == 0 and operator.get(QUARANTINE).json == []
    assert replay(operator, all=True)["replayed"] == 0  # replaying again stores nothing

    for response in send_all(after.test_client(), 3):
        assert response.status_code == 200, response.json
        body = response.json
        results = body["results"] if "results" in body else [body]
        assert all(r.get("duplicate") or r["status"] == "duplicate" for r in results)
    assert stored(after) == 4

    served = poll(operator, limit=50)["packets"]
    assert len({p["packet_id"] for p in served}) == len(served) == 4
    assert {p["cognitive_state"] for p in served} == {"FATIGUED"}
    for p in served:
        assert ack(operator, p["packet_id"]).status_code == 200
    assert poll(operator, limit=50)["count"] == 0
    figures = status(operator)
    assert figures["processed_packets"] == figures["total_packets"] == 4
    assert figures["quarantined_packets"] == 0


def test_a_replayed_copy_of_a_packet_stored_since_is_a_duplicate(make_app):
    """Replay goes through deduplication: a copy ingested meanwhile is not stored twice."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    packet = make_packet(cognitive_state="THINKING")
    entry_id = refused(strict.test_client(), packet)["quarantine_id"]
    lenient = make_app()
    client = lenient.test_client()
    assert client.post(INGEST, json=packet).status_code == 200
    report = replay(client, ids=[entry_id])
    assert report["duplicates"] == 1 and report["ingested"] == 0
    assert stored(lenient) == 1 and held(lenient) == 0


def test_operators_list_show_replay_and_purge_from_the_cli(make_app):
    """``flask bucket quarantine list|show|replay|purge``."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    client = strict.test_client()
    fixable = refused(client, make_packet(user_id="cli", cognitive_state="THINKING"))
    broken = refused(client, make_packet(user_id="cli", focus_score=-3))
    runner = strict.test_cli_runner()
    listed = runner.invoke(args=["bucket", "quarantine", "list", "--user", "cli"])
    assert listed.exit_code == 0, listed.output
    assert "2 held" in listed.output and "focus_score" in listed.output
    shown = runner.invoke(args=["bucket", "quarantine", "show", str(fixable["quarantine_id"])])
    assert shown.exit_code == 0 and json.loads(shown.output)["body"]["user_id"] == "cli"
    missing = runner.invoke(args=["bucket", "quarantine", "show", "424242"])
    assert missing.exit_code != 0 and "no quarantine entry" in missing.output
    assert runner.invoke(args=["bucket", "quarantine", "replay"]).exit_code != 0

    lenient = make_app()
    runner = lenient.test_cli_runner()
    replayed = runner.invoke(args=["bucket", "quarantine", "replay", "--all", "--user", "cli"])
    assert replayed.exit_code == 0, replayed.output
    assert "ingested 1" in replayed.output and "still refused 1" in replayed.output
    assert stored(lenient) == 1 and held(lenient) == 1
    assert runner.invoke(args=["bucket", "quarantine", "purge"]).exit_code != 0  # needs --yes
    purged = runner.invoke(args=["bucket", "quarantine", "purge", "--field", "focus_score"])
    assert purged.exit_code == 0 and "purged 1" in purged.output
    assert held(lenient) == 0
    assert status(lenient.test_client())["quarantine_bytes"] == 0
    assert broken["quarantine_id"] != fixable["quarantine_id"]


# --- what the mutation run (docs/mutation.md, quarantine) found untested ----------------------

Q = QuarantinedPacket.__table__
MAX_ID = 2**63 - 1


def rows_of(app) -> dict[int, dict]:
    """Every entry as stored, by id."""
    with app.app_context():
        found = {row["id"]: dict(row) for row in db.session.execute(select(Q)).mappings()}
        db.session.commit()
        return found


def set_entry(app, entry_id: int, **values) -> None:
    with app.app_context():
        db.session.execute(update(Q).where(Q.c.id == entry_id).values(**values))
        db.session.commit()


def sized(size: int, **overrides) -> dict:
    """A refused packet whose body is exactly ``size`` bytes as the quarantine counts them."""
    packet = make_packet(**{"focus_score": -1, "raw_signals": {"pad": ""}, **overrides})
    pad = size - len(json.dumps(packet, separators=(",", ":")).encode())
    packet["raw_signals"]["pad"] = "p" * pad
    return packet


def test_the_byte_figure_is_the_sum_of_the_bodies_kept_and_a_resend_adds_nothing(app, client):
    """Two entries kept by one batch add both their sizes; a resent copy changes no figure."""
    batch = client.post(
        INGEST, json={"packets": [make_packet(focus_score=-1), make_packet(role="x")]}
    )
    assert batch.status_code == 422, batch.json
    first = make_packet(focus_score=-2)
    refused(client, first)
    refused(client, {**first, "retry_count": 1})
    sizes = [row["size_bytes"] for row in rows_of(app).values()]
    figures = status(client)
    assert figures["quarantined_packets"] == len(sizes) == 3
    assert figures["quarantine_bytes"] == sum(sizes)


def test_one_entry_under_a_bound_of_one_entry_is_kept(make_app):
    """A bound is a most, not a less-than, from the very first entry (no figure yet)."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=1)
    kept = refused(app.test_client(), make_packet(focus_score=-1))["quarantine_id"]
    assert list(rows_of(app)) == [kept]
    assert status(app.test_client())["quarantine_evicted"] == 0


def test_one_body_of_exactly_the_byte_bound_is_kept(make_app):
    """The byte bound is a most too, from the very first entry (no figure yet)."""
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=3000)
    kept = refused(app.test_client(), sized(3000))["quarantine_id"]
    assert rows_of(app)[kept]["size_bytes"] == 3000
    figures = status(app.test_client())
    assert figures["quarantine_evicted"] == 0 and figures["quarantine_bytes"] == 3000


def test_eviction_goes_one_percent_below_the_row_bound(make_app):
    """Exactly 100 entries under a bound of 100 evict nothing; the 101st takes the quarantine
    down to 99, so the search for the biggest sender runs once per many newcomers; the oldest
    entries go."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=100)
    client = app.test_client()
    ids = [refused(client, make_packet(focus_score=1000 + n))["quarantine_id"] for n in range(100)]
    assert status(client)["quarantine_evicted"] == 0 and len(rows_of(app)) == 100
    ids.append(refused(client, make_packet(focus_score=1100))["quarantine_id"])
    assert sorted(rows_of(app)) == ids[2:]
    figures = status(client)
    assert figures["quarantined_packets"] == 99 and figures["quarantine_evicted"] == 2


def test_eviction_goes_one_percent_below_the_byte_bound_and_no_further(make_app):
    """Bodies of equal size under a byte bound of 100 of them: 100 evict nothing; the 101st
    leaves 99, the two least recently seen evicted; never fewer."""
    size = 500
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=100 * size)
    client = app.test_client()
    ids = [refused(client, sized(size, focus_score=-1 - n))["quarantine_id"] for n in range(100)]
    assert status(client)["quarantine_evicted"] == 0 and len(rows_of(app)) == 100
    ids.append(refused(client, sized(size, focus_score=-101))["quarantine_id"])
    kept = rows_of(app)
    assert {row["size_bytes"] for row in kept.values()} == {size}
    assert sorted(kept) == ids[2:]
    figures = status(client)
    assert figures["quarantine_bytes"] == 99 * size and figures["quarantine_evicted"] == 2


def test_the_row_bound_evicts_by_rows_when_the_bytes_sit_exactly_on_their_watermark(make_app):
    """Over the row bound with the bytes held exactly at the byte watermark (1 % below the
    byte bound, not above it): the eviction is by entries, and the row bound is restored."""
    size = 500
    # 101 bodies of 500 bytes make 50,500, exactly 51,010 - 51,010 // 100.
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=100, BUCKET_QUARANTINE_MAX_BYTES=51_010)
    client = app.test_client()
    ids = [refused(client, sized(size, focus_score=-1 - n))["quarantine_id"] for n in range(101)]
    assert sorted(rows_of(app)) == ids[2:]
    figures = status(client)
    assert figures["quarantined_packets"] == 99 and figures["quarantine_evicted"] == 2


@pytest.mark.parametrize("backend", ["postgres"])
def test_an_eviction_racing_another_for_the_same_entries_still_keeps_the_newcomer(
    make_app, backend, monkeypatch
):
    """PostgreSQL: when another transaction evicts the biggest sender's entries between this
    request's search for that sender and its delete, the delete finds nothing; the request (from
    another address) stops evicting and still answers 422 with its own entry kept, never a 500."""
    import psycopg
    from sqlalchemy.orm import Session

    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=3)
    client = app.test_client()
    for n in range(3):
        refused(client, make_packet(focus_score=-1 - n))
    url = app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")
    real_execute = Session.execute
    raced = []

    def execute(self, statement, *args, **kwargs):
        result = real_execute(self, statement, *args, **kwargs)
        if not raced and "GROUP BY quarantine.sender" in str(statement):
            raced.append(True)  # the other transaction evicts them all, and commits
            with psycopg.connect(url, autocommit=True) as other:
                other.execute("DELETE FROM quarantine")
        return result

    monkeypatch.setattr(Session, "execute", execute)
    response = client.post(
        INGEST,
        json=make_packet(focus_score=-50),
        headers={"Origin": ORIGIN},
        environ_base={"REMOTE_ADDR": "192.0.2.77"},  # not the biggest sender
    )
    monkeypatch.undo()
    assert response.status_code == 422, response.json
    assert raced and list(rows_of(app)) == [response.json["quarantine_id"]]


def test_the_row_bound_evicts_the_sender_holding_most_entries_not_most_bytes(make_app):
    """Under the row bound, the address with the most entries gives way, even when another
    holds more bytes in fewer entries."""
    app = make_app(BUCKET_QUARANTINE_MAX_ROWS=8)
    client = app.test_client()

    def post(packet, address):
        response = client.post(INGEST, json=packet, environ_base={"REMOTE_ADDR": address})
        assert response.status_code == 422, response.json
        return response.json["quarantine_id"]

    heavy = {
        post(make_packet(focus_score=-n, raw_signals={"pad": "h" * 3000}), "192.0.2.9")
        for n in range(1, 4)
    }
    many = [post(make_packet(focus_score=-n), "192.0.2.1") for n in range(10, 15)]
    newcomer = post(make_packet(focus_score=-99), "192.0.2.5")
    kept = set(rows_of(app))
    assert heavy <= kept and newcomer in kept
    assert many[0] not in kept and set(many[1:]) <= kept


def test_the_byte_bound_evicts_the_sender_holding_most_bytes_not_most_entries(make_app):
    """Under the byte bound, the address holding the most bytes gives way, even when another
    (sorting before it) has more entries."""
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=12_000)
    client = app.test_client()

    def post(packet, address):
        response = client.post(INGEST, json=packet, environ_base={"REMOTE_ADDR": address})
        assert response.status_code == 422, response.json
        return response.json["quarantine_id"]

    many = {post(make_packet(focus_score=-n), "192.0.2.1") for n in range(1, 7)}
    heavy = [
        post(make_packet(focus_score=-n, raw_signals={"pad": "h" * 2500}), "192.0.2.9")
        for n in range(10, 13)
    ]
    assert status(client)["quarantine_evicted"] == 0
    newcomer = post(make_packet(focus_score=-99, raw_signals={"pad": "h" * 2500}), "192.0.2.5")
    kept = set(rows_of(app))
    assert many <= kept and newcomer in kept
    assert heavy[0] not in kept


def test_when_the_biggest_sender_cannot_cover_the_excess_the_next_gives_way_too(make_app):
    """A newcomer over the byte bound by more than the biggest sender's one entry: that entry
    goes, then the next biggest sender's; the figures match the table after."""
    app = make_app(BUCKET_QUARANTINE_MAX_BYTES=10_000)  # eviction goes down to 9 900
    client = app.test_client()

    def post(packet, address):
        response = client.post(INGEST, json=packet, environ_base={"REMOTE_ADDR": address})
        assert response.status_code == 422, response.json
        return response.json["quarantine_id"]

    big = post(sized(5000, user_id="big"), "192.0.2.9")
    middle = post(sized(4970, user_id="middle"), "192.0.2.1")
    assert status(client)["quarantine_evicted"] == 0  # 9 970 bytes held
    newcomer = post(sized(4960, user_id="new"), "192.0.2.5")  # 14 930: 5 030 too many
    kept = rows_of(app)
    assert list(kept) == [newcomer] and kept[newcomer]["size_bytes"] == 4960
    figures = status(client)
    assert figures["quarantine_evicted"] == 2 and big != middle
    assert figures["quarantined_packets"] == 1 and figures["quarantine_bytes"] == 4960


def test_a_field_filter_is_matched_literally_not_as_a_pattern(client):
    """``field=%`` or ``field=_`` names no field: LIKE's wildcards are escaped."""
    refused(client, make_packet(focus_score=-1))
    for pattern in ("%", "focus%", "focus_scor_"):
        assert client.get(QUARANTINE, query_string={"field": pattern}).json == [], pattern
    assert len(client.get(QUARANTINE, query_string={"field": "focus_score"}).json) == 1


def test_since_includes_and_until_excludes_the_moment_last_seen(app, client):
    """``since`` is "at or after", ``until`` "before", on the moment an entry was last seen."""
    early, on, late = (
        refused(client, make_packet(focus_score=-n))["quarantine_id"] for n in (1, 2, 3)
    )
    moment = utc_now().replace(microsecond=0) - timedelta(days=1)
    for entry_id, offset in ((early, -60), (on, 0), (late, 60)):
        set_entry(app, entry_id, last_seen_at=moment + timedelta(seconds=offset))
    at = moment.isoformat()
    since = {e["id"] for e in client.get(QUARANTINE, query_string={"since": at}).json}
    until = {e["id"] for e in client.get(QUARANTINE, query_string={"until": at}).json}
    assert since == {on, late} and until == {early}


def test_an_entry_refused_for_several_fields_is_found_by_each(client):
    """Every refused field is one the filter finds the entry by."""
    entry_id = refused(client, make_packet(focus_score=-1, role="x"))["quarantine_id"]
    for name in ("focus_score", "role"):
        found = client.get(QUARANTINE, query_string={"field": name}).json
        assert [e["id"] for e in found] == [entry_id], name


def test_an_entry_naming_its_user_by_employee_id_is_found_by_that_user(client):
    """An EMS packet names its user in ``employee_id``; the user filter finds it."""
    packet = make_packet(focus_score=-1)
    del packet["user_id"]
    entry_id = refused(client, {**packet, "employee_id": "emp_7"})["quarantine_id"]
    assert entry(client, entry_id)["user_id"] == "emp_7"
    found = client.get(QUARANTINE, query_string={"user_id": "emp_7"}).json
    assert [e["id"] for e in found] == [entry_id]


def test_a_user_id_that_is_not_text_is_kept_without_a_user(client):
    """A refused packet whose user_id is a number is kept; it names no user."""
    entry_id = refused(client, make_packet(user_id=42))["quarantine_id"]
    assert entry(client, entry_id)["user_id"] is None


def test_long_text_fields_are_kept_cut_to_their_columns_and_nul_shown_as_replacement(app, client):
    """The user, Origin and sender address are cut to 256, 512 and 64 characters (the
    columns' sizes); a NUL (which PostgreSQL text cannot hold) is kept as U+FFFD."""
    origin = "https://" + "o" * 600 + ".example"
    response = client.post(
        INGEST,
        json=make_packet(user_id="u\x00" + "u" * 300),
        headers={"Origin": origin},
        environ_base={"REMOTE_ADDR": "s\x00" + "s" * 100},
    )
    assert response.status_code == 422, response.json
    row = rows_of(app)[response.json["quarantine_id"]]
    assert row["user_id"] == "u\ufffd" + "u" * 254
    assert row["origin"] == origin[:512]
    assert row["sender"] == "s\ufffd" + "s" * 62


def test_the_same_content_with_its_keys_in_another_order_is_one_entry(client):
    """The digest is of canonical JSON: key order does not make a new entry."""
    packet = make_packet(focus_score=-1)
    backwards = dict(reversed(list(packet.items())))
    first = client.post(INGEST, data=json.dumps(packet), content_type="application/json")
    second = client.post(INGEST, data=json.dumps(backwards), content_type="application/json")
    assert first.status_code == second.status_code == 422
    assert first.json["quarantine_id"] == second.json["quarantine_id"]
    assert entry(client, first.json["quarantine_id"])["seen_count"] == 2


def test_each_page_cursor_points_past_the_last_entry_and_a_full_last_page_has_no_link(client):
    """Pages of three, newest first, every entry once: six entries are two pages with no
    link after the second; a seventh makes a third page."""

    def every_page() -> list[list[int]]:
        pages, url = [], f"{QUARANTINE}?limit=3"
        while url:
            page = client.get(url)
            assert page.status_code == 200, page.json
            pages.append([e["id"] for e in page.json])
            link = page.headers.get("Link")
            url = link[link.index("<") + 1 : link.index(">")] if link else None
        return pages

    ids = [refused(client, make_packet(focus_score=-n))["quarantine_id"] for n in range(1, 7)]
    assert every_page() == [ids[:2:-1], ids[2::-1]]
    ids.append(refused(client, make_packet(focus_score=-7))["quarantine_id"])
    assert every_page() == [ids[:3:-1], ids[3:0:-1], ids[:1]]


def test_the_largest_id_a_bigint_holds_names_its_entry_and_cursors_beyond_are_refused(app, client):
    """An entry at id 2^63 - 1 is shown, listed past with a cursor and replayed; a cursor
    of 0, of 2^63 or of ``true`` is a 422."""
    low = refused(client, make_packet(focus_score=-1))["quarantine_id"]
    top = refused(client, make_packet(focus_score=-2))["quarantine_id"]
    set_entry(app, top, id=MAX_ID)
    assert entry(client, MAX_ID)["body"]["focus_score"] == -2
    first = client.get(f"{QUARANTINE}?limit=1")
    assert [e["id"] for e in first.json] == [MAX_ID]
    link = first.headers["Link"]
    second = client.get(link[link.index("<") + 1 : link.index(">")])
    assert second.status_code == 200 and [e["id"] for e in second.json] == [low]
    report = replay(client, ids=[MAX_ID])
    assert report["replayed"] == 1 and report["results"][0]["id"] == MAX_ID
    for value in (0, 2**63, True):
        bad = client.get(QUARANTINE, query_string={"cursor": cursors.encode(value)})
        assert bad.status_code == 422 and "cursor" in bad.json["errors"]["query"], value


def test_replay_and_purge_with_filters_touch_only_the_matching_entries(app, client, runner):
    """A filtered replay takes only the matching entries, and ``remaining`` counts only
    those it did not reach; a filtered purge deletes only them."""
    mine = [
        refused(client, make_packet(user_id="mine", focus_score=-n))["quarantine_id"]
        for n in (1, 2)
    ]
    other = refused(client, make_packet(user_id="other", focus_score=-3))["quarantine_id"]
    report = replay(client, user_id="mine", limit=1)
    assert [r["id"] for r in report["results"]] == [mine[0]]
    assert (report["remaining"], report["next_after"]) == (1, mine[0])
    report = replay(client, user_id="mine", after=mine[0])
    assert [r["id"] for r in report["results"]] == [mine[1]]
    assert (report["remaining"], report["next_after"]) == (0, None)
    purged = runner.invoke(args=["bucket", "quarantine", "purge", "--yes", "--user", "mine"])
    assert purged.exit_code == 0 and "purged 2" in purged.output, purged.output
    assert list(rows_of(app)) == [other]


def test_a_replay_that_still_fails_records_the_errors_of_the_rules_in_force(make_app):
    """An entry refused for two fields, replayed when one of them is allowed, keeps only the
    other's error (and is found by that field only); other entries are untouched."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    client = strict.test_client()
    both = refused(client, make_packet(cognitive_state="THINKING", focus_score=-1))["quarantine_id"]
    bystander = refused(client, make_packet(cognitive_state="THINKING"))["quarantine_id"]
    lenient = make_app()
    client = lenient.test_client()
    report = replay(client, ids=[both])
    assert report["results"] == [
        {
            "id": both,
            "status": "rejected",
            "errors": {"focus_score": report["results"][0]["errors"]["focus_score"]},
        }
    ]
    rows = rows_of(lenient)
    assert set(rows[both]["errors"]) == {"focus_score"}
    assert rows[both]["error_fields"] == ",focus_score,"
    assert set(rows[bystander]["errors"]) == {"cognitive_state"}
    found = client.get(QUARANTINE, query_string={"field": "cognitive_state"}).json
    assert [e["id"] for e in found] == [bystander]


def test_replay_reports_each_entry_with_its_status_and_stored_packet(make_app):
    """``results`` names each entry, ``ingested`` or ``duplicate``, and the packet stored
    for it; two duplicates count two."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    client = strict.test_client()
    packets = [make_packet(cognitive_state="THINKING") for _ in range(3)]
    ids = [refused(client, p)["quarantine_id"] for p in packets]
    lenient = make_app()
    client = lenient.test_client()
    stored_ids = [client.post(INGEST, json=p).json["packet_id"] for p in packets[:2]]
    report = replay(client, all=True)
    assert (report["ingested"], report["duplicates"]) == (1, 2)
    with lenient.app_context():
        newest = db.session.execute(
            select(Packet.packet_id).where(Packet.packet_id.not_in(stored_ids))
        ).scalar_one()
        db.session.commit()
    assert report["results"] == [
        {"id": ids[0], "status": "duplicate", "packet_id": stored_ids[0]},
        {"id": ids[1], "status": "duplicate", "packet_id": stored_ids[1]},
        {"id": ids[2], "status": "ingested", "packet_id": newest},
    ]


def test_a_replayed_packet_keeps_the_idempotency_key_it_was_sent_with(make_app):
    """The bridge's Idempotency-Key travels with the entry: once replayed, a resend under
    that key (even with a new timestamp) is the same packet."""
    strict = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    packet = make_packet(cognitive_state="THINKING")
    headers = {"Idempotency-Key": "bridge-key-1"}
    response = strict.test_client().post(INGEST, json=packet, headers=headers)
    assert response.status_code == 422
    lenient = make_app()
    client = lenient.test_client()
    report = replay(client, all=True)
    assert report["ingested"] == 1
    again = client.post(
        INGEST, json={**packet, "timestamp": "2025-11-28T09:00:00Z"}, headers=headers
    )
    assert again.status_code == 200 and again.json["duplicate"] is True, again.json
    assert again.json["packet_id"] == report["results"][0]["packet_id"]
    assert stored(lenient) == 1


def test_packets_nested_deeper_than_the_encoders_go_are_told_apart_by_content(app, client):
    """Two refused packets too deep for the canonical encoder, differing in one field, are
    two entries; the same one sent again is the same entry."""

    def deep(user: str) -> str:
        return json.dumps(
            make_packet(
                user_id=user, focus_score=-1, timestamp="2025-11-28T08:00:00Z", raw_signals={"n": 1}
            )
        )[:-1] + (', "extra": ' + "[" * 300 + "]" * 300 + "}")

    answers = [
        client.post(INGEST, data=body, content_type="application/json")
        for body in (deep("deep_a"), deep("deep_b"))
    ]
    assert [a.status_code for a in answers] == [422, 422], answers[0].json
    first, second = (a.json["quarantine_id"] for a in answers)
    assert first != second
    again = client.post(INGEST, data=deep("deep_a"), content_type="application/json")
    assert again.json["quarantine_id"] == first
    assert {e["user_id"] for e in client.get(QUARANTINE).json} == {"deep_a", "deep_b"}


def test_a_lowered_row_bound_is_met_at_the_next_newcomer_across_every_sender(make_app):
    """Four senders hold one entry each; the operator lowers the bound to one entry: the
    next refused packet brings the quarantine down to one, one sender after another, and
    the figures say so."""
    app = make_app()
    client = app.test_client()
    for n in range(1, 4):
        response = client.post(
            INGEST,
            json=make_packet(focus_score=-n),
            environ_base={"REMOTE_ADDR": f"192.0.2.{n}"},
        )
        assert response.status_code == 422
    lowered = make_app(BUCKET_QUARANTINE_MAX_ROWS=1)
    client = lowered.test_client()
    response = client.post(
        INGEST, json=make_packet(focus_score=-9), environ_base={"REMOTE_ADDR": "192.0.2.9"}
    )
    assert response.status_code == 422
    assert len(rows_of(lowered)) == 1
    figures = status(client)
    assert figures["quarantined_packets"] == 1 and figures["quarantine_evicted"] == 3


def test_replay_takes_the_entries_in_id_order_even_after_they_changed(app, client):
    """An entry seen again (its row rewritten) is still replayed in its place by id."""
    ids = [refused(client, make_packet(focus_score=-n))["quarantine_id"] for n in (1, 2, 3)]
    first = entry(client, ids[0])["body"]
    refused(client, {**first, "retry_count": 5})  # rewrites the first row
    report = replay(client, all=True, limit=1)
    assert [r["id"] for r in report["results"]] == [ids[0]]
    assert (report["remaining"], report["next_after"]) == (2, ids[0])
