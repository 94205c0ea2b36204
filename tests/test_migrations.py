"""Schema only through migrations: upgrade builds it, check finds no drift, downgrade undoes it."""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime, timedelta

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from bucket import create_app
from bucket.extensions import db
from bucket.models import AuditSeal
from tests import servers
from tests.factories import make_packet, packed_as_before_0019

EXPECTED_INDEXES = {
    "ix_packets_user": ["user_id", "received_at"],
    "ix_packets_employee": ["employee_id", "received_at"],
    "ix_packets_seq": ["seq"],
}


@pytest.fixture
def fresh_app(empty_database):
    app = create_app({"SQLALCHEMY_DATABASE_URI": empty_database, "REDIS_URL": None}, testing=True)
    yield app
    servers.dispose_engines(app)


def flask_db(app, *args: str):
    """Run ``flask db …`` against ``app`` and return the click result."""
    return app.test_cli_runner().invoke(args=["db", *args], catch_exceptions=False)


def heads(app) -> list[str]:
    """The head revision(s) of the migration scripts."""
    with app.app_context():
        config = app.extensions["migrate"].migrate.get_config()
    return list(ScriptDirectory.from_config(config).get_heads())


def tables(app) -> set[str]:
    with app.app_context():
        return set(inspect(db.engine).get_table_names())


def test_upgrade_builds_the_schema_with_its_constraints_and_indexes(fresh_app, backend):
    """`flask db upgrade` on an empty database creates packets, unique keys and hot-path indexes:
    on SQLite on the one packets table; on PostgreSQL, whose packets are partitioned by day,
    the natural identity in packet_keys, itself partitioned by the client's day, which its key
    contains (a unique key on a partitioned table must contain the partition key), and the
    Idempotency-Key in packet_idempotency_keys (migration 0015)."""
    assert "packets" not in tables(fresh_app)
    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert {"packets", "alembic_version"} <= tables(fresh_app)
    postgres = backend == "postgres"
    keys_table = "packet_keys" if postgres else "packets"
    with fresh_app.app_context():
        inspector = inspect(db.engine)
        all_indexes = inspector.get_indexes("packets")
        indexes = {ix["name"]: ix["column_names"] for ix in all_indexes}
        key_indexes = inspector.get_indexes(keys_table)
        unique_indexes = {tuple(ix["column_names"]) for ix in key_indexes if ix["unique"]}
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(keys_table)}
        key_primary = inspector.get_pk_constraint(keys_table)["constrained_columns"]
        primary = inspector.get_pk_constraint("packets")["constrained_columns"]
        if postgres:
            idempotency_primary = inspector.get_pk_constraint("packet_idempotency_keys")
            partition_key = db.session.execute(
                text("SELECT pg_get_partkeydef('packet_keys'::regclass)")
            ).scalar()
            db.session.commit()
    for name, columns in EXPECTED_INDEXES.items():
        if postgres and name == "ix_packets_seq":
            assert name not in indexes  # one of its own in each partition (migration 0017)
            continue
        if postgres and name == "ix_packets_user":  # on the user id's key (migration 0028)
            (user_index,) = [ix for ix in all_indexes if ix["name"] == name]
            assert user_index["expressions"] == ["packet_user_key(user_id::text)", "received_at"]
            continue
        assert indexes.get(name) == columns, name
    if postgres:
        assert seq_indexes(fresh_app) == {
            (name, f"{name}_seq_key", True) for name in packet_partitions(fresh_app)
        }
        assert brin_indexes(fresh_app) == {("packet_keys", "ix_packet_keys_received")}
        assert key_primary == ["dedup_key", "client_day"]
        assert partition_key == "RANGE (client_day)"
        assert idempotency_primary["constrained_columns"] == ["idempotency_key"]
    else:
        assert ("dedup_key",) in uniques
        # Partial (only rows that carry a key), so it is a unique index, not a constraint.
        assert ("idempotency_key",) in unique_indexes
    assert primary == (["packet_id", "received_at"] if postgres else ["packet_id"])
    with fresh_app.app_context():
        inspector = inspect(db.engine)
        # PostgreSQL: the queue index lives on the hot partition only (migration 0014).
        hot = "deliveries_hot" if postgres else "deliveries"
        deliveries = {ix["name"]: ix["column_names"] for ix in inspector.get_indexes(hot)}
        delivery_key = inspector.get_pk_constraint(hot)["constrained_columns"]
        keys = inspector.get_foreign_keys("deliveries")
    assert deliveries["ix_deliveries_queue"] == ["delivery_state", "visible_at"]
    assert delivery_key == ["packet_id"]
    # PostgreSQL: a key to a partitioned table would be re-checked at every detach of a day.
    expected = [] if postgres else [(["packet_id"], "packets")]
    assert [(k["constrained_columns"], k["referred_table"]) for k in keys] == expected


def packet_partitions(app) -> set[str]:
    """PostgreSQL: the partitions of packets."""
    found = rows_of(
        app,
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'packets'::regclass",
    )
    return {name for (name,) in found}


def seq_indexes(app) -> set[tuple[str, str, bool]]:
    """PostgreSQL: (table, index, unique) of every index on seq alone of packets and its
    partitions."""
    found = rows_of(
        app,
        "SELECT x.indrelid::regclass::text, x.indexrelid::regclass::text, x.indisunique "
        "FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid "
        "AND a.attnum = x.indkey[0] WHERE x.indnkeyatts = 1 AND a.attname = 'seq' "
        "AND x.indrelid IN (SELECT 'packets'::regclass UNION ALL "
        "SELECT inhrelid FROM pg_inherits WHERE inhparent = 'packets'::regclass)",
    )
    return {tuple(row) for row in found}


def brin_indexes(app) -> set[tuple[str, str]]:
    """PostgreSQL: (table, index) of every BRIN index on a table that is not a partition."""
    found = rows_of(
        app,
        "SELECT t.relname, i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_class t ON t.oid = x.indrelid JOIN pg_am m ON m.oid = i.relam "
        "WHERE m.amname = 'brin' AND NOT t.relispartition",
    )
    return {tuple(row) for row in found}


def test_models_and_migrations_do_not_drift(fresh_app):
    """`flask db check` (alembic check) finds nothing to autogenerate after upgrade."""
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    result = flask_db(fresh_app, "check")
    assert result.exit_code == 0, result.output


def test_check_fails_before_upgrade(fresh_app):
    """The drift check is real: on an empty database it reports pending operations."""
    result = fresh_app.test_cli_runner().invoke(args=["db", "check"])
    assert result.exit_code != 0


def test_downgrade_removes_the_schema_and_upgrade_restores_it(fresh_app):
    """Downgrade to base drops the table; upgrading again gives a working service."""
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    result = flask_db(fresh_app, "downgrade", "base")
    assert result.exit_code == 0, result.output
    assert "packets" not in tables(fresh_app)
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    response = client.post("/api/v1/bucket/prana/ingest", json=make_packet())
    assert response.status_code == 200
    polled = client.get("/api/v1/bucket/prana/packets/pending").json
    assert [p["packet_id"] for p in polled["packets"]] == [response.json["packet_id"]]


def test_upgrade_is_idempotent(fresh_app):
    """Running the release step twice (every deploy runs it) changes nothing the second time."""
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    with fresh_app.app_context():
        versions = db.session.execute(text("SELECT version_num FROM alembic_version")).all()
    assert [v for (v,) in versions] == heads(fresh_app)


def test_quarantine_entries_kept_before_0011_have_no_auth_outcome(fresh_app):
    """An entry refused before migration 0011 survives it with no outcome recorded (NULL),
    which a replay under require keeps back (tests/test_quarantine_auth.py); downgrading
    drops the columns and keeps the entry."""
    assert flask_db(fresh_app, "upgrade", "0010_packet_auth").exit_code == 0
    with fresh_app.app_context():  # as the code of that time kept it
        db.session.execute(
            text(
                "INSERT INTO quarantine (digest, body, errors, error_fields, source, size_bytes, "
                "seen_count, first_seen_at, last_seen_at) VALUES ('d', '{}', '{}', ',x,', "
                "'packet', 2, 1, '2026-12-01 00:00:00', '2026-12-01 00:00:00')"
            )
        )
        db.session.commit()
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    with fresh_app.app_context():
        rows = db.session.execute(text("SELECT auth_outcome, auth_subject FROM quarantine")).all()
        db.session.commit()
    assert [tuple(row) for row in rows] == [(None, None)]
    assert flask_db(fresh_app, "downgrade", "0010_packet_auth").exit_code == 0
    with fresh_app.app_context():
        columns = {c["name"] for c in inspect(db.engine).get_columns("quarantine")}
        count = db.session.execute(text("SELECT count(*) FROM quarantine")).scalar()
        db.session.commit()
    assert "auth_outcome" not in columns and count == 1


