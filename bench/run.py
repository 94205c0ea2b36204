"""The benchmark suite: every figure of BENCHMARKS.md, each beside its ceiling in the same run.

    .venv/bin/python -m bench            # the full run (about 25 minutes on 2 cores)
    .venv/bin/python -m bench --quick    # every figure at smaller sizes, under 3 minutes
    .venv/bin/python -m bench --smoke    # seconds: proves the suite still runs (CI)

It starts a private PostgreSQL (with pg_stat_statements) and Redis, runs the service exactly as
the Procfile's web line does, and runs a trivial Flask app under the same command as the
ceiling. Load comes from separate processes: wrk with Lua for ingest, lean keep-alive clients
for the consumer side. Service and ceiling runs alternate and medians are reported, because one
run on a shared machine swings by ±20 %. It prints a table and one JSON line (``BENCH_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clients  # noqa: E402
from bench.harness import (  # noqa: E402
    TOKEN,
    UNLIMITED,
    Accounting,
    Database,
    Service,
    Weather,
    bucket_command,
    fill,
    median,
    migrate,
    pending_count,
    percentile,
    private_redis,
    recount,
    wrk,
)

LEARNER_PACKETS_PER_DAY = 5000  # one packet per 5 s over about 7 active hours


@dataclass
class Sizes:
    """How big and how long each scenario runs in one mode."""

    seconds: float
    rounds: int
    small_backlog: int
    large_backlog: int
    small_table: int
    large_table: int
    recovery_backlog: int
    learners: int
    sequential_calls: int
    # The audit scenario's turns a side, and whether each measurement waits one seal interval
    # more so the sealer's work on its last packets counts (a 5 % effect needs the full run).
    audit_rounds: int
    audit_settles: bool
    wrk_connections: int = 16


MODES = {
    "full": Sizes(10, 3, 10_000, 1_000_000, 10_000, 5_000_000, 1_000_000, 1000, 2000, 5, True),
    "quick": Sizes(2, 3, 10_000, 100_000, 10_000, 100_000, 50_000, 1000, 300, 1, False),
    "smoke": Sizes(1, 1, 500, 2_000, 500, 3_000, 2_000, 50, 50, 1, False),
}


@dataclass
class Run:
    """Everything one benchmark run shares: servers, the service, the ceiling, the results."""

    sizes: Sizes
    database: Database
    env: dict[str, str]
    service: Service | None = None
    ceiling: Service | None = None
    bare: Service | None = None  # bench/bare_app.py: the bucket's statements and nothing else
    results: dict = field(default_factory=dict)

    def restart_service(self) -> None:
        if self.service:
            self.service.stop()
        self.service = Service(self.env)

    def truncate(self) -> None:
        with self.database.connect() as conn:
            conn.execute(
                "TRUNCATE packets, deliveries, packet_counters, quarantine, "
                "audit_seals, audit_purges, activity_minutes"
            )
        recount(self.env)

    def top_up(self, backlog: int) -> None:
        """Fill the pending backlog back up to ``backlog`` packets."""
        missing = backlog - pending_count(self.database)
        fill(self.database, missing, "pending", clients.run_id())
        if missing > 0:
            recount(self.env)
            settle(self.database)


def settle(database: Database) -> None:
    """After a bulk fill: what autovacuum and the checkpointer would have done while a real
    backlog built up over an hour, done now so they do not run during the measurement."""
    with database.connect() as conn:
        conn.execute("VACUUM (ANALYZE) packets, deliveries")
        conn.execute("CHECKPOINT")


def service_env(database: Database, redis_url: str, log_dir: str) -> dict[str, str]:
    """Production settings, with rate limits raised so they never refuse (but still run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    env.update(
        DATABASE_URL=database.url,
        REDIS_URL=redis_url,
        BUCKET_REDIS_PREFIX=f"bench-{clients.run_id()}",
        BUCKET_CONSUMER_TOKEN=TOKEN,
        BUCKET_RATE_LIMIT_INGEST_PER_IP=UNLIMITED,
        BUCKET_RATE_LIMIT_INGEST_PER_USER=UNLIMITED,
        BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP=UNLIMITED,
        # The audit sealer would spend minutes sealing each bulk fill (a backlog that arrives
        # at once, unlike a real one); the "audit" scenario measures what it costs ingest.
        BUCKET_AUDIT_SEAL_INTERVAL="0",
        BENCH_LOG_DIR=log_dir,
    )
    for name in ("WEB_CONCURRENCY", "PORT", "PROMETHEUS_MULTIPROC_DIR", "LOG_LEVEL"):
        env.pop(name, None)
    return env


# --- ingest -------------------------------------------------------------------------------


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
    wrk(run.service.port, "ingest.lua", 2, connections, {"RUN": "warm"})
    rss_before = run.service.rss_mb()
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
    rss_after = run.service.rss_mb()
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
        "growth": max(a / b - 1 for a, b in zip(rss_after, rss_before, strict=False)),
    }


