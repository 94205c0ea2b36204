"""A packet's five numbers as scaled smallints on PostgreSQL (migration 0026): a value a bridge
sends with few decimals is stored as value x scale, any other as the float received, and every
reader (ingest's answer, the poll, the user listing, the artifact, the model, the audit leaf)
sees exactly the float sent, -0.0 included. SQLite stores every number as received.
"""

from __future__ import annotations

import re

import orjson
import pytest
from psycopg.errors import UndefinedColumn
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from bucket.extensions import db
from bucket.models import PACKET_SCALES, Packet
from bucket.schemas.packets import fast_load_packet
from bucket.services import codes
from bucket.timeutil import epoch_now, utc_now
from tests.factories import make_packet
from tests.queue_helpers import API, listing, poll

SCALED = tuple(PACKET_SCALES)
STORED_SQL = "SELECT CAST(packet_id AS TEXT) AS packet_id, {} FROM packets".format(
    ", ".join(f"{name}_float, {name}_scaled" for name in SCALED)
)
# Each packet's numbers as sent, and how PostgreSQL must store each: scaled (the integer) or
# as the float (None in the scaled column).
SENT = {
    "typical": (
        {"active_seconds": 4.8, "idle_seconds": 0.2, "away_seconds": 0.0, "focus_score": 85},
        {"active_seconds": 4800, "idle_seconds": 200, "away_seconds": 0, "focus_score": 8500},
    ),
    "ems": (
        {
            "active_seconds": 3.9,
            "idle_seconds": 1.1,
            "away_seconds": 0,
            "focus_score": None,
            "integrity_score": 0.92,
        },
        {"active_seconds": 3900, "idle_seconds": 1100, "away_seconds": 0, "integrity_score": 9200},
    ),
    "awkward": (
        {
            "active_seconds": 1 / 3,
            "idle_seconds": 5 - 1 / 3,
            "away_seconds": -0.0,
            "focus_score": 70.12345678901234,
            "integrity_score": 0.123456,
        },
        {},
    ),
    "edges": (
        {
            "active_seconds": 0.001,
            "idle_seconds": 4.999,
            "away_seconds": 0.0,
            "focus_score": 100,
            "integrity_score": 1,
        },
        {
            "active_seconds": 1,
            "idle_seconds": 4999,
            "away_seconds": 0,
            "focus_score": 10_000,
            "integrity_score": 10_000,
        },
    ),
}


def exact(value, backend: str = "postgres") -> str | None:
    """A number as a reader must show it: the float sent, sign of zero included (SQLite
    stores a REAL that is a whole number as an integer, so its -0.0 comes back as 0.0, as it
    always has)."""
    if value is None:
        return None
    return repr(0.0) if backend == "sqlite" and value == 0 else repr(float(value))


def numbers(packet: dict, backend: str = "postgres") -> dict:
    return {name: exact(packet.get(name), backend) for name in SCALED}


def post_all(client, batch: bool) -> dict[str, str]:
    bodies = {name: make_packet(**values) for name, (values, _) in SENT.items()}
    if batch:
        response = client.post(f"{API}/ingest", json={"packets": list(bodies.values())})
        assert response.status_code in (200, 201), response.json
        return dict(zip(bodies, [r["packet_id"] for r in response.json["results"]], strict=True))
    ids = {}
    for name, body in bodies.items():
        response = client.post(f"{API}/ingest", json=body)
        assert response.status_code == 200, response.json
        ids[name] = response.json["packet_id"]
    return ids


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_numbers_with_few_decimals_are_stored_scaled_and_read_back_exactly(
    app, client, backend, batch
):
    """Single packets and a batch envelope (two statements of ingest): on PostgreSQL each
    number with few decimals is stored as its integer, float NULL, and a third, a long
    decimal and -0.0 as floats; SQLite keeps every float. The poll, the listing, the
    artifacts and the model show every number as sent, and the seal over them verifies."""
    ids = post_all(client, batch)
    with app.app_context():
        stored = {row["packet_id"]: row for row in db.session.execute(text(STORED_SQL)).mappings()}
        db.session.commit()
    for name, (values, scaled) in SENT.items():
        row = stored[ids[name]]
        expected = scaled if backend == "postgres" else {}
        assert {n: row[f"{n}_scaled"] for n in SCALED if row[f"{n}_scaled"] is not None} == (
            expected
        ), name
        floats = {n: exact(row[f"{n}_float"]) for n in SCALED if row[f"{n}_float"] is not None}
        assert floats == {
            n: exact(v, backend) for n, v in values.items() if v is not None and n not in expected
        }, name

    sent = {ids[name]: numbers(values, backend) for name, (values, _) in SENT.items()}
    polled = {p["packet_id"]: numbers(p) for p in poll(client, limit=10)["packets"]}
    assert polled == sent
    listed = {p["packet_id"]: numbers(p) for p in listing(client, "stu_test", limit=10)}
    assert listed == sent
    runner = app.test_cli_runner()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "4 packets" in verified.output, verified.output
    for packet_id, expected in sent.items():
        data = client.get(f"/api/v1/audit/artifact/{packet_id}").json["data"]
        assert numbers(data) == expected
        with app.app_context():
            model = db.session.get(Packet, packet_id)
            assert {name: exact(getattr(model, name)) for name in SCALED} == expected
            db.session.commit()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite stores floats only
