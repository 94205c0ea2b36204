"""What every scenario shares: the sizes of each mode, the run's servers and results, the
fill-and-settle steps, the consumer helpers, and the shape of a scenario and its report rows."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients
from bench.harness import TOKEN, UNLIMITED, Database, Service, fill, pending_count, recount


@dataclass
class Sizes:
    """How big and how long each scenario runs in one mode."""

    seconds: float
    rounds: int
    small_backlog: int
    large_backlog: int
    small_table: int
    large_table: int
    recovery_backlog: int
    learners: int
    sequential_calls: int
    # The audit scenario's turns a side, and whether each measurement waits one seal interval
    # more so the sealer's work on its last packets counts (a 5 % effect needs the full run).
    audit_rounds: int
    audit_settles: bool
    wrk_connections: int = 16
    # The large table's packets spread over this many past days, a day partition each (issue
    # 22: 20M over 30 days); 0: over the past hours, at the benchmark's 200 packets a second.
    large_table_days: int = 0


MODES = {
    "full": Sizes(
        10,
        3,
        10_000,
        1_000_000,
        10_000,
        20_000_000,
        1_000_000,
        1000,
        2000,
        5,
        True,
        large_table_days=30,
    ),
    "quick": Sizes(
        2, 3, 10_000, 100_000, 10_000, 100_000, 50_000, 1000, 300, 1, False, large_table_days=3
    ),
    "smoke": Sizes(1, 1, 500, 2_000, 500, 3_000, 2_000, 50, 50, 1, False, large_table_days=2),
}


@dataclass
class Run:
    """Everything one benchmark run shares: servers, the service, the ceiling, the results."""

    sizes: Sizes
    database: Database
    env: dict[str, str]
    workdir: Path  # the run's scratch directory: logs, the embedded default's SQLite file
    service: Service | None = None
    ceiling: Service | None = None
    bare: Service | None = None  # bench/bare_app.py: the bucket's statements and nothing else
    results: dict = field(default_factory=dict)

    def restart_service(self) -> None:
        if self.service:
            self.service.stop()
        self.service = Service(self.env)

    def truncate(self) -> None:
        with self.database.connect() as conn:
            conn.execute(
                "TRUNCATE packets, packet_keys, packet_idempotency_keys, deliveries, "
                "packet_counters, quarantine, audit_seals, audit_purges, audit_purged_ranges, "
                "activity_minutes"
            )
        recount(self.env)

    def top_up(self, backlog: int) -> None:
        """Fill the pending backlog back up to ``backlog`` packets."""
        missing = backlog - pending_count(self.database)
        fill(self.database, missing, "pending", clients.run_id())
        if missing > 0:
            recount(self.env)
            settle(self.database)


def settle(database: Database) -> None:
    """After a bulk fill: what autovacuum and the checkpointer would have done while a real
    backlog built up over an hour, done now so they do not run during the measurement."""
    with database.connect() as conn:
        conn.execute("VACUUM (ANALYZE) packets, deliveries")
        conn.execute("CHECKPOINT")


def service_env(database_url: str, redis_url: str, log_dir: str) -> dict[str, str]:
    """Production settings, with rate limits raised so they never refuse (but still run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        BUCKET_REDIS_PREFIX=f"bench-{clients.run_id()}",
        BUCKET_CONSUMER_TOKEN=TOKEN,
        BUCKET_RATE_LIMIT_INGEST_PER_IP=UNLIMITED,
        BUCKET_RATE_LIMIT_INGEST_PER_USER=UNLIMITED,
        BUCKET_RATE_LIMIT_INGEST_BYTES_PER_IP=UNLIMITED,
        # The audit sealer would spend minutes sealing each bulk fill (a backlog that arrives
        # at once, unlike a real one); the "audit" scenario measures what it costs ingest.
        BUCKET_AUDIT_SEAL_INTERVAL="0",
        BENCH_LOG_DIR=log_dir,
    )
    for name in ("WEB_CONCURRENCY", "PORT", "PROMETHEUS_MULTIPROC_DIR", "LOG_LEVEL"):
        env.pop(name, None)
    # A setting under trial, e.g. BENCH_SERVICE_ENV="BUCKET_INGEST_COALESCE=true
    # BUCKET_ACK_COALESCE=true": the service runs with it, the ceilings as always.
    for setting in os.environ.get("BENCH_SERVICE_ENV", "").split():
        name, _, value = setting.partition("=")
        env[name] = value
    return env


def db_rows(db: Database) -> int:
    with db.connect() as conn:
        return conn.execute("SELECT count(*) FROM packets").fetchone()[0]


def sequential(port: int, what: str, count: int, token: str | None = TOKEN) -> clients.Tally:
    (tally,) = clients.in_processes(
        [(clients.sequential_calls, port, token, what, count, clients.run_id())]
    )
    return tally


def karma(port: int, seconds: float, max_packets: int) -> clients.Tally:
    (tally,) = clients.in_processes([(clients.karma_poller, port, TOKEN, seconds, max_packets, 10)])
    return tally


Row = Callable[[str, str, str], None]  # one line of the report: figure, measured, target


@dataclass(frozen=True)
class Section:
    """Rows of the report, drawn from the results; ``position`` orders the sections in the
    table (the order BENCHMARKS.md reads), whichever scenario measured them."""

    position: int
    render: Callable[[dict, Row], None]


@dataclass(frozen=True)
class Scenario:
    """One ``--only`` name: what it measures, the scenarios it needs first, and its rows."""

    name: str
    measure: Callable[[Run], None]
    needs: tuple[str, ...] = ()
    sections: tuple[Section, ...] = ()
