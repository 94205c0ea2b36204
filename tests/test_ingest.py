"""Single-packet ingest: validation per CONTRACT.md, the one error shape, CORS and idempotency."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from http import HTTPStatus

import pytest

from tests.factories import fixture, make_packet
from tests.queue_helpers import stored

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
ORIGIN = "http://localhost:5173"
BRIDGE_HEADERS = "content-type,x-client-timestamp,x-prana-batch-id,idempotency-key"


def assert_error(response, code: int, *fields: str, location: str = "json") -> dict:
    """The response is the service's one JSON error shape and names each offending field."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.json
    assert body["code"] == code
    assert body["status"] == HTTPStatus(code).phrase
    assert isinstance(body["message"], str) and body["message"]
    for field in fields:
        assert field in body["errors"][location], body
    return body


def post_raw(client, data: bytes | str, content_type: str = "application/json", **kwargs):
    return client.post(INGEST, data=data, content_type=content_type, **kwargs)


# --- accepted packets ---------------------------------------------------------------------------


def test_gurukul_fixture_is_stored_with_every_field_and_seed_response(client, app):
    """The bridge's packet is committed as sent and answered in the seed's response shape."""
    packet = fixture("gurukul_packet.json")
    response = client.post(INGEST, json=packet)
    assert response.status_code == 200
    body = response.json
    assert set(body) == {"status", "packet_id", "received_at"}
    assert body["status"] == "ingested"
    assert datetime.fromisoformat(body["received_at"]).utcoffset().total_seconds() == 0

    (row,) = stored(app)
    assert row["packet_id"] == body["packet_id"]
    assert row["user_id"] == "stu_1042"
    assert row["employee_id"] is None
    assert row["session_id"] == "sess_9f2c41"
    assert row["lesson_id"] == "lesson_algebra_07"
    assert row["cognitive_state"] == "DEEP_FOCUS"
    assert row["state"] is None
    assert (row["active_seconds"], row["idle_seconds"], row["away_seconds"]) == (4.8, 0.2, 0.0)
    assert row["focus_score"] == 85
    assert row["raw_signals"] == packet["raw_signals"]
    assert row["client_timestamp"] == datetime(2026, 11, 28, 10, 15, 5, 4000, tzinfo=UTC)
    assert row["delivery_state"] == "pending"


def test_transport_and_unknown_fields_are_tolerated_and_not_stored(client, app):
    """queued_at, retry_count and fields we never heard of do not cause a rejection."""
    packet = make_packet(
        queued_at="2026-11-28T10:00:00Z", retry_count=3, browser="firefox", extra={"nested": [1, 2]}
    )
    assert client.post(INGEST, json=packet).status_code == 200
    (row,) = stored(app)
    assert "queued_at" not in row and "browser" not in row


def test_ems_fixture_employee_id_becomes_user_and_state_is_kept_as_sent(client, app):
    """EMS: employee_id is the user and is kept; state is stored, cognitive_state not invented."""
    response = client.post(INGEST, json=fixture("ems_packet.json"))
    assert response.status_code == 200
    (row,) = stored(app)
    assert row["user_id"] == "emp_0387"
    assert row["employee_id"] == "emp_0387"
    assert row["state"] == "WORKING"
    assert row["cognitive_state"] is None
    assert row["integrity_score"] == 0.92
    assert row["task_id"] == "task_invoice_review"
    assert row["client_timestamp"] == datetime(2026, 11, 28, 4, 45, 10, tzinfo=UTC)

    polled = client.get(f"{API}/packets/pending").json["packets"]
    assert [p["packet_id"] for p in polled] == [response.json["packet_id"]]
    assert polled[0]["cognitive_state"] == "WORKING"
    assert polled[0]["user_id"] == "emp_0387"


def test_user_id_wins_when_both_identities_are_sent(client, app):
    """With user_id and employee_id, user_id is the user and employee_id is kept beside it."""
    assert (
        client.post(INGEST, json=make_packet(user_id="u_1", employee_id="emp_1")).status_code == 200
    )
    (row,) = stored(app)
    assert (row["user_id"], row["employee_id"]) == ("u_1", "emp_1")


def test_null_user_id_next_to_employee_id_counts_as_absent(client, app):
    """An EMS client sending user_id: null and cognitive_state: null beside state is accepted."""
    packet = make_packet(user_id=None, employee_id="emp_9", cognitive_state=None, state="IDLE")
    assert client.post(INGEST, json=packet).status_code == 200
    (row,) = stored(app)
    assert (row["user_id"], row["state"], row["cognitive_state"]) == ("emp_9", "IDLE", None)


