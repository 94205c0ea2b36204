"""A leaf's bytes: PostgreSQL's ``record_send`` and the Python encoder agree on every value,
the standalone verifier reads them back, and ingest stores raw_signals canonically.

The sealer lets PostgreSQL encode leaves while ``verify``, the artifact endpoint and SQLite
encode them in Python: one byte of difference would report every sealed packet as altered.
"""

from __future__ import annotations

import importlib.util
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from bucket.extensions import db
from bucket.models import PACKET_SCALES, Packet
from bucket.services.audit.content import (
    FIELDS,
    LEAF_FROM,
    LEAF_SELECT,
    LEAF_SQL,
    json_leaf_content,
    leaf_content,
)
from bucket.services.audit.sealing import seal_everything
from bucket.services.codes import AS_RECEIVED, CODE_COLUMNS, field_name, scaled
from bucket.services.signals import stored_signals_text
from tests.factories import make_packet

API = "/api/v1/bucket/prana"
VERIFIER = Path(__file__).resolve().parent.parent / "tools" / "verify_proof.py"

# Text PostgreSQL can hold (no NUL), any script; floats as stored (no NaN or infinities, which
# validation refuses); timestamps across the range the published pattern allows.
CHARACTERS = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
TEXT = st.text(CHARACTERS, max_size=40)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
# Numbers as bridges send them (a few decimals, in range): stored scaled (migration 0026).
FEW_DECIMALS = st.one_of(
    st.integers(0, 5000).map(lambda n: n / 1000),
    st.integers(0, 10_000).map(lambda n: n / 100),
    st.integers(0, 100),
    st.sampled_from([0.0, -0.0, 5.0, 4.8, 0.1, 32.767, 32.768, 1e-7, 3.0000001]),
)
NUMBER = st.one_of(FLOAT, FEW_DECIMALS)
TIMESTAMP = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2999, 12, 31, 23, 59, 59, 999999)
)
SIGNALS = st.dictionaries(
    TEXT, st.none() | st.booleans() | st.integers(-(2**53), 2**53) | FLOAT | TEXT, max_size=5
)


@st.composite
def packet_rows(draw) -> dict:
    row = {}
    for column in Packet.__table__.columns:  # text within each column's declared length
        size = min(40, getattr(column.type, "length", None) or 40)
        row[field_name(column.name)] = draw(st.none() | st.text(CHARACTERS, max_size=size))
    row["packet_id"] = str(uuid.uuid4())
    row["seq"] = draw(st.integers(1, 2**62))
    row["dedup_key"] = uuid.uuid4().hex
    if row["idempotency_key"] is not None:  # unique where set
        row["idempotency_key"] += uuid.uuid4().hex
    row["user_id"] = draw(st.text(CHARACTERS, max_size=40))
    for name in ("active_seconds", "idle_seconds", "away_seconds"):
        row[name] = draw(NUMBER)
    for name in ("focus_score", "integrity_score"):
        row[name] = draw(st.none() | NUMBER)
    outcomes = [None, "verified", "missing", "invalid", "mismatch"]
    row["auth_outcome"] = draw(st.sampled_from(outcomes))
    row["stale"] = draw(st.booleans())
    row["client_timestamp"] = draw(TIMESTAMP)
    row["received_at"] = draw(TIMESTAMP)
    row["raw_signals"] = orjson.dumps(draw(SIGNALS), option=orjson.OPT_SORT_KEYS).decode()
    return row


