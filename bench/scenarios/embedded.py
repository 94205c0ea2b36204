"""The embedded default: ``make run``'s SQLite + memory configuration under load."""

from __future__ import annotations

from bench import clients
from bench.context import Row, Run, Scenario, Section
from bench.harness import TOKEN, Service, migrate, wrk


def bench_embedded(run: Run) -> None:
    """``make run``'s configuration (SQLite + memory, 2 workers) at 32 connections."""
    env = {k: v for k, v in run.env.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = f"sqlite:///{run.workdir}/embedded.sqlite3"
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


def embedded_rows(results: dict, row: Row) -> None:
    """The embedded default's rates and errors."""
    if "embedded" in results:
        emb = results["embedded"]
        row(
            "embedded default (SQLite + memory), 32 connections",
            f"ingest {emb['single_rps']:.0f}/s, drain {emb['drain_packets_per_s']:.0f}/s, "
            f"{emb['single_errors'] + emb['drain_errors']} errors, "
            f"{emb['database_locked']} locked",
            "0 errors",
        )


SCENARIOS = (Scenario("embedded", bench_embedded, sections=(Section(70, embedded_rows),)),)
