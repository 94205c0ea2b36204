"""Operators' endpoints the console uses: activity per minute, dead letters, requeue, replay,
and a learner's timeline over a period. Through HTTP, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from bucket.extensions import db
from bucket.services import cursors
from bucket.services.bookkeeping import book_new_packets
from tests.factories import make_packet
from tests.queue_helpers import ack, ingest_many, poll, status

API = "/api/v1/bucket/prana"


def book(app) -> None:
    with app.app_context():
        book_new_packets()


def kill(make_app, count: int, user_id: str = "doomed") -> tuple:
    """An app whose packets die on their first failure, and ``count`` dead packets."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    ids = ingest_many(client, count, user_id=user_id)
    poll(client, limit=count)
    for packet_id in ids:
        answer = ack(client, packet_id, success=False, error_message=f"boom {packet_id}")
        assert answer.status_code == 200 and answer.json["outcome"] == "dead", answer.json
    return app, client, ids


def test_timeseries_counts_ingested_by_state_and_processed_per_minute(app, client):
    """Ingested packets appear once booked (by system and state); processed ones as acked."""
    ingest_many(client, 3, cognitive_state="DEEP_FOCUS")
    ingest_many(client, 2, system_type="ems", role="employee", cognitive_state=None, state="FAKING")
    served = poll(client, limit=2)["packets"]
    for packet in served:
        assert ack(client, packet["packet_id"]).status_code == 200
    book(app)
    book(app)  # booking twice counts nothing twice
    hour = client.get(f"{API}/stats/timeseries?window=1h").json
    assert hour["window"] == "1h" and len(hour["minutes"]) == len(hour["ingested"]) == 60
    assert hour["totals"] == {"ingested": 5, "processed": 2}
    assert sum(hour["ingested"][-2:]) == 5 and sum(hour["processed"][-2:]) == 2
    assert hour["states"] == {"gurukul": {"DEEP_FOCUS": 3}, "ems": {"FAKING": 2}}
    day = client.get(f"{API}/stats/timeseries?window=24h").json
    assert len(day["minutes"]) == 1440 and day["totals"] == hour["totals"]
    first, last = (datetime.fromisoformat(m) for m in (day["minutes"][0], day["minutes"][-1]))
    assert last - first == timedelta(minutes=1439)
    assert client.get(f"{API}/stats/timeseries?window=7d").status_code == 422


def test_old_minutes_leave_the_window_and_are_pruned(app, client):
    ingest_many(client, 2)
    book(app)
    with app.app_context():
        db.session.execute(text("UPDATE activity_minutes SET minute = minute - 90"))
        db.session.commit()
    hour = client.get(f"{API}/stats/timeseries?window=1h").json
    assert hour["totals"]["ingested"] == 0
    assert client.get(f"{API}/stats/timeseries?window=24h").json["totals"]["ingested"] == 2
    with app.app_context():
        db.session.execute(text("UPDATE activity_minutes SET minute = minute - 3 * 1440"))
        db.session.commit()
        from bucket.services.activity import prune

        assert prune() == 1


def test_the_cognitive_mix_leaves_out_minutes_older_than_the_window(app, client):
    """The states mix counts only the window's minutes, as the totals do: packets booked 90
    minutes ago are in the day's mix and not in the hour's."""
    ingest_many(client, 2, cognitive_state="DISTRACTED")
    book(app)
    with app.app_context():
        db.session.execute(text("UPDATE activity_minutes SET minute = minute - 90"))
        db.session.commit()
    ingest_many(client, 1, cognitive_state="DEEP_FOCUS")
    book(app)
    hour = client.get(f"{API}/stats/timeseries?window=1h").json
    assert hour["totals"]["ingested"] == 1
    assert hour["states"] == {"gurukul": {"DEEP_FOCUS": 1}}
    day = client.get(f"{API}/stats/timeseries?window=24h").json
    assert day["states"] == {"gurukul": {"DEEP_FOCUS": 1, "DISTRACTED": 2}}