@pytest.mark.parametrize(
    "timestamp, instant",
    [
        ("2026-11-28T10:00:00Z", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2026-11-28T15:30:00+05:30", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2026-11-28T05:00:00.250-05:00", datetime(2026, 11, 28, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2026-11-28T10:00:00", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2026-11-28 10:00:00Z", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("1900-01-01T00:00:00+05:00", datetime(1899, 12, 31, 19, 0, tzinfo=UTC)),
        ("2999-12-31T23:59:59-05:00", datetime(3000, 1, 1, 4, 59, 59, tzinfo=UTC)),
    ],
    ids=[
        "zulu",
        "positive-offset",
        "negative-offset",
        "naive-is-utc",
        "space-for-t",
        "first-year-with-offset",
        "last-year-with-offset",
    ],
)
def test_timestamp_forms_are_stored_as_the_utc_instant(make_app, timestamp, instant):
    """Z, an offset, or no zone (meaning UTC) all become the same UTC instant (the whole range
    the pattern allows, so the future limit is lifted here: tests/test_ingest_auth.py)."""
    app = make_app(BUCKET_MAX_CLOCK_SKEW=10**12)
    client = app.test_client()
    assert client.post(INGEST, json=make_packet(timestamp=timestamp)).status_code == 200
    (row,) = stored(app)
    assert row["client_timestamp"] == instant
    polled = client.get(f"{API}/packets/pending").json["packets"][0]
    assert datetime.fromisoformat(polled["client_timestamp"]) == instant


@pytest.mark.parametrize(
    "split",
    [(5.0, 0.0, 0.0), (4.9, 0.0, 0.0), (4.0, 1.1, 0.0), (0, 0, 5), (2, 2, 1)],
    ids=["exact", "low-edge", "high-edge", "integers-away", "integers-mixed"],
)
def test_window_within_tolerance_is_accepted(client, split):
    """active + idle + away of 5.0 s ± 0.1 (integers included) is a valid window."""
    active, idle, away = split
    packet = make_packet(active_seconds=active, idle_seconds=idle, away_seconds=away)
    assert client.post(INGEST, json=packet).status_code == 200


def test_nullable_fields_accept_null(client, app):
    """session, lesson, task, system_type, role, focus and integrity scores may be null."""
    packet = make_packet(
        session_id=None,
        lesson_id=None,
        task_id=None,
        system_type=None,
        role=None,
        focus_score=None,
        integrity_score=None,
    )
    assert client.post(INGEST, json=packet).status_code == 200
    (row,) = stored(app)
    assert row["session_id"] is None and row["focus_score"] is None


def test_identifiers_of_256_characters_are_accepted(client, app):
    """The 256-character upper bound is inclusive."""
    long_id = "u" * 256
    assert (
        client.post(INGEST, json=make_packet(user_id=long_id, session_id=long_id)).status_code
        == 200
    )
    assert stored(app)[0]["user_id"] == long_id


# --- rejected packets ---------------------------------------------------------------------------

INVALID = [
    ("user_id", ""),
    ("user_id", "u" * 257),
    ("user_id", 42),
    ("employee_id", ""),
    ("session_id", "s" * 257),
    ("session_id", ""),
    ("lesson_id", 7),
    ("task_id", "t" * 257),
    ("system_type", "classroom"),
    ("role", "teacher"),
    ("timestamp", "yesterday"),
    ("timestamp", 1764324000),
    ("timestamp", "2026-13-01T00:00:00Z"),
    ("timestamp", "2026-11-28T10:00:00+25:00"),
    ("timestamp", "0001-01-01T00:00:00+01:00"),
    ("timestamp", "9999-12-31T23:59:59-01:00"),
    ("timestamp", "1899-12-31T23:59:59Z"),
    ("timestamp", "3000-01-01T00:00:00Z"),
    ("timestamp", "2026-11-28"),
    ("timestamp", "20261128T100000Z"),
    ("timestamp", None),
    ("cognitive_state", "HAPPY"),
    ("cognitive_state", "on_task"),
    ("state", "SLEEPING"),
    ("state", "DEEP_FOCUS"),
    ("active_seconds", "4.0"),
    ("active_seconds", True),
    ("active_seconds", -1.0),
    ("active_seconds", None),
    ("idle_seconds", "1"),
    ("idle_seconds", False),
    ("away_seconds", [0]),
    ("focus_score", 100.5),
    ("focus_score", -0.1),
    ("focus_score", "85"),
    ("focus_score", True),
    ("integrity_score", 1.01),
    ("integrity_score", -0.5),
    ("integrity_score", "0.9"),
    ("raw_signals", ["tab_visible"]),
    ("raw_signals", "tab_visible=true"),
    ("raw_signals", None),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}"[:40] for f, v in INVALID])
def test_invalid_field_is_rejected_by_name_and_not_stored(client, app, field, value):
    """Each contract rule refuses a bad value with 422 naming the field; nothing is stored."""
    packet = make_packet(**{field: value})
    if field in ("active_seconds", "idle_seconds", "away_seconds"):
        packet.update(
            {"active_seconds": 4.0, "idle_seconds": 1.0, "away_seconds": 0.0, field: value}
        )
    assert_error(client.post(INGEST, json=packet), 422, field)
    assert stored(app) == []


@pytest.mark.parametrize("field", ["user_id", "employee_id", "session_id", "lesson_id", "task_id"])
def test_nul_characters_in_identifiers_are_refused_not_a_500(client, app, field):
    """PostgreSQL text cannot hold NUL, so it is a 422 naming the field on every backend."""
    assert_error(client.post(INGEST, json=make_packet(**{field: "a\u0000b"})), 422, field)
    assert stored(app) == []


def test_nul_inside_raw_signals_is_stored_and_returned_intact(client):
    """raw_signals is free-form JSON: an escaped NUL inside it survives the round trip."""
    signals = {"label": "a\u0000b", "nested": {"k": [1, "\u0000"]}}
    assert client.post(INGEST, json=make_packet(raw_signals=signals)).status_code == 200
    polled = client.get(f"{API}/packets/pending").json["packets"]
    assert polled[0]["raw_signals"] == signals


@pytest.mark.parametrize(
    "missing", ["timestamp", "active_seconds", "idle_seconds", "away_seconds", "raw_signals"]
)
def test_missing_required_field_is_rejected_by_name(client, missing):
    """Every required field is required."""
    packet = make_packet()
    del packet[missing]
    assert_error(client.post(INGEST, json=packet), 422, missing)


@pytest.mark.parametrize(
    "identity", [{}, {"user_id": None}, {"user_id": None, "employee_id": None}]
)
def test_a_packet_without_any_identity_is_rejected_under_user_id(client, identity):
    """user_id is required unless employee_id is given (null is the same as absent)."""
    packet = make_packet()
    del packet["user_id"]
    packet.update(identity)
    assert_error(client.post(INGEST, json=packet), 422, "user_id")


@pytest.mark.parametrize("states", [{}, {"cognitive_state": None}, {"state": None}])
def test_a_packet_without_any_state_is_rejected_under_cognitive_state(client, states):
    """One of cognitive_state / state is required."""
    packet = make_packet()
    del packet["cognitive_state"]
    packet.update(states)
    assert_error(client.post(INGEST, json=packet), 422, "cognitive_state")


@pytest.mark.parametrize("split", [(4.0, 0.8, 0.0), (4.0, 1.0, 0.2), (0, 0, 0), (5, 5, 5)])
def test_window_outside_tolerance_is_rejected(client, app, split):
    """A window whose parts do not sum to 5.0 s ± 0.1 is refused (under active_seconds)."""
    active, idle, away = split
    packet = make_packet(active_seconds=active, idle_seconds=idle, away_seconds=away)
    body = assert_error(client.post(INGEST, json=packet), 422, "active_seconds")
    assert "5.0" in body["errors"]["json"]["active_seconds"][0]
    assert stored(app) == []


def test_every_offending_field_is_named_at_once(client):
    """A packet with several faults lists each of them, not only the first."""
    packet = make_packet(
        user_id="",
        role="admin",
        focus_score=500,
        raw_signals=[],
        timestamp="soon",
        cognitive_state="BORED",
    )
    del packet["idle_seconds"]
    assert_error(
        client.post(INGEST, json=packet),
        422,
        "user_id",
        "role",
        "focus_score",
        "raw_signals",
        "timestamp",
        "cognitive_state",
        "idle_seconds",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "u", "active_seconds": NaN}',
        b'{"active_seconds": Infinity}',
        b'{"active_seconds": 1e400}',
        b'{"user_id": "u",',
        b"{'user_id': 'u'}",
        b"\xff\xfe{}",
        b"not json at all",
    ],
    ids=["nan", "infinity", "overflow", "truncated", "single-quotes", "bad-utf8", "prose"],
)
def test_malformed_json_is_a_400_json_error(client, app, raw):
    """Bodies that are not JSON (NaN and Infinity included) get 400 in the one shape."""
    response = post_raw(client, raw)
    body = assert_error(response, 400)
    assert body["errors"]["json"]
    assert stored(app) == []


