"""Ingest with wrk: single packets and batches, against the trivial app and the bare inserts,
with the CPU and WAL each packet costs and the workers' memory over the run."""

from __future__ import annotations

from bench.context import Row, Run, Scenario, Section, db_rows
from bench.harness import Accounting, Service, median, wrk


def round_of_ingest(run: Run, n: int, single: list, batch: list, single_cost: list) -> None:
    """One turn of the service: single packets (with their cost), then batches."""
    sizes, connections = run.sizes, run.sizes.wrk_connections
    with Accounting(run.database, run.service) as cost:
        single.append(
            wrk(run.service.port, "ingest.lua", sizes.seconds, connections, {"RUN": f"s{n}"})
        )
    single_cost.append((cost, single[-1]["requests"]))
    batch.append(
        wrk(run.service.port, "batch.lua", sizes.seconds, 4, {"RUN": f"b{n}", "BATCH": "100"})
    )


def bench_ingest(run: Run) -> None:
    """Single-packet and batch ingest with wrk, alternating with the trivial endpoint."""
    sizes, db = run.sizes, run.database
    connections = sizes.wrk_connections
    wrk(run.ceiling.port, "ingest.lua", 1, connections)  # warm both up
    # Four times the connections: every worker's thread pool starts all its threads (each
    # takes about a megabyte: its stack and its allocator's arena), so the memory row measures
    # what serving requests adds, not the pool's start (BENCHMARKS.md).
    wrk(run.service.port, "ingest.lua", 3, connections * 4, {"RUN": "warm"})
    rss_before, threads_before = run.service.rss_mb(), run.service.thread_counts()
    ingested_before = db_rows(db)
    trivial, bare, bare_batch, single, batch = [], [], [], [], []
    single_cost = []
    # The second ceiling: Flask and the same durable inserts, none of the bucket's layers.
    wrk(run.bare.port, "ingest.lua", 1, connections, {"RUN": "bare-warm"})
    for n in range(sizes.rounds):
        trivial.append(wrk(run.ceiling.port, "ingest.lua", sizes.seconds, connections))
        bare.append(
            wrk(run.bare.port, "ingest.lua", sizes.seconds, connections, {"RUN": f"bare{n}"})
        )
        bare_batch.append(
            wrk(run.bare.port, "batch.lua", sizes.seconds, 4, {"RUN": f"bb{n}", "BATCH": "100"})
        )
        round_of_ingest(run, n, single, batch, single_cost)
    ingested = db_rows(db) - ingested_before
    rss_after, threads_after = run.service.rss_mb(), run.service.thread_counts()
    trivial_rps = median([r["rps"] for r in trivial])
    bare_rps = median([r["rps"] for r in bare])
    single_rps = median([r["rps"] for r in single])
    batch_pps = median([r["rps"] * 100 for r in batch])
    bare_batch_pps = median([r["rps"] * 100 for r in bare_batch])
    db_cpu = sum(c.db_cpu for c, _ in single_cost) / sum(n for _, n in single_cost)
    app_cpu = sum(c.app_cpu for c, _ in single_cost) / sum(n for _, n in single_cost)
    wal = sum(c.wal for c, _ in single_cost) / sum(n for _, n in single_cost)
    run.results["ingest"] = {
        "trivial_rps": trivial_rps,
        "single_rps": single_rps,
        "single_ratio": single_rps / trivial_rps,
        "bare_insert_rps": bare_rps,
        "bare_insert_ratio": bare_rps / trivial_rps,
        "bare_insert_errors": sum(r["errors"] for r in bare),
        "single_p50_ms": median([r["p50_ms"] for r in single]),
        "single_p99_ms": median([r["p99_ms"] for r in single]),
        "single_errors": sum(r["errors"] for r in single),
        "batch_packets_per_s": batch_pps,
        "batch_ratio_to_trivial_rps": batch_pps / trivial_rps,
        "batch_p99_ms": median([r["p99_ms"] for r in batch]),
        "batch_errors": sum(r["errors"] for r in batch),
        "bare_batch_packets_per_s": bare_batch_pps,
        "bare_batch_errors": sum(r["errors"] for r in bare_batch),
        "runs": {
            "trivial": trivial,
            "bare_insert": bare,
            "bare_batch": bare_batch,
            "single": single,
            "batch": batch,
        },
        "db_cpu_ms_per_packet": db_cpu * 1000,
        "app_cpu_ms_per_packet": app_cpu * 1000,
        "wal_bytes_per_packet": wal,
    }
    run.results["memory"] = {
        "packets_ingested": ingested,
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "threads_before": threads_before,
        "threads_after": threads_after,
        "growth": max(a / b - 1 for a, b in zip(rss_after, rss_before, strict=False)),
    }