def test_an_altered_scaled_number_is_named_by_verify(app, client):
    """The leaf of a scaled row is the leaf of the same row with its floats written back (as
    stored before migration 0026); a scaled integer changed afterwards is named by verify."""
    from bucket.services.audit.content import LEAF_FROM, LEAF_SQL

    response = client.post(f"{API}/ingest", json=make_packet(**SENT["typical"][0]))
    packet_id = response.json["packet_id"]
    leaf_sql = f"SELECT {LEAF_SQL} FROM {LEAF_FROM} WHERE packets.packet_id = :id"
    as_floats = ", ".join(
        f"{name}_float = {codes.decoded_sql(name, 'packets')}, {name}_scaled = NULL"
        for name in SCALED
    )
    with app.app_context():
        scaled = db.session.execute(text(leaf_sql), {"id": packet_id}).scalar()
        db.session.execute(
            text(f"UPDATE packets SET {as_floats} WHERE packet_id = :id"), {"id": packet_id}
        )
        unscaled = db.session.execute(
            text("SELECT active_seconds_float, active_seconds_scaled FROM packets")
        ).one()
        floats = db.session.execute(text(leaf_sql), {"id": packet_id}).scalar()
        db.session.rollback()
    assert tuple(unscaled) == (4.8, None)
    assert bytes(scaled) == bytes(floats)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    assert runner.invoke(args=["bucket", "verify"]).exit_code == 0
    with app.app_context():
        db.session.execute(
            text("UPDATE packets SET focus_score_scaled = 9900 WHERE packet_id = :id"),
            {"id": packet_id},
        )
        db.session.commit()
    result = runner.invoke(args=["bucket", "verify"])
    assert result.exit_code != 0 and packet_id in result.output, result.output


@pytest.mark.parametrize(
    ("value", "scale", "expected"),
    [
        (4.8, 1000, 4800),
        (5, 1000, 5000),
        (0.0, 1000, 0),
        (-0.0, 1000, None),  # would come back as 0.0
        (1 / 3, 1000, None),
        (0.1 + 0.2, 1000, None),  # 0.30000000000000004
        (32.767, 1000, 32_767),
        (32.768, 1000, None),  # beyond a smallint
        (-1.0, 1000, None),
        (float("nan"), 100, None),
        (float("inf"), 100, None),
        (True, 100, None),
        ("5", 100, None),
        (None, 100, None),
        (99.99, 100, 9999),
        (0.0001, 10_000, 1),
    ],
)
def test_scaled_is_the_integer_only_when_it_gives_back_the_float(value, scale, expected):
    """A plain check of the rule ingest applies: the integer, or None to keep the float."""
    assert codes.scaled(value, scale) == expected
    if expected is not None:
        assert expected / scale == value


def as_before_0026(statement: str) -> str:
    """A statement of today's service as the release before migration 0026 sent it, as far as
    the numbers go: each read and written under the field's own name."""
    for name in SCALED:
        statement = statement.replace(codes.decoded_sql(name, "p"), f"p.{name}")
        statement = re.sub(rf"\b{name}_float\b", name, statement)
    return statement


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # several instances: PostgreSQL
def test_an_instance_of_a_release_before_0026_fails_instead_of_serving_numbers_as_null(app, client):
    """During an upgrade the previous release's instances keep answering beside the new ones.
    They read the numbers' columns by the fields' names, so on a scaled row they would lease
    and list null numbers: since 0026 those columns are named ``<name>_float`` and their lease
    and their ingest fail instead, leasing and storing nothing; the packet reaches the consumer
    whole through a new instance."""
    from bucket.services import sql
    from bucket.services.delivery.claims import PG_LEASE, lease_params
    from bucket.services.ingest import BATCH_INSERT_SQL, packet_row

    body = make_packet(**SENT["typical"][0])
    packet_id = client.post(f"{API}/ingest", json=body).json["packet_id"]
    with app.app_context():
        now = epoch_now()
        params = lease_params(
            now, 5, receipt="old-release", until=now + 30, source="pending", limit=10
        )
        old_lease = as_before_0026(PG_LEASE)
        assert "p.active_seconds AS active_seconds" in old_lease
        with pytest.raises(ProgrammingError) as refused:
            sql.run(old_lease, params)
        assert isinstance(refused.value.orig, UndefinedColumn)
        row = packet_row(fast_load_packet(make_packet(user_id="stu_later")), utc_now(), None)
        # The earlier release's rows held the numbers under the fields' names, and no integers.
        row.update({name: row.pop(column) for name, column in codes.FLOAT_COLUMNS.items()})
        for name in SCALED:
            del row[f"{name}_scaled"]
        doc = orjson.dumps([row], option=orjson.OPT_NAIVE_UTC).decode()
        with pytest.raises(ProgrammingError) as refused:
            sql.run(as_before_0026(BATCH_INSERT_SQL), {"doc": doc})
        assert isinstance(refused.value.orig, UndefinedColumn)
        db.session.rollback()
    (polled,) = poll(client, limit=10)["packets"]
    assert polled["packet_id"] == packet_id and polled["delivery_count"] == 1
    assert numbers(polled) == numbers(SENT["typical"][0])
    assert listing(client, "stu_later") == []
