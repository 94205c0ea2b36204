"""What the benchmark runs on: private PostgreSQL and Redis, the service as the Procfile starts
it, wrk, set-based fills, and the CPU, WAL and memory figures it reads off the processes."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import child_pids, procfile_web  # noqa: E402
from tests.servers import PrivatePostgres, PrivateRedis, free_port  # noqa: E402

BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")
# Limits far above what the benchmark sends: every request pays for both checks, none is refused.
UNLIMITED = "1000000000 per minute"
TOKEN = "bench-consumer-token"


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (0–100) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


class Service:
    """gunicorn started by the Procfile's web line (``module`` replacing ``wsgi:app``)."""

    def __init__(
        self,
        env: dict[str, str],
        module: str = "wsgi:app",
        name: str = "bucket",
        tree: Path | str = ROOT,
    ):
        """``tree``: the checkout to run (another revision's worktree, say); the venv is ours."""
        self.port = free_port()
        self.name = name
        command = procfile_web()
        if module != "wsgi:app":
            command = command.replace("wsgi:app", module)
        self.log_path = Path(env.get("BENCH_LOG_DIR", "/tmp")) / f"bench-{name}-{self.port}.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=tree,
            env={
                **env,
                "PATH": f"{BIN}:{env.get('PATH', os.environ['PATH'])}",
                "PORT": str(self.port),
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # a start that failed leaves no gunicorn behind
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                if len(self.worker_pids()) >= 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")

    def worker_pids(self) -> list[int]:
        return child_pids(self.process.pid)

    def thread_counts(self) -> list[int]:
        """Threads of each worker (gunicorn's pool starts its threads as requests need them)."""
        counts = []
        for pid in self.worker_pids():
            try:
                counts.append(len(os.listdir(f"/proc/{pid}/task")))
            except OSError:
                continue
        return counts

    def rss_mb(self) -> list[float]:
        """Resident memory of each worker, in MB."""
        sizes = []
        for pid in self.worker_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            if match:
                sizes.append(int(match.group(1)) / 1024)
        return sizes

    def cpu_seconds(self) -> float:
        """CPU used by the master and its workers so far."""
        return sum(process_cpu(pid) for pid in [self.process.pid, *self.worker_pids()])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


def process_cpu(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid`` in seconds (plus its reaped children's, with ``children``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


class Database:
    """The benchmark's private PostgreSQL, with pg_stat_statements, and its accounting."""

    def __init__(self) -> None:
        self.server = PrivatePostgres(
            shared_preload_libraries="pg_stat_statements",
            max_connections="200",
            **{"pg_stat_statements.track": "all"},
        ).start()
        self.url = self.server.url
        self.dsn = self.server.dsn
        with self.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def cpu_seconds(self) -> float:
        """CPU of the server: postmaster, its live processes and the ones it already reaped."""
        pid = self.server.postmaster_pid()
        if pid is None:
            return 0.0
        return process_cpu(pid, children=True) + sum(process_cpu(c) for c in child_pids(pid))

    def wal_lsn(self) -> int:
        with self.connect() as conn:
            return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])

    def reset_statements(self) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_stat_statements_reset()")

    def top_statements(self, limit: int = 8) -> list[dict]:
        """The statements that took the most server time since the last reset."""
        with self.connect() as conn:
            rows = conn.execute(
                """
                SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls,
                       round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 4),
                       wal_bytes
                FROM pg_stat_statements
                WHERE query NOT ILIKE '%%pg_stat_statements%%'
                ORDER BY total_exec_time DESC LIMIT %s
                """,
                (limit,),
            ).fetchall()
        return [
            {"query": q, "calls": c, "total_ms": float(t), "mean_ms": float(m), "wal_bytes": int(w)}
            for q, c, t, m, w in rows
        ]

    def table_bytes(self) -> tuple[int, int, int]:
        """(rows, heap bytes, index bytes) of the packets table."""
        with self.connect() as conn:
            conn.execute("VACUUM ANALYZE packets, deliveries")
            rows = conn.execute("SELECT count(*) FROM packets").fetchone()[0]
            heap, index = conn.execute(
                "SELECT sum(pg_table_size(t)), sum(pg_indexes_size(t)) "
                "FROM unnest(ARRAY['packets', 'deliveries']::regclass[]) AS t"
            ).fetchone()
        return int(rows), int(heap), int(index)  # sum() of bigint answers a Decimal

    def stop(self) -> None:
        self.server.destroy()


@dataclass
class Accounting:
    """Server CPU and WAL consumed between ``start`` and ``stop``."""

    database: Database
    service: Service | None = None
    db_cpu: float = 0.0
    app_cpu: float = 0.0
    wal: int = 0

    def __enter__(self) -> Accounting:
        self._db, self._wal = self.database.cpu_seconds(), self.database.wal_lsn()
        self._app = self.service.cpu_seconds() if self.service else 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.db_cpu = self.database.cpu_seconds() - self._db
        self.wal = self.database.wal_lsn() - self._wal
        if self.service:
            self.app_cpu = self.service.cpu_seconds() - self._app


@dataclass
class Weather:
    """What the host and PostgreSQL did during a measurement, beside its figures: CPU time the
    hypervisor stole, I/O wait, the kernel's pressure stall figures, and the writes of
    PostgreSQL's checkpointer and backends. A figure that drifts with the machine (a table
    row measured after minutes of load) can then be told from one that drifts with the code."""

    database: Database
    figures: dict | None = None

    def __enter__(self) -> Weather:
        self._started = (time.monotonic(), cpu_ticks(), pressure_us(), self._bgwriter())
        return self

    def __exit__(self, *exc) -> None:
        began, ticks, stalls, writes = self._started
        elapsed_us = (time.monotonic() - began) * 1e6
        ticks_now, stalls_now, writes_now = cpu_ticks(), pressure_us(), self._bgwriter()
        spent = {k: ticks_now[k] - ticks[k] for k in ticks}
        total = max(sum(spent.values()), 1)
        self.figures = {
            "steal_pct": 100 * spent["steal"] / total,
            "iowait_pct": 100 * spent["iowait"] / total,
            "idle_pct": 100 * spent["idle"] / total,
            **{
                f"{kind}_pressure_pct": 100 * (stalls_now[kind] - stalls[kind]) / elapsed_us
                for kind in stalls
            },
            **{name: writes_now[name] - writes[name] for name in writes},
        }

    def _bgwriter(self) -> dict[str, int]:
        """Buffers written by the checkpointer, the background writer and backends (which
        write when shared_buffers holds no clean page), and the WAL with its full-page images
        (the first change to a page after a checkpoint logs the whole 8 kB page)."""
        with self.database.connect() as conn:
            row = conn.execute(
                "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, buffers_clean,"
                " buffers_backend, wal_records, wal_fpi, wal_bytes"
                " FROM pg_stat_bgwriter, pg_stat_wal"
            ).fetchone()
        names = (
            "checkpoints",
            "checkpoint_buffers",
            "bgwriter_buffers",
            "backend_buffers",
            "wal_records",
            "wal_full_page_images",
            "wal_bytes",
        )
        return dict(zip(names, (int(v) for v in row), strict=True))


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time by kind since boot (/proc/stat), in clock ticks."""
    with open("/proc/stat") as stat:
        values = stat.readline().split()[1 : 1 + len(CPU_FIELDS)]
    return dict(zip(CPU_FIELDS, (int(v) for v in values), strict=True))


def pressure_us() -> dict[str, int]:
    """Microseconds in which some task stalled on CPU or on I/O (/proc/pressure), where the
    kernel reports them."""
    stalls = {}
    for kind in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{kind}") as pressure:
                first = pressure.readline()
        except OSError:
            continue
        stalls[kind] = int(first.rsplit("total=", 1)[1])
    return stalls


# The indexes a layout gives each partition of its own (no index of the parent holds them:
# migration 0017's unique index on seq), read from a partition that has them.
OWN_INDEXES_SQL = (
    "SELECT pg_get_indexdef(x.indexrelid) FROM pg_index x WHERE x.indrelid = %s::regclass "
    "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = x.indexrelid)"
)


def day_partitions(conn: psycopg.Connection, table: str, first: float, days: int) -> int:
    """When ``table`` is range-partitioned on one time column, create the day partitions of
    the fill that no partition covers yet (a layout's own job; here so that no fill lands in
    a default partition), each with the column order and the indexes of its own that the
    layout's default partition has (a layout may order a partition's columns otherwise than
    its parent's: processed deliveries since migration 0021); how many were created."""
    key = conn.execute("SELECT pg_get_partkeydef(%s::regclass)", (table,)).fetchone()[0]
    if not key or not key.upper().startswith("RANGE (") or "," in key:
        return 0
    default = f"{table}_default"
    own = []
    if exists(conn, default):
        own = [row[0] for row in conn.execute(OWN_INDEXES_SQL, (default,))]
    made = 0
    for day in range(days + 1):
        start = time.strftime("%Y-%m-%d", time.gmtime(first + day * 86400))
        name = f"{table}_bench_{start.replace('-', '')}"
        try:
            with conn.transaction():
                bounds = f"FOR VALUES FROM ('{start}') TO ('{start}'::date + 1)"
                if exists(conn, default):
                    conn.execute(f'CREATE TABLE "{name}" (LIKE {default})')
                    conn.execute(f'ALTER TABLE {table} ATTACH PARTITION "{name}" {bounds}')
                else:
                    conn.execute(f'CREATE TABLE "{name}" PARTITION OF {table} {bounds}')
                for definition in own:
                    conn.execute(definition.replace(default, name))
            made += 1
        except psycopg.Error:
            pass  # a partition of the layout's own covers the day (or part of it)
    return made


def exists(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone()[0]


FILL_SQL = """
WITH source AS (
  SELECT g, t,
    -- a UUIDv7 of the millisecond it was received, as the service issues them
    lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0')
      || md5(%(run)s || 'id' || g::text) AS h
  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
    LATERAL (SELECT %(start)s::timestamp + make_interval(secs => g * %(step)s) AS t) AS received
), stored AS (
  -- the numbers as ingest stores them on PostgreSQL: scaled integers (migration 0026); the
  -- dedup key in packet_keys only (migration 0027)
  INSERT INTO packets (packet_id, user_id, session_id, lesson_id, system_type_text,
    role_text, client_timestamp, cognitive_state_text, active_seconds_scaled,
    idle_seconds_scaled, away_seconds_scaled, focus_score_scaled, raw_signals, received_at)
  SELECT
    CAST(substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(h, 14, 3) || '-8'
      || substr(h, 18, 3) || '-' || substr(h, 21, 12) AS uuid),
    'fill_' || (g %% 5000), 's_' || (g %% 5000),
    'lesson_1', 'gurukul',
    'student', t, (ARRAY['DEEP_FOCUS','ON_TASK','THINKING','IDLE'])[1 + g %% 4], 4000, 1000, 0,
    (50 + g %% 50) * 100, '{"tab_visible": true, "dwell_time_ms": 4000}'::json, t
  FROM source
  RETURNING packet_id, received_at, client_timestamp
), keyed AS (
  -- the packets' natural identities (migration 0012: packet_keys holds them across day
  -- partitions; 0015: by the client timestamp's day; uuid in both tables since 0016), a
  -- digest of the packet's id standing in for the digest of its fields
  INSERT INTO packet_keys (dedup_key, client_day, received_at, packet_id)
  SELECT CAST(md5(packet_id::text) AS uuid), client_timestamp::date, received_at, packet_id
  FROM stored
)
-- a processed one's time in visible_at only, its processed_at NULL (migration 0021)
INSERT INTO deliveries (packet_id, received_at, delivery_state, visible_at, delivery_count,
  processed_by_karma)
SELECT packet_id, received_at, %(state)s, extract(epoch FROM received_at), %(count)s,
  %(processed)s
FROM stored
"""


def fill(database: Database, rows: int, state: str, run: str, days: int = 0) -> None:
    """Insert ``rows`` packets in ``state`` (pending or processed) with set-based SQL: received
    over the past hours, oldest first, as a backlog or a history would be; or, with ``days``,
    over that many past days, each in a day partition of its own as a deployment has them (not
    the default partition), in statements of at most ``FILL_CHUNK`` packets."""
    if rows <= 0:
        return
    processed = state == "processed"
    now = time.time()
    # 200 packets per second, the benchmark's learners; or the days asked for.
    span = days * 86400.0 if days else max(3600.0, rows / 200.0)
    start = now - span - 60
    with database.connect() as conn:
        if days:
            day_tables(conn, start, days)
        for first in range(1, rows + 1, FILL_CHUNK):
            conn.execute(
                FILL_SQL,
                {
                    "run": run,
                    "first": first,
                    "last": min(rows, first + FILL_CHUNK - 1),
                    "state": state,
                    "count": 1 if processed else 0,
                    "processed": processed,
                    "start": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
                    "step": span / rows,
                },
            )


FILL_CHUNK = 1_000_000


def day_tables(conn: psycopg.Connection, first: float, days: int) -> int:
    """Day partitions, from the day of ``first`` on, of every table partitioned by day
    (packets, processed deliveries, keys); a new deployment's empty legacy partition of keys
    (migration 0015: every day before it) goes first, so the days of keys get their own."""
    if (
        exists(conn, "packet_keys_legacy")
        and not conn.execute("SELECT EXISTS (SELECT 1 FROM packet_keys_legacy)").fetchone()[0]
    ):
        conn.execute("DROP TABLE packet_keys_legacy")
    return sum(
        day_partitions(conn, table, first, days)
        for table in ("packets", "deliveries", "deliveries_processed", "packet_keys")
        if exists(conn, table)
    )


def recount(env: dict[str, str]) -> None:
    """Bring the status counters in line with rows inserted behind the service's back."""
    bucket_command(env, "recount")


def bucket_command(env: dict[str, str], command: str) -> None:
    """``flask --app wsgi bucket <command>`` against the benchmark's database."""
    subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "bucket", command],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )


def migrate(env: dict[str, str], tree: Path | str = ROOT) -> None:
    """``flask db upgrade`` with ``env``, by the migrations of the checkout at ``tree``."""
    subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )


def pending_count(database: Database) -> int:
    with database.connect() as conn:
        return conn.execute(
            "SELECT count(*) FROM deliveries WHERE delivery_state = 'pending'"
        ).fetchone()[0]


def wrk(
    port: int,
    script: str,
    seconds: float,
    connections: int,
    env: dict | None = None,
    path: str = "/api/v1/bucket/prana/ingest",
) -> dict:
    """Run wrk with a Lua script against ``path`` (ingest); requests/s, latency percentiles,
    non-2xx."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",  # wrk needs a connection per thread
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / script),
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=True,
    ).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 0.001, "ms": 1, "s": 1000}[match.group(2)]
        figures[f"p{pct}_ms"] = float(match.group(1)) * scale
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["errors"] = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(n) for n in errors.groups()) if errors else 0
    )
    figures["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    return figures


def private_redis() -> PrivateRedis:
    return PrivateRedis().start()
