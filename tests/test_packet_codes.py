"""A packet's low-cardinality strings as one-byte codes on PostgreSQL (migration 0022), and an
EMS packet's employee_id NULL when it repeats its user_id. Every reader (ingest's answer, the
poll, the listings by user and by employee, the artifact, the model, the audit leaf) sees
exactly the text sent; a value outside the code table is stored as that text. SQLite stores
every value as text, as before.
"""

from __future__ import annotations

import re

import orjson
import pytest
from psycopg.errors import UndefinedColumn
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from bucket.extensions import db
from bucket.models import Packet
from bucket.schemas.packets import fast_load_packet
from bucket.services import codes
from bucket.services.coalescing import Submission
from bucket.services.ingest import write_submissions
from bucket.services.tokens import PacketAuth
from bucket.timeutil import epoch_now, utc_now
from tests.factories import fixture, make_packet
from tests.queue_helpers import API, listing, poll

CODED = ("system_type", "role", "cognitive_state", "state", "auth_outcome", "employee_id")
STORED_SQL = (
    "SELECT CAST(packet_id AS TEXT) AS packet_id, system_type_text AS system_type, "
    "role_text AS role, cognitive_state_text AS cognitive_state, state_text AS state, "
    "auth_outcome_text AS auth_outcome, employee_id, system_type_code, role_code, "
    "cognitive_state_code, state_code, auth_outcome_code, employee_is_user FROM packets"
)


def stored(app) -> dict[str, dict]:
    """Each packet's coded columns exactly as stored."""
    with app.app_context():
        rows = db.session.execute(text(STORED_SQL)).mappings().all()
        db.session.commit()
    return {row["packet_id"]: dict(row) for row in rows}


def post(client, body) -> str:
    response = client.post(f"{API}/ingest", json=body)
    assert response.status_code == 200, response.json
    return response.json["packet_id"]


def sent_values(body: dict) -> dict:
    """What a reader must show of the coded fields of a packet sent as ``body``."""
    return {
        "system_type": body.get("system_type"),
        "role": body.get("role"),
        "cognitive_state": body.get("cognitive_state") or body.get("state"),
        "state": body.get("state"),
        "employee_id": body.get("employee_id"),
    }


def shown(packet: dict) -> dict:
    return {name: packet.get(name) for name in ("system_type", "role", "cognitive_state", "state")}


def test_known_values_are_stored_as_codes_and_every_reader_sees_the_text_sent(app, client, backend):
    """A learner's packet, an EMS packet naming only its employee (who becomes the user), one
    naming a user and another employee, and one holding a legacy state in cognitive_state:
    on PostgreSQL their known values are stored as codes (text NULL) and the repeated
    employee_id as NULL; the poll, both listings, the artifact and the model show what was
    sent, and the seal over them verifies."""
    ems = fixture("ems_packet.json")
    ems.pop("user_id", None)
    bodies = {
        "learner": make_packet(),
        "ems": {**ems, "timestamp": make_packet()["timestamp"]},
        "other": make_packet(
            user_id="emp_boss",
            employee_id="emp_7",
            system_type="ems",
            role="employee",
            cognitive_state=None,
            state="FAKING",
        ),
        "legacy": make_packet(cognitive_state="WORKING", state="IDLE"),
    }
    ids = {name: post(client, body) for name, body in bodies.items()}
    forms = stored(app)
    if backend == "postgres":
        assert {name: forms[packet_id]["employee_is_user"] for name, packet_id in ids.items()} == {
            "learner": None,
            "ems": True,
            "other": None,
            "legacy": None,
        }
        assert forms[ids["other"]]["employee_id"] == "emp_7"
        for form in forms.values():
            assert form["system_type"] is form["role"] is form["cognitive_state"] is None
            assert form["state"] is None and form["system_type_code"] is not None
        assert forms[ids["legacy"]]["cognitive_state_code"] == "W"
        assert forms[ids["legacy"]]["state_code"] == "I"
    else:
        assert {form["employee_is_user"] for form in forms.values()} == {None}
        assert {form["cognitive_state_code"] for form in forms.values()} == {None}
        assert forms[ids["ems"]]["employee_id"] == ems["employee_id"]

    expected = {ids[name]: sent_values(body) for name, body in bodies.items()}
    polled = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert {pid: {**shown(p), "employee_id": p["employee_id"]} for pid, p in polled.items()} == (
        expected
    )
    user = ems["employee_id"]
    for who, names in ((user, ["ems"]), ("emp_7", ["other"]), ("emp_boss", ["other"])):
        listed = listing(client, who, limit=10)
        assert [p["packet_id"] for p in listed] == [ids[name] for name in names]
        assert [{**shown(p), "employee_id": p["employee_id"]} for p in listed] == [
            expected[ids[name]] for name in names
        ]
    assert runner_ok(app, "seal") and "4 packets" in runner_ok(app, "verify")
    for name, packet_id in ids.items():
        data = client.get(f"/api/v1/audit/artifact/{packet_id}").json["data"]
        assert {k: data[k] for k in CODED if k != "auth_outcome"} == {
            **sent_values(bodies[name]),
            "cognitive_state": bodies[name].get("cognitive_state"),
        }
        with app.app_context():
            model = db.session.get(Packet, packet_id)
            assert model.employee_id == bodies[name].get("employee_id")
            assert model.cognitive_state == bodies[name].get("cognitive_state")
            assert model.system_type == bodies[name]["system_type"]
            db.session.commit()