@pytest.mark.parametrize("value", ["[]", "[{}]", '"packet"', "5", "null", "true"])
def test_a_json_value_that_is_not_an_object_is_rejected(client, value):
    """Arrays, strings, numbers, null and booleans are not packets."""
    body = assert_error(post_raw(client, value), 422)
    assert body["errors"]["json"]


@pytest.mark.parametrize("raw", [b"", b"   \n  "], ids=["empty", "whitespace"])
def test_an_empty_body_is_a_400_json_error(client, raw):
    """No body at all is refused in the one shape."""
    body = assert_error(post_raw(client, raw), 400)
    assert body["errors"]["json"]


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "application/xml", "multipart/form-data; boundary=x"],
)
def test_wrong_content_type_is_a_415_json_error(client, app, content_type):
    """Only JSON (or sendBeacon's text/plain) bodies are read."""
    response = post_raw(client, json.dumps(make_packet()), content_type)
    body = assert_error(response, 415)
    assert "Content-Type" in body["errors"]["headers"]
    assert stored(app) == []


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", ""])
def test_send_beacon_text_plain_body_is_accepted_like_json(client, app, content_type):
    """navigator.sendBeacon posts the same JSON as text/plain; it is stored like JSON."""
    response = post_raw(client, json.dumps(make_packet(user_id="beacon")), content_type)
    assert response.status_code == 200
    assert response.json["status"] == "ingested"
    assert [row["user_id"] for row in stored(app)] == ["beacon"]


