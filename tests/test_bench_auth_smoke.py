"""The authenticated-ingest benchmark still runs: ``python -m bench.auth_ingest --smoke``.

It asserts that every mode produced its figures without a failed request, never how fast
anything was (the goal lives in the benchmark and BENCHMARKS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_auth_ingest_benchmark_smoke_run_measures_every_mode():
    run = subprocess.run(
        [sys.executable, "-m", "bench.auth_ingest", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("BENCH_AUTH_JSON "))
    results = json.loads(line.removeprefix("BENCH_AUTH_JSON "))
    assert set(results["median_us_per_request"]) == {"off", "hs256", "rs256"}
    assert all(value > 0 for value in results["median_us_per_request"].values())
    assert set(results["overhead_vs_off_percent"]) == {"hs256", "rs256"}
    for figures in results["check_us"].values():
        assert figures["seen"] >= 0 and figures["first"] > 0