OLD_STATES = ("pending", "leased", "processed", "dead", "processed", "pending")


def rows_of(app, statement: str) -> list[tuple]:
    with app.app_context():
        found = [tuple(row) for row in db.session.execute(text(statement))]
        db.session.commit()
    return found


def test_upgrade_to_day_partitions_keeps_every_packet_delivery_and_seal(fresh_app, backend):
    """Migration 0012 with data in the old layout: every packet (seq and content), delivery
    state and seal survives; the old packets still deduplicate; nothing finished is delivered
    again; verify still checks them all; the seq goes on above them. On PostgreSQL the old
    table is the legacy partition; on SQLite nothing moves. Downgrading keeps them too."""
    from bucket.services.audit.sealing import seal_everything
    from bucket.services.bookkeeping import book_new_packets
    from bucket.services.counters import recount
    from bucket.services.ingest import identity_key
    from bucket.timeutil import new_packet_id
    from tests.queue_helpers import sealer_before_signal_key_sets

    assert flask_db(fresh_app, "upgrade", "0011_quarantine_auth").exit_code == 0
    postgres = backend == "postgres"
    bodies = [make_packet() for _ in OLD_STATES]
    # The service has always named packets by UUIDs (migration 0015 stores them as such).
    old = {n: new_packet_id() for n in range(1, len(OLD_STATES) + 1)}
    with fresh_app.app_context():  # rows as the code of that time wrote them
        for n, (body, state) in enumerate(zip(bodies, OLD_STATES, strict=True), start=1):
            timestamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
            received = datetime(2026, 12, 1, 10, 0, n)
            db.session.execute(
                text(
                    "INSERT INTO packets (packet_id, dedup_key, idempotency_key, user_id, "
                    "session_id, system_type, role, client_timestamp, cognitive_state, "
                    "active_seconds, idle_seconds, away_seconds, focus_score, raw_signals, "
                    "received_at, stale"
                    + ("" if postgres else ", seq")
                    + ") VALUES (:id, :dedup, :idem, :user, :session, 'gurukul', 'student', :ts, "
                    "'ON_TASK', 4, 1, 0, 70, :raw, :received, false"
                    + ("" if postgres else ", :n")
                    + ")"
                ),
                {
                    "id": old[n],
                    "dedup": identity_key(
                        "gurukul", body["user_id"], body["session_id"], timestamp
                    ),
                    "idem": None,
                    "user": body["user_id"],
                    "session": body["session_id"],
                    "ts": timestamp.replace(tzinfo=None),
                    "raw": json.dumps(body["raw_signals"]),
                    "received": received,
                    "n": n,
                },
            )
            visible = received.replace(tzinfo=UTC).timestamp()
            if state == "leased":
                visible = time.time() + 3600  # its lease runs for another hour
            db.session.execute(
                text(
                    "INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, "
                    "delivery_count, processed_by_karma) VALUES (:id, :received, :state, "
                    ":visible, :count, false)"
                ),
                {
                    "id": old[n],
                    "received": received,
                    "state": state,
                    "visible": visible,
                    "count": 0 if state == "pending" else 1,
                },
            )
        if not postgres:
            db.session.execute(
                text("UPDATE packet_counters SET value = 6 WHERE name = 'allocated'")
            )
        db.session.commit()
        recount()
        book_new_packets()
        with packed_as_before_0019(), sealer_before_signal_key_sets():
            assert seal_everything()
    packets_sql = "SELECT * FROM packets ORDER BY seq"
    deliveries_sql = "SELECT * FROM deliveries ORDER BY packet_id"
    seals_sql = "SELECT seq, last_seq, hash FROM audit_seals ORDER BY seq"
    before = [rows_of(fresh_app, q) for q in (packets_sql, deliveries_sql, seals_sql)]
    assert len(before[0]) == 6

    # The layouts of 0012 and 0014 (0016 changes the ids' type: its own test compares them).
    result = flask_db(fresh_app, "upgrade", "0014_hot_deliveries")
    assert result.exit_code == 0, result.output
    after = [rows_of(fresh_app, q) for q in (packets_sql, deliveries_sql, seals_sql)]
    assert after == before
    if postgres:
        where = rows_of(fresh_app, "SELECT DISTINCT tableoid::regclass::text FROM packets")
        assert where == [("packets_legacy",)]
        assert rows_of(fresh_app, "SELECT count(*) FROM packet_keys") == [(6,)]
        # Migration 0014: processed deliveries beside their packets' (legacy) partition.
        held = rows_of(
            fresh_app,
            "SELECT tableoid::regclass::text, count(*) FROM deliveries GROUP BY 1 ORDER BY 1",
        )
        assert held == [("deliveries_hot", 4), ("deliveries_processed_legacy", 2)]
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    verified = fresh_app.test_cli_runner().invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "checked 1 seals and 6 packets" in verified.output

    client = fresh_app.test_client()
    again = client.post("/api/v1/bucket/prana/ingest", json=bodies[2]).json
    assert again["packet_id"] == old[3] and again["duplicate"] is True
    fresh = client.post("/api/v1/bucket/prana/ingest", json=make_packet()).json["packet_id"]
    served = client.get("/api/v1/bucket/prana/packets/pending?limit=10").json["packets"]
    assert sorted(p["packet_id"] for p in served) == sorted([old[1], old[6], fresh])
    ((new_seq,),) = rows_of(fresh_app, f"SELECT seq FROM packets WHERE packet_id = '{fresh}'")
    assert new_seq > 6
    status = client.get("/api/v1/bucket/prana/status").json
    assert status["total_packets"] == 7 and status["dead_packets"] == 1

    assert flask_db(fresh_app, "downgrade", "0011_quarantine_auth").exit_code == 0
    downgraded = rows_of(fresh_app, packets_sql)
    assert len(downgraded) == 7 and downgraded[:6] == before[0]
    with fresh_app.app_context():
        uniques = {
            tuple(u["column_names"]) for u in inspect(db.engine).get_unique_constraints("packets")
        }
    assert ("dedup_key",) in uniques


