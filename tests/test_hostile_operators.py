"""Hostile or careless input behind the token (issue 18, findings 6-9): no 500 from a forged
cursor, query string or moment; no action on everything without an explicit ``{"all": true}``;
no lease from HEAD or OPTIONS; /metrics behind a token when asked; no packet data in error logs.
Through HTTP, on both backends."""

from __future__ import annotations

import base64
import json
import logging
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import text

from bucket.extensions import db
from bucket.web.request_log import json_formatter
from tests.factories import make_packet
from tests.queue_helpers import ack, ingest_many, poll, status

API = "/api/v1/bucket/prana"
QUARANTINE = f"{API}/quarantine"
REQUEUE = f"{API}/packets/dead/requeue"


def forged(raw: bytes) -> str:
    """A cursor as the service writes them (base64url, no padding) around ``raw``."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def refuse_packets(client, count: int, user_id: str = "refused") -> list[int]:
    """``count`` packets refused for their content: their quarantine ids."""
    ids = []
    for n in range(count):
        answer = client.post(f"{API}/ingest", json=make_packet(user_id=user_id, focus_score=-1 - n))
        assert answer.status_code == 422, answer.json
        ids.append(answer.json["quarantine_id"])
    return ids


def assert_refused(response, code: int, *path: str) -> None:
    """A 4xx in the one error shape whose ``errors`` name ``path`` (e.g. query, cursor)."""
    assert response.status_code == code, (response.status_code, response.get_data(as_text=True))
    body = response.json
    assert body["code"] == code and body["message"]
    found = body["errors"]
    for key in path:
        assert key in found, (path, body["errors"])
        found = found[key]


# --- 6. forged cursors, query strings and moments -------------------------------------------

LISTINGS = [
    f"{API}/packets/user/stu_test",
    f"{API}/packets/dead",
    QUARANTINE,
]


@pytest.mark.parametrize("url", LISTINGS)
def test_a_cursor_of_deeply_nested_json_is_a_422_naming_the_cursor(client, url):
    """JSON nested past the parser's recursion limit is a bad cursor, not a RecursionError."""
    for raw in (b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b'[{"a":' * 30_000):
        assert_refused(
            client.get(url, query_string={"cursor": forged(raw)}), 422, "query", "cursor"
        )


def test_a_quarantine_cursor_beyond_a_bigint_is_a_422(client):
    """An id no column can hold (2^63 and more, or below 1) is refused before the database."""
    for value in (2**63, 2**64 + 5, 10**30, -(2**63) - 1):
        cursor = forged(json.dumps([value]).encode())
        assert_refused(
            client.get(QUARANTINE, query_string={"cursor": cursor}), 422, "query", "cursor"
        )


def test_a_user_cursor_whose_moment_overflows_is_a_422(client):
    cursor = forged(json.dumps(["0001-01-01T00:00:00+14:00", "x"]).encode())
    url = f"{API}/packets/user/stu_test"
    assert_refused(client.get(url, query_string={"cursor": cursor}), 422, "query", "cursor")


HOSTILE_QUERIES = [
    {"user_id": "someone-else"},
    {"endpoint": "health.health"},
    {"_method": "POST"},
    {"_external": "1"},
    {"_scheme": "javascript"},
    {"_anchor": "x"},
    {"values": "1"},
    {"invented": "1"},
]


def next_link(response) -> tuple[str, dict]:
    """The next page's path and query from a listing's ``Link`` header."""
    assert response.status_code == 200, response.get_data(as_text=True)
    link = response.headers["Link"]
    assert link.startswith("</") and link.endswith('>; rel="next"'), link
    target = urlsplit(link[1 : link.index(">")])
    assert not target.netloc and not target.scheme, link
    return link[1 : link.index(">")], parse_qs(target.query)