SEAL_INTERVAL = 5  # seconds: BUCKET_AUDIT_SEAL_INTERVAL's default


def bench_audit(run: Run) -> None:
    """Single and batch ingest with the audit sealer running (every 5 s, the default) and
    with it off: what sealing in the background costs ingest. Each side runs in a service of
    its own, started afresh and warmed up for each measurement, and the sides take turns going
    first (ABBA), so neither inherits a warmer table or the other's autovacuum. Before a sealed
    measurement, what is stored is sealed first: each side pays only for its own packets."""
    sizes = run.sizes
    connections = sizes.wrk_connections
    batch = {"BATCH": "100"}
    runs: dict[str, list] = {key: [] for key in ("ss", "su", "bs", "bu")}
    for n in range(sizes.audit_rounds):
        order = ("s", "u") if n % 2 == 0 else ("u", "s")
        for side in order:
            interval = str(SEAL_INTERVAL) if side == "s" else "0"
            service = Service(
                {**run.env, "BUCKET_AUDIT_SEAL_INTERVAL": interval}, name=f"bucket-audit-{side}"
            )
            try:
                wrk(service.port, "ingest.lua", 2, connections, {"RUN": f"aw{side}{n}"})
                bucket_command(run.env, "seal")
                for kind, script, clients_, extra in (
                    ("s", "ingest.lua", connections, {}),
                    ("b", "batch.lua", 4, batch),
                ):
                    cpu = service.cpu_seconds() + run.database.cpu_seconds()
                    result = wrk(
                        service.port,
                        script,
                        sizes.seconds,
                        clients_,
                        {"RUN": f"a{kind}{side}{n}", **extra},
                    )
                    # One seal interval more: the sealer's work on the last packets counts too.
                    time.sleep(SEAL_INTERVAL + 1 if sizes.audit_settles else 0)
                    cpu = service.cpu_seconds() + run.database.cpu_seconds() - cpu
                    packets = result["requests"] * (100 if kind == "b" else 1)
                    result["cpu_us_per_packet"] = cpu / max(1, packets) * 1e6
                    runs[f"{kind}{side}"].append(result)
            finally:
                service.stop()
    with run.database.connect() as conn:
        seals = conn.execute(
            "SELECT count(*), coalesce(sum(packet_count), 0) FROM audit_seals"
        ).fetchone()
    rate = {key: median([r["rps"] for r in results]) for key, results in runs.items()}
    run.results["audit"] = {
        "single_rps_with_sealer": rate["ss"],
        "single_rps_without_sealer": rate["su"],
        "single_ratio": rate["ss"] / rate["su"],
        "batch_packets_per_s_with_sealer": rate["bs"] * 100,
        "batch_packets_per_s_without_sealer": rate["bu"] * 100,
        "ratio": rate["bs"] / rate["bu"],
        "seals": int(seals[0]),
        "packets_sealed": int(seals[1]),
        "runs": {key: [round(r["rps"]) for r in results] for key, results in runs.items()},
        # CPU of the service and PostgreSQL per packet: steadier than rates on a shared machine.
        "cpu_us_per_packet": {
            key: median([r["cpu_us_per_packet"] for r in results]) for key, results in runs.items()
        },
        "errors": sum(r["errors"] for results in runs.values() for r in results),
    }


def db_rows(db: Database) -> int:
    with db.connect() as conn:
        return conn.execute("SELECT count(*) FROM packets").fetchone()[0]


# --- consumers ----------------------------------------------------------------------------


def sequential(port: int, what: str, count: int, token: str | None = TOKEN) -> clients.Tally:
    (tally,) = clients.in_processes(
        [(clients.sequential_calls, port, token, what, count, clients.run_id())]
    )
    return tally