def bench_lone_ingest(run: Run) -> None:
    """One connection, so no request has company to share a commit with: coalescing must not
    make it wait (issue 21). Two services, coalescing on and off whatever the run's service
    has, take turns (the first side alternates); the trivial app at one connection beside."""
    sizes = run.sizes
    sides = {
        flag: Service({**run.env, "BUCKET_INGEST_COALESCE": flag}, name=f"lone-{flag}")
        for flag in ("true", "false")
    }
    try:
        runs: dict[str, list] = {"true": [], "false": [], "trivial": []}
        for flag, side in sides.items():
            wrk(side.port, "ingest.lua", 1, 1, {"RUN": f"lone-warm-{flag}"})
        for n in range(sizes.rounds):
            order = ("true", "false") if n % 2 == 0 else ("false", "true")
            for flag in order:
                runs[flag].append(
                    wrk(sides[flag].port, "ingest.lua", sizes.seconds, 1, {"RUN": f"l{flag}{n}"})
                )
            runs["trivial"].append(wrk(run.ceiling.port, "ingest.lua", sizes.seconds, 1))
    finally:
        for side in sides.values():
            side.stop()
    on, off = (median([r["p50_ms"] for r in runs[flag]]) for flag in ("true", "false"))
    run.results["lone_ingest"] = {
        "coalesced_p50_ms": on,
        "direct_p50_ms": off,
        "ratio": on / off,
        "trivial_p50_ms": median([r["p50_ms"] for r in runs["trivial"]]),
        "errors": sum(r["errors"] for flag in ("true", "false") for r in runs[flag]),
        "runs": runs,
    }


def measure(run: Run) -> None:
    """Ingest, then an empty table for the next scenario."""
    bench_ingest(run)
    bench_lone_ingest(run)
    run.truncate()


def ingest_rows(results: dict, row: Row) -> None:
    """Single and batch ingest, each beside its ceilings."""
    if "ingest" in results:
        ing = results["ingest"]
        row(
            "single ingest vs trivial, wrk 16 connections",
            f"{ing['single_rps']:.0f} vs {ing['trivial_rps']:.0f} = {ing['single_ratio']:.2f}, "
            f"p99 {ing['single_p99_ms']:.1f} ms, {ing['single_errors']} errors",
            ">= 0.5, p99 < 50 ms, 0 errors",
        )
        row(
            "  bare Flask + the same insert vs trivial (a ceiling)",
            f"{ing['bare_insert_rps']:.0f} vs {ing['trivial_rps']:.0f} = "
            f"{ing['bare_insert_ratio']:.2f}; ingest / bare = "
            f"{ing['single_rps'] / ing['bare_insert_rps']:.2f}",
            "(what the bucket's layers cost)",
        )
    if "lone_ingest" in results:
        lone = results["lone_ingest"]
        row(
            "single ingest p50 at 1 connection, coalescing on vs off",
            f"{lone['coalesced_p50_ms']:.2f} vs {lone['direct_p50_ms']:.2f} ms = "
            f"{lone['ratio']:.2f} (trivial {lone['trivial_p50_ms']:.2f} ms), "
            f"{lone['errors']} errors",
            "<= 1.1 x",
        )
    if "ingest" in results:
        ing = results["ingest"]
        row(
            "batch ingest, 100 packets per envelope",
            f"{ing['batch_packets_per_s']:,.0f} packets/s "
            f"({ing['batch_ratio_to_trivial_rps']:.1f}x trivial req/s)",
            ">= 30,000/s and >= 5x",
        )
        row(
            "  bare Flask + the same batch insert (a ceiling)",
            f"{ing['bare_batch_packets_per_s']:,.0f} packets/s "
            f"({ing['bare_batch_packets_per_s'] / ing['trivial_rps']:.1f}x trivial req/s)",
            "",
        )


def memory_rows(results: dict, row: Row) -> None:
    """The workers' memory over the ingest run."""
    if "memory" in results:
        mem = results["memory"]
        row(
            f"worker RSS over {mem['packets_ingested']:,} ingested packets",
            " / ".join(
                f"{b:.0f} -> {a:.0f} MB"
                for b, a in zip(mem["rss_mb_before"], mem["rss_mb_after"], strict=False)
            )
            + f" (+{mem['growth']:.1%}; threads "
            + " / ".join(
                f"{b} -> {a}"
                for b, a in zip(mem["threads_before"], mem["threads_after"], strict=False)
            )
            + ")",
            "growth < 10 %, < 150 MB",
        )


SCENARIOS = (
    Scenario("ingest", measure, sections=(Section(20, ingest_rows), Section(40, memory_rows))),
)