def runner_ok(app, command: str) -> str:
    result = app.test_cli_runner().invoke(args=["bucket", command])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("app_config", [{"BUCKET_COGNITIVE_STATES": ["ON_TASK", "FLOW"]}])
def test_a_value_outside_the_code_table_round_trips_exactly(app, client, backend):
    """A cognitive state a newer bridge sends (configured, not in the code table), values
    written by a later version of the service (a system, a role, an authentication outcome
    the table does not know, a known value in another case) are stored as that very text,
    code NULL, and read back unchanged by every reader; the leaf covers them as stored."""
    flow = post(client, make_packet(cognitive_state="FLOW"))
    with app.app_context():
        loaded = fast_load_packet(make_packet(cognitive_state="ON_TASK"))
        loaded.update(system_type="Gurukul", role="mentor", employee_id="stu_test ")
        written = write_submissions([Submission([loaded], None, [PacketAuth("expired", "x")])])
    later = written[0][0].packet_id
    forms = stored(app)
    assert forms[flow]["cognitive_state"] == "FLOW" and forms[flow]["cognitive_state_code"] is None
    assert (forms[later]["system_type"], forms[later]["role"], forms[later]["auth_outcome"]) == (
        "Gurukul",
        "mentor",
        "expired",
    )
    assert forms[later]["employee_id"] == "stu_test " and forms[later]["employee_is_user"] is None
    assert {forms[later][f"{name}_code"] for name in ("system_type", "role", "auth_outcome")} == {
        None
    }
    if backend == "postgres":
        assert forms[later]["cognitive_state_code"] == "O"
    polled = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert polled[flow]["cognitive_state"] == "FLOW"
    assert (polled[later]["system_type"], polled[later]["role"]) == ("Gurukul", "mentor")
    assert polled[later]["auth_outcome"] == "expired"
    listed = {p["packet_id"]: p for p in listing(client, "stu_test", limit=10)}
    assert listed[flow]["cognitive_state"] == "FLOW"
    assert listed[later]["employee_id"] == "stu_test "
    assert runner_ok(app, "seal") and "2 packets" in runner_ok(app, "verify")
    data = client.get(f"/api/v1/audit/artifact/{later}").json["data"]
    assert (data["system_type"], data["role"], data["auth_outcome"], data["employee_id"]) == (
        "Gurukul",
        "mentor",
        "expired",
        "stu_test ",
    )


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite stores text only
def test_a_coded_row_and_the_same_packet_stored_as_text_have_the_same_leaf(app, client):
    """The leaf PostgreSQL computes for a coded row is the leaf of the same row with its text
    written back (as stored before migration 0022): an altered code is named by verify."""
    from bucket.services.audit.content import LEAF_FROM, LEAF_SQL

    ems = {**fixture("ems_packet.json"), "timestamp": make_packet()["timestamp"]}
    ems.pop("user_id", None)
    packet_id = post(client, ems)
    leaf_sql = f"SELECT {LEAF_SQL} FROM {LEAF_FROM} WHERE packets.packet_id = :id"
    with app.app_context():
        coded = db.session.execute(text(leaf_sql), {"id": packet_id}).scalar()
        db.session.execute(
            text(
                "UPDATE packets SET system_type_text = 'ems', system_type_code = NULL, "
                "role_text = 'employee', role_code = NULL, employee_id = user_id, "
                "employee_is_user = NULL, state_text = :state, state_code = NULL "
                "WHERE packet_id = :id"
            ),
            {"id": packet_id, "state": ems["state"]},
        )
        as_text = db.session.execute(text(leaf_sql), {"id": packet_id}).scalar()
        db.session.commit()
    assert bytes(coded) == bytes(as_text)
    assert runner_ok(app, "seal") and "1 packets" in runner_ok(app, "verify")
    with app.app_context():
        db.session.execute(
            text("UPDATE packets SET state_text = NULL, state_code = 'K' WHERE packet_id = :id"),
            {"id": packet_id},
        )
        db.session.commit()
    result = app.test_cli_runner().invoke(args=["bucket", "verify"])
    assert result.exit_code != 0 and packet_id in result.output, result.output