def karma(port: int, seconds: float, max_packets: int) -> clients.Tally:
    (tally,) = clients.in_processes([(clients.karma_poller, port, TOKEN, seconds, max_packets, 10)])
    return tally


def bench_backlog(run: Run, backlog: int, label: str) -> None:
    """Poll, status and the Karma Tracker drain with ``backlog`` packets waiting."""
    sizes = run.sizes
    run.top_up(backlog)
    calls = sizes.sequential_calls
    sequential(run.service.port, "status", 50)  # warm-up
    status = sequential(run.service.port, "status", calls)
    service_rates, trivial_rates, bare_rates, acks, polls, bare_acks = [], [], [], [], [], []
    errors = status.errors
    drained = max(200, min(backlog // 5, 3000 * int(sizes.seconds)))
    for _ in range(sizes.rounds):
        run.top_up(backlog)
        tally = karma(run.service.port, sizes.seconds, drained)
        service_rates.append(tally.calls / tally.elapsed)
        acks += tally.latencies.get("ack", [])
        polls += tally.latencies.get("poll", [])
        ceiling = karma(run.ceiling.port, sizes.seconds, drained)
        trivial_rates.append(ceiling.calls / ceiling.elapsed)
        # The bare statements take the backlog as the service left it (at most ``drained``
        # fewer): neither's cost depends on the backlog's size, and a refill costs seconds.
        bare = karma(run.bare.port, sizes.seconds, drained)
        bare_rates.append(bare.calls / bare.elapsed)
        bare_acks += bare.latencies.get("ack", [])
        errors += tally.errors + ceiling.errors + bare.errors
    run.results[f"backlog_{label}"] = {
        "waiting": backlog,
        "status_p50_ms": percentile(status.latencies["status"], 50) * 1000,
        "poll_p50_ms": percentile(polls, 50) * 1000,
        "ack_p50_ms": percentile(acks, 50) * 1000,
        "karma_calls_per_s": median(service_rates),
        "trivial_calls_per_s": median(trivial_rates),
        "karma_ratio": median(service_rates) / median(trivial_rates),
        "bare_ack_p50_ms": percentile(bare_acks, 50) * 1000,
        "bare_calls_per_s": median(bare_rates),
        "bare_ratio": median(bare_rates) / median(trivial_rates),
        "errors": errors,
    }


def batch_drain(port: int, consumers: int, seconds: float, max_packets: int) -> clients.Tally:
    jobs = [
        (clients.batch_consumer, port, TOKEN, seconds, max_packets // consumers, 100)
        for _ in range(consumers)
    ]
    tallies = clients.in_processes(jobs)
    merged = clients.Tally()
    for tally in tallies:
        merged.packets += tally.packets
        merged.errors += tally.errors
        merged.calls += tally.calls
        merged.elapsed = max(merged.elapsed, tally.elapsed)
    return merged


def bench_batch_drain(run: Run) -> None:
    """Four consumers, limit 100, one batch ack per poll, at the large backlog."""
    sizes, db = run.sizes, run.database
    rates, bare_rates, costs, errors = [], [], [], 0
    for _ in range(sizes.rounds):
        run.top_up(sizes.large_backlog)
        with Accounting(db, run.service) as cost:
            merged = batch_drain(run.service.port, 4, sizes.seconds, sizes.large_backlog // 2)
        rates.append(merged.packets / merged.elapsed)
        costs.append((cost, merged.packets))
        bare = batch_drain(run.bare.port, 4, sizes.seconds, sizes.large_backlog // 2)
        bare_rates.append(bare.packets / bare.elapsed)
        errors += merged.errors + bare.errors
    trivial = run.results[f"backlog_{'large'}"]["trivial_calls_per_s"]
    packets = sum(n for _, n in costs) or 1
    run.results["batch_drain"] = {
        "packets_per_s": median(rates),
        "ratio_to_trivial_sequential_calls": median(rates) / trivial,
        "bare_packets_per_s": median(bare_rates),
        "errors": errors,
        "db_cpu_ms_per_packet": sum(c.db_cpu for c, _ in costs) * 1000 / packets,
        "app_cpu_ms_per_packet": sum(c.app_cpu for c, _ in costs) * 1000 / packets,
        "wal_bytes_per_packet": sum(c.wal for c, _ in costs) / packets,
    }


def bench_recovery(run: Run) -> None:
    """A backlog, learners still sending, four batch consumers: time until it is gone."""
    sizes = run.sizes
    run.top_up(sizes.recovery_backlog)
    limit_seconds = 1800 if sizes.recovery_backlog >= 1_000_000 else 600
    started = time.monotonic()
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    learner = context.Process(
        target=clients.learners,
        args=(run.service.port, limit_seconds, sizes.learners, clients.run_id()),
        daemon=True,
    )
    learner.start()
    consumers = [
        context.Process(
            target=clients.batch_consumer,
            args=(run.service.port, TOKEN, limit_seconds, 10**9, 100),
            daemon=True,
        )
        for _ in range(4)
    ]
    for process in consumers:
        process.start()
    # Empty: no more than the last second's arrivals waiting.
    threshold = max(50, sizes.learners // 5)
    remaining = pending_count(run.database)
    while remaining > threshold and time.monotonic() - started < limit_seconds:
        time.sleep(1.0)
        remaining = pending_count(run.database)
    elapsed = time.monotonic() - started
    for process in [learner, *consumers]:
        process.terminate()
        process.join(10)
    run.results["recovery"] = {
        "backlog": sizes.recovery_backlog,
        "learners": sizes.learners,
        "seconds": elapsed,
        "emptied": remaining <= threshold,
    }


# --- a growing table ----------------------------------------------------------------------


def bench_table(run: Run, stored: int, label: str) -> None:
    """Ingest p50 and poll/ack p50 with ``stored`` packets in the table, mostly processed."""
    sizes = run.sizes
    have = db_rows(run.database)
    fill(run.database, stored - have, "processed", clients.run_id())
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


def bench_storage(run: Run) -> None:
    """Heap and index bytes per stored packet."""
    rows, heap, index = run.database.table_bytes()
    run.results["storage"] = {
        "rows": rows,
        "heap_bytes_per_packet": heap / max(rows, 1),
        "index_bytes_per_packet": index / max(rows, 1),
    }


# --- the embedded default -----------------------------------------------------------------


def bench_embedded(run: Run, workdir: Path) -> None:
    """``make run``'s configuration (SQLite + memory, 2 workers) at 32 connections."""
    env = {k: v for k, v in run.env.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = f"sqlite:///{workdir}/embedded.sqlite3"
    migrate(env)
    service = Service(env, name="embedded")
    try:
        wrk(service.port, "ingest.lua", 1, 32, {"RUN": "ew"})
        single = wrk(service.port, "ingest.lua", run.sizes.seconds, 32, {"RUN": "e1"})
        jobs = [
            (clients.batch_consumer, service.port, TOKEN, run.sizes.seconds, 10**9, 100)
            for _ in range(4)
        ]
        tallies = clients.in_processes(jobs)
        drained = sum(t.packets for t in tallies)
        elapsed = max(t.elapsed for t in tallies)
        log = service.log_path.read_text(errors="replace")
    finally:
        service.stop()
    run.results["embedded"] = {
        "single_rps": single["rps"],
        "single_p99_ms": single["p99_ms"],
        "single_errors": single["errors"],
        "drain_packets_per_s": drained / elapsed,
        "drain_errors": sum(t.errors for t in tallies),
        "database_locked": log.count("database is locked"),
    }


# --- report -------------------------------------------------------------------------------


def capacity(results: dict, cores: int) -> dict:
    """Learners one instance and one PostgreSQL server carry, and disk per day."""
    ingest = results["ingest"]
    drain = results.get("batch_drain", {})
    per_packet_app = ingest["app_cpu_ms_per_packet"] + drain.get("app_cpu_ms_per_packet", 0)
    per_packet_db = ingest["db_cpu_ms_per_packet"] + drain.get("db_cpu_ms_per_packet", 0)
    storage = results.get("storage", {})
    bytes_per_packet = storage.get("heap_bytes_per_packet", 0) + storage.get(
        "index_bytes_per_packet", 0
    )
    rate_per_learner = 0.2  # packets per second while active
    return {
        "app_cpu_ms_per_packet": per_packet_app,
        "db_cpu_ms_per_packet": per_packet_db,
        "learners_per_instance_core": 1000 / per_packet_app / rate_per_learner
        if per_packet_app
        else None,
        "learners_per_postgres_core": 1000 / per_packet_db / rate_per_learner
        if per_packet_db
        else None,
        "disk_mb_per_day_per_1000_learners": bytes_per_packet
        * LEARNER_PACKETS_PER_DAY
        * 1000
        / 1e6,
        "wal_mb_per_day_per_1000_learners": (
            ingest["wal_bytes_per_packet"] + drain.get("wal_bytes_per_packet", 0)
        )
        * LEARNER_PACKETS_PER_DAY
        * 1000
        / 1e6,
        "cores": cores,
    }


def table(results: dict) -> str:
    """The figures of the issue's table, each beside its ceiling and target."""
    lines = []
    small, large = results.get("backlog_small"), results.get("backlog_large")

    def row(name: str, value: str, target: str) -> None:
        lines.append(f"{name:<58} {value:<34} {target}")

    row("figure", "measured", "target")
    if small and large:
        row(
            f"poll limit=10 p50, {small['waiting']:,} -> {large['waiting']:,} waiting",
            f"{small['poll_p50_ms']:.2f} -> {large['poll_p50_ms']:.2f} ms "
            f"(x{large['poll_p50_ms'] / small['poll_p50_ms']:.2f})",
            "<= 1.3x",
        )
        row(
            f"status p50, {small['waiting']:,} -> {large['waiting']:,} waiting",
            f"{small['status_p50_ms']:.2f} -> {large['status_p50_ms']:.2f} ms "
            f"(x{large['status_p50_ms'] / small['status_p50_ms']:.2f})",
            "<= 1.3x",
        )
        row(
            "one mark-processed p50 (small / large backlog)",
            f"{small['ack_p50_ms']:.2f} / {large['ack_p50_ms']:.2f} ms",
            "<= 1.5 ms",
        )
        row(
            "  bare Flask + the same ack statement (a ceiling)",
            f"{small['bare_ack_p50_ms']:.2f} / {large['bare_ack_p50_ms']:.2f} ms",
            "",
        )
        for drained in (small, large):
            row(
                f"Karma Tracker drain at {drained['waiting']:,} waiting: calls/s vs trivial",
                f"{drained['karma_calls_per_s']:.0f} vs {drained['trivial_calls_per_s']:.0f} "
                f"= {drained['karma_ratio']:.2f}",
                ">= 0.5",
            )
            row(
                "  bare Flask + the same lease and ack statements (a ceiling)",
                f"{drained['bare_calls_per_s']:.0f} vs {drained['trivial_calls_per_s']:.0f} "
                f"= {drained['bare_ratio']:.2f}",
                "",
            )
    if "batch_drain" in results:
        bd = results["batch_drain"]
        row(
            "drain limit=100 + batch ack, 4 consumers",
            f"{bd['packets_per_s']:,.0f} packets/s "
            f"({bd['ratio_to_trivial_sequential_calls']:.1f}x trivial calls/s)",
            ">= 20,000/s and >= 11x",
        )
        row(
            "  bare Flask + the same lease and ack statements (a ceiling)",
            f"{bd['bare_packets_per_s']:,.0f} packets/s",
            "",
        )
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
    ts, tl = results.get("table_small"), results.get("table_large")
    if ts and tl:
        row(
            f"ingest p50, {ts['stored']:,} -> {tl['stored']:,} stored",
            f"{ts['ingest_p50_ms']:.2f} -> {tl['ingest_p50_ms']:.2f} ms "
            f"(x{tl['ingest_p50_ms'] / ts['ingest_p50_ms']:.2f})",
            "<= 1.3x",
        )
        poll_ack_small = ts["poll_p50_ms"] + ts["ack_p50_ms"]
        poll_ack_large = tl["poll_p50_ms"] + tl["ack_p50_ms"]
        row(
            f"poll + ack p50, {ts['stored']:,} -> {tl['stored']:,} stored",
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
    if "memory" in results:
        mem = results["memory"]
        row(
            f"worker RSS over {mem['packets_ingested']:,} ingested packets",
            " / ".join(
                f"{b:.0f} -> {a:.0f} MB"
                for b, a in zip(mem["rss_mb_before"], mem["rss_mb_after"], strict=False)
            )
            + f" (+{mem['growth']:.1%})",
            "growth < 10 %, < 150 MB",
        )
    if "audit" in results:
        aud = results["audit"]
        row(
            "single ingest with the audit sealer / without",
            f"{aud['single_rps_with_sealer']:,.0f} / {aud['single_rps_without_sealer']:,.0f} "
            f"req/s = {aud['single_ratio']:.2f}",
            ">= 0.95",
        )
        row(
            "batch ingest with the audit sealer / without",
            f"{aud['batch_packets_per_s_with_sealer']:,.0f} / "
            f"{aud['batch_packets_per_s_without_sealer']:,.0f} packets/s = {aud['ratio']:.2f} "
            f"({aud['seals']} seals)",
            ">= 0.95",
        )
        cpu = aud["cpu_us_per_packet"]
        row(
            "service + PostgreSQL CPU per packet, with the sealer / without",
            f"single {cpu['ss']:.0f} / {cpu['su']:.0f} us, "
            f"batch {cpu['bs']:.1f} / {cpu['bu']:.1f} us",
            "(the sealer's cost)",
        )
    if "recovery" in results:
        rec = results["recovery"]
        row(
            f"recovery: {rec['backlog']:,} waiting, {rec['learners']} learners, 4 consumers",
            f"{rec['seconds']:.0f} s" + ("" if rec["emptied"] else " (not emptied)"),
            "< 900 s",
        )
    if "embedded" in results:
        emb = results["embedded"]
        row(
            "embedded default (SQLite + memory), 32 connections",
            f"ingest {emb['single_rps']:.0f}/s, drain {emb['drain_packets_per_s']:.0f}/s, "
            f"{emb['single_errors'] + emb['drain_errors']} errors, "
            f"{emb['database_locked']} locked",
            "0 errors",
        )
    if "capacity" in results:
        cap = results["capacity"]
        row(
            "cost per packet (ingest + batch drain): app / PostgreSQL CPU",
            f"{cap['app_cpu_ms_per_packet']:.3f} / {cap['db_cpu_ms_per_packet']:.3f} ms",
            "",
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, under 3 minutes")
    mode.add_argument("--smoke", action="store_true", help="seconds; checks the suite runs")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: ingest, audit, backlog, drain, recovery, table, embedded",
    )
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = MODES[name]
    chosen = set(filter(None, args.only.split(","))) or {
        "ingest",
        "audit",
        "backlog",
        "drain",
        "recovery",
        "table",
        "embedded",
    }
    if shutil.which("wrk") is None:
        raise SystemExit("the benchmark needs wrk (Debian: apt-get install wrk)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bucket-bench-"))
    database = Database()
    redis_server = private_redis()
    env = service_env(database, redis_server.url, str(workdir))
    migrate(env)
    run = Run(sizes, database, env)
    try:
        run.service = Service(env)
        run.ceiling = Service(env, module="bench.trivial_app:app", name="trivial")
        run.bare = Service(env, module="bench.bare_app:app", name="bare")
        scenarios = [
            ("ingest", lambda: (bench_ingest(run), run.truncate())),
            ("audit", lambda: (bench_audit(run), run.truncate())),
            (
                "backlog",
                lambda: (
                    bench_backlog(run, sizes.small_backlog, "small"),
                    bench_backlog(run, sizes.large_backlog, "large"),
                ),
            ),
            ("drain", lambda: bench_batch_drain(run)),
            ("recovery", lambda: bench_recovery(run)),
            (
                "table",
                lambda: (
                    run.truncate(),
                    bench_table(run, sizes.small_table, "small"),
                    bench_table(run, sizes.large_table, "large"),
                    bench_storage(run),
                ),
            ),
            ("embedded", lambda: bench_embedded(run, workdir)),
        ]
        # The backlog figures are the drain's and recovery's ceiling: they run with either.
        if chosen & {"drain", "recovery"}:
            chosen.add("backlog")
        timings = run.results["scenario_seconds"] = {}
        for scenario, measure in scenarios:
            if scenario in chosen:
                began = time.monotonic()
                measure()
                timings[scenario] = round(time.monotonic() - began, 1)
        if "ingest" in run.results:
            run.results["capacity"] = capacity(run.results, os.cpu_count() or 0)
    finally:
        for service in (run.service, run.ceiling, run.bare):
            if service:
                service.stop()
        redis_server.stop()
        database.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    run.results["mode"] = name
    run.results["cores"] = os.cpu_count()
    run.results["seconds"] = round(time.monotonic() - started, 1)
    print(table(run.results))
    print(f"({name} run, {os.cpu_count()} cores, {run.results['seconds']:.0f} s)")
    print("BENCH_JSON " + json.dumps(run.results, default=str))
    return run.results


if __name__ == "__main__":
    main()
