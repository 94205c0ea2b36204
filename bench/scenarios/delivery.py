"""Delivery to Karma Tracker: poll, status and ack at a small and a large backlog, the batch
drain with four consumers, and the recovery from a backlog while learners keep sending."""

from __future__ import annotations

import multiprocessing
import time

from bench import clients
from bench.context import Row, Run, Scenario, Section, karma, sequential
from bench.harness import TOKEN, Accounting, median, pending_count, percentile


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
        for status, count in tally.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + count
    return merged


def failed(tally: clients.Tally, into: dict[str, int]) -> None:
    """Add the calls of ``tally`` that did not succeed to ``into``, by status (0: no answer)."""
    for status, count in tally.statuses.items():
        if status not in (200, 207):
            into[str(status)] = into.get(str(status), 0) + count


def bench_batch_drain(run: Run) -> None:
    """Four consumers, limit 100, one batch ack per poll, at the large backlog."""
    sizes, db = run.sizes, run.database
    rates, bare_rates, costs, errors = [], [], [], 0
    statuses: dict[str, int] = {}
    bare_statuses: dict[str, int] = {}
    for _ in range(sizes.rounds):
        run.top_up(sizes.large_backlog)
        with Accounting(db, run.service) as cost:
            merged = batch_drain(run.service.port, 4, sizes.seconds, sizes.large_backlog // 2)
        rates.append(merged.packets / merged.elapsed)
        costs.append((cost, merged.packets))
        bare = batch_drain(run.bare.port, 4, sizes.seconds, sizes.large_backlog // 2)
        bare_rates.append(bare.packets / bare.elapsed)
        errors += merged.errors + bare.errors
        failed(merged, statuses)
        failed(bare, bare_statuses)
    trivial = run.results[f"backlog_{'large'}"]["trivial_calls_per_s"]
    packets = sum(n for _, n in costs) or 1
    run.results["batch_drain"] = {
        "packets_per_s": median(rates),
        "ratio_to_trivial_sequential_calls": median(rates) / trivial,
        "bare_packets_per_s": median(bare_rates),
        "errors": errors,
        # which calls failed, by status, the service's and the bare app's apart
        "error_statuses": statuses,
        "bare_error_statuses": bare_statuses,
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


def measure_backlogs(run: Run) -> None:
    """The small backlog, then the large one."""
    bench_backlog(run, run.sizes.small_backlog, "small")
    bench_backlog(run, run.sizes.large_backlog, "large")


def backlog_rows(results: dict, row: Row) -> None:
    """Poll, status, ack and the drain at both backlogs; the batch drain."""
    small, large = results.get("backlog_small"), results.get("backlog_large")
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


def recovery_rows(results: dict, row: Row) -> None:
    """How long the recovery took."""
    if "recovery" in results:
        rec = results["recovery"]
        row(
            f"recovery: {rec['backlog']:,} waiting, {rec['learners']} learners, 4 consumers",
            f"{rec['seconds']:.0f} s" + ("" if rec["emptied"] else " (not emptied)"),
            "< 900 s",
        )


# The backlog figures are the drain's and recovery's ceiling: they run with either.
SCENARIOS = (
    Scenario("backlog", measure_backlogs, sections=(Section(10, backlog_rows),)),
    Scenario("drain", bench_batch_drain, needs=("backlog",)),
    Scenario(
        "recovery", bench_recovery, needs=("backlog",), sections=(Section(60, recovery_rows),)
    ),
)