def as_before_0024(statement: str) -> str:
    """A statement of today's service as the release before migration 0024 sent it: the same,
    with the five text columns under the fields' names."""
    renamed = re.compile(rf"\b({'|'.join(codes.CODED)})_text\b")
    assert renamed.search(statement) and statement.count("_text") == len(renamed.findall(statement))
    return renamed.sub(r"\1", statement)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # several instances: PostgreSQL
def test_an_instance_of_a_release_before_0024_fails_instead_of_serving_codes_as_null(app, client):
    """During an upgrade the previous release's instances keep answering beside the new ones.
    They read the coded strings' columns by the fields' names, so on a coded row they would
    lease and list null strings: since 0024 those columns are named ``<name>_text`` and each of
    their statements fails instead, leasing and storing nothing; the packet reaches the
    consumer whole through a new instance."""
    from bucket.services import sql
    from bucket.services.delivery.claims import PG_LEASE, lease_params
    from bucket.services.ingest import BATCH_INSERT_SQL, packet_row

    body = make_packet(cognitive_state="ON_TASK")
    packet_id = post(client, body)
    assert stored(app)[packet_id]["cognitive_state_code"] == "O"
    with app.app_context():
        now = epoch_now()
        params = lease_params(
            now, 5, receipt="old-release", until=now + 30, source="pending", limit=10
        )
        with pytest.raises(ProgrammingError) as refused:
            sql.run(as_before_0024(PG_LEASE), params)
        assert isinstance(refused.value.orig, UndefinedColumn)
        # The earlier release's rows held the strings under the fields' names.
        row = packet_row(fast_load_packet(make_packet(user_id="stu_later")), utc_now(), None)
        row.update({codes.field_name(column): row.pop(column) for column in codes.FIELDS})
        doc = orjson.dumps([row], option=orjson.OPT_NAIVE_UTC).decode()
        with pytest.raises(ProgrammingError) as refused:
            sql.run(as_before_0024(BATCH_INSERT_SQL), {"doc": doc})
        assert isinstance(refused.value.orig, UndefinedColumn)
        with pytest.raises(ProgrammingError, match="system_type"):
            db.session.execute(text("SELECT system_type FROM packets"))
        db.session.rollback()
    (polled,) = poll(client, limit=10)["packets"]
    assert polled["packet_id"] == packet_id and polled["delivery_count"] == 1
    assert {**shown(polled), "employee_id": polled["employee_id"]} == sent_values(body)
    assert listing(client, "stu_later") == []
