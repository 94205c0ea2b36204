"""Authenticated ingest: single ingest with token verification off, HS256 and RS256.

The measurement is ``bench/auth_ingest.py`` (also runnable alone): three applications on the
run's PostgreSQL, alternated round by round, in-process so the figure is the service's own time
per request. Goal (issue 20): verification on within 5 % of off.
"""

from __future__ import annotations

from bench import auth_ingest
from bench.context import MODES, Row, Run, Scenario, Section


def bench_auth(run: Run) -> None:
    """Alternate the three modes on the run's database, emptied before and after."""
    size = next(name for name, sizes in MODES.items() if sizes == run.sizes)
    run.truncate()
    run.results["auth_ingest"] = auth_ingest.run(run.database.url, size)
    run.truncate()


def auth_rows(results: dict, row: Row) -> None:
    """Each verifying mode's cost against off, and the check alone."""
    if "auth_ingest" not in results:
        return
    auth = results["auth_ingest"]
    for mode, name in (("hs256", "HS256"), ("rs256", "RS256")):
        check = auth["check_us"][mode]
        row(
            f"single ingest, token verified ({name}) vs off",
            f"{auth['overhead_vs_off_percent'][mode]:+.1f} % "
            f"(check {check['seen']:.1f} µs seen, {check['first']:.0f} µs first)",
            "within 5 %",
        )


SCENARIOS = (Scenario("auth", bench_auth, sections=(Section(85, auth_rows),)),)