def test_upgrade_to_hot_deliveries_moves_every_delivery_once(fresh_app, backend):
    """Migration 0014 with deliveries in the 0012 layout (one table): processed, pending,
    leased (its lease running), retrying and dead packets. Every delivery row survives
    unchanged; on PostgreSQL the unfinished and dead ones sit in the hot partition and the
    processed ones in their day's partition (the default one for a day without partition);
    nothing finished or leased is served again, the processed stay answered as such,
    and downgrading puts every row back in one table."""
    from tests.queue_helpers import ack, ingest_many, poll

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    postgres = backend == "postgres"
    client = fresh_app.test_client()
    # The rows are written by the service, then taken back to the 0013 layout (one table, ids
    # as text) by the downgrade: today's statements no longer run on that layout.
    ids = ingest_many(client, 8)
    served = [p["packet_id"] for p in poll(client, limit=6)["packets"]]
    assert sorted(served) == sorted(ids[:6])
    for packet_id in ids[:3]:
        assert ack(client, packet_id).status_code == 200
    assert ack(client, ids[3], success=False).status_code == 200  # retrying
    assert flask_db(fresh_app, "downgrade", "0013_lean_user_indexes").exit_code == 0
    with fresh_app.app_context():
        db.session.execute(
            text("UPDATE deliveries SET delivery_state = 'dead' WHERE packet_id = :p"),
            {"p": ids[4]},
        )
        if postgres:  # a processed packet of a day without partition
            db.session.execute(
                text("UPDATE deliveries SET received_at = '2026-01-01' WHERE packet_id = :p"),
                {"p": ids[0]},
            )
        db.session.commit()
    deliveries_sql = "SELECT * FROM deliveries ORDER BY packet_id"
    before = rows_of(fresh_app, deliveries_sql)
    assert len(before) == 8

    result = flask_db(fresh_app, "upgrade", "0014_hot_deliveries")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, deliveries_sql) == before
    if postgres:
        where = dict(
            rows_of(
                fresh_app,
                "SELECT packet_id, tableoid::regclass::text FROM deliveries ORDER BY packet_id",
            )
        )
        today = partitions_today(fresh_app)
        assert where == {
            ids[0]: "deliveries_processed_default",
            ids[1]: f"deliveries_processed_{today}",
            ids[2]: f"deliveries_processed_{today}",
            **{packet_id: "deliveries_hot" for packet_id in ids[3:]},
        }
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    # ids[3] retries later, ids[5] is leased: only the two never served are served.
    again = [p["packet_id"] for p in poll(client, limit=10)["packets"]]
    assert sorted(again) == sorted(ids[6:])
    assert ack(client, ids[1]).json["outcome"] == "already_processed"
    assert ack(client, ids[5]).json["outcome"] == "processed"

    assert flask_db(fresh_app, "downgrade", "0013_lean_user_indexes").exit_code == 0
    after = rows_of(fresh_app, deliveries_sql)
    assert len(after) == 8 and [row[0] for row in after] == [row[0] for row in before]
    if postgres:
        assert rows_of(fresh_app, "SELECT relkind FROM pg_class WHERE relname = 'deliveries'") == [
            ("r",)
        ]


def store_as_0014(app, count: int, bodies=None, idempotency=None) -> list[str]:
    """Store ``count`` pending packets (or these ``bodies``, with these Idempotency-Keys) as
    ingest did on PostgreSQL before migration 0015 (its key row in the one packet_keys table,
    the packet, its delivery); their ids, oldest first."""
    from bucket.services.ingest import identity_key, scoped_idempotency_key
    from bucket.timeutil import new_packet_id, utc_now

    bodies = bodies or [make_packet() for _ in range(count)]
    idempotency = idempotency or [None] * len(bodies)
    ids = []
    with app.app_context():
        for body, key in zip(bodies, idempotency, strict=True):
            packet_id, received = new_packet_id(), utc_now()
            timestamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
            values = {
                "id": packet_id,
                "dedup": identity_key("gurukul", body["user_id"], body["session_id"], timestamp),
                "idem": scoped_idempotency_key(body["user_id"], key),
                "user": body["user_id"],
                "session": body["session_id"],
                "ts": timestamp.replace(tzinfo=None),
                "raw": json.dumps(body["raw_signals"]),
                "received": received.replace(tzinfo=None),
                "visible": received.timestamp(),
            }
            db.session.execute(
                text(
                    "INSERT INTO packet_keys (dedup_key, idempotency_key, packet_id, "
                    "received_at) VALUES (:dedup, :idem, :id, :received)"
                ),
                values,
            )
            db.session.execute(
                text(
                    "INSERT INTO packets (packet_id, dedup_key, idempotency_key, user_id, "
                    "session_id, system_type, client_timestamp, cognitive_state, "
                    "active_seconds, idle_seconds, away_seconds, raw_signals, received_at, "
                    "stale) VALUES (:id, :dedup, :idem, :user, :session, 'gurukul', :ts, "
                    "'ON_TASK', 4, 1, 0, :raw, :received, false)"
                ),
                values,
            )
            db.session.execute(
                text(
                    "INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, "
                    "delivery_count, processed_by_karma) VALUES (:id, :received, 'pending', "
                    ":visible, 0, false)"
                ),
                values,
            )
            db.session.commit()
            ids.append(packet_id)
    return ids


@pytest.mark.parametrize("backend", ["postgres"])
def test_upgrade_to_key_days_moves_every_key_once_and_downgrade_restores_them(fresh_app, backend):
    """Migration 0015 with keys in the 0012 layout (one packet_keys table): a packet of a past
    client day, one sent with an Idempotency-Key, one whose client clock runs a day ahead.
    Every key moves into the day of its client timestamp (the past ones into the legacy
    partition, the one ahead into its day's), as 16-byte uuids, and the Idempotency-Key into
    its own table; every copy resent afterwards is the duplicate of its packet, a request
    reusing the Idempotency-Key too, and nothing is stored twice. Downgrading puts the rows
    back as they were."""
    from bucket.timeutil import utc_now

    assert flask_db(fresh_app, "upgrade", "0014_hot_deliveries").exit_code == 0
    ahead = (utc_now() + timedelta(days=1)).replace(microsecond=0)
    bodies = [
        make_packet(),
        make_packet(),
        make_packet(timestamp=ahead.isoformat().replace("+00:00", "Z")),
    ]
    ids = store_as_0014(fresh_app, 0, bodies, [None, "order-7", None])
    keys_sql = "SELECT * FROM packet_keys ORDER BY dedup_key"
    before = rows_of(fresh_app, keys_sql)
    assert len(before) == 3

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    moved = rows_of(
        fresh_app,
        "SELECT packet_id::text, tableoid::regclass::text, client_day, "
        "replace(dedup_key::text, '-', '') FROM packet_keys",
    )
    tomorrow = ahead.date()
    # The factory's clock advances with every packet the test process made before: each
    # packet's own client day, not a fixed one.
    day = [datetime.fromisoformat(body["timestamp"]).date() for body in bodies]
    assert sorted(moved) == sorted(
        [
            (ids[0], "packet_keys_legacy", day[0], before_key(before, ids[0])),
            (ids[1], "packet_keys_legacy", day[1], before_key(before, ids[1])),
            (ids[2], f"packet_keys_p{tomorrow:%Y%m%d}", tomorrow, before_key(before, ids[2])),
        ]
    ), moved
    idempotent = rows_of(
        fresh_app,
        "SELECT k.packet_id::text FROM packet_idempotency_keys i JOIN packet_keys k "
        "USING (dedup_key, client_day)",
    )
    assert idempotent == [(ids[1],)]
    client = fresh_app.test_client()
    for body, packet_id in zip(bodies, ids, strict=True):
        again = client.post("/api/v1/bucket/prana/ingest", json=body).json
        assert (again["packet_id"], again.get("duplicate")) == (packet_id, True)
    reused = client.post(
        "/api/v1/bucket/prana/ingest", json=make_packet(), headers={"Idempotency-Key": "order-7"}
    ).json
    assert (reused["packet_id"], reused.get("duplicate")) == (ids[1], True)
    assert rows_of(fresh_app, "SELECT count(*) FROM packets") == [(3,)]

    assert flask_db(fresh_app, "downgrade", "0014_hot_deliveries").exit_code == 0
    assert rows_of(fresh_app, keys_sql) == before
    assert rows_of(fresh_app, "SELECT to_regclass('packet_idempotency_keys')") == [(None,)]


def before_key(rows: list[tuple], packet_id: str) -> str:
    """The dedup key of a packet in the old layout's packet_keys rows."""
    (key,) = [row[0] for row in rows if row[2] == packet_id]
    return key


def partitions_today(app) -> str:
    """The suffix of today's day partitions (pYYYYMMDD), as the service names them."""
    from bucket.services import partitions
    from bucket.timeutil import utc_now

    return partitions.day_name(utc_now().date()).removeprefix("packets_")


# Columns as text on both backends (CAST, not ::, so SQLite runs them too): what the service
# reads of the ids and keys, whatever their stored type.
ID_VIEWS = {
    "packets": "SELECT CAST(packet_id AS TEXT), replace(CAST(dedup_key AS TEXT), '-', ''), seq, "
    "received_at FROM packets ORDER BY seq",
    "deliveries": "SELECT CAST(packet_id AS TEXT), delivery_state, delivery_count, visible_at, "
    "lease_id FROM deliveries ORDER BY packet_id",
}
UUID_COLUMNS_SQL = (
    "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
    "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
    "AND (c.relname LIKE 'packet%' OR c.relname LIKE 'deliveries%') "
    "AND a.attname IN ('packet_id', 'dedup_key') ORDER BY 1, 2"
)


