"""What the ingest rate limits cost a worker: CPU and Redis commands per single-packet ingest.

``python -m bench.ratelimit_cost [--requests 2000] [--rounds 3] [--threads 16]``

In one process, through Flask's test client (no gunicorn, no wrk): a private PostgreSQL
database on the machine's server and a private redis-server on a free port, so Redis's
``INFO commandstats`` counts only this run's commands. Each variant posts ``--requests``
unique single packets, one thread after another (``sequential``) and from ``--threads``
threads at once with ingest coalescing on (``concurrent``); variants alternate for
``--rounds`` rounds and the medians are printed: the process's CPU per request
(``time.process_time``, every thread) and Redis commands per request by name. Limits are
raised so they never refuse, but every request pays for them (as in ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import redis
from flask_migrate import upgrade

from bucket import create_app
from bucket.extensions import db
from tests import servers
from tests.factories import make_packet

INGEST = "/api/v1/bucket/prana/ingest"
HIGH = "100000000 per minute"


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), without INFO itself."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def build(url: str, redis_url: str, limits: bool, coalesce: bool, prefix: str):
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": url,
            "REDIS_URL": redis_url,
            "BUCKET_REDIS_PREFIX": prefix,
            "BUCKET_RATE_LIMIT_ENABLED": limits,
            "BUCKET_RATE_LIMIT_INGEST_PER_IP": HIGH,
            "BUCKET_RATE_LIMIT_INGEST_PER_USER": HIGH,
            "BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP": "100000000000 per minute",
            "BUCKET_INGEST_COALESCE": coalesce,
            "BUCKET_REQUEST_LOG": False,
        },
        testing=True,
    )
    return app


def run(app, requests: int, threads: int) -> float:
    """Post ``requests`` packets from ``threads`` threads; the process CPU they took."""
    per_thread = requests // threads
    bodies = [
        [make_packet(user_id=f"learner-{t}-{n % 50}") for n in range(per_thread)]
        for t in range(threads)
    ]
    failures: list[int] = []

    def send(mine: list[dict]) -> None:
        client = app.test_client()
        for body in mine:
            status = client.post(INGEST, json=body).status_code
            if status != 200:
                failures.append(status)

    started = time.process_time()
    workers = [threading.Thread(target=send, args=(mine,)) for mine in bodies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    spent = time.process_time() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
    return spent / (per_thread * threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    private = servers.PrivateRedis().start()
    name, url = servers.create_database()
    try:
        migrating = create_app({"SQLALCHEMY_DATABASE_URI": url}, testing=True)
        with migrating.app_context():
            upgrade()
            db.engine.dispose()
        watcher = redis.Redis.from_url(private.url)
        variants = [
            (mode, limits) for mode in ("sequential", "concurrent") for limits in (False, True)
        ]
        cpu: dict[str, list[float]] = {}
        calls: dict[str, list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else list(reversed(variants))
            for mode, limits in order:
                label = f"{mode}, limits {'on' if limits else 'off'}"
                threads = 1 if mode == "sequential" else args.threads
                app = build(url, private.url, limits, mode == "concurrent", f"rl{round_}")
                run(app, 32, threads)  # warm: connections, prepared statements, scripts
                before = command_calls(watcher)
                seconds = run(app, args.requests, threads)
                after = command_calls(watcher)
                requests = args.requests // threads * threads
                cpu.setdefault(label, []).append(seconds * 1e6)
                calls.setdefault(label, []).append(
                    {k: (after[k] - before.get(k, 0)) / requests for k in after}
                )
                servers.dispose_engines(app)
        report = {}
        for label, values in cpu.items():
            names = sorted({k for run_ in calls[label] for k in run_})
            report[label] = {
                "cpu_us_per_request": round(statistics.median(values)),
                "cpu_us_runs": [round(v) for v in values],
                "redis_commands_per_request": {
                    k: round(statistics.median(r.get(k, 0.0) for r in calls[label]), 3)
                    for k in names
                    if any(r.get(k) for r in calls[label])
                },
            }
        print(json.dumps(report, indent=2))
    finally:
        servers.drop_database(name)
        private.stop()


if __name__ == "__main__":
    main()
