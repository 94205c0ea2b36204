"""Purging a day: where the time of ``purge_days`` goes on one big calendar day of packets.

    .venv/bin/python -m bench.purge_day                       # 2 days of 5M packets
    .venv/bin/python -m bench.purge_day --per-day 1000000 --days 2

A database of its own on the benchmark's private PostgreSQL (created, migrated, dropped here)
is filled with ``bench.storage``'s set-based fill: ``days`` whole calendar days (UTC) of
``per-day`` packets each, the last ending yesterday, all processed but one dead in 20,000, and
a small backlog of unfinished packets in the newest day; sealed, booked and vacuumed as a
running deployment's would be. Then ``purge_days`` drops the oldest day (``--include-dead``)
in a process of its own, timed inside, with the time of every SQL statement it ran (grouped
by what it does). Before it, ``EXPLAIN (ANALYZE, BUFFERS)`` of drop_day's checks on that day,
for the plans. Prints a table and one JSON line (``BENCH_PURGE_DAY_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.harness import Database, day_partitions, migrate  # noqa: E402
from bench.storage import (  # noqa: E402
    SEAL_PACKETS,
    SEALS_SQL,
    exists,
    fill_range,
    fill_statement,
    url_of,
)

BACKLOG = 2_000
# Runs with the service's settings: purge_days, each statement timed by the engine's events.
PURGE_SCRIPT = """
import json, sys, time
from sqlalchemy import event
from bucket import create_app
from bucket.extensions import db
from bucket.services.retention import purge_days
app = create_app()
statements = []
with app.app_context():
    engine = db.engine
    @event.listens_for(engine, "before_cursor_execute")
    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault("began", []).append(time.perf_counter())
    @event.listens_for(engine, "after_cursor_execute")
    def after(conn, cursor, statement, parameters, context, executemany):
        began = conn.info["began"].pop()
        statements.append([" ".join(statement.split())[:110], time.perf_counter() - began])
    # Commits too: a DROP TABLE's files go at its commit, outside every statement.
    commit = engine.dialect.do_commit
    def timed_commit(dbapi_connection):
        began = time.perf_counter()
        commit(dbapi_connection)
        statements.append(["COMMIT", time.perf_counter() - began])
    engine.dialect.do_commit = timed_commit
    began = time.perf_counter()
    report = purge_days(float(sys.argv[1]), include_dead=True)
    seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "statements": statements,
                  "dropped": [[d.partition, d.packets, d.ranges] for d in report.dropped],
                  "kept": [[d.partition, d.kept] for d in report.kept],
                  "key_days": [[k.partition, k.kept] for k in report.key_days]}))
"""


def fill(dsn: str, per_day: int, days: int) -> dict:
    """Fill whole UTC days ending yesterday; seal, book and vacuum."""
    run = uuid.uuid4().hex[:8]
    today = int(time.time() // 86400) * 86400
    first = today - days * 86400
    step = 86400.0 / per_day
    figures: dict = {"per_day": per_day, "days": days, "first_day": time.gmtime(first)[:3]}
    figures["oldest_day_end"] = first + 86400
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = fill_statement(conn, [])
        # A new deployment's legacy partition of keys is empty: the fill's days of keys get
        # day partitions, as a running deployment has them.
        if exists(conn, "packet_keys_legacy"):
            conn.execute("DROP TABLE packet_keys_legacy")
        for table in ("packets", "deliveries", "deliveries_processed", "packet_keys"):
            if exists(conn, table):
                day_partitions(conn, table, first, days)
        began = time.monotonic()
        total = per_day * days
        for day in range(days):
            lo, hi = day * per_day, (day + 1) * per_day
            end = hi - BACKLOG if day == days - 1 else hi
            # Chunks of 1M rows: each its own statement (and transaction).
            for chunk in range(lo, end, 1_000_000):
                top = min(chunk + 1_000_000, end)
                fill_range(conn, sql, chunk, top, first, step, False, 1000, run)
            fill_range(conn, sql, end, hi, first, step, True, 1000, run)
        figures["fill_seconds"] = round(time.monotonic() - began, 1)
        conn.execute(SEALS_SQL, {"per_seal": SEAL_PACKETS})
        conn.execute("DELETE FROM packet_counters WHERE name = 'booked'")
        conn.execute(
            "INSERT INTO packet_counters (name, shard, value) "
            "SELECT 'booked', 0, max(seq) FROM packets"
        )
        began = time.monotonic()
        conn.execute("VACUUM (ANALYZE)")
        figures["vacuum_seconds"] = round(time.monotonic() - began, 1)
        figures["stored"] = total
    return figures


def older_than(oldest_day_end: float) -> float:
    """``purge_days``' age in days that drops the oldest filled day and no other (its cutoff
    falls in the day after it): counted from the fill's own days, not from today, so a run
    that crosses UTC midnight between the fill and the purge still keeps the next day, and the
    backlog's, out of the purge."""
    return (time.time() - oldest_day_end) / 86400


