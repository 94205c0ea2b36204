"""A worker's CPU per single-packet ingest, in process, one version of the code beside another.

    .venv/bin/python -m bench.ingest_cpu [--against REF] [--rounds 5] [--requests 3000]
        [--threads 16] [--modes concurrent,sequential,batch,gunicorn] [--revision REF]

Each measurement is a fresh Python process serving requests through Flask's test client (no
gunicorn, no wrk), configured as in production: rate limits on (raised so they never refuse),
the request log on (its lines discarded), Prometheus metrics in multiprocess files, a private
PostgreSQL database on the machine's server and a private redis-server. ``concurrent``: 16
threads post unique single packets at once with ingest coalescing on; ``sequential``: one
thread, coalescing off; ``batch``: one thread posts envelopes of 100 packets, each of another
learner as in ``bench/batch.lua`` (the figure is then per packet, ``--requests`` counting
packets); ``gunicorn``: the Procfile's gunicorn with one worker (coalescing on)
under wrk, 16 connections, for ``--seconds``, the worker's CPU from ``/proc`` per answered
request (what ``make bench`` reports, without the rest of the benchmark). The figure is the
process's CPU per request (``time.process_time``, every thread, the test client's share
included), a figure a shared machine disturbs far less than rates.

``--against REF`` (repeatable) also measures the code of git revision ``REF`` (checked out in
a temporary worktree) with this script, alternating them in every round (the order flipped
each round); the medians and each run are printed. ``--revision REF`` measures a revision in
place of the working tree (which can then change while the measurement runs).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INGEST = "/api/v1/bucket/prana/ingest"
BATCH = 100  # packets per envelope in the batch mode, as bench/batch.lua sends them
HIGH = "100000000 per minute"
TOKEN = "bench-ingest-cpu-token"


def child(args: argparse.Namespace) -> None:
    """One measurement in this process, with the code of ``args.tree``; prints µs per request."""
    sys.path.insert(0, args.tree)
    metrics = tempfile.mkdtemp(prefix="bucket-cpu-metrics-")
    atexit.register(shutil.rmtree, metrics, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics
    from bucket import create_app  # noqa: PLC0415 - from the tree under measurement
    from tests.factories import make_packet  # noqa: PLC0415

    concurrent = args.mode == "concurrent"
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": args.url,
            "REDIS_URL": args.redis,
            "BUCKET_REDIS_PREFIX": args.prefix,
            "BUCKET_CONSUMER_TOKEN": TOKEN,
            "BUCKET_RATE_LIMIT_ENABLED": True,
            "BUCKET_RATE_LIMIT_INGEST_PER_IP": HIGH,
            "BUCKET_RATE_LIMIT_INGEST_PER_USER": HIGH,
            "BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP": "100000000000 per minute",
            "BUCKET_INGEST_COALESCE": concurrent,
            "BUCKET_ACK_COALESCE": concurrent,
            "BUCKET_REQUEST_LOG": True,
            "BUCKET_AUDIT_SEAL_INTERVAL": 0,
        },
        testing=True,
    )
    threads = args.threads if concurrent else 1
    run_id = f"{args.prefix}-{os.getpid()}"

    def ingest(requests: int, tag: str) -> tuple[float, int]:
        per_thread = requests // threads
        bodies = [
            [make_packet(user_id=f"learner-{run_id}-{tag}-{t}-{n % 50}") for n in range(per_thread)]
            for t in range(threads)
        ]
        return timed(bodies, lambda client, body: client.post(INGEST, json=body).status_code)

    def timed(work, call) -> tuple[float, int]:
        failures: list[int] = []

        def serve(mine: list) -> None:
            client = app.test_client()
            for item in mine:
                status = call(client, item)
                if status != 200:
                    failures.append(status)

        workers = [threading.Thread(target=serve, args=(mine,)) for mine in work]
        started = time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        spent = time.process_time() - started
        if failures:
            raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
        return spent, sum(len(mine) for mine in work)

    def envelopes(packets: int, tag: str) -> tuple[float, int]:
        bodies = [
            {
                "packets": [
                    make_packet(user_id=f"learner-{run_id}-{tag}-{e}-{n}") for n in range(BATCH)
                ],
                "batch_size": BATCH,
            }
            for e in range(max(1, packets // BATCH))
        ]
        spent, count = timed(
            [bodies], lambda client, body: client.post(INGEST, json=body).status_code
        )
        return spent, count * BATCH

    if args.mode == "batch":
        envelopes(2 * BATCH, "warm")
        spent, count = envelopes(args.requests, "run")
        print(json.dumps({"us": spent / count * 1e6, "requests": count}))
        return
    ingest(64, "warm")  # connections, prepared statements, scripts
    spent, count = ingest(args.requests, "run")
    print(json.dumps({"us": spent / count * 1e6, "requests": count}))


def commits(port: int) -> tuple[float, float]:
    """The ingest coalescer's writes and the requests they answered, so far (``/metrics``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals = {"bucket_ingest_commits_total": 0.0, "bucket_ingest_commit_requests_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["bucket_ingest_commits_total"], totals["bucket_ingest_commit_requests_total"]


