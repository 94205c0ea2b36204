"""The benchmark suite still runs: ``python -m bench --smoke`` end to end, in seconds.

It asserts that every scenario produced its figures and that no request failed, never how
fast anything was (speed goals live in the benchmark and BENCHMARKS.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import CAPACITY
from bench.scenarios import SCENARIOS
from tests import servers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_scenario_registry_is_consistent():
    """Each scenario has its own name, needs only registered ones, and its rows their own place."""
    names = [scenario.name for scenario in SCENARIOS]
    assert len(names) == len(set(names)), names
    assert all(set(scenario.needs) <= set(names) for scenario in SCENARIOS)
    positions = [section.position for s in SCENARIOS for section in s.sections] + [
        CAPACITY.position
    ]
    assert len(positions) == len(set(positions)), positions


def test_the_benchmark_smoke_run_measures_every_figure():
    if shutil.which("wrk") is None:
        servers.unavailable("wrk is not installed (Debian: apt-get install wrk)")
    if servers.postgres_binary("initdb") is None:
        servers.unavailable("PostgreSQL's initdb is not installed")
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("BENCH_JSON "))
    results = json.loads(line.removeprefix("BENCH_JSON "))
    for scenario in ("ingest", "backlog_small", "backlog_large", "batch_drain", "recovery"):
        assert scenario in results, scenario
    for scenario in ("table_small", "table_large", "storage", "embedded", "capacity", "memory"):
        assert scenario in results, scenario
    assert results["audit"]["errors"] == 0 and results["audit"]["ratio"] > 0
    assert all(cpu > 0 for cpu in results["audit"]["cpu_us_per_packet"].values())
    ingest = results["ingest"]
    assert ingest["single_rps"] > 0 and ingest["trivial_rps"] > 0
    assert ingest["single_errors"] == ingest["batch_errors"] == 0
    # The second ceiling (bench/bare_app.py) ran every statement it stands for, without errors.
    assert ingest["bare_insert_errors"] == ingest["bare_batch_errors"] == 0
    # A burst through HTTP, booked and sealed by the service's own background thread.
    burst = results["burst"]
    assert burst["burst_packets"] > 0 and burst["burst_errors"] == burst["errors"] == 0
    assert burst["caught_up"]
    # One connection, coalescing on and off: both sides answered every request.
    lone = results["lone_ingest"]
    assert lone["errors"] == 0 and lone["coalesced_p50_ms"] > 0 and lone["direct_p50_ms"] > 0
    assert ingest["bare_insert_rps"] > 0 and ingest["bare_batch_packets_per_s"] > 0
    for backlog in (results["backlog_small"], results["backlog_large"]):
        assert backlog["errors"] == 0
        assert backlog["bare_calls_per_s"] > 0 and backlog["bare_ack_p50_ms"] > 0
    assert results["batch_drain"]["errors"] == 0
    assert results["batch_drain"]["packets_per_s"] > 0
    assert results["batch_drain"]["bare_packets_per_s"] > 0
    assert results["recovery"]["emptied"]
    embedded = results["embedded"]
    assert embedded["single_errors"] == embedded["drain_errors"] == 0
    assert embedded["database_locked"] == 0
    # The Karma Tracker drain (bench/scenarios/consumer.py): both consumers drained, none errred,
    # and the client never made a karma call twice for one packet.
    drain = results["consumer_drain"]
    assert drain["errors"] == 0 and drain["karma_calls_twice"] == 0
    for figure in ("deployed_1", "client_1", "client_4"):
        assert drain[f"{figure}_packets_per_s"] > 0, figure
    # Authenticated ingest (bench/scenarios/auth.py): every mode measured on the run's database.
    auth = results["auth_ingest"]
    assert auth["database"] == "postgresql"
    assert all(value > 0 for value in auth["median_us_per_request"].values())
    assert set(auth["overhead_vs_off_percent"]) == {"hs256", "rs256"}
    # Storage (bench/scenarios/storage.py): a database of its own filled with every column the
    # fill knows, measured relation by relation, the hot table at the backlog and at all stored.
    fill = results["storage_fill"]
    assert fill["stored"] == fill["packets"] and fill["unfilled_columns"] == []
    assert fill["states"]["processed"] > fill["states"]["pending"] > 0
    assert {"packets", "deliveries", "audit_seals", "audit_purges"} <= set(fill["relations"])
    assert fill["bytes_per_packet"] > fill["core_bytes_per_packet"] > 0
    # The hot partition of deliveries (migration 0014) follows the backlog, not the history.
    assert fill["hot_table"] == "deliveries_hot"
    assert 0 < fill["hot_bytes_at_stored"] <= 2 * fill["hot_bytes_at_backlog"]
    assert all("bytes" in alternative for alternative in fill["alternatives"].values())
    # The real purge dropped the oldest days, every packet of them, keeping none.
    assert fill["purge"]["packets"] > 0 and fill["purge"]["kept"] == []
    # Keys go by client day (migration 0015): a day of them dropped whole, none one by one.
    assert any(kept is None for _, kept in fill["purge"]["key_days"]), fill["purge"]
    assert "packet_keys" not in fill["purge"]["rows_deleted"]
    assert "poll limit=10 p50" in run.stdout  # the table was printed