def test_body_over_the_limit_is_a_413_json_error(make_app):
    """Bodies larger than BUCKET_MAX_BODY_BYTES are refused with 413 in the one shape."""
    app = make_app(BUCKET_MAX_BODY_BYTES=2048)
    client = app.test_client()
    small = make_packet(raw_signals={"pad": "x" * 1000})
    assert client.post(INGEST, json=small).status_code == 200
    big = make_packet(raw_signals={"pad": "x" * 3000})
    assert_error(client.post(INGEST, json=big), 413)
    beacon = post_raw(client, json.dumps(big), "text/plain")
    assert_error(beacon, 413)
    assert len(stored(app)) == 1


def test_chunked_body_over_the_limit_is_a_413_not_a_truncated_read(make_app):
    """A chunked body (no Content-Length) over the limit is refused, not cut and misread."""
    app = make_app(BUCKET_MAX_BODY_BYTES=2048)
    client = app.test_client()

    def chunked(packet: dict):
        return client.post(
            INGEST,
            input_stream=io.BytesIO(json.dumps(packet).encode()),
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
            environ_overrides={"wsgi.input_terminated": True},
        )

    assert chunked(make_packet(raw_signals={"pad": "x" * 500})).status_code == 200
    assert_error(chunked(make_packet(raw_signals={"pad": "x" * 5000})), 413)
    assert len(stored(app)) == 1


def test_unknown_path_is_a_404_json_error(client):
    """404 keeps the one JSON shape (never an HTML page)."""
    assert_error(client.get(f"{API}/nowhere"), 404)
    assert_error(client.get("/favicon.ico"), 404)


def test_wrong_method_is_a_405_json_error_with_allow(client):
    """GET on ingest is 405 in the one JSON shape, naming the allowed methods."""
    response = client.get(INGEST)
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_error(client.delete(f"{API}/packets/pending"), 405)


def test_overlong_idempotency_key_is_refused(client, app):
    """An Idempotency-Key longer than 255 characters is a 400 naming the header."""
    response = client.post(INGEST, json=make_packet(), headers={"Idempotency-Key": "k" * 256})
    body = assert_error(response, 400, "Idempotency-Key", location="headers")
    assert body["message"]
    assert stored(app) == []


# --- CORS ---------------------------------------------------------------------------------------


def preflight(client, origin: str = ORIGIN):
    return client.options(
        INGEST,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": BRIDGE_HEADERS,
        },
    )