def under_gunicorn(
    tree: str, url: str, redis_url: str, prefix: str, seconds: float
) -> tuple[float, float]:
    """One gunicorn worker of ``tree`` (coalescing on) under wrk, 16 connections of unique
    single packets: the worker's CPU (``/proc``) per answered request, in µs, and the requests
    per shared write."""
    from bench.context import service_env  # noqa: PLC0415
    from bench.harness import Service, process_cpu, wrk  # noqa: PLC0415

    logs = tempfile.mkdtemp(prefix="bucket-cpu-log-")
    env = {
        **service_env(url, redis_url, logs),
        "BUCKET_REDIS_PREFIX": prefix,
        "BUCKET_INGEST_COALESCE": "true",
        "BUCKET_ACK_COALESCE": "true",
        "WEB_CONCURRENCY": "1",
    }
    service = Service(env, name="cpu", tree=tree)
    try:
        port = service.port
        (worker,) = service.worker_pids()
        wrk(port, "ingest.lua", 2, 16, {"RUN": f"{prefix}w"})  # warm-up
        writes = commits(port)
        before = process_cpu(worker)
        figures = wrk(port, "ingest.lua", seconds, 16, {"RUN": prefix})
        spent = process_cpu(worker) - before
        writes = [after - earlier for after, earlier in zip(commits(port), writes, strict=True)]
        if figures["errors"]:
            raise RuntimeError(f"{figures['errors']} requests failed")
        return spent / figures["requests"] * 1e6, writes[1] / max(writes[0], 1)
    finally:
        service.stop()
        shutil.rmtree(logs, ignore_errors=True)


def worktree(ref: str) -> tuple[str, Path]:
    """A temporary checkout of ``ref``: its path and the directory to remove afterwards."""
    place = Path(tempfile.mkdtemp(prefix="bucket-cpu-ref-"))
    tree = place / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), ref], check=True
    )
    return str(tree), place


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--against", action="append", help="a git revision to measure beside (repeatable)"
    )
    parser.add_argument("--revision", help="measure this git revision instead of the working tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--modes", default="concurrent,sequential")
    parser.add_argument("--seconds", type=float, default=10, help="gunicorn: wrk's run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(ROOT))
    from bench.harness import migrate  # noqa: PLC0415
    from tests import servers  # noqa: PLC0415

    trees = {"this tree": str(ROOT)}
    cleanups = []
    if args.revision:
        trees = {}
        trees[args.revision], place = worktree(args.revision)
        cleanups.append(place)
    for ref in args.against or ():
        trees[ref], place = worktree(ref)
        cleanups.append(place)
    private = servers.PrivateRedis().start()
    # A database for each tree, migrated by that tree's own migrations: two versions of the
    # packets' layout cannot share one.
    databases = {label: servers.create_database() for label in trees}
    results: dict[str, list[float]] = {}
    try:
        migrating = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
        for label, (_, url) in databases.items():
            migrate({**migrating, "DATABASE_URL": url, "REDIS_URL": ""}, trees[label])
        variants = [(mode, label) for mode in args.modes.split(",") for label in trees]
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else list(reversed(variants))
            for mode, label in order:
                if mode == "gunicorn":
                    us, per_write = under_gunicorn(
                        trees[label],
                        databases[label][1],
                        private.url,
                        f"cpu{round_}{label}",
                        args.seconds,
                    )
                    results.setdefault(f"{mode}, {label}", []).append(us)
                    print(
                        f"round {round_ + 1}: {mode}, {label}: {us:.0f} µs, "
                        f"{per_write:.1f} requests per write",
                        flush=True,
                    )
                    continue
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    f"--tree={trees[label]}",
                    f"--mode={mode}",
                    f"--url={databases[label][1]}",
                    f"--redis={private.url}",
                    f"--prefix=cpu{round_}",
                    f"--requests={args.requests}",
                    f"--threads={args.threads}",
                ]
                done = subprocess.run(
                    command, cwd=trees[label], capture_output=True, text=True, check=False
                )
                if done.returncode != 0:
                    raise SystemExit(f"{label}, {mode}: failed\n{done.stderr[-3000:]}")
                line = done.stdout.strip().splitlines()[-1]
                us = json.loads(line)["us"]
                results.setdefault(f"{mode}, {label}", []).append(us)
                print(f"round {round_ + 1}: {mode}, {label}: {us:.0f} µs", flush=True)
        print(
            json.dumps(
                {
                    label: {
                        "median_us": round(statistics.median(values)),
                        "runs_us": [round(v) for v in values],
                    }
                    for label, values in results.items()
                },
                indent=2,
            )
        )
    finally:
        for name, _ in databases.values():
            servers.drop_database(name)
        private.stop()
        for place in cleanups:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(place / "tree")],
                check=False,
            )
            shutil.rmtree(place, ignore_errors=True)


if __name__ == "__main__":
    main()
