"""``bench.purge_day`` still runs, in seconds: its fill is purged by the real ``purge_days``,
one day of packets and its day of keys dropped whole, every statement timed. It asserts what
was dropped and how, never how fast (the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import time

import pytest

from bench import purge_day, storage
from tests import servers


@pytest.mark.slow
def test_the_purge_of_a_filled_day_drops_it_whole_and_times_each_statement(capsys):
    if servers.postgres_binary("initdb") is None:
        servers.unavailable("PostgreSQL's initdb is not installed")
    figures = purge_day.main(["--per-day", "3000", "--days", "2"])
    purge = figures["purge"]
    (dropped,) = purge["dropped"]
    assert dropped[1:] == [3000, 1]  # every packet of the day, in one run of seq
    assert purge["kept"] == []
    assert [kept for _, kept in purge["key_days"]] == [None]
    assert {"day runs", "seals near the day", "key day live check"} <= set(purge["steps"])
    assert not any("DELETE FROM packets" in statement for statement, _ in purge["statements"])
    assert "runs_sql" in figures["explain"]
    assert "BENCH_PURGE_DAY_JSON" in capsys.readouterr().out


DAY = 86400


@pytest.mark.parametrize("backlog_age", [60, 3600, "just before midnight"])
def test_the_benchmarks_purge_age_keeps_the_backlogs_day_when_the_run_crosses_midnight(
    backlog_age,
):
    """The day partitions a purge drops are those that end at or before ``now - age``: the day
    before the backlog's must be among them and the backlog's own day never, also when the
    backlog's minutes fell on yesterday (a run that crossed UTC midnight)."""
    now = time.time()
    if backlog_age == "just before midnight":
        backlog_age = now % DAY + 90
    backlog_since = now - backlog_age
    backlog_day = backlog_since // DAY * DAY
    # bench.purge_day's two days: the oldest one ends where the backlog's day begins.
    for age in (storage.purge_age(2, backlog_since), purge_day.older_than(backlog_day)):
        cutoff = time.time() - age * DAY  # the purge asks for its cutoff after the age is set
        assert backlog_day <= cutoff < backlog_day + DAY
    # With more days filled, the oldest two calendar days still go, the backlog's stays.
    cutoff = now - storage.purge_age(30, backlog_since) * DAY
    assert cutoff < backlog_day