def id_types(app) -> set[tuple[str, str]]:
    """PostgreSQL: the (column, type) pairs of the ids and keys over every table and partition
    of packets, packet_keys, packet_idempotency_keys and deliveries."""
    return {(f"{table}.{column}", kind) for table, column, kind in rows_of(app, UUID_COLUMNS_SQL)}


def key_table(name: str) -> bool:
    """A column of the key tables (migration 0015: uuid already), or of one of their
    partitions."""
    return name.startswith(("packet_keys", "packet_idempotency_keys"))


def test_upgrade_to_uuid_ids_keeps_every_id_key_and_seal(fresh_app, backend):
    """Migration 0016 with data in the 0015 layout (packet and delivery ids and keys as text,
    the key tables' as uuid): processed, leased, retrying and pending packets, one sent with
    an Idempotency-Key, sealed. On PostgreSQL every table and partition of packets and
    deliveries then holds uuid like the key tables, whose rows stay as they were; on both
    backends every id and key reads as the same string, the artifacts are byte for byte the
    same and verify passes (the leaves did not change), a resent packet is still its
    original's duplicate, a packet reusing the Idempotency-Key too, nothing finished or leased
    is served again; downgrading gives back every row as it was."""
    from tests.queue_helpers import API, ack, ingest_many, poll

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    postgres = backend == "postgres"
    client = fresh_app.test_client()
    bodies = [make_packet() for _ in range(6)]
    ids = [
        client.post(
            f"{API}/ingest", json=body, headers={"Idempotency-Key": "order-9"} if n == 4 else {}
        ).json["packet_id"]
        for n, body in enumerate(bodies)
    ]
    ids += ingest_many(client, 2)
    served = [p["packet_id"] for p in poll(client, limit=5)["packets"]]
    assert sorted(served) == sorted(ids[:5])
    for packet_id in ids[:2]:
        assert ack(client, packet_id).status_code == 200
    assert ack(client, ids[2], success=False).status_code == 200  # retrying
    assert fresh_app.test_cli_runner().invoke(args=["bucket", "seal"]).exit_code == 0
    artifacts = [client.get(f"/api/v1/audit/artifact/{pid}").json for pid in ids]
    assert all(artifact["provenance"]["sealed"] for artifact in artifacts)
    # The 0015 layout, with these rows (the downgrade is part of what is tested).
    assert flask_db(fresh_app, "downgrade", "0015_key_days").exit_code == 0
    keys_sql = (
        "SELECT * FROM packet_keys ORDER BY dedup_key",
        "SELECT * FROM packet_idempotency_keys ORDER BY idempotency_key",
    )
    if postgres:
        types = id_types(fresh_app)
        assert {kind for name, kind in types if not key_table(name)} == {
            "character varying(36)",
            "character varying(32)",
        }
        assert {kind for name, kind in types if key_table(name)} == {"uuid"}
        keys_before = [rows_of(fresh_app, q) for q in keys_sql]
        assert len(keys_before[0]) == 8 and len(keys_before[1]) == 1
    whole = ("SELECT * FROM packets ORDER BY seq", "SELECT * FROM deliveries ORDER BY packet_id")
    before = [rows_of(fresh_app, q) for q in whole]
    before_ids = {name: rows_of(fresh_app, q) for name, q in ID_VIEWS.items()}
    assert len(before_ids["packets"]) == 8 and ids[0] in before_ids["packets"][0]

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert {name: rows_of(fresh_app, q) for name, q in ID_VIEWS.items()} == before_ids
    if postgres:
        types = id_types(fresh_app)
        assert {kind for _, kind in types} == {"uuid"}
        partitions_held = {name.split(".")[0] for name, _ in types}
        today = partitions_today(fresh_app)
        assert {
            "packets",
            f"packets_{today}",
            "packets_default",
            "packet_keys",
            "packet_idempotency_keys",
            "deliveries",
            "deliveries_hot",
            f"deliveries_processed_{today}",
        } <= partitions_held
        assert [rows_of(fresh_app, q) for q in keys_sql] == keys_before
    assert [client.get(f"/api/v1/audit/artifact/{pid}").json for pid in ids] == artifacts
    verified = fresh_app.test_cli_runner().invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "8 packets" in verified.output, verified.output
    again = client.post(f"{API}/ingest", json=bodies[5]).json
    assert again["packet_id"] == ids[5] and again["duplicate"] is True
    reused = client.post(
        f"{API}/ingest", json=make_packet(), headers={"Idempotency-Key": "order-9"}
    ).json
    assert reused["packet_id"] == ids[4] and reused["duplicate"] is True
    # ids[2] retries later, ids[3] and ids[4] are leased: only the three never served are.
    served = [p["packet_id"] for p in poll(client, limit=10)["packets"]]
    assert sorted(served) == sorted(ids[5:])
    assert ack(client, ids[0]).json["outcome"] == "already_processed"
    assert ack(client, ids[3]).json["outcome"] == "processed"

    assert flask_db(fresh_app, "downgrade", "0015_key_days").exit_code == 0
    if postgres:
        types = id_types(fresh_app)
        assert "uuid" not in {kind for name, kind in types if not key_table(name)}
        assert [rows_of(fresh_app, q) for q in keys_sql] == keys_before
    after = [rows_of(fresh_app, q) for q in whole]
    assert after[0] == before[0]  # packets: written once, never changed
    assert [row[0] for row in after[1]] == [row[0] for row in before[1]]


def test_upgrade_to_unique_day_seqs_indexes_each_partition_and_keeps_a_day_with_a_repeat(
    fresh_app, backend
):
    """Migration 0017 with data in the 0016 layout (one partitioned index on seq): processed,
    sealed packets on two past days, one of which holds a seq twice (given by hand: that
    layout let it; with the seq it no longer holds, its count is its seqs' width), and a
    pending one today. On PostgreSQL every partition of packets then
    has a unique index of its own on seq, but the day with the repeat a plain one, and
    packet_keys its BRIN index on received_at; no row changes; retention drops the other day
    as one run of seqs and keeps that one, with the reason; downgrading gives back the
    partitioned index and every row. SQLite keeps its one plain index and its rows."""
    from bucket.services import partitions, retention
    from bucket.timeutil import utc_now
    from tests.queue_helpers import ack, ingest_many, poll, sql

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    postgres = backend == "postgres"
    client = fresh_app.test_client()
    ids = ingest_many(client, 6)
    for packet_id in ids[:5]:
        assert packet_id in [p["packet_id"] for p in poll(client, limit=1)["packets"]]
        assert ack(client, packet_id).status_code == 200
    old, odd = (utc_now().date() - timedelta(days=n) for n in (50, 45))
    if postgres:
        with fresh_app.app_context():
            for day in (old, odd):
                partitions.create_day(day, adopt=False)
        for offset, (packet_id, day) in enumerate(
            zip(ids, (old, old, odd, odd, odd), strict=False)
        ):
            moment = datetime.combine(day, datetime.min.time()) + timedelta(minutes=offset)
            for table in ("packets", "deliveries", "packet_keys"):
                sql(
                    fresh_app,
                    f"UPDATE {table} SET received_at = :m WHERE packet_id = :p",
                    m=moment,
                    p=packet_id,
                )
    assert fresh_app.test_cli_runner().invoke(args=["bucket", "seal"]).exit_code == 0
    # The 0016 layout, with these rows (the downgrade is part of what is tested).
    assert flask_db(fresh_app, "downgrade", "0016_uuid_ids").exit_code == 0
    if postgres:
        assert_partitioned_seq_index(fresh_app)
        sql(
            fresh_app,
            "UPDATE packets SET seq = (SELECT seq FROM packets WHERE packet_id = :a) "
            "WHERE packet_id = :b",
            a=ids[2],
            b=ids[3],
        )  # odd holds s, s, s + 2
    whole = "SELECT * FROM packets ORDER BY seq, packet_id"
    before = rows_of(fresh_app, whole)
    assert len(before) == 6

    result = flask_db(fresh_app, "upgrade", "0020_signal_key_sets")
    assert result.exit_code == 0, result.output
    # Every column of 0016 as it was; 0020's two, appended, NULL (its own test covers them,
    # and 0022's test the codes it then stores).
    width = len(before[0])
    assert [row[:width] for row in rows_of(fresh_app, whole)] == before
    assert {row[width:] for row in rows_of(fresh_app, whole)} == {(None, None)}
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    if postgres:
        odd_name = partitions.day_name(odd)
        assert seq_indexes(fresh_app) == {
            (name, f"{name}_seq_key", name != odd_name) for name in packet_partitions(fresh_app)
        }
        assert brin_indexes(fresh_app) == {("packet_keys", "ix_packet_keys_received")}
        with fresh_app.app_context():
            report = retention.purge_days(30)
        found = {day.partition: (day.packets, day.ranges, day.kept) for day in report.days}
        assert found == {
            partitions.day_name(old): (2, 1, None),
            odd_name: (
                3,
                0,
                "its rows do not match the audit log's leaves (run flask bucket verify)",
            ),
        }
        stored = rows_of(fresh_app, "SELECT packet_id::text FROM packets")
        assert {packet_id for (packet_id,) in stored} == set(ids[2:])
    else:
        assert {ix["name"]: ix["column_names"] for ix in inspect_indexes(fresh_app)}[
            "ix_packets_seq"
        ] == ["seq"]

    assert flask_db(fresh_app, "downgrade", "0020_signal_key_sets").exit_code == 0
    after_purge = [row[:width] for row in rows_of(fresh_app, whole)]
    assert after_purge == [row for row in before if row[0] in {row[0] for row in after_purge}]
    assert flask_db(fresh_app, "downgrade", "0016_uuid_ids").exit_code == 0
    assert rows_of(fresh_app, whole) == after_purge
    if postgres:
        assert_partitioned_seq_index(fresh_app)


