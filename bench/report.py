"""The report: the figures table from every registered scenario's rows, and the capacity
figures derived from the ingest, drain and storage results."""

from __future__ import annotations

from bench.context import Row, Section
from bench.scenarios import SCENARIOS

LEARNER_PACKETS_PER_DAY = 5000  # one packet per 5 s over about 7 active hours


def capacity(results: dict, cores: int) -> dict:
    """Learners one instance and one PostgreSQL server carry, and disk per day."""
    ingest = results["ingest"]
    drain = results.get("batch_drain", {})
    per_packet_app = ingest["app_cpu_ms_per_packet"] + drain.get("app_cpu_ms_per_packet", 0)
    per_packet_db = ingest["db_cpu_ms_per_packet"] + drain.get("db_cpu_ms_per_packet", 0)
    storage = results.get("storage", {})
    bytes_per_packet = storage.get("heap_bytes_per_packet", 0) + storage.get(
        "index_bytes_per_packet", 0
    )
    rate_per_learner = 0.2  # packets per second while active
    return {
        "app_cpu_ms_per_packet": per_packet_app,
        "db_cpu_ms_per_packet": per_packet_db,
        "learners_per_instance_core": 1000 / per_packet_app / rate_per_learner
        if per_packet_app
        else None,
        "learners_per_postgres_core": 1000 / per_packet_db / rate_per_learner
        if per_packet_db
        else None,
        "disk_mb_per_day_per_1000_learners": bytes_per_packet
        * LEARNER_PACKETS_PER_DAY
        * 1000
        / 1e6,
        "wal_mb_per_day_per_1000_learners": (
            ingest["wal_bytes_per_packet"] + drain.get("wal_bytes_per_packet", 0)
        )
        * LEARNER_PACKETS_PER_DAY
        * 1000
        / 1e6,
        "cores": cores,
    }


def capacity_rows(results: dict, row: Row) -> None:
    """The cost per packet behind the capacity figures."""
    if "capacity" in results:
        cap = results["capacity"]
        row(
            "cost per packet (ingest + batch drain): app / PostgreSQL CPU",
            f"{cap['app_cpu_ms_per_packet']:.3f} / {cap['db_cpu_ms_per_packet']:.3f} ms",
            "",
        )


# After every scenario's rows: the derived figures.
CAPACITY = Section(100, capacity_rows)


def table(results: dict) -> str:
    """The figures of the issue's table, each beside its ceiling and target."""
    lines = []

    def row(name: str, value: str, target: str) -> None:
        lines.append(f"{name:<58} {value:<34} {target}")

    row("figure", "measured", "target")
    sections = [section for scenario in SCENARIOS for section in scenario.sections]
    for section in sorted([*sections, CAPACITY], key=lambda section: section.position):
        section.render(results, row)
    return "\n".join(lines)
