"""A burst: poll + ack latency while the background thread books and seals a burst of packets
just stored, beside the same latency when the background has nothing to do (issue 22).

The service runs as deployed, sealer and bookkeeper on (the other scenarios turn the sealer
off, so that their bulk fills are not sealed during their measurements). The burst arrives
through HTTP (batch envelopes from wrk, as fast as the service takes them); then the unchanged
Karma Tracker poller runs round after round while the bookkeeper and the sealer catch up, and
its latencies are compared with those of rounds after they have.
"""

from __future__ import annotations

import time

from bench import clients
from bench.context import MODES, Row, Run, Scenario, Section, karma, settle
from bench.harness import Service, fill, percentile, recount, wrk

# Seconds of batch ingest that make the burst: about 1M packets at the full run's pace.
BURST_SECONDS = {"full": 60, "quick": 8, "smoke": 2}
# Rounds while the background catches up stop here at the latest.
CATCH_UP_LIMIT = {"full": 600, "quick": 120, "smoke": 30}
CAUGHT_UP_SQL = """
SELECT coalesce(max(seq), 0),
  (SELECT coalesce(max(value), 0) FROM packet_counters WHERE name = 'booked'),
  (SELECT coalesce(max(last_seq), 0) FROM audit_seals)
FROM packets
"""


def horizons(run: Run) -> tuple[int, int, int]:
    """The highest stored seq, the booked horizon and the sealed one."""
    with run.database.connect() as conn:
        return conn.execute(CAUGHT_UP_SQL).fetchone()


def caught_up(run: Run) -> bool:
    stored, booked, sealed = horizons(run)
    return booked >= stored and sealed >= stored


def poll_ack_round(port: int, calls: int) -> tuple[list[float], list[float], int]:
    """One round of the poller: its poll and ack latencies (ms) and its errors."""
    tally = karma(port, 60, calls)
    return (
        [s * 1000 for s in tally.latencies.get("poll", [])],
        [s * 1000 for s in tally.latencies.get("ack", [])],
        tally.errors,
    )


def p50_sum(polls: list[float], acks: list[float]) -> float:
    return percentile(polls, 50) + percentile(acks, 50)


def bench_burst(run: Run) -> None:
    """Quiet rounds, the burst, rounds until the background has booked and sealed it."""
    sizes = run.sizes
    mode = next(name for name, each in MODES.items() if each == sizes)
    run.truncate()
    # Packets for the poller to take, booked (recount) and then sealed by the service.
    fill(run.database, sizes.small_backlog, "pending", clients.run_id())
    recount(run.env)
    settle(run.database)
    service = Service({**run.env, "BUCKET_AUDIT_SEAL_INTERVAL": "5"}, name="burst")
    try:
        deadline = time.monotonic() + CATCH_UP_LIMIT[mode]
        while not caught_up(run) and time.monotonic() < deadline:
            time.sleep(0.5)
        calls = max(10, sizes.sequential_calls // sizes.rounds)
        poll_ack_round(service.port, 20)  # warm-up
        quiet_polls, quiet_acks, errors = [], [], 0
        for _ in range(sizes.rounds):
            polls, acks, failed = poll_ack_round(service.port, calls)
            quiet_polls += polls
            quiet_acks += acks
            errors += failed
        before, _, _ = horizons(run)
        burst = wrk(
            service.port, "batch.lua", BURST_SECONDS[mode], 4, {"RUN": "burst", "BATCH": "100"}
        )
        stored, booked, sealed = horizons(run)
        began = time.monotonic()
        deadline = began + CATCH_UP_LIMIT[mode]
        busy_polls, busy_acks, rounds = [], [], 0
        while not caught_up(run) and time.monotonic() < deadline:
            polls, acks, failed = poll_ack_round(service.port, calls)
            busy_polls += polls
            busy_acks += acks
            errors += failed
            rounds += 1
        catch_up = time.monotonic() - began
        done = caught_up(run)
    finally:
        service.stop()
    quiet = p50_sum(quiet_polls, quiet_acks)
    busy = p50_sum(busy_polls, busy_acks) if busy_polls else quiet
    run.results["burst"] = {
        "burst_packets": stored - before,
        "burst_errors": burst["errors"],
        "unbooked_after_burst": stored - booked,
        "unsealed_after_burst": stored - sealed,
        "quiet_poll_ack_p50_ms": quiet,
        "busy_poll_ack_p50_ms": busy,
        "busy_poll_p50_ms": percentile(busy_polls, 50) if busy_polls else None,
        "busy_ack_p50_ms": percentile(busy_acks, 50) if busy_acks else None,
        "ratio": busy / quiet,
        "busy_rounds": rounds,
        "catch_up_seconds": catch_up,
        "caught_up": done,
        "errors": errors,
    }
    run.truncate()


def burst_rows(results: dict, row: Row) -> None:
    if "burst" not in results:
        return
    b = results["burst"]
    row(
        f"poll + ack p50 while a burst of {b['burst_packets']:,} is booked and sealed, vs quiet",
        f"{b['busy_poll_ack_p50_ms']:.2f} vs {b['quiet_poll_ack_p50_ms']:.2f} ms = "
        f"x{b['ratio']:.2f} over {b['busy_rounds']} rounds; caught up in "
        f"{b['catch_up_seconds']:.0f} s{'' if b['caught_up'] else ' (NOT within the limit)'}, "
        f"{b['errors']} errors",
        "<= 1.3x",
    )


SCENARIOS = (Scenario("burst", bench_burst, sections=(Section(35, burst_rows),)),)
