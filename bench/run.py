"""The benchmark suite: every figure of BENCHMARKS.md, each beside its ceiling in the same run.

    .venv/bin/python -m bench            # the full run (about 25 minutes on 2 cores, and an
                                         # estimated 20 more for the storage scenario's fill)
    .venv/bin/python -m bench --quick    # every figure at smaller sizes, under 4 minutes
    .venv/bin/python -m bench --smoke    # seconds: proves the suite still runs (CI)

It starts a private PostgreSQL (with pg_stat_statements) and Redis, runs the service exactly as
the Procfile's web line does, and runs a trivial Flask app under the same command as the
ceiling. Load comes from separate processes: wrk with Lua for ingest, lean keep-alive clients
for the consumer side. Service and ceiling runs alternate and medians are reported, because one
run on a shared machine swings by ±20 %. It prints a table and one JSON line (``BENCH_JSON``).

BENCH_SERVICE_ENV="NAME=value ..." runs the service with settings under trial (the ceilings as
always), e.g. ``BENCH_SERVICE_ENV="BUCKET_INGEST_COALESCE=true" .venv/bin/python -m bench
--only ingest``; the JSON line records it as ``service_env``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.context import MODES, Run, service_env  # noqa: E402
from bench.harness import Database, Service, migrate, private_redis  # noqa: E402
from bench.report import capacity, table  # noqa: E402
from bench.scenarios import SCENARIOS  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Start the servers, run the chosen scenarios in order, print the table and the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, under 4 minutes")
    mode.add_argument("--smoke", action="store_true", help="seconds; checks the suite runs")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios: " + ", ".join(s.name for s in SCENARIOS),
    )
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = MODES[name]
    chosen = set(filter(None, args.only.split(","))) or {s.name for s in SCENARIOS}
    for scenario in SCENARIOS:
        if scenario.name in chosen:
            chosen.update(scenario.needs)
    if shutil.which("wrk") is None:
        raise SystemExit("the benchmark needs wrk (Debian: apt-get install wrk)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bucket-bench-"))
    database = Database()
    redis_server = private_redis()
    env = service_env(database.url, redis_server.url, str(workdir))
    migrate(env)
    run = Run(sizes, database, env, workdir)
    try:
        run.service = Service(env)
        run.ceiling = Service(env, module="bench.trivial_app:app", name="trivial")
        run.bare = Service(env, module="bench.bare_app:app", name="bare")
        timings = run.results["scenario_seconds"] = {}
        for scenario in SCENARIOS:
            if scenario.name in chosen:
                began = time.monotonic()
                scenario.measure(run)
                timings[scenario.name] = round(time.monotonic() - began, 1)
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
    run.results["service_env"] = os.environ.get("BENCH_SERVICE_ENV", "")
    run.results["cores"] = os.cpu_count()
    run.results["seconds"] = round(time.monotonic() - started, 1)
    print(table(run.results))
    print(f"({name} run, {os.cpu_count()} cores, {run.results['seconds']:.0f} s)")
    print("BENCH_JSON " + json.dumps(run.results, default=str))
    return run.results


if __name__ == "__main__":
    main()