def test_preflight_from_the_dev_platform_allows_the_bridge_headers(client):
    """The browser's preflight for the bridge's custom headers is granted."""
    response = preflight(client)
    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert {"content-type", "x-client-timestamp", "x-prana-batch-id", "idempotency-key"} <= allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_cross_origin_post_carries_the_allow_origin_header(client):
    """The actual POST answer lets the page read the response."""
    response = client.post(
        INGEST, json=make_packet(), headers={"Origin": ORIGIN, "X-CLIENT-TIMESTAMP": "1"}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")


@pytest.mark.parametrize(
    "body",
    [make_packet(role="x"), {"packets": [make_packet(role="x")]}, []],
    ids=["packet", "batch", "not-an-object"],
)
def test_error_answers_carry_cors_headers_so_the_page_can_read_them(client, body):
    """A rejected cross-origin post is readable by the page (it must not retry it blindly)."""
    response = client.post(INGEST, json=body, headers={"Origin": ORIGIN})
    assert response.status_code == 422
    assert response.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")


def test_cors_origins_setting_restricts_who_may_post(make_app):
    """With BUCKET_CORS_ORIGINS set, only the listed origins get CORS grants."""
    app = make_app(BUCKET_CORS_ORIGINS=["https://gurukul.example", ORIGIN])
    client = app.test_client()
    granted = preflight(client, "https://gurukul.example")
    assert granted.headers["Access-Control-Allow-Origin"] == "https://gurukul.example"
    assert preflight(client).headers["Access-Control-Allow-Origin"] == ORIGIN
    refused = preflight(client, "https://evil.example")
    assert "Access-Control-Allow-Origin" not in refused.headers
    post = client.post(INGEST, json=make_packet(), headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in post.headers


def test_operating_names_from_the_environment_apply(make_app, monkeypatch):
    """BUCKET_CORS_ORIGINS (comma-separated) and BUCKET_MAX_BODY_BYTES are read from the env."""
    monkeypatch.setenv("BUCKET_CORS_ORIGINS", "https://gurukul.example, http://localhost:5173")
    monkeypatch.setenv("BUCKET_MAX_BODY_BYTES", "1500")
    client = make_app().test_client()
    assert preflight(client).headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Access-Control-Allow-Origin" not in preflight(client, "https://evil.example").headers
    assert_error(client.post(INGEST, json=make_packet(raw_signals={"pad": "x" * 2000})), 413)


# --- idempotency --------------------------------------------------------------------------------


def test_same_packet_twice_returns_the_original_id_and_one_row(client, app):
    """A retried packet is answered with its original packet_id and duplicate: true."""
    packet = make_packet()
    first = client.post(INGEST, json=packet).json
    second = client.post(INGEST, json={**packet, "retry_count": 1}).json
    assert "duplicate" not in first
    assert second["status"] == "ingested"
    assert second["duplicate"] is True
    assert second["packet_id"] == first["packet_id"]
    assert second["received_at"] == first["received_at"]
    assert len(stored(app)) == 1


def test_a_duplicate_is_served_only_once(client):
    """Two copies of a packet are delivered as one."""
    packet = make_packet()
    client.post(INGEST, json=packet)
    client.post(INGEST, json=packet)
    polled = client.get(f"{API}/packets/pending?limit=10").json
    assert polled["count"] == 1
    assert client.get(f"{API}/packets/pending?limit=10").json["count"] == 0


@pytest.mark.parametrize(
    "first, second",
    [
        ("2026-11-28T10:00:00.123Z", "2026-11-28T15:30:00.123+05:30"),
        ("2026-11-28T10:00:00.123Z", "2026-11-28T10:00:00.123"),
        ("2026-11-28T10:00:00.123Z", "2026-11-28T10:00:00.123000+00:00"),
        ("2026-11-28T10:00:00.1231Z", "2026-11-28T10:00:00.1239Z"),
        ("2026-11-28T10:00:00.123001Z", "2026-11-28T04:30:00.123999-05:30"),
    ],
    ids=["zulu-vs-offset", "zulu-vs-naive", "zulu-vs-explicit-utc", "sub-ms", "sub-ms-offset"],
)
def test_timestamps_equal_as_instants_are_duplicates(client, app, first, second):
    """The timestamp is compared as a UTC instant at millisecond precision."""
    original = client.post(INGEST, json=make_packet(timestamp=first)).json
    again = client.post(INGEST, json=make_packet(timestamp=second)).json
    assert again.get("duplicate") is True
    assert again["packet_id"] == original["packet_id"]
    assert len(stored(app)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"timestamp": "2026-11-28T10:00:00.124Z"},
        {"session_id": "another_session"},
        {"session_id": None},
        {"user_id": "another_user"},
        {"system_type": "ems"},
        {"system_type": None},
    ],
    ids=["next-ms", "session", "null-session", "user", "system", "null-system"],
)
def test_packets_differing_in_identity_are_both_stored(client, app, change):
    """Only (system_type, user_id, session_id, timestamp) decides identity."""
    base = make_packet(timestamp="2026-11-28T10:00:00.123Z")
    first = client.post(INGEST, json=base).json
    second = client.post(INGEST, json={**base, **change}).json
    assert "duplicate" not in second
    assert second["packet_id"] != first["packet_id"]
    assert len(stored(app)) == 2