def assert_partitioned_seq_index(app) -> None:
    """PostgreSQL, the layout before 0017: one partitioned index on seq, plain, in every
    partition; no BRIN index."""
    found = seq_indexes(app)
    assert ("packets", "ix_packets_seq", False) in found
    assert {table for table, _, _ in found} == {"packets"} | packet_partitions(app)
    assert not any(unique or index.endswith("_seq_key") for _, index, unique in found)
    assert brin_indexes(app) == set()


def inspect_indexes(app) -> list[dict]:
    with app.app_context():
        found = inspect(db.engine).get_indexes("packets")
        db.session.commit()
    return found


def seal_columns(app) -> dict[str, bool]:
    """audit_seals' columns and whether each may be NULL."""
    with app.app_context():
        found = {c["name"]: c["nullable"] for c in inspect(db.engine).get_columns("audit_seals")}
        db.session.commit()
    return found


def test_downgrade_from_packed_leaves_writes_the_old_packing_and_upgrade_reads_both(
    fresh_app, backend
):
    """Migration 0019 with data: three seals in the new packing (the last after a skipped
    seq, so it keeps its seqs; the one before has none). Downgrading writes them in the old
    packing (every seq, the ids as text one a line), the same leaves, and drops
    ``leaf_uuids``; upgrading again keeps them so, verify passes and the artifacts are the
    same; a new seal beside them has the new packing, and a second downgrade writes it back
    too."""
    from bucket.services.audit.content import Leaves
    from tests.queue_helpers import ingest_many
    from tests.test_packed_leaves import packing, skip_seqs

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    runner = fresh_app.test_cli_runner()
    groups = []
    for skipped in (0, 0, 1):  # the first seal's range may start before its first seq
        skip_seqs(fresh_app, backend, skipped)
        groups.append(ingest_many(client, 2))
        assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    ids = [packet_id for group in groups for packet_id in group]
    with fresh_app.app_context():
        leaves = [Leaves.of(seal) for seal in db.session.query(AuditSeal).order_by(AuditSeal.seq)]
        db.session.commit()
    assert [leaf.ids for leaf in leaves] == groups
    assert [len(packing(fresh_app, seq)[0]) for seq in (2, 3)] == [0, 16]
    artifacts = [client.get(f"/api/v1/audit/artifact/{pid}").json for pid in ids]
    assert all(answer["provenance"]["sealed"] for answer in artifacts)

    def assert_old_packing(expected: list[Leaves]) -> None:
        rows = rows_of(
            fresh_app,
            "SELECT leaf_seqs, leaf_ids, leaf_hashes FROM audit_seals ORDER BY seq",
        )
        assert [
            (
                list(struct.unpack(f">{len(seqs) // 8}q", seqs)),
                ids_text.split("\n"),
                bytes(hashes),
            )
            for seqs, ids_text, hashes in rows
        ] == [(leaf.seqs, leaf.ids, b"".join(leaf.hashes)) for leaf in expected]

    result = flask_db(fresh_app, "downgrade", "0017_unique_day_seqs")
    assert result.exit_code == 0, result.output
    assert "leaf_uuids" not in seal_columns(fresh_app)
    assert seal_columns(fresh_app)["leaf_ids"] is False
    assert_old_packing(leaves)

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    assert seal_columns(fresh_app)["leaf_uuids"] is True
    kept = [packing(fresh_app, seq)[1:] for seq in (1, 2, 3)]
    assert kept == [("\n".join(group), None) for group in groups]
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "checked 3 seals and 6 packets" in verified.output, (
        verified.output
    )
    assert [client.get(f"/api/v1/audit/artifact/{pid}").json for pid in ids] == artifacts
    # Workers restart after a release's migrations: the ids of raw_signals' key sets this
    # process cached went with the dictionary the downgrade dropped (0020).
    fresh_app.extensions.pop("signal_key_sets", None)
    more = ingest_many(client, 2)
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    assert packing(fresh_app, 4) == (
        b"",
        None,
        b"".join(bytes.fromhex(packet_id.replace("-", "")) for packet_id in more),
    )
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "checked 4 seals and 8 packets" in verified.output, (
        verified.output
    )
    with fresh_app.app_context():
        leaves = [Leaves.of(seal) for seal in db.session.query(AuditSeal).order_by(AuditSeal.seq)]
        db.session.commit()

    assert flask_db(fresh_app, "downgrade", "0017_unique_day_seqs").exit_code == 0
    assert_old_packing(leaves)
    assert flask_db(fresh_app, "upgrade").exit_code == 0


def test_upgrade_to_signal_key_sets_keeps_old_rows_and_downgrade_writes_compact_ones_back(
    fresh_app, backend
):
    """Migration 0020 with data: packets stored before it (in full) keep every column as they
    were and their seals verify; packets stored after it are compact on PostgreSQL (in full on
    SQLite), and verify passes over the mix; downgrading writes each compact packet's
    raw_signals back as the very canonical text ingest would have stored, and the sealed
    leaves stay good when the revision comes back."""
    from bucket.jsonutil import canonical_json
    from tests.queue_helpers import ingest

    signals = {"tab_visible": True, "dwell_time_ms": 5000, "nested": {"b": 1, "a": [0.5, None]}}
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    old = [ingest(client, raw_signals=signals) for _ in range(2)]
    assert fresh_app.test_cli_runner().invoke(args=["bucket", "seal"]).exit_code == 0
    assert flask_db(fresh_app, "downgrade", "0017_unique_day_seqs").exit_code == 0
    whole = (
        "SELECT packet_id, seq, user_id, CAST(raw_signals AS TEXT), received_at FROM packets "
        "ORDER BY seq"
    )
    before = rows_of(fresh_app, whole)
    assert [row[3] for row in before] == [canonical_json(signals)] * 2

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, whole) == before
    # The service restarts after a release's migrations (the Procfile's release step): the
    # process that knew the dictionary dropped above is not the one that writes again.
    restarted = create_app(
        {"SQLALCHEMY_DATABASE_URI": fresh_app.config["SQLALCHEMY_DATABASE_URI"], "REDIS_URL": None},
        testing=True,
    )
    try:
        check_signal_key_sets_revision(restarted, backend, old, before, whole, signals)
    finally:
        servers.dispose_engines(restarted)


