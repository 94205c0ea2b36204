"""The Karma Tracker drain: the deployed consumer's pattern beside the consumer client.

Both use Karma Tracker's default settings (``batch_size`` 10, ``poll_interval`` 5 s) against a
karma API stub answering in 10 ms, with a backlog waiting, in 1 and 4 processes (the processes
are ``bench/consumer_drain.py``). Figures: packets per second acknowledged by the consumer
processes, and karma calls made twice for one packet (the stub counts calls per
``Idempotency-Key``, which only the client sends). The stub (``bench/karma_server.py``, a process
of its own, the same for both patterns) is part of the instrument: its own ceiling, measured with
wrk after the drains, is reported beside them.
"""

from __future__ import annotations

from typing import Any

from bench import clients
from bench.consumer_drain import KARMA_LATENCY, POLL_INTERVAL, client_drain, deployed_pattern
from bench.context import Row, Run, Scenario, Section
from bench.harness import TOKEN, Accounting, median
from bench.karma_server import karma_server


def drain(job, port: int, karma_port: int, processes: int, seconds: float) -> tuple[float, int]:
    """``processes`` consumers at once: (packets/s over the slowest one's time, errors)."""
    rate, errors, _ = drain_counted(job, port, karma_port, processes, seconds)
    return rate, errors


def drain_counted(
    job, port: int, karma_port: int, processes: int, seconds: float
) -> tuple[float, int, list[clients.Tally]]:
    tallies = clients.in_processes(
        [(job, port, karma_port, TOKEN, seconds) for _ in range(processes)]
    )
    elapsed = max(t.elapsed for t in tallies)
    return sum(t.packets for t in tallies) / elapsed, sum(t.errors for t in tallies), tallies


def bench_consumer_drain(run: Run) -> None:
    """Deployed pattern vs client, 1 and 4 processes, karma stub at 10 ms, backlog waiting."""
    smoke = run.sizes.seconds < 2
    client_seconds = max(2.0, float(run.sizes.seconds))
    # Deployed cycles start until then and each is counted whole (5 s of sleep included).
    deployed_seconds = 2.0 * run.sizes.seconds
    per_process = 1000 if smoke else 3000  # packets/s a process could drain at most, with room
    port = run.service.port
    results: dict[str, Any] = {
        "karma_latency_ms": KARMA_LATENCY * 1000,
        "poll_interval_s": POLL_INTERVAL,
        "errors": 0,
    }
    with karma_server(KARMA_LATENCY) as karma:
        for processes in (1,) if smoke else (1, 4):
            run.top_up(200)
            rate, errors = drain(deployed_pattern, port, karma.port, processes, deployed_seconds)
            results[f"deployed_{processes}_packets_per_s"] = rate
            results["errors"] += errors
        for processes in (1, 4):
            rates = []
            cpu = {"client": 0.0, "bucket": 0.0, "postgres": 0.0, "stub": 0.0, "packets": 0}
            for _ in range(1 if smoke else run.sizes.rounds):
                run.top_up(int(per_process * processes * client_seconds) + 1000)
                stub_cpu = karma.cpu_seconds()
                with Accounting(run.database, run.service) as servers:
                    rate, errors, tallies = drain_counted(
                        client_drain, port, karma.port, processes, client_seconds
                    )
                rates.append(rate)
                results["errors"] += errors
                cpu["client"] += sum(t.cpu for t in tallies)
                cpu["bucket"] += servers.app_cpu
                cpu["postgres"] += servers.db_cpu
                cpu["stub"] += karma.cpu_seconds() - stub_cpu
                cpu["packets"] += sum(t.packets for t in tallies)
            results[f"client_{processes}_packets_per_s"] = median(rates)
            # Where the CPU goes, per packet (µs): what two cores allow at most, all counted.
            packets = max(1, cpu.pop("packets"))
            results[f"client_{processes}_cpu_us_per_packet"] = {
                part: seconds_ / packets * 1e6 for part, seconds_ in cpu.items()
            }
        keys = karma.keys()
        # After the drains: its calls carry no Idempotency-Key, so they are not counted below.
        ceiling = karma.ceiling(min(2.0, client_seconds), connections=64)
    results["stub_ceiling_per_s"] = ceiling["rps"]
    results["stub_cpu_us_per_call"] = ceiling["cpu_us_per_call"]
    results["karma_calls"] = sum(keys.values())
    results["karma_calls_twice"] = sum(1 for key, n in keys.items() if key and n > 1)
    run.results["consumer_drain"] = results


def consumer_rows(results: dict, row: Row) -> None:
    """Karma Tracker's drain, deployed pattern beside the client."""
    if "consumer_drain" not in results:
        return
    drain_ = results["consumer_drain"]
    for processes, target in ((1, "≥ 500/s"), (4, "≥ 1,500/s")):
        deployed = drain_.get(f"deployed_{processes}_packets_per_s")
        shown = f"deployed {deployed:.1f}/s, " if deployed is not None else ""
        row(
            f"Karma Tracker drain, {processes} process(es), karma 10 ms",
            f"{shown}client {drain_[f'client_{processes}_packets_per_s']:.0f}/s",
            target,
        )
    for processes in (1, 4):
        parts = drain_.get(f"client_{processes}_cpu_us_per_packet")
        if parts:
            total = sum(parts.values())
            row(
                f"client drain, {processes} process(es): CPU µs per packet "
                "(client, bucket, PostgreSQL, stub)",
                ", ".join(f"{parts[p]:.0f}" for p in ("client", "bucket", "postgres", "stub"))
                + f" = {total:.0f}: 2 cores allow {2e6 / max(1.0, total):.0f}/s",
                "",
            )
    if "stub_ceiling_per_s" in drain_:
        row(
            "karma stub's own ceiling (wrk, 64 connections, 10 ms), CPU per call",
            f"{drain_['stub_ceiling_per_s']:.0f}/s, {drain_['stub_cpu_us_per_call']:.0f} µs",
            "above the drains",
        )
    row(
        "client: karma calls twice for one packet, errors",
        f"{drain_['karma_calls_twice']}, {drain_['errors']}",
        "0, 0",
    )


SCENARIOS = (Scenario("consumer", bench_consumer_drain, sections=(Section(80, consumer_rows),)),)
