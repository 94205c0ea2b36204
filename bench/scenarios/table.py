"""A growing table: ingest and poll/ack latency as stored packets grow, beside the machine's
weather, and the bytes each stored packet takes."""

from __future__ import annotations

from bench import clients
from bench.context import Row, Run, Scenario, Section, db_rows, karma, sequential, settle
from bench.harness import Database, Weather, exists, fill, median, percentile, recount


def bench_table(run: Run, stored: int, label: str, days: int = 0) -> None:
    """Ingest p50 and poll/ack p50 with ``stored`` packets in the table, mostly processed
    (those added here spread over ``days`` past days, when given)."""
    sizes = run.sizes
    have = db_rows(run.database)
    fill(run.database, stored - have, "processed", clients.run_id(), days)
    recount(run.env)
    settle(run.database)
    calls = max(10, sizes.sequential_calls // sizes.rounds)
    sequential(run.service.port, "ingest", 100, token=None)  # warm-up
    # Rounds, medians, and the trivial app's p50 beside them: one sequence of calls on a
    # shared machine swings by a third, which would hide or fake a change with the table size.
    ingests, polls, acks, trivials, weathers = [], [], [], [], []
    for _ in range(sizes.rounds):
        with Weather(run.database) as weather:
            ingest = sequential(run.service.port, "ingest", calls, token=None)
            drain = karma(run.service.port, 60, calls)
            trivial = sequential(run.ceiling.port, "ingest", calls, token=None)
        weathers.append(weather.figures)
        ingests.append(percentile(ingest.latencies["ingest"], 50) * 1000)
        polls.append(percentile(drain.latencies.get("poll", []), 50) * 1000)
        acks.append(percentile(drain.latencies.get("ack", []), 50) * 1000)
        trivials.append(percentile(trivial.latencies["ingest"], 50) * 1000)
    run.results[f"table_{label}"] = {
        "stored": db_rows(run.database),
        "days": days,
        # packets that fell in the default partition: 0 when the fill made its days' partitions
        "in_default_partition": default_rows(run.database),
        "ingest_p50_ms": median(ingests),
        "poll_p50_ms": median(polls),
        "ack_p50_ms": median(acks),
        "trivial_ingest_p50_ms": median(trivials),
        # The machine during the rounds: medians of percentages, sums of PostgreSQL's writes.
        "weather": {
            name: (median if name.endswith("_pct") else sum)([w[name] for w in weathers])
            for name in weathers[0]
        },
    }


def default_rows(database: Database) -> int | None:
    """Packets in the default partition of ``packets`` (None: not partitioned, SQLite-like)."""
    with database.connect() as conn:
        if not exists(conn, "packets_default"):
            return None
        return conn.execute("SELECT count(*) FROM packets_default").fetchone()[0]


def bench_storage(run: Run) -> None:
    """Heap and index bytes per stored packet."""
    rows, heap, index = run.database.table_bytes()
    run.results["storage"] = {
        "rows": rows,
        "heap_bytes_per_packet": heap / max(rows, 1),
        "index_bytes_per_packet": index / max(rows, 1),
    }


def measure(run: Run) -> None:
    """From an empty table: the small table, the large one, then the storage per packet."""
    run.truncate()
    bench_table(run, run.sizes.small_table, "small")
    bench_table(run, run.sizes.large_table, "large", run.sizes.large_table_days)
    bench_storage(run)


def over_days(result: dict) -> str:
    return f" over {result['days']} days" if result.get("days") else ""


def table_rows(results: dict, row: Row) -> None:
    """Latency as the table grows, and the machine meanwhile."""
    ts, tl = results.get("table_small"), results.get("table_large")
    if ts and tl:
        row(
            f"ingest p50, {ts['stored']:,} -> {tl['stored']:,} stored{over_days(tl)}",
            f"{ts['ingest_p50_ms']:.2f} -> {tl['ingest_p50_ms']:.2f} ms "
            f"(x{tl['ingest_p50_ms'] / ts['ingest_p50_ms']:.2f})",
            "<= 1.3x",
        )
        poll_ack_small = ts["poll_p50_ms"] + ts["ack_p50_ms"]
        poll_ack_large = tl["poll_p50_ms"] + tl["ack_p50_ms"]
        row(
            f"poll + ack p50, {ts['stored']:,} -> {tl['stored']:,} stored{over_days(tl)}",
            f"{poll_ack_small:.2f} -> {poll_ack_large:.2f} ms "
            f"(x{poll_ack_large / poll_ack_small:.2f})",
            "<= 1.3x",
        )
        row(
            "  trivial app's ingest p50 beside them (the machine's drift)",
            f"{ts['trivial_ingest_p50_ms']:.2f} -> {tl['trivial_ingest_p50_ms']:.2f} ms",
            "",
        )
        ws, wl = ts["weather"], tl["weather"]
        row(
            "  the machine meanwhile: CPU stolen, I/O wait, I/O pressure",
            " -> ".join(
                f"{w['steal_pct']:.0f}/{w['iowait_pct']:.0f}/{w.get('io_pressure_pct', 0):.0f} %"
                for w in (ws, wl)
            ),
            "",
        )
        row(
            "  PostgreSQL meanwhile: checkpoints, buffers written by checkpoints/backends",
            " -> ".join(
                f"{w['checkpoints']}, {w['checkpoint_buffers']:,}/{w['backend_buffers']:,}"
                for w in (ws, wl)
            ),
            "",
        )
        row(
            "  WAL meanwhile: full-page images / records, MB",
            " -> ".join(
                f"{w['wal_full_page_images']:,}/{w['wal_records']:,}, {w['wal_bytes'] / 1e6:.1f}"
                for w in (ws, wl)
            ),
            "",
        )


SCENARIOS = (Scenario("table", measure, sections=(Section(30, table_rows),)),)