def check_signal_key_sets_revision(fresh_app, backend, old, before, whole, signals) -> None:
    """The rest of the test above, on the restarted service."""
    from bucket.jsonutil import canonical_json
    from tests.queue_helpers import ingest

    client = fresh_app.test_client()
    runner = fresh_app.test_cli_runner()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    new = [ingest(client, raw_signals=signals) for _ in range(2)]
    forms = rows_of(
        fresh_app,
        "SELECT CAST(packet_id AS TEXT), raw_signals IS NULL, signal_keys IS NULL FROM packets",
    )
    compact = {packet_id for packet_id, no_raw, _ in forms if no_raw}
    assert compact == (set(new) if backend == "postgres" else set())
    assert {packet_id for packet_id, _, no_keys in forms if no_keys} == set(old) | (
        set() if backend == "postgres" else set(new)
    )
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0, verified.output
    polled = client.get("/api/v1/bucket/prana/packets/pending?limit=10").json["packets"]
    assert [canonical_json(p["raw_signals"]) for p in polled] == [canonical_json(signals)] * 4

    assert flask_db(fresh_app, "downgrade", "0017_unique_day_seqs").exit_code == 0
    assert [row[3] for row in rows_of(fresh_app, whole)] == [canonical_json(signals)] * 4
    assert "signal_key_sets" not in tables(fresh_app)
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0, verified.output


# Every column of a delivery, as the old and the new shape both hold them.
DELIVERY_ROWS = (
    "SELECT CAST(packet_id AS TEXT), delivery_state, visible_at, lease_id, delivery_count, "
    "last_error, last_delivered_at, processed_at, processed_by_karma, "
    "CAST(karma_actions AS TEXT), dead_at, received_at FROM deliveries ORDER BY 1"
)
STATUS_FIGURES = (
    "total_packets",
    "processed_packets",
    "pending_packets",
    "dead_packets",
    "queue_size",
)


def old_shape_deliveries(app, backend) -> dict[str, str]:
    """At the head revision, packets in every state (the service of today writes them: it
    reads packets as 0022 stores them, so it does not run on 0020), one processed row with a
    ``processed_at`` of its own (another writer's clock); their ids by role. Downgraded to 0020
    (``downgraded_to_0020``), their processed rows are as the code before 0021 wrote them
    (``processed_at`` the ack's instant, which ``visible_at`` holds too; karma actions naming
    the packet, as the Karma Tracker sends them, verbatim)."""
    from bucket.services.counters import recount
    from bucket.timeutil import from_epoch
    from tests.queue_helpers import ack, ingest_many, poll, sql

    client = app.test_client()
    names = ("actions", "empty", "own_clock", "retrying", "leased", "dead", "waiting")
    ids = dict(zip(names, ingest_many(client, len(names), user_id="lean"), strict=True))
    served = {p["packet_id"] for p in poll(client, limit=6)["packets"]}
    assert served == set(ids.values()) - {ids["waiting"]}
    named = [{"action": "completing_lessons", "packet_id": ids["actions"], "intensity": 0.85}]
    assert ack(client, ids["actions"], karma_actions=named).status_code == 200
    assert ack(client, ids["empty"], karma_actions=[]).status_code == 200
    assert ack(client, ids["own_clock"], karma_actions=None).status_code == 200
    assert ack(client, ids["retrying"], success=False, error_message="down").status_code == 200
    sql(
        app,
        "UPDATE deliveries SET delivery_state = 'dead', dead_at = :t, last_error = 'gone', "
        "lease_id = NULL WHERE packet_id = :p",
        t=datetime(2026, 12, 6, 12, 0, 0, 123456),
        p=ids["dead"],
    )
    with app.app_context():
        recount()
    processed = sql(
        app, "SELECT packet_id, visible_at FROM deliveries WHERE delivery_state = 'processed'"
    )
    assert len(processed) == 3
    for pid, visible_at in processed:
        if str(pid) == ids["own_clock"]:
            moment = from_epoch(visible_at).replace(tzinfo=None) + timedelta(microseconds=1)
            sql(
                app,
                "UPDATE deliveries SET processed_at = :t WHERE packet_id = :p",
                t=moment,
                p=pid,
            )
    return ids


def downgraded_to_0020(app) -> None:
    """Revision 0020: 0021's downgrade writes the processed rows back as the code before it
    wrote them (the ack's instant in ``processed_at``, the packet's id in its karma actions;
    the test checks both)."""
    assert flask_db(app, "downgrade", "0020_signal_key_sets").exit_code == 0


def test_upgrade_to_lean_processed_deliveries_keeps_every_delivery_and_reads_the_same(
    fresh_app, backend
):
    """Migration 0021 with data in the old shape: every delivery keeps its state, attempts,
    errors and outcome; the listing, status and a repeated acknowledgement answer exactly as
    before; nothing finished or leased is served again. On PostgreSQL the processed rows lose
    their processed_at (one of another clock keeps it) and sit in partitions ordered without
    padding; downgrading writes every row back as it was."""
    from tests.queue_helpers import ack, listing, poll, status

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    ids = old_shape_deliveries(fresh_app, backend)
    # What the service answers (it cannot run on 0020 since 0022): the same after the round trip.
    listed = listing(client, "lean", limit=50)
    figures = {name: status(client)[name] for name in STATUS_FIGURES}
    repeated = ack(client, ids["actions"]).json
    assert repeated["outcome"] == "already_processed"
    downgraded_to_0020(fresh_app)
    rows = rows_of(fresh_app, DELIVERY_ROWS)
    assert all(row[7] is not None for row in rows if row[1] == "processed")
    named = f'"packet_id":"{ids["actions"]}"'
    assert [row[9] for row in rows if named in (row[9] or "")] != []
    postgres = backend == "postgres"
    if postgres:
        assert row_bytes(fresh_app, ids["empty"]) == 108

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    lean = rows_of(fresh_app, DELIVERY_ROWS)
    processed = {ids["actions"], ids["empty"], ids["own_clock"]}
    cleared = processed - {ids["own_clock"]} if postgres else set()
    # PostgreSQL: the packet's own id in its actions becomes a mark (a TAB and 0).
    marked = {ids["actions"]} if postgres else set()
    assert lean == [
        (
            *row[:7],
            None if row[0] in cleared else row[7],
            row[8],
            row[9].replace(f'"{row[0]}"', "\t0") if row[0] in marked else row[9],
            *row[10:],
        )
        for row in rows
    ]
    assert listing(client, "lean", limit=50) == listed
    assert {name: status(client)[name] for name in STATUS_FIGURES} == figures
    assert ack(client, ids["actions"]).json == repeated
    if postgres:
        layout = rows_of(
            fresh_app,
            "SELECT c.relname, a.attname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = 1 "
            "WHERE i.inhparent = 'deliveries_processed'::regclass",
        )
        assert layout and {first for _, first in layout} == {"received_at"}, layout
        indexed = rows_of(
            fresh_app,
            "SELECT count(*) FROM pg_indexes WHERE tablename LIKE 'deliveries_processed_%'",
        )
        assert indexed == [(len(layout),)]
        assert row_bytes(fresh_app, ids["empty"]) == 90
    served = {p["packet_id"] for p in poll(client, limit=10)["packets"]}
    assert served <= {ids["waiting"], ids["retrying"]} and ids["waiting"] in served

    assert flask_db(fresh_app, "downgrade", "0020_signal_key_sets").exit_code == 0
    back = {row[0]: row for row in rows_of(fresh_app, DELIVERY_ROWS)}
    for row in rows:
        if row[0] in processed:
            assert back[row[0]] == row
    if postgres:
        first = rows_of(
            fresh_app,
            "SELECT a.attname FROM pg_attribute a JOIN pg_inherits i ON i.inhrelid = a.attrelid "
            "WHERE a.attnum = 1 AND i.inhparent = 'deliveries_processed'::regclass "
            "GROUP BY 1",
        )
        assert first == [("packet_id",)]
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    assert listing(client, "lean", limit=50)[0]["packet_id"] in ids.values()


