"""Storage: the bytes a stored packet costs, from a set-based fill of a database of its own.

The measurement is ``bench/storage.py`` (also runnable alone, with any size): a database
created on the run's PostgreSQL, migrated, filled over days of ``received_at`` without HTTP,
measured after VACUUM and dropped. Bytes do not depend on the machine's load. Goals (issue
22): at most 500 bytes of heap and index per stored packet, 2.5 GB a day per 1,000 learners,
a hot delivery table at most twice its size with only the backlog stored, and a day of 5M
packets purged in at most a second with no row deleted one by one (the real ``purge_days`` on
the filled database, timed).
"""

from __future__ import annotations

from bench import storage
from bench.context import MODES, Row, Run, Scenario, Section


def bench_storage(run: Run) -> None:
    """Fill, measure and drop a database of the mode's size on the run's server."""
    size = next(name for name, sizes in MODES.items() if sizes == run.sizes)
    run.results["storage_fill"] = storage.run(run.database.dsn, run.database.url, run.env, size)


def storage_rows(results: dict, row: Row) -> None:
    """The issue's storage figures, then each table's bytes per packet."""
    if "storage_fill" not in results:
        return
    fill = results["storage_fill"]
    row(
        f"heap + index bytes per stored packet ({fill['stored']:,} over {fill['days']} days)",
        f"{fill['bytes_per_packet']:,.0f} "
        f"(packets + deliveries {fill['core_bytes_per_packet']:,.0f})",
        "<= 500",
    )
    compaction = fill.get("compacted")
    if compaction:
        row(
            "  the same after the daily compaction of past days' indexes",
            f"{compaction['bytes_per_packet']:,.0f}",
            "<= 500",
        )
    row(
        "disk per day per 1,000 learners (5,000 / 17,280 packets)",
        f"{fill['disk_gb_per_day_per_1000_learners_at_5000']:.2f} / "
        f"{fill['disk_gb_per_day_per_1000_learners']:.2f} GB",
        "<= 2.5 GB (5,000)",
    )
    row(
        f"hot delivery table, {fill['stored']:,} vs {fill['backlog']:,} stored",
        f"{fill['hot_bytes_at_stored'] / 1e6:,.1f} vs {fill['hot_bytes_at_backlog'] / 1e6:,.1f} MB "
        f"(x{fill['hot_ratio']:.1f})",
        "<= 2x",
    )
    purge = fill.get("purge")
    if purge:
        deleted = sum(purge["rows_deleted"].values())
        row(
            f"purge of the oldest days ({purge['packets']:,} packets), by dropping them",
            f"{purge['seconds']:.2f} s ({purge['us_per_packet']:.1f} us a packet, "
            f"{purge['us_per_packet'] * 5:.1f} s for 5M), {deleted:,} rows deleted one by one",
            "a day of 5M <= 1 s, none one by one",
        )
    row(
        "  WAL of the set-based fill per packet",
        f"{fill['fill_wal_bytes_per_packet']:,.0f} bytes",
        "",
    )
    for name, per_packet in sorted(fill["bytes_per_packet_by_table"].items()):
        row(f"  {name} per stored packet", f"{per_packet:,.0f} bytes", "")


SCENARIOS = (Scenario("storage", bench_storage, sections=(Section(90, storage_rows),)),)