def load_verifier():
    spec = importlib.util.spec_from_file_location("verify_proof", VERIFIER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_packet_column_is_in_the_leaf():
    """A column added to packets must be placed in the leaf deliberately (a new leaf format
    for the packets stored after it), never by reading the model: that would change the bytes
    of every packet sealed before it."""
    # raw_signals' compact form on PostgreSQL (migration 0020) is covered as raw_signals' text,
    # and the codes (migration 0022) as the text of the columns they stand for, which hold
    # their fields under ``<name>_text`` (migration 0024).
    compact_form = {"signal_keys", "signal_values", *CODE_COLUMNS}
    stored = {field_name(column.name) for column in Packet.__table__.columns}
    assert set(FIELDS) == stored - compact_form
    assert len(FIELDS) == len(set(FIELDS))
    assert load_verifier().LEAF_FIELDS == FIELDS


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Distinct seqs: each partition of packets holds a seq once (migration 0017).
@given(rows=st.lists(packet_rows(), min_size=1, max_size=4, unique_by=lambda row: row["seq"]))
def test_postgres_and_python_encode_the_same_leaf(app, rows):
    """Stored on PostgreSQL, each row's record_send bytes equal the Python encoder's over the
    row as read back: NULLs, any Unicode, -0.0 and extreme floats, timestamps before 2000.
    A number a smallint holds exactly once scaled is stored so (migration 0026), as ingest
    stores it, and read back as the very float it was."""
    scaled_columns = [f"{name}_scaled" for name in PACKET_SCALES]
    columns = ", ".join([*(AS_RECEIVED.get(name, name) for name in FIELDS), *scaled_columns])
    values = ", ".join(
        [
            *(f"CAST(:{name} AS json)" if name == "raw_signals" else f":{name}" for name in FIELDS),
            *(f":{column}" for column in scaled_columns),
        ]
    )
    stored = [dict(row) for row in rows]
    for row in stored:
        for name, scale in PACKET_SCALES.items():
            row[f"{name}_scaled"] = scaled(row[name], scale)
            if row[f"{name}_scaled"] is not None:
                row[name] = None
    with app.app_context():
        try:
            db.session.execute(
                text(f"INSERT INTO packets ({columns}) OVERRIDING SYSTEM VALUE VALUES ({values})"),
                stored,
            )
            ids = [row["packet_id"] for row in rows]
            in_postgres = dict(
                db.session.execute(
                    text(
                        f"SELECT packet_id, {LEAF_SQL} FROM {LEAF_FROM} WHERE packet_id = ANY(:ids)"
                    ),
                    {"ids": ids},
                ).all()
            )
            read_back = db.session.execute(
                select(*LEAF_SELECT).where(Packet.packet_id.in_(ids))
            ).mappings()
            sent = {row["packet_id"]: row for row in rows}
            for row in read_back:
                assert leaf_content(row) == bytes(in_postgres[row["packet_id"]]), row
                for name in PACKET_SCALES:  # repr tells -0.0 from 0.0
                    value = sent[row["packet_id"]][name]
                    assert repr(row[name]) == repr(None if value is None else float(value)), name
        finally:
            db.session.rollback()


@settings(max_examples=200, deadline=None)
@given(row=packet_rows())
def test_the_standalone_verifier_reads_back_every_value(row):
    """What the verifier decodes from the bytes is the row that was encoded."""
    stated = load_verifier().fields_of(leaf_content(row))
    for name in FIELDS:
        expected = row[name]
        if name == "raw_signals":
            expected = orjson.loads(expected)
        elif isinstance(expected, datetime):
            expected = expected.replace(tzinfo=UTC)
        if isinstance(expected, float):
            assert math.copysign(1, stated[name]) == math.copysign(1, expected)
        assert stated[name] == expected, name


@settings(max_examples=50, deadline=None)
@given(naive=packet_rows())
def test_naive_and_aware_utc_timestamps_encode_alike(naive):
    """Rows read through the models carry aware UTC datetimes, raw ones naive UTC."""
    aware = dict(naive)
    for name in ("client_timestamp", "received_at"):
        aware[name] = naive[name].replace(tzinfo=UTC)
    assert leaf_content(naive) == leaf_content(aware)
    later = dict(naive, received_at=naive["received_at"] + timedelta(microseconds=1))
    assert leaf_content(later) != leaf_content(naive)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_raw_signals_are_stored_canonically(app, client, batch):
    """Keys sorted at every depth, no whitespace: the same signals always have the same
    bytes, whichever way they arrived."""
    signals = {"zeta": 1, "alpha": {"y": [3, {"b": 1, "a": 2}], "x": 0.5}, "mid": "é"}
    packets = [make_packet(raw_signals=signals) for _ in range(2 if batch else 1)]
    body = {"packets": packets} if batch else packets[0]
    response = client.post(f"{API}/ingest", json=body)
    assert response.status_code in (200, 201), response.json
    with app.app_context():
        # As the leaf reads it: the column, or on PostgreSQL the compact form rebuilt.
        stored = db.session.execute(select(stored_signals_text())).scalars()
        expected = '{"alpha":{"x":0.5,"y":[3,{"a":2,"b":1}]},"mid":"é","zeta":1}'
        assert list(stored) == [expected] * len(packets)
        db.session.commit()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_server_with_other_encoding_and_float_defaults_seals_what_verify_reads(
    make_app, monkeypatch
):
    """A client encoding other than UTF-8 (record_send converts text to it) and rounded float
    output (Python reads floats as text) would make every such packet look altered."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    monkeypatch.setenv("PGOPTIONS", "-c extra_float_digits=0")
    app = make_app()
    client = app.test_client()
    packet = make_packet(
        user_id="José", focus_score=70.12345678901234, raw_signals={"note": "é", "x": 0.1}
    )
    response = client.post(f"{API}/ingest", json=packet)
    assert response.status_code in (200, 201), response.json
    with app.app_context():
        (sealed,) = seal_everything()
        assert sealed.packet_count == 1
    result = app.test_cli_runner().invoke(args=["bucket", "verify"])
    assert result.exit_code == 0, result.output
    answer = client.get(f"/api/v1/audit/artifact/{response.json['packet_id']}").json
    assert answer["provenance"]["matches_stored_content"] is True
    assert answer["data"]["user_id"] == "José"
    assert answer["data"]["focus_score"] == 70.12345678901234


def test_the_json_leaf_format_keeps_its_bytes_in_any_host_time_zone(monkeypatch):
    """Leaf format 1 is frozen: seals made before migration 0008 hold the SHA-256 of exactly
    these bytes. Keys sorted (raw_signals' too), times in UTC with microseconds and ``+00:00``
    whether the row's datetime is naive UTC or aware, on a host whose zone is not UTC."""
    row = {name: None for name in FIELDS}
    row.update(
        packet_id="p-1",
        seq=7,
        dedup_key="d",
        user_id="u",
        system_type="gurukul",
        client_timestamp=datetime(2026, 3, 1, 12, 0, 0),  # naive UTC, as raw SQL hands it back
        received_at=datetime(2026, 3, 1, 12, 0, 5, 250, tzinfo=UTC),
        active_seconds=1.5,
        idle_seconds=0.0,
        away_seconds=-0.0,
        raw_signals='{"zeta":1,"alpha":{"b":2,"a":1}}',
    )
    expected = (
        b'{"active_seconds":1.5,"away_seconds":-0.0,"client_timestamp":'
        b'"2026-03-01T12:00:00.000000+00:00","cognitive_state":null,"dedup_key":"d",'
        b'"employee_id":null,"focus_score":null,"idempotency_key":null,"idle_seconds":0.0,'
        b'"integrity_score":null,"lesson_id":null,"packet_id":"p-1","raw_signals":'
        b'{"alpha":{"a":1,"b":2},"zeta":1},"received_at":"2026-03-01T12:00:05.000250+00:00",'
        b'"role":null,"seq":7,"session_id":null,"state":null,"system_type":"gurukul",'
        b'"task_id":null,"user_id":"u"}'
    )
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert json_leaf_content(row) == expected
    finally:
        monkeypatch.undo()
        time.tzset()