def row_bytes(app, packet_id: str) -> int:
    """PostgreSQL: the bytes of a delivery's row as its partition holds it (a row read through
    ``deliveries`` is converted to the parent's order)."""
    ((partition, day),) = rows_of(
        app,
        "SELECT tableoid::regclass::text, received_at::date FROM deliveries "
        f"WHERE CAST(packet_id AS TEXT) = '{packet_id}'",
    )
    ((size,),) = rows_of(
        app,
        f"SELECT pg_column_size(d.*) FROM {partition} d "
        f"WHERE CAST(packet_id AS TEXT) = '{packet_id}'",
    )
    assert partition == f"deliveries_processed_p{day:%Y%m%d}"
    return size


@pytest.mark.parametrize("backend", ["postgres"])
def test_lean_deliveries_migration_computes_processed_at_as_python_does(fresh_app, backend):
    """Migration 0021 clears a processed_at only where it equals visible_at as
    ``datetime.fromtimestamp`` converts it, and its downgrade writes that value back: its SQL
    agrees with Python on every instant, halfway microseconds (rounded to even) included
    (PostgreSQL's own to_timestamp differs on about one in twenty). Its marks of karma actions
    are the service's."""
    import importlib.util
    import pathlib
    import random

    from bucket.services.delivery.actions import PG_MARKED, PG_RESTORED
    from bucket.timeutil import from_epoch

    path = pathlib.Path(__file__).parents[1] / (
        "migrations/versions/0021_lean_processed_deliveries.py"
    )
    spec = importlib.util.spec_from_file_location("lean_deliveries", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = random.Random(21)
    instants = [1765000000 + j / 128 for j in range(128)]  # 7812.5 us and the like: ties
    instants += [time.time() + generator.uniform(-1e7, 1e7) for _ in range(20000)]
    instants += [generator.randrange(10**9, 2 * 10**9) + generator.random() for _ in range(20000)]
    assert flask_db(fresh_app, "upgrade").exit_code == 0
    with fresh_app.app_context():
        found = db.session.execute(
            text(
                f"SELECT visible_at, {module.FROM_EPOCH} FROM unnest(CAST(:v AS float8[])) "
                "AS v(visible_at)"
            ),
            {"v": instants},
        ).all()
        db.session.commit()
    assert len(found) == len(instants)
    wrong = [(v, t) for v, t in found if t != from_epoch(v).replace(tzinfo=None)]
    assert wrong == []
    # Its marks in karma actions are the service's own (services/delivery/actions).
    own = {"actions": "karma_actions", "packet_id": "packet_id"}
    assert module.MARKED == PG_MARKED.format(**own)
    assert module.RESTORED == PG_RESTORED.format(**own)


CODED_VIEW = (
    "SELECT CAST(packet_id AS TEXT), user_id, employee_id, system_type, role, cognitive_state, "
    "state, auth_outcome FROM packets ORDER BY seq"
)
# The same columns since migration 0024 (``<name>_text``).
CODED_VIEW_NOW = (
    "SELECT CAST(packet_id AS TEXT), user_id, employee_id, system_type_text, role_text, "
    "cognitive_state_text, state_text, auth_outcome_text FROM packets ORDER BY seq"
)


def test_upgrade_to_packet_codes_converts_old_rows_and_downgrade_writes_their_text_back(
    fresh_app, backend
):
    """Migration 0022 with data in the 0021 layout (every string as text, an EMS packet's
    employee_id repeating its user_id): a learner's packet, an EMS one, one naming a user and
    another employee, one with a state outside the code table and one with an authentication
    outcome, sealed. Upgrading stores the known values as codes and the repeated employee_id
    as NULL on PostgreSQL (SQLite: unchanged), and every reader answers byte for byte as
    before: the listings by user and by employee, the artifacts, verify over the old seals,
    the poll; downgrading writes every row back exactly as it was."""
    from bucket.schemas.packets import fast_load_packet
    from bucket.services.coalescing import Submission
    from bucket.services.ingest import write_submissions
    from bucket.services.tokens import PacketAuth
    from tests.factories import fixture
    from tests.queue_helpers import API, ingest, poll

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    runner = fresh_app.test_cli_runner()
    ems = {**fixture("ems_packet.json"), "timestamp": make_packet()["timestamp"]}
    ems.pop("user_id", None)
    other = make_packet(user_id="emp_boss", employee_id="emp_7", system_type="ems")
    ids = [
        ingest(client),
        client.post(f"{API}/ingest", json=ems).json["packet_id"],
        client.post(f"{API}/ingest", json=other).json["packet_id"],
    ]
    with fresh_app.app_context():
        # A state a newer bridge sends (configured by BUCKET_COGNITIVE_STATES).
        flow = {**fast_load_packet(make_packet()), "cognitive_state": "FLOW"}
        verified = fast_load_packet(make_packet())
        written = write_submissions(
            [
                Submission([flow]),
                Submission([verified], None, [PacketAuth("verified", "stu_test")]),
            ]
        )
    ids += [outcomes[0].packet_id for outcomes in written]
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0

    def answers() -> list:
        listed = [
            client.get(f"{API}/packets/user/{who}?limit=50").get_data()
            for who in ("stu_test", "emp_0387", "emp_7", "emp_boss")
        ]
        artifacts = [client.get(f"/api/v1/audit/artifact/{pid}").get_data() for pid in ids]
        return [listed, artifacts]

    seen = answers()
    # The 0021 layout (packets as before 0022), with these rows (the downgrade is tested too).
    result = flask_db(fresh_app, "downgrade", "0021_lean_processed_deliveries")
    assert result.exit_code == 0, result.output
    old = rows_of(fresh_app, CODED_VIEW)
    assert old == [
        (ids[0], "stu_test", None, "gurukul", "student", "ON_TASK", None, None),
        (ids[1], "emp_0387", "emp_0387", "ems", "employee", None, "WORKING", None),
        (ids[2], "emp_boss", "emp_7", "ems", "student", "ON_TASK", None, None),
        (ids[3], "stu_test", None, "gurukul", "student", "FLOW", None, None),
        (ids[4], "stu_test", None, "gurukul", "student", "ON_TASK", None, "verified"),
    ]
    whole = "SELECT * FROM packets ORDER BY seq"
    before = rows_of(fresh_app, whole)

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    stored = rows_of(fresh_app, CODED_VIEW_NOW)
    codes = rows_of(
        fresh_app,
        "SELECT system_type_code, role_code, cognitive_state_code, state_code, "
        "auth_outcome_code, employee_is_user FROM packets ORDER BY seq",
    )
    if backend == "postgres":
        assert stored == [
            (ids[0], "stu_test", None, None, None, None, None, None),
            (ids[1], "emp_0387", None, None, None, None, None, None),
            (ids[2], "emp_boss", "emp_7", None, None, None, None, None),
            (ids[3], "stu_test", None, None, None, "FLOW", None, None),
            (ids[4], "stu_test", None, None, None, None, None, None),
        ]
        assert codes == [
            ("g", "s", "O", None, None, None),
            ("e", "e", None, "W", None, True),
            ("e", "s", "O", None, None, None),
            ("g", "s", None, None, None, None),
            ("g", "s", "O", None, "v", None),
        ]
    else:
        assert stored == old
        assert set(codes) == {(None,) * 6}
    assert answers() == seen
    verified_output = runner.invoke(args=["bucket", "verify"])
    assert verified_output.exit_code == 0 and "5 packets" in verified_output.output, (
        verified_output.output
    )
    polled = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert [
        (polled[pid]["employee_id"], polled[pid]["system_type"], polled[pid]["cognitive_state"])
        for pid in ids
    ] == [
        (None, "gurukul", "ON_TASK"),
        ("emp_0387", "ems", "WORKING"),
        ("emp_7", "ems", "ON_TASK"),
        (None, "gurukul", "FLOW"),
        (None, "gurukul", "ON_TASK"),
    ]
    assert polled[ids[4]]["auth_outcome"] == "verified"

    assert flask_db(fresh_app, "downgrade", "0021_lean_processed_deliveries").exit_code == 0
    assert rows_of(fresh_app, whole) == before
    assert flask_db(fresh_app, "upgrade").exit_code == 0


NUMBERS_BEFORE_0026 = (
    "SELECT CAST(packet_id AS TEXT), active_seconds, idle_seconds, away_seconds, focus_score, "
    "integrity_score FROM packets ORDER BY seq"
)
# The same since migration 0026: the floats under ``<name>_float``, then the scaled integers.
NUMBERS_NOW = (
    "SELECT CAST(packet_id AS TEXT), active_seconds_float, idle_seconds_float, "
    "away_seconds_float, focus_score_float, integrity_score_float, active_seconds_scaled, "
    "idle_seconds_scaled, away_seconds_scaled, focus_score_scaled, integrity_score_scaled "
    "FROM packets ORDER BY seq"
)


def test_upgrade_to_scaled_numbers_keeps_old_rows_and_downgrade_writes_their_floats_back(
    fresh_app, backend
):
    """Migration 0026, both ways, with data: two packets stored on the head (the first with
    few decimals, scaled on PostgreSQL; the second with a third and a long decimal, floats),
    sealed. Downgrading to 0025 writes every number back as the float sent, under the fields'
    names, the durations NOT NULL again; upgrading leaves those rows as floats (no rewrite),
    and every reader answers byte for byte as on the head: the listing, the artifacts, verify
    over the seal, the poll; a packet ingested afterwards is stored scaled again."""
    from tests.queue_helpers import API, ingest, poll

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    runner = fresh_app.test_cli_runner()
    sent = [
        dict(active_seconds=4.8, idle_seconds=0.2, away_seconds=0.0, focus_score=85),
        dict(active_seconds=1 / 3, idle_seconds=5 - 1 / 3, away_seconds=0.0, focus_score=70.125),
    ]
    ids = [ingest(client, **numbers) for numbers in sent]
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0

    def answers() -> list:
        listed = client.get(f"{API}/packets/user/stu_test?limit=50").get_data()
        return [listed, *(client.get(f"/api/v1/audit/artifact/{pid}").get_data() for pid in ids)]

    seen = answers()
    as_floats = [
        (ids[0], 4.8, 0.2, 0.0, 85.0, None),
        (ids[1], 1 / 3, 5 - 1 / 3, 0.0, 70.125, None),
    ]
    if backend == "postgres":
        assert rows_of(fresh_app, NUMBERS_NOW) == [
            (ids[0], None, None, None, None, None, 4800, 200, 0, 8500, None),
            (ids[1], 1 / 3, 5 - 1 / 3, None, 70.125, None, None, None, 0, None, None),
        ]
    else:
        assert rows_of(fresh_app, NUMBERS_NOW) == [row + (None,) * 5 for row in as_floats]

    result = flask_db(fresh_app, "downgrade", "0025_hot_fillfactor")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, NUMBERS_BEFORE_0026) == as_floats
    with fresh_app.app_context():
        columns = {c["name"]: c for c in inspect(db.engine).get_columns("packets")}
    nullable = [columns[name]["nullable"] for name in ("active_seconds", "focus_score")]
    assert nullable == [False, True]

    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, NUMBERS_NOW) == [row + (None,) * 5 for row in as_floats]
    assert answers() == seen
    verified = runner.invoke(args=["bucket", "verify"])
    assert verified.exit_code == 0 and "2 packets" in verified.output, verified.output
    polled = {p["packet_id"]: p for p in poll(client, limit=10)["packets"]}
    assert [
        tuple(polled[pid][name] for name in ("active_seconds", "idle_seconds", "focus_score"))
        for pid in ids
    ] == [(4.8, 0.2, 85.0), (1 / 3, 5 - 1 / 3, 70.125)]
    later = ingest(client, **sent[0])
    scaled = [row[6:] for row in rows_of(fresh_app, NUMBERS_NOW) if row[0] == later]
    assert scaled == [(4800, 200, 0, 8500, None) if backend == "postgres" else (None,) * 5]


