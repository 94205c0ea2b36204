"""Profile one gunicorn worker of the service under one kind of load, with py-spy.

    .venv/bin/python -m bench.profile ingest        # wrk, single packets, 16 connections
    .venv/bin/python -m bench.profile batch-ingest  # wrk, envelopes of 100
    .venv/bin/python -m bench.profile karma         # the unchanged Karma Tracker poller
    .venv/bin/python -m bench.profile drain         # 4 consumers, limit 100, batch acks
      [--seconds 15] [--idle] [--out stacks.txt]

The service runs with one worker (``WEB_CONCURRENCY=1``) on a private PostgreSQL and Redis, so
every sample comes from the process under load. It prints the functions with the most samples,
by their own time and including callees; ``--out`` keeps the collapsed stacks (for
flamegraph.pl or speedscope). ``--idle`` also counts threads waiting on I/O (where latency goes,
not CPU). Needs py-spy (``pip install py-spy``) and wrk.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clients  # noqa: E402
from bench.context import service_env  # noqa: E402
from bench.harness import BIN, TOKEN, Database, Service, fill, migrate, private_redis, recount, wrk  # noqa: E402


def load(kind: str, port: int, seconds: float) -> None:
    """Drive the service for ``seconds`` the way ``kind`` says."""
    if kind == "ingest":
        wrk(port, "ingest.lua", seconds, 16, {"RUN": "profile"})
    elif kind == "batch-ingest":
        wrk(port, "batch.lua", seconds, 4, {"RUN": "profile", "BATCH": "100"})
    elif kind == "karma":
        clients.in_processes([(clients.karma_poller, port, TOKEN, seconds, 10**9, 10)])
    elif kind == "drain":
        jobs = [(clients.batch_consumer, port, TOKEN, seconds, 10**9, 100) for _ in range(4)]
        clients.in_processes(jobs)
    else:
        raise SystemExit(f"unknown load {kind!r}")


def summarise(stacks: Path, top: int) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        path, _, count = line.rpartition(" ")
        if not path:
            continue
        samples = int(count)
        frames = [
            frame.split(" (")[0] + " " + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
            for frame in path.split(";")[1:]
        ]
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("including callees", inclusive)):
        lines.append(f"\n-- {title}")
        for frame, samples in counter.most_common(top):
            lines.append(f"{samples / total:6.1%}  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("kind", choices=["ingest", "batch-ingest", "karma", "drain"])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--backlog", type=int, default=200_000, help="packets waiting (consumers)")
    parser.add_argument(
        "--idle",
        action="store_true",
        help="sample threads waiting on I/O too (default: the GIL holder only, i.e. CPU)",
    )
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", help="keep the collapsed stacks in this file")
    args = parser.parse_args()

    database = Database()
    redis_server = private_redis()
    workdir = Path(tempfile.mkdtemp(prefix="bucket-profile-"))
    env = {**service_env(database.url, redis_server.url, str(workdir)), "WEB_CONCURRENCY": "1"}
    migrate(env)
    service = None
    try:
        if args.kind in ("karma", "drain"):
            fill(database, args.backlog, "pending", clients.run_id())
            recount(env)
        service = Service(env)
        (worker,) = service.worker_pids()
        load(args.kind, service.port, 2)  # warm-up
        stacks = Path(args.out or workdir / "stacks.txt")
        command = [
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(worker),
            "--format",
            "raw",
            "--rate",
            "250",
            "--gil",
            "--duration",
            str(int(args.seconds)),
            "--output",
            str(stacks),
        ]
        if args.idle:
            command.remove("--gil")
            command.append("--idle")
        driver = threading.Thread(target=load, args=(args.kind, service.port, args.seconds + 1))
        driver.start()
        subprocess.run(command, check=True, capture_output=True)
        driver.join()
        print(summarise(stacks, args.top))
    finally:
        if service:
            service.stop()
        redis_server.stop()
        database.stop()


if __name__ == "__main__":
    main()
