"""``bench.purge_day`` still runs, in seconds: its fill is purged by the real ``purge_days``,
one day of packets and its day of keys dropped whole, every statement timed. It asserts what
was dropped and how, never how fast (the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench import purge_day
from tests import servers

pytestmark = pytest.mark.slow


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