@pytest.mark.parametrize("extra", HOSTILE_QUERIES, ids=lambda extra: next(iter(extra)))
def test_the_link_header_keeps_only_the_parameters_a_listing_knows(client, extra):
    """Unknown parameters (and url_for's own) never reach the next page's URL nor cause a 500,
    whatever the Host; the listing's own parameters are kept as sent."""
    ingest_many(client, 3, user_id="stu_test")
    refuse_packets(client, 3)
    evil = {"Host": "evil.example"}
    cases = [(f"{API}/packets/user/stu_test", {"limit": "1", "processed_only": "false"})]
    if "user_id" not in extra:  # a filter the quarantine knows; tested below
        cases.append((QUARANTINE, {"limit": "1", "origin": "", "field": "focus_score"}))
    for url, own in cases:
        response = client.get(url, query_string={**extra, **own}, headers=evil)
        following, sent = next_link(response)
        assert following.startswith(url + "?")
        assert {name: values[0] for name, values in sent.items() if name != "cursor"} == {
            name: value for name, value in own.items() if value
        } or set(sent) - {"cursor"} == set(own)
        assert client.get(following).status_code == 200
        assert len(client.get(following).json) == 1


def test_the_quarantine_link_keeps_its_filters(client):
    refuse_packets(client, 3)
    refuse_packets(client, 1, user_id="other")
    response = client.get(QUARANTINE, query_string={"limit": "1", "user_id": "refused"})
    following, sent = next_link(response)
    assert sent["user_id"] == ["refused"] and sent["limit"] == ["1"]
    assert client.get(following).json[0]["user_id"] == "refused"


@pytest.mark.parametrize(
    "moment",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+00:01"],
)
@pytest.mark.parametrize("name", ["since", "until"])
def test_a_since_or_until_beyond_what_utc_can_hold_is_a_422_naming_it(client, name, moment):
    ingest_many(client, 1, user_id="stu_test")
    for url in (f"{API}/packets/user/stu_test", QUARANTINE):
        response = client.get(url, query_string={name: moment})
        assert_refused(response, 422, "query", name)
    response = client.post(f"{API}/packets/replay", json={"user_id": "stu_test", name: moment})
    assert_refused(response, 422, "json", name)
    response = client.post(f"{QUARANTINE}/replay", json={name: moment})
    assert_refused(response, 422, "json", name)


# --- 7. operator actions on everything need {"all": true} -----------------------------------


def test_quarantine_replay_of_a_body_it_cannot_read_replays_nothing(make_app):
    """text/plain, form-encoded (curl -d) and empty bodies are 4xx: never "every entry"."""
    app = make_app(BUCKET_COGNITIVE_STATES=["ON_TASK"])
    client = app.test_client()
    for _ in range(3):
        answer = client.post(f"{API}/ingest", json=make_packet(cognitive_state="THINKING"))
        assert answer.status_code == 422
    lenient = make_app().test_client()
    url = f"{QUARANTINE}/replay"
    ids = [entry["id"] for entry in lenient.get(QUARANTINE).json]
    one = json.dumps({"ids": [ids[0]]})
    assert_refused(lenient.post(url, data=one, content_type="text/plain"), 415, "headers")
    assert_refused(lenient.post(url, data={"ids": str(ids[0])}), 415, "headers")
    assert_refused(lenient.post(url, data=""), 400, "json")
    assert_refused(lenient.post(url, data="", content_type="application/json"), 400, "json")
    assert_refused(lenient.post(url, data="{", content_type="application/json"), 400, "json")
    for body in ({}, {"limit": 5}, {"after": 1}, {"all": False}, {"all": "yes"}, {"user_id": ""}):
        assert_refused(lenient.post(url, json=body), 422, "json")
    assert_refused(lenient.post(url, json={"all": True, "ids": [ids[0]]}), 422, "json", "all")
    assert len(lenient.get(QUARANTINE).json) == 3  # nothing was replayed by any of those
    named = lenient.post(url, json={"ids": [ids[0]]})
    assert named.status_code == 200 and named.json["ingested"] == 1
    everything = lenient.post(url, json={"all": True})
    assert everything.status_code == 200 and everything.json["ingested"] == 2
    assert lenient.get(QUARANTINE).json == []