def explain(dsn: str) -> dict:
    """EXPLAIN (ANALYZE, BUFFERS) of drop_day's checks on the oldest day partition."""
    from bucket.services import retention  # noqa: PLC0415

    plans = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'packets'::regclass AND c.relname ~ '_p?[0-9]{8}$' "
            "ORDER BY 1 LIMIT 1"
        ).fetchone()[0]
        lo, hi = conn.execute(f"SELECT min(received_at), max(received_at) FROM {name}").fetchone()
        keys = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'packet_keys'::regclass AND c.relname ~ '_p?[0-9]{8}$' "
            "ORDER BY 1 LIMIT 1"
        ).fetchone()[0]
        checks = {
            "count": f"SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0) FROM {name}",
            "held": "SELECT packet_id, delivery_state FROM deliveries WHERE delivery_state IN "
            "('pending', 'leased', 'dead') AND received_at >= %(lo)s AND received_at <= %(hi)s",
            # The day of keys' live check once the day of packets is gone: nothing after it.
            "key_live": f"SELECT count(*) FROM (SELECT 1 FROM {keys} WHERE received_at > %(hi)s "
            "LIMIT 1000) AS held",
        }
        # The ranges' statement before and after; the count that proves a day one run.
        for check in ("RANGES_SQL", "RUNS_SQL", "SPAN_SQL"):
            if hasattr(retention, check):
                checks[check.lower()] = getattr(retention, check).format(day=name)
        for key, statement in checks.items():
            began = time.monotonic()
            rows = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, {"lo": lo, "hi": hi}
            ).fetchall()
            plans[key] = {
                "seconds": round(time.monotonic() - began, 3),
                "plan": [r[0] for r in rows],
            }
    plans["day"] = name
    return plans


def grouped(statements: list) -> dict[str, float]:
    """Seconds per kind of statement."""
    kinds = {
        "count(*), count(DISTINCT seq)": "day count",
        "row_number() OVER (ORDER BY seq)": "day runs",
        "(SELECT count(*) FROM packets_": "day runs",  # the count that proves one run
        "x.indisunique": "day runs",
        "octet_length(leaf_seqs)": "seals near the day",
        "SELECT coalesce(max(seq), 0) FROM packets_": "day max(seq)",
        "WITH bounds AS": "day ranges",
        "delivery_state IN ('pending', 'leased', 'dead')": "unfinished/dead",
        "FROM packet_keys_": "key day live check",
        "DETACH PARTITION": "detach",
        "DROP TABLE": "drop",
        "LOCK TABLE": "lock",
        "audit_seals": "sealing",
        "COMMIT": "commits",
    }
    out: dict[str, float] = {}
    for statement, seconds in statements:
        kind = next((k for needle, k in kinds.items() if needle in statement), "other")
        out[kind] = out.get(kind, 0.0) + seconds
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--per-day", type=int, default=5_000_000, help="packets a day")
    parser.add_argument("--days", type=int, default=2, help="whole days filled (>= 2)")
    parser.add_argument("--no-explain", action="store_true", help="skip the EXPLAIN pass")
    args = parser.parse_args(argv)
    database = Database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    name = f"bench_purge_{uuid.uuid4().hex[:8]}"
    try:
        with database.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = url_of(database.url, name)
        migrate({**env, "DATABASE_URL": url})
        dsn = database.dsn.rsplit("/", 1)[0] + "/" + name
        figures = fill(dsn, args.per_day, args.days)
        if not args.no_explain:
            figures["explain"] = explain(dsn)
        out = subprocess.run(
            [sys.executable, "-c", PURGE_SCRIPT, str(older_than(figures["oldest_day_end"]))],
            cwd=Path(__file__).resolve().parent.parent,
            env={**env, "DATABASE_URL": url},
            check=True,
            capture_output=True,
            text=True,
            timeout=3600,
        ).stdout
        figures["purge"] = json.loads(out.strip().splitlines()[-1])
        figures["purge"]["steps"] = grouped(figures["purge"]["statements"])
    finally:
        database.stop()
    purge = figures["purge"]
    print(
        f"{args.per_day:,} packets a day, {args.days} days (fill {figures['fill_seconds']} s): "
        f"purge of the oldest day {purge['seconds']:.2f} s; dropped {purge['dropped']}, "
        f"kept {purge['kept']}, key days {purge['key_days']}"
    )
    for kind, seconds in purge["steps"].items():
        print(f"  {kind:<24} {seconds:8.3f} s")
    for key, plan in figures.get("explain", {}).items():
        if key != "day":
            print(f"EXPLAIN {key}: {plan['seconds']} s")
            print("\n".join("    " + line for line in plan["plan"]))
    print("BENCH_PURGE_DAY_JSON " + json.dumps(figures, default=str))
    return figures


if __name__ == "__main__":
    main()
