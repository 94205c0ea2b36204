"""Ingest benchmark: the bucket against a trivial Flask endpoint under the same gunicorn command.

Usage: .venv/bin/python bench/run.py [--duration 15] [--connections 32] [--batch 100]
                                      [--prefill 0]
Needs wrk (Debian package ``wrk``), PostgreSQL and Redis on 127.0.0.1. Prints requests/s, the ratio
to the trivial endpoint, batch packets/s and latency percentiles; creates and drops its own
database.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import migrate  # noqa: E402
from tests.servers import create_database, drop_database, free_port  # noqa: E402

BIN = Path(sys.executable).parent
GUNICORN = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py"]


def start_server(module: str, env: dict) -> tuple[subprocess.Popen, int]:
    """Start gunicorn exactly as the Procfile's web line does, on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [*GUNICORN, module],
        cwd=ROOT,
        env={**env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError as exc:
            if getattr(exc, "code", None) == 404:  # the trivial app has no /health
                break
            time.sleep(0.2)
    return process, port


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def wrk(port: int, script: str, duration: int, connections: int, env: dict) -> dict:
    """Run wrk and parse requests/s, latency percentiles and non-2xx answers."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / script),
            f"http://127.0.0.1:{port}/api/v1/bucket/prana/ingest",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 0.001, "ms": 1, "s": 1000}[match.group(2)]
        figures[f"p{pct}_ms"] = float(match.group(1)) * scale
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    figures["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    figures["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    return figures


def prefill(url: str, rows: int) -> None:
    """Insert ``rows`` processed packets with set-based SQL, to see latencies on a big table."""
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            """
            INSERT INTO packets (packet_id, dedup_key, user_id, session_id, system_type,
              client_timestamp, cognitive_state, active_seconds, idle_seconds, away_seconds,
              raw_signals, received_at, delivery_state, visible_at, delivery_count,
              processed_by_karma, processed_at)
            SELECT gen_random_uuid()::text, md5(g::text), 'fill_' || (g %% 5000), 's', 'gurukul',
              now() - make_interval(secs => g), 'ON_TASK', 5, 0, 0, '{}'::json,
              now() - make_interval(secs => g), 'processed', extract(epoch from now()) - g, 1,
              true, now() - make_interval(secs => g)
            FROM generate_series(1, %s) AS g
            """,
            (rows,),
        )
        # Status reads processed packets from their counter, which set-based inserts bypass.
        conn.execute(
            "INSERT INTO packet_counters AS c (name, shard, value) VALUES ('processed', 1, %s) "
            "ON CONFLICT (name, shard) DO UPDATE SET value = c.value + excluded.value",
            (rows,),
        )
        conn.execute("ANALYZE packets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--batch", type=int, default=100, help="packets per batch envelope")
    parser.add_argument("--prefill", type=int, default=0, help="rows to insert before measuring")
    args = parser.parse_args()

    name, url = create_database()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "BUCKET_REDIS_PREFIX": f"bench-{name}",
        "BUCKET_RATE_LIMIT_ENABLED": "false",
        "BATCH": str(args.batch),
    }
    try:
        migrate(env)
        if args.prefill:
            started = time.monotonic()
            prefill(url, args.prefill)
            print(f"prefilled {args.prefill} rows in {time.monotonic() - started:.1f}s")

        trivial, port = start_server("bench.trivial_app:app", env)
        try:
            wrk(port, "ingest.lua", 3, args.connections, env)  # warm-up
            base = wrk(port, "ingest.lua", args.duration, args.connections, env)
        finally:
            stop_server(trivial)

        bucket, port = start_server("wsgi:app", env)
        try:
            wrk(port, "ingest.lua", 3, args.connections, env)
            single = wrk(port, "ingest.lua", args.duration, args.connections, env)
            batch = wrk(port, "batch.lua", args.duration, max(4, args.connections // 4), env)
        finally:
            stop_server(bucket)

        print(
            f"trivial endpoint : {base['rps']:8.0f} req/s  p50 {base['p50_ms']:.2f} ms  "
            f"p99 {base['p99_ms']:.2f} ms"
        )
        print(
            f"single ingest    : {single['rps']:8.0f} req/s  p50 {single['p50_ms']:.2f} ms  "
            f"p99 {single['p99_ms']:.2f} ms  non-2xx {single['non2xx']}"
        )
        print(f"ratio            : {single['rps'] / base['rps']:.3f} (goal >= 0.4)")
        print(
            f"batch ingest     : {batch['rps'] * args.batch:8.0f} packets/s "
            f"({batch['rps']:.0f} batches/s of {args.batch}) p50 {batch['p50_ms']:.2f} ms  "
            f"p99 {batch['p99_ms']:.2f} ms  non-2xx {batch['non2xx']}"
        )
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