def kill(make_app, count: int) -> tuple:
    """An app whose packets die on their first failure, and ``count`` dead packets."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    ids = ingest_many(client, count, user_id="doomed")
    poll(client, limit=count)
    for packet_id in ids:
        assert ack(client, packet_id, success=False, error_message="boom").status_code == 200
    return client, ids


def test_dead_requeue_of_a_body_it_cannot_read_requeues_nothing(make_app):
    client, ids = kill(make_app, 3)
    one = json.dumps({"packet_ids": [ids[0]]})
    assert_refused(client.post(REQUEUE, data=one, content_type="text/plain"), 415, "headers")
    assert_refused(client.post(REQUEUE, data={"packet_ids": ids[0]}), 415, "headers")
    assert_refused(client.post(REQUEUE, data=""), 400, "json")
    for body in ({}, {"all": False}, {"all": None}):
        assert_refused(client.post(REQUEUE, json=body), 422, "json")
    both = {"all": True, "user_id": "doomed"}
    assert_refused(client.post(REQUEUE, json=both), 422, "json", "all")
    assert status(client)["dead_packets"] == 3
    assert client.post(REQUEUE, json={"packet_ids": [ids[0]]}).json == {"requeued": 1}
    assert client.post(REQUEUE, json={"all": True}).json == {"requeued": 2}
    assert status(client)["dead_packets"] == 0


def test_user_replay_refuses_a_body_it_cannot_read(client):
    """The user replay names its user, but a form-encoded body is a 415 like the others."""
    response = client.post(f"{API}/packets/replay", data={"user_id": "x"})
    assert_refused(response, 415, "headers")


# --- 8. HEAD and OPTIONS change nothing -----------------------------------------------------


def test_head_and_options_on_pending_lease_nothing(client):
    ids = ingest_many(client, 3)
    query = "limit=50&visibility_timeout=43200"
    head = client.head(f"{API}/packets/pending?{query}")
    assert head.status_code == 405 and "HEAD" not in head.headers["Allow"]
    assert "GET" in head.headers["Allow"]
    options = client.options(f"{API}/packets/pending?{query}")
    assert options.status_code in (200, 204)
    figures = status(client)
    assert figures["leased_packets"] == 0 and figures["queue_size"] == 3
    assert sorted(p["packet_id"] for p in poll(client, limit=50)["packets"]) == sorted(ids)


def test_head_and_options_anywhere_change_nothing(app, client):
    """Every route, asked with HEAD and OPTIONS and a leasing query string: nothing moves."""
    ingest_many(client, 2, user_id="stu_test")
    refuse_packets(client, 1)
    before = status(client)
    query = "limit=50&visibility_timeout=43200&wait=0"
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<int:\w+>", "1", rule.rule)
        path = re.sub(r"<path:filename>", "console/console.js", path)
        path = re.sub(r"<[^>]+>", "stu_test", path)
        for method in ("HEAD", "OPTIONS"):
            answer = client.open(f"{path}?{query}", method=method)
            answer.close()
            assert answer.status_code < 500, (method, path, answer.status_code)
    after = status(client)
    for name in ("leased_packets", "queue_size", "pending_packets", "quarantined_packets"):
        assert after[name] == before[name], name


# --- 9. /metrics behind a token on request; no packet data in error logs ----------------------

METRICS_TOKEN = "scrape-token-for-prometheus"
CONSUMER_TOKEN = "consumer-token-of-karma"


def test_metrics_stay_open_unless_asked(make_app):
    """The contract: /metrics answers without a token, even when the consumer token is set."""
    client = make_app(BUCKET_CONSUMER_TOKEN=[CONSUMER_TOKEN]).test_client()
    assert client.get("/metrics").status_code == 200


def test_a_metrics_token_protects_metrics(make_app):
    client = make_app(
        BUCKET_CONSUMER_TOKEN=[CONSUMER_TOKEN], BUCKET_METRICS_TOKEN=[METRICS_TOKEN]
    ).test_client()
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.json["code"] == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    for headers in (
        {"Authorization": f"Bearer {METRICS_TOKEN}"},
        {"X-API-Key": METRICS_TOKEN},
        {"Authorization": f"Bearer {CONSUMER_TOKEN}"},
    ):
        answer = client.get("/metrics", headers=headers)
        assert answer.status_code == 200 and "bucket_" in answer.get_data(as_text=True)
    operation = client.get("/openapi.json").json["paths"]["/metrics"]["get"]
    assert operation["security"] and "401" in operation["responses"]
    # The metrics token opens nothing else.
    scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert client.get(f"{API}/status", headers=scraper).status_code == 403
    assert client.get("/health").status_code == 200


def test_metrics_can_ask_for_the_consumer_token(make_app):
    client = make_app(
        BUCKET_CONSUMER_TOKEN=[CONSUMER_TOKEN], BUCKET_METRICS_REQUIRE_TOKEN=True
    ).test_client()
    assert client.get("/metrics").status_code == 401
    consumer = {"Authorization": f"Bearer {CONSUMER_TOKEN}"}
    assert client.get("/metrics", headers=consumer).status_code == 200


def test_metrics_asking_for_a_token_without_any_stay_closed_and_say_so(make_app, caplog):
    client = make_app(BUCKET_METRICS_REQUIRE_TOKEN=True).test_client()
    assert "BUCKET_METRICS_REQUIRE_TOKEN is set but no token is" in caplog.text
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": "guess"}).status_code == 403
    assert client.get(f"{API}/status").status_code == 200  # the consumer side stays open


PAYLOAD_MARK = "PAYLOAD-THAT-MUST-NOT-BE-LOGGED"


@pytest.fixture
def failing_inserts(app):
    """Every insert into packets fails with a database error that is not an outage (on
    PostgreSQL its DETAIL quotes the row, as a NOT NULL or CHECK violation's does)."""
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            statements = [
                "CREATE TRIGGER refuse_packets BEFORE INSERT ON packets "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            ]
            undo = ["DROP TRIGGER refuse_packets"]
        else:
            statements = [
                "CREATE FUNCTION refuse_packets() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the test' USING DETAIL = NEW::text; END $$",
                "CREATE TRIGGER refuse_packets BEFORE INSERT ON packets "
                "FOR EACH ROW EXECUTE FUNCTION refuse_packets()",
            ]
            undo = ["DROP TRIGGER refuse_packets ON packets", "DROP FUNCTION refuse_packets()"]
        with db.engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    yield
    with app.app_context(), db.engine.begin() as connection:
        for statement in undo:
            connection.execute(text(statement))


def test_a_database_error_logs_identifiers_not_payloads(client, failing_inserts, caplog):
    """The 500's log line names the statement and the packet's identifiers; the packet's
    signals and the rest of its content stay out (SQL parameters included)."""
    caplog.set_level(logging.INFO)
    packet = make_packet(user_id="stu_logged", raw_signals={"secret": PAYLOAD_MARK})
    packet["session_id"] = "sess_logged"
    for body in (packet, {"packets": [packet, make_packet(raw_signals={"s": PAYLOAD_MARK})]}):
        response = client.post(f"{API}/ingest", json=body)
        assert response.status_code == 500, response.get_data(as_text=True)
    formatter = json_formatter()
    lines = [formatter.format(record) for record in caplog.records]
    errors = [line for line in lines if '"level":"ERROR"' in line]
    assert errors, lines
    assert not [line for line in lines if PAYLOAD_MARK in line]
    assert any("stu_logged" in line for line in errors)
    assert any("refused by the test" in line for line in errors)


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_cli_moments_beyond_utc_are_a_usage_error(runner, moment):
    """The commands' --since/--until refuse such a moment as the API does (exit 2, no trace)."""
    for args in (["requeue", "--since", moment], ["replay", "--user", "u", "--until", moment]):
        result = runner.invoke(args=["bucket", *args])
        assert result.exit_code == 2, (result.output, result.exception)
        assert "UTC" in result.output