def test_dead_letters_newest_first_with_error_and_attempts_paged(make_app):
    app, client, ids = kill(make_app, 5)
    first = client.get(f"{API}/packets/dead?limit=3")
    assert first.status_code == 200
    page = first.json
    assert [p["packet_id"] for p in page] == ids[::-1][:3]
    assert page[0]["last_error"] == f"boom {ids[-1]}" and page[0]["delivery_count"] == 1
    assert page[0]["delivery_state"] == "dead" and page[0]["dead_at"]
    url = first.headers["Link"].split("<")[1].split(">")[0]
    rest = client.get(url).json
    assert [p["packet_id"] for p in rest] == ids[::-1][3:]
    assert client.get(f"{API}/packets/dead?cursor=bad").status_code == 422
    not_an_id = cursors.encode(1_000_000_000.0, "not-a-packet-id")  # well formed but the id
    assert client.get(f"{API}/packets/dead", query_string={"cursor": not_an_id}).status_code == 422


def test_requeue_one_packet_one_user_or_all(make_app):
    app, client, ids = kill(make_app, 3)
    other = kill(make_app, 2, user_id="other")[2]
    requeue = f"{API}/packets/dead/requeue"
    assert client.post(requeue, json={"packet_ids": [ids[0]]}).json == {"requeued": 1}
    assert status(client)["dead_packets"] == 4
    assert client.post(requeue, json={"user_id": "doomed"}).json == {"requeued": 2}
    assert {p["user_id"] for p in client.get(f"{API}/packets/dead").json} == {"other"}
    assert client.post(requeue, json={"all": True}).json == {"requeued": 2}
    assert status(client)["dead_packets"] == 0
    served = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert set(served) == set(ids + other)
    assert {p["delivery_count"] for p in served.values()} == {1}  # fresh attempts
    assert client.post(requeue, json={"packet_ids": []}).status_code == 422


def test_replay_serves_a_users_packets_again(app, client):
    ids = ingest_many(client, 2, user_id="again")
    for packet in poll(client, limit=2)["packets"]:
        assert ack(client, packet["packet_id"]).json["outcome"] == "processed"
    answer = client.post(f"{API}/packets/replay", json={"user_id": "again"})
    assert answer.status_code == 200 and answer.json == {"requeued": 2}
    assert sorted(p["packet_id"] for p in poll(client)["packets"]) == sorted(ids)
    assert client.post(f"{API}/packets/replay", json={}).status_code == 422


def test_a_learners_timeline_over_a_period(client):
    """The user listing bounded by since/until, with delivery states and karma actions."""
    base = datetime.now(UTC)
    ids = ingest_many(client, 3, user_id="timeline")
    packet_id = poll(client, limit=1)["packets"][0]["packet_id"]
    answer = ack(client, packet_id, karma_actions=[{"action": "focus_bonus", "points": 5}])
    assert answer.status_code == 200 and answer.json["outcome"] == "processed", answer.json
    since = (base - timedelta(minutes=1)).isoformat()
    query = {"since": since, "limit": 500}
    listed = client.get(f"{API}/packets/user/timeline", query_string=query).json
    assert sorted(p["packet_id"] for p in listed) == sorted(ids)
    done = next(p for p in listed if p["packet_id"] == packet_id)
    assert done["delivery_state"] == "processed"
    assert done["karma_actions"] == [{"action": "focus_bonus", "points": 5}]
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert client.get(f"{API}/packets/user/timeline", query_string={"since": later}).json == []
    before = client.get(f"{API}/packets/user/timeline", query_string={"until": since}).json
    assert before == []
    assert client.post(f"{API}/ingest", json=make_packet(user_id="timeline")).status_code == 200


def test_the_console_page_loads_only_its_own_assets(client):
    """One HTML page; every script and style it names is served here."""
    page = client.get("/console")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html
    for asset in (
        "/static/console/console.js",
        "/static/console/console.css",
        "/static/vendor/chartjs/chart.umd.min.js",
    ):
        assert asset in html
        served = client.get(asset)
        assert served.status_code == 200 and len(served.get_data()) > 1000
        served.close()