def test_nulls_in_the_identity_are_equal(client, app):
    """Two packets with null session_id and system_type and the same instant are one."""
    packet = make_packet(session_id=None, system_type=None)
    first = client.post(INGEST, json=packet).json
    second = client.post(INGEST, json=packet).json
    assert second["duplicate"] is True and second["packet_id"] == first["packet_id"]
    assert len(stored(app)) == 1


def test_payload_changes_do_not_break_identity(client, app):
    """A retry whose scores or signals changed is still the same packet; the first copy stays."""
    packet = make_packet(focus_score=10)
    first = client.post(INGEST, json=packet).json
    second = client.post(INGEST, json={**packet, "focus_score": 99}).json
    assert second["packet_id"] == first["packet_id"]
    (row,) = stored(app)
    assert row["focus_score"] == 10


def test_idempotency_key_repeat_is_a_duplicate_even_with_another_identity(client, app):
    """A repeat carrying the same Idempotency-Key returns the original packet."""
    headers = {"Idempotency-Key": "bridge-key-1"}
    first = client.post(INGEST, json=make_packet(), headers=headers).json
    second = client.post(INGEST, json=make_packet(), headers=headers).json
    assert second["duplicate"] is True
    assert second["packet_id"] == first["packet_id"]
    third = client.post(
        INGEST, json=make_packet(), headers={"Idempotency-Key": "bridge-key-2"}
    ).json
    assert "duplicate" not in third
    assert len(stored(app)) == 2


def test_idempotency_keys_of_different_users_never_collide(client, app):
    """Two browsers choosing the same key keep both packets: a key belongs to its user."""
    headers = {"Idempotency-Key": "1"}
    first = client.post(INGEST, json=make_packet(user_id="stu_x"), headers=headers).json
    second = client.post(INGEST, json=make_packet(user_id="stu_y"), headers=headers).json
    assert "duplicate" not in second
    assert second["packet_id"] != first["packet_id"]
    assert sorted(row["user_id"] for row in stored(app)) == ["stu_x", "stu_y"]


def test_natural_duplicate_with_a_new_idempotency_key_is_still_a_duplicate(client, app):
    """Matching either the key or the natural identity makes a duplicate."""
    packet = make_packet()
    first = client.post(INGEST, json=packet, headers={"Idempotency-Key": "a"}).json
    second = client.post(INGEST, json=packet, headers={"Idempotency-Key": "b"}).json
    assert second["duplicate"] is True and second["packet_id"] == first["packet_id"]
    assert len(stored(app)) == 1


def test_ems_retry_is_a_duplicate(client, app):
    """EMS packets are identified through the user id their employee_id became."""
    first = client.post(INGEST, json=fixture("ems_packet.json")).json
    retry = {**fixture("ems_packet.json"), "timestamp": "2026-11-28T04:45:10Z"}
    second = client.post(INGEST, json=retry).json
    assert second["duplicate"] is True and second["packet_id"] == first["packet_id"]
    assert len(stored(app)) == 1


def test_duplicate_of_a_processed_packet_does_not_requeue_it(client, app):
    """A late retry of an already processed packet changes nothing."""
    packet = make_packet()
    packet_id = client.post(INGEST, json=packet).json["packet_id"]
    client.get(f"{API}/packets/pending")
    client.post(f"{API}/packets/mark-processed", json={"packet_id": packet_id, "success": True})
    again = client.post(INGEST, json=packet).json
    assert again["packet_id"] == packet_id and again["duplicate"] is True
    (row,) = stored(app)
    assert row["delivery_state"] == "processed"
    assert client.get(f"{API}/packets/pending").json["count"] == 0
