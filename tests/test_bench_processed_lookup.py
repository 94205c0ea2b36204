"""``bench.processed_lookup`` still runs, in seconds: every index it compares is built and
measured on a small day, and the b-tree finds one id with a handful of buffers."""

from __future__ import annotations

import pytest

from bench import processed_lookup
from tests import servers


@pytest.mark.slow
def test_every_index_is_measured_on_a_small_day(capsys):
    if servers.postgres_binary("initdb") is None:
        servers.unavailable("PostgreSQL's initdb is not installed")
    figures = processed_lookup.main(["--rows", "20000"])

    assert set(figures["indexes"]) == set(processed_lookup.INDEXES)
    btree = figures["indexes"]["btree"]
    assert btree["one_buffers_p50"] <= 4 and btree["bytes_per_row"] > 20
    for name, found in figures["indexes"].items():
        if name != "btree":
            assert found["bytes_per_row"] < btree["bytes_per_row"] / 10, name
    assert "BENCH_PROCESSED_LOOKUP_JSON" in capsys.readouterr().out
