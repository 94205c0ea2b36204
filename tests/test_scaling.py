"""The hot statements' cost does not grow with the backlog or the table.

PostgreSQL: packets are inserted behind the planner's back (no ANALYZE, so statistics as
stale as after a sudden backlog), first 3,000 waiting and 3,000 processed, then forty times as
many, and the statements run again once the statistics know. Each statement a poll, an
acknowledgement or a status read sends is run under EXPLAIN (ANALYZE, BUFFERS) on the hot
pool's own connections, prepared with the generic plan they keep, at each size: it must never
scan a table or walk a whole index, and the pages it touches must stay about the same. The
benchmark measures the time; this keeps the plans that make it so.
"""

from __future__ import annotations

import re

import orjson
import psycopg
import pytest
from sqlalchemy import text

from bucket.database import AUTOCOMMIT_BIND
from bucket.extensions import db
from bucket.services.counters import recount
from bucket.services.delivery.acks import PG_ACK
from bucket.services.delivery.claims import PG_HEADS, PG_LEASE
from bucket.services.stats import COUNT_CAP, HEAD_ROWS, STATUS_SQL
from bucket.timeutil import epoch_now, from_epoch
from tests.queue_helpers import ingest_many

FILL = """
WITH stored AS (
  INSERT INTO packets (packet_id, dedup_key, user_id, client_timestamp, active_seconds_float,
    idle_seconds_float, away_seconds_float, raw_signals, received_at)
  SELECT CAST(md5(:prefix || g || '/id') AS uuid), CAST(md5(:prefix || g) AS uuid),
    'fill_' || (g % 500), now(), 5, 0, 0,
    '{"tab_visible": true}'::json, now() - make_interval(secs => g)
  FROM generate_series(1, :rows) AS g
  RETURNING packet_id, received_at
)
INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, delivery_count,
  processed_by_karma, processed_at)
SELECT packet_id, received_at, CAST(:state AS text), extract(epoch from received_at) - 86400,
  0, CAST(:state AS text) = 'processed', now()
FROM stored
"""


def fill(app, waiting: int, processed: int, prefix: str) -> None:
    """Waiting and processed packets, by set-based SQL; counters recounted."""
    with app.app_context():
        for state, rows in (("pending", waiting), ("processed", processed)):
            db.session.execute(
                text(FILL), {"prefix": f"{prefix}-{state}-", "state": state, "rows": rows}
            )
        db.session.commit()
        recount()


def hot_statements(live: list[str]) -> dict[str, tuple[str, dict]]:
    """Each statement of a poll, an acknowledgement of ``live`` and a status read."""
    now = epoch_now()
    common = {"now": now, "now_ts": from_epoch(now), "max": 5, "shard": 0, "minute": int(now // 60)}
    ack_items = [
        {"packet_id": pid, "success": True, "receipt": None, "jitter": 1.0} for pid in live
    ]
    return {
        "status": (STATUS_SQL, {"now": now, "cap": COUNT_CAP, "head": HEAD_ROWS, "max": 5}),
        "heads": (PG_HEADS, {**common, "exhausted_error": "x", "cap": COUNT_CAP}),
        "lease": (
            PG_LEASE,
            {**common, "receipt": "r", "until": now + 60, "source": "pending", "limit": 500},
        ),
        "ack": (
            PG_ACK,
            {
                **common,
                "doc": orjson.dumps(ack_items).decode(),
                "ids": live,
                "now_ts": from_epoch(now).replace(tzinfo=None),
                "backoff": 10.0,
                "backoff_max": 3600.0,
                "failure": "x",
            },
        ),
    }


def explain_prepared(connection, sql: str, params: dict) -> str:
    """The executed plan of ``sql`` as the hot pool runs it: prepared, with the generic plan
    the pool's connections keep (run once to prepare it, then under EXPLAIN ANALYZE)."""
    connection.execute(sql, params, prepare=True)
    opening = sql.split("%(", 1)[0]  # the text before the first parameter, as prepared
    name, types = connection.execute(
        "SELECT name, parameter_types::text[] FROM pg_prepared_statements "
        "WHERE starts_with(statement, %s)",
        (opening,),
    ).fetchone()
    order = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))  # psycopg numbers them so
    arguments = ", ".join(f"%s::{kind}" for kind in types)
    # EXECUTE takes no bound parameters: the values go as literals (a client-side cursor).
    cursor = psycopg.ClientCursor(connection)
    cursor.execute(
        f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name}({arguments})", [params[n] for n in order]
    )
    rows = cursor.fetchall()
    return "\n".join(line for (line,) in rows)


def whole_index_scans(plan: str) -> list[str]:
    """Index scans of packets or deliveries with no Index Cond: a walk of the whole index."""
    lines = plan.splitlines()
    found = []
    for number, line in enumerate(lines):
        if re.search(r"Index (Only )?Scan .* on (packets|deliveries)\b", line):
            indent = len(line) - len(line.lstrip(" ->"))
            details = []
            for following in lines[number + 1 :]:
                if "->" in following or len(following) - len(following.lstrip()) <= indent - 4:
                    break
                details.append(following)
            if not any("Index Cond" in detail for detail in details):
                found.append(line.strip())
    return found


def pages_touched(app, statements: dict[str, tuple[str, dict]]) -> dict[str, int]:
    """Run each statement under EXPLAIN (ANALYZE, BUFFERS) on a hot-pool connection; the
    shared buffers its root node touched (which includes every node, CTE and subplan)."""
    touched = {}
    with app.app_context():
        pooled = db.engines[AUTOCOMMIT_BIND].raw_connection()
        try:
            for name, (sql, params) in statements.items():
                plan = explain_prepared(pooled.dbapi_connection, sql, params)
                assert not re.search(r"Seq Scan on (packets|deliveries)\b", plan), (name, plan)
                assert not whole_index_scans(plan), (name, plan)
                root = next(line for line in plan.splitlines() if "Buffers:" in line)
                touched[name] = sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", root))
        finally:
            pooled.close()
        # The leases taken above go back, so the next measurement starts from the same queue.
        db.session.execute(
            text(
                "UPDATE deliveries SET delivery_state = 'pending', lease_id = NULL, "
                "visible_at = extract(epoch FROM now()) - 1 "
                "WHERE delivery_state = 'leased'"
            )
        )
        db.session.commit()
    return touched


@pytest.mark.parametrize("backend", ["postgres"])
def test_hot_statements_touch_as_many_pages_at_forty_times_the_backlog(backend, app, client):
    """Poll (heads and lease), acknowledgement and status: no table scan at either size, and
    about the same number of pages at 120,000 waiting as at 3,000."""
    fill(app, 3_000, 3_000, "small")
    small = pages_touched(app, hot_statements(ingest_many(client, 3)))
    fill(app, 117_000, 3_000, "large")  # a backlog: nearly every delivery is waiting
    stale = pages_touched(app, hot_statements(ingest_many(client, 3)))
    with app.app_context():  # and once vacuum and statistics know how big the backlog is
        with db.engines[AUTOCOMMIT_BIND].connect() as connection:
            connection.exec_driver_sql("VACUUM (ANALYZE) packets, deliveries")
    fresh = pages_touched(app, hot_statements(ingest_many(client, 3)))
    for large in (stale, fresh):
        for name in small:
            # One more index level at most (a few pages per descent), never the backlog
            # (120,000 waiting packets fill thousands of pages).
            assert large[name] <= small[name] * 1.5 + 30, (name, small, large)
