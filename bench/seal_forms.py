"""The sealer's statement over packets stored compact and in full (migration 0020).

    .venv/bin/python -m bench.seal_forms                 # 100,000 packets, seals of 50,000
    .venv/bin/python -m bench.seal_forms --packets 20000

A database of its own on the benchmark's private PostgreSQL, migrated and filled as
``bench.storage`` fills it (raw_signals as key set and values, as ingest stores them), then
the sealer's statement (``LEAVES_SQL``, in its transaction settings) is timed five times over
the first seal's packets; then every row is rewritten in full (raw_signals' canonical text,
no key set), ``VACUUM FULL``, and timed again, with this statement and with the one before
0020 (no join to the key sets). Prints the seconds of each run and whether the three gave the
same leaf hashes, and one JSON line (``BENCH_SEAL_FORMS_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench import storage  # noqa: E402
from bench.harness import Database, day_tables, migrate  # noqa: E402
from bucket.services.audit.content import LEAF_FROM, SIGNALS_TEXT  # noqa: E402
from bucket.services.audit.sealing import LEAVES_SQL, SEALER_SETTINGS  # noqa: E402
from bucket.services.signals import REBUILT_SQL  # noqa: E402

# The sealer's statement before migration 0020: raw_signals as stored, no key sets.
BEFORE_SQL = LEAVES_SQL.replace(LEAF_FROM, "packets").replace(SIGNALS_TEXT, "raw_signals::text")
IN_FULL_SQL = (
    "UPDATE packets p SET raw_signals = ("
    + REBUILT_SQL.format(p="p", s="k")
    + ")::json, signal_keys = NULL, signal_values = NULL "
    "FROM signal_key_sets k WHERE k.id = p.signal_keys"
)
RUNS = 5


def timed(conn: psycopg.Connection, statement: str, packets: int, per_seal: int):
    """Seconds of each run of the statement, and the leaf hashes it gave."""
    seconds, hashes = [], None
    for _ in range(RUNS):
        with conn.transaction():
            cursor = conn.cursor(binary=True)
            cursor.execute(SEALER_SETTINGS)
            began = time.perf_counter()
            row = cursor.execute(statement, (0, packets, per_seal)).fetchone()
            seconds.append(time.perf_counter() - began)
            hashes = row[2]
    return seconds, hashes


def measure(dsn: str, packets: int, per_seal: int) -> dict:
    """Fill, then time the three."""
    first = time.time() - 86400 - 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = storage.fill_statement(conn, [])
        day_tables(conn, first, 1)
        storage.fill_range(conn, sql, 0, packets, first, 86400.0 / packets, False, 1000, "s")
        conn.execute("VACUUM (ANALYZE)")
        compact = conn.execute("SELECT count(*) FROM packets WHERE raw_signals IS NULL").fetchone()
        compact_s, compact_hashes = timed(conn, LEAVES_SQL, packets, per_seal)
        conn.execute(IN_FULL_SQL)
        conn.execute("VACUUM (FULL, ANALYZE) packets")
        full_s, full_hashes = timed(conn, LEAVES_SQL, packets, per_seal)
        before_s, before_hashes = timed(conn, BEFORE_SQL, packets, per_seal)
    return {
        "packets": packets,
        "per_seal": per_seal,
        "compact_rows": compact[0],
        "compact_seconds": compact_s,
        "in_full_seconds": full_s,
        "before_0020_in_full_seconds": before_s,
        "same_leaves": compact_hashes == full_hashes == before_hashes,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--per-seal", type=int, default=50_000)
    args = parser.parse_args(argv)
    database = Database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    name = f"bench_seal_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        migrate({**env, "DATABASE_URL": storage.url_of(database.url, name)})
        figures = measure(database.dsn.rsplit("/", 1)[0] + "/" + name, args.packets, args.per_seal)
    finally:
        database.stop()
    for key in ("compact_seconds", "in_full_seconds", "before_0020_in_full_seconds"):
        median = statistics.median(figures[key])
        print(f"{key}: median {median:.3f} s, {median * 1e6 / args.per_seal:.1f} us a packet")
    print(f"compact rows {figures['compact_rows']:,}, same leaves: {figures['same_leaves']}")
    print("BENCH_SEAL_FORMS_JSON " + json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
