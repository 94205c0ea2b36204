"""Looking up processed deliveries by packet_id: a b-tree against BRIN indexes.

    .venv/bin/python -m bench.processed_lookup                    # one day of 5M deliveries
    .venv/bin/python -m bench.processed_lookup --rows 1000000

The processed deliveries are looked up by ``packet_id`` rarely (the user listing, an
acknowledgement of a packet already processed, a requeue, retention's purge by rows) and are
written in about the order of their time-ordered ids, so a BRIN index could stand in for the
b-tree's 28 bytes a packet. This measures what a lookup would cost. On the benchmark's private
PostgreSQL, one table shaped as a day's partition of processed deliveries (migration 0021's
column order) is filled with ``rows`` deliveries of one day, in the order they would be
acknowledged: each 0-5 s after its packet was received, 1 % retried and processed 1-11
minutes later. Then, for each index alone, its bytes a row and ``EXPLAIN (ANALYZE, BUFFERS)``
of one id (100 of them), of 50 ids joined (20 such joins) and of 50 ids that name nothing.
Prints a table and one JSON line (``BENCH_PROCESSED_LOOKUP_JSON``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.harness import Database  # noqa: E402

TABLE_SQL = """
CREATE TABLE processed (received_at timestamp, visible_at float8, last_delivered_at timestamp,
  packet_id uuid, delivery_count int, processed_by_karma bool, delivery_state varchar(16),
  karma_actions json)
"""
# A UUIDv7 of the packet's reception (48 bits of milliseconds, then random bits), acknowledged
# ``lag`` seconds later; a quarter of the acknowledgements carry one action (its id marked).
FILL_SQL = """
INSERT INTO processed
SELECT t, e + lag, t,
  (lpad(to_hex((e * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3) || '8'
    || substr(h, 4, 15))::uuid,
  1, true, 'processed',
  CASE WHEN g %% 4 = 0 THEN ('[{"action":"completing_lessons","packet_id":' || chr(9)
    || '0,"intensity":0.85}]')::json ELSE '[]'::json END
FROM (
  SELECT g, t, extract(epoch FROM t) AS e, md5(g::text) AS h,
    random() * 5 + CASE WHEN random() < 0.01 THEN 60 + random() * 600 ELSE 0 END AS lag
  FROM (
    SELECT g, timestamp '2026-12-01' + g * interval '1 s' * (86400.0 / %(rows)s) AS t
    FROM generate_series(1, %(rows)s) AS g
  ) AS received
) AS acknowledged
ORDER BY e + lag
"""
INDEXES = {
    "btree": "(packet_id) WITH (fillfactor = 100)",
    "brin_minmax_16": "USING brin (packet_id) WITH (pages_per_range = 16)",
    **{
        f"brin_multi_{pages}": (
            f"USING brin (packet_id uuid_minmax_multi_ops) WITH (pages_per_range = {pages})"
        )
        for pages in (8, 16, 32, 64)
    },
}
ONE = "SELECT * FROM processed WHERE packet_id = %s"
JOINED = (
    "SELECT processed.* FROM unnest(%s::uuid[]) AS wanted(id) "
    "JOIN processed ON processed.packet_id = wanted.id"
)


def explained(conn: psycopg.Connection, statement: str, value) -> tuple[int, float, str]:
    """Buffers touched, milliseconds and the top plan node of one run of ``statement``."""
    (plan,) = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, (value,)
    ).fetchone()
    node = plan[0]["Plan"]
    touched = node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
    return touched, node["Actual Total Time"], node["Node Type"]


def measure(conn: psycopg.Connection, rows: int) -> dict:
    conn.execute(TABLE_SQL)
    started = time.monotonic()
    conn.execute(FILL_SQL, {"rows": rows})
    conn.execute("VACUUM ANALYZE processed")
    heap = conn.execute("SELECT pg_relation_size('processed')").fetchone()[0]
    figures = {"rows": rows, "fill_seconds": round(time.monotonic() - started, 1)}
    figures["heap_bytes_per_row"] = heap / rows
    # About 3,000 rows of the day, taken anywhere in it; the first 1,100 are used.
    percent = min(100.0, 300_000 / rows)
    sampled = "SELECT packet_id FROM processed TABLESAMPLE BERNOULLI (%s) LIMIT 1100"
    sample = [r[0] for r in conn.execute(sampled, (percent,))]
    unknown = [r[0] for r in conn.execute("SELECT gen_random_uuid() FROM generate_series(1, 50)")]
    figures["indexes"] = {}
    for name, definition in INDEXES.items():
        conn.execute("DROP INDEX IF EXISTS ix")
        conn.execute(f"CREATE INDEX ix ON processed {definition}")
        conn.execute("ANALYZE processed")
        size = conn.execute("SELECT pg_relation_size('ix')").fetchone()[0]
        one = [explained(conn, ONE, packet_id) for packet_id in sample[1000:1100]]
        joined = [explained(conn, JOINED, sample[i : i + 50]) for i in range(0, 1000, 50)]
        nothing = explained(conn, JOINED, unknown)
        figures["indexes"][name] = {
            "bytes_per_row": size / rows,
            "one_buffers_p50": statistics.median(b for b, _, _ in one),
            "one_ms_p50": statistics.median(ms for _, ms, _ in one),
            "joined_buffers_p50": statistics.median(b for b, _, _ in joined),
            "joined_ms_p50": statistics.median(ms for _, ms, _ in joined),
            "joined_plan": joined[0][2],
            "unknown_buffers": nothing[0],
        }
    return figures


def table(figures: dict) -> str:
    lines = [
        f"{figures['rows']:,} processed deliveries of one day, "
        f"{figures['heap_bytes_per_row']:.1f} bytes of heap a row",
        f"{'index':<16} {'B/row':>6} {'1 id: buffers':>14} {'ms':>7} "
        f"{'50 ids: buffers':>16} {'ms':>8}  plan; 50 unknown ids: buffers",
    ]
    for name, found in figures["indexes"].items():
        lines.append(
            f"{name:<16} {found['bytes_per_row']:>6.2f} {found['one_buffers_p50']:>14,.0f} "
            f"{found['one_ms_p50']:>7.3f} {found['joined_buffers_p50']:>16,.0f} "
            f"{found['joined_ms_p50']:>8.2f}  {found['joined_plan']}; "
            f"{found['unknown_buffers']:,}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5_000_000)
    args = parser.parse_args(argv)
    database = Database()
    try:
        with database.connect() as conn:
            figures = measure(conn, args.rows)
    finally:
        database.stop()
    print(table(figures))
    print("BENCH_PROCESSED_LOOKUP_JSON " + json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