OWN_KEYS = "SELECT CAST(packet_id AS TEXT), CAST(dedup_key AS TEXT) FROM packets ORDER BY seq"


def test_keys_in_packet_keys_only_migrate_both_ways_without_touching_a_key_or_a_seal(
    fresh_app, backend
):
    """Migration 0027, both ways, with data: a packet stored with its key on the row (as the
    release before it did, written here by hand on PostgreSQL) and one without, sealed.
    Downgrading to 0026 leaves every row as it is (PostgreSQL: the seals committed to the
    NULL keys, so none is written back and the column stays nullable; SQLite, which keeps
    its keys, makes it NOT NULL again); upgrading again changes nothing. Throughout, a copy
    of either packet is still its duplicate and verify passes."""
    from tests.queue_helpers import API

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    runner = fresh_app.test_cli_runner()
    bodies = [make_packet(), make_packet()]
    ids = [client.post(f"{API}/ingest", json=body).json["packet_id"] for body in bodies]
    if backend == "postgres":
        with fresh_app.app_context():
            db.session.execute(
                text(
                    "UPDATE packets p SET dedup_key = k.dedup_key FROM packet_keys k "
                    "WHERE k.packet_id = p.packet_id AND p.packet_id = CAST(:id AS uuid)"
                ),
                {"id": ids[0]},
            )
            db.session.commit()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    before = rows_of(fresh_app, OWN_KEYS)
    assert [key is None for _, key in before] == (
        [False, True] if backend == "postgres" else [False, False]
    )

    def still_whole() -> None:
        for body, packet_id in zip(bodies, ids, strict=True):
            again = client.post(f"{API}/ingest", json=body).json
            assert (again["packet_id"], again["duplicate"]) == (packet_id, True)
        verified = runner.invoke(args=["bucket", "verify"])
        assert verified.exit_code == 0 and "2 packets" in verified.output, verified.output

    still_whole()
    result = flask_db(fresh_app, "downgrade", "0026_scaled_numbers")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, OWN_KEYS) == before
    with fresh_app.app_context():
        columns = {c["name"]: c for c in inspect(db.engine).get_columns("packets")}
    assert columns["dedup_key"]["nullable"] is (backend == "postgres")
    still_whole()
    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert rows_of(fresh_app, OWN_KEYS) == before
    still_whole()


USER_INDEX = (
    "SELECT x.indrelid::regclass::text, pg_get_indexdef(x.indexrelid) FROM pg_index x "
    "WHERE x.indexrelid = CAST('ix_packets_user' AS regclass) OR x.indexrelid IN "
    "(SELECT inhrelid FROM pg_inherits WHERE inhparent = CAST('ix_packets_user' AS regclass)) "
    "ORDER BY 1"
)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite keeps its index
def test_user_key_index_migrates_both_ways_on_every_partition(fresh_app):
    """Migration 0028, both ways, with packets of two users: the parent's index and every
    partition's are on (packet_user_key(user_id), received_at) at the head and on (user_id,
    received_at) at 0027, with the function gone; the listing answers the same throughout."""
    from tests.queue_helpers import API

    assert flask_db(fresh_app, "upgrade").exit_code == 0
    client = fresh_app.test_client()
    for user in ("stu_a", "stu_b", "stu_a"):
        client.post(f"{API}/ingest", json=make_packet(user_id=user))

    def answers() -> list:
        return [client.get(f"{API}/packets/user/{u}").get_data() for u in ("stu_a", "stu_b")]

    def definitions() -> set[str]:
        return {
            definition.split(" USING btree ")[1] for _, definition in rows_of(fresh_app, USER_INDEX)
        }

    seen = answers()
    partitions = len(rows_of(fresh_app, USER_INDEX))
    assert partitions > 2 and definitions() == {"(packet_user_key((user_id)::text), received_at)"}
    result = flask_db(fresh_app, "downgrade", "0027_keys_in_packet_keys_only")
    assert result.exit_code == 0, result.output
    assert definitions() == {"(user_id, received_at)"}
    assert len(rows_of(fresh_app, USER_INDEX)) == partitions
    assert rows_of(fresh_app, "SELECT count(*) FROM pg_proc WHERE proname = 'packet_user_key'") == [
        (0,)
    ]
    result = flask_db(fresh_app, "upgrade")
    assert result.exit_code == 0, result.output
    assert definitions() == {"(packet_user_key((user_id)::text), received_at)"}
    assert answers() == seen
