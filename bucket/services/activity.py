"""Per-minute activity for the console's charts: packets ingested (by system and cognitive
state) and processed, over the last hour or day, in one bounded read.

The roll-ups cannot drift from the rows: ingested packets are added by the bookkeeper in the
transaction that books them (each packet exactly once, ``services/bookkeeping``), so ingest
itself writes nothing more; processed ones are added by the acknowledgement's own statement
(``services/delivery/acks``). A chart reads at most a day of minutes (a few dozen rows per
minute, however many packets are stored). Minutes older than two days are pruned.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, text

from bucket.extensions import db
from bucket.models import ActivityMinute
from bucket.services import counters, sql
from bucket.services.codes import column_sql
from bucket.services.dialect import dialect_name, upsert_insert
from bucket.timeutil import epoch_now

A = ActivityMinute.__table__
PROCESSED = "processed"
INGESTED = "ingested:"
REFUSED = "refused:"  # refused:<reason>, by authenticated ingest
AUTH = "auth:"  # auth:<outcome>, stored packets by authentication outcome (booked)
AUTH_REFUSALS = ("missing", "invalid", "mismatch")
KEEP_MINUTES = 2 * 24 * 60
WINDOWS = {"1h": 60, "24h": 24 * 60}
MINUTE_OF = {
    "postgresql": "floor(extract(epoch FROM received_at) / 60)::bigint",
    "sqlite": "CAST(strftime('%s', received_at) AS INTEGER) / 60",
}
# The same upsert inside the PostgreSQL acknowledgement statement ({source}: the count).
PG_PROCESSED = """
INSERT INTO activity_minutes AS a (minute, series, shard, value)
SELECT %(minute)s, 'processed', %(shard)s, n FROM ({source}) AS p(n) WHERE n > 0
ON CONFLICT (minute, series, shard) DO UPDATE SET value = a.value + excluded.value
"""


def add(minute_values: list[dict[str, Any]]) -> None:
    """Add to per-minute series in the session's transaction."""
    if not minute_values:
        return
    statement = upsert_insert(A).values(minute_values)
    statement = statement.on_conflict_do_update(
        index_elements=[A.c.minute, A.c.series, A.c.shard],
        set_={"value": A.c.value + statement.excluded.value},
    )
    db.session.execute(statement)


# The booked packets' minutes, set-based in the database: a booking after a long stretch
# unbooked (an import, a restore behind the service's back) covers hundreds of thousands of
# minutes and series, which never travel to the worker. Series ``ingested:<system>:<state>``
# (the cognitive state, else the state; "unknown" for none), and stored packets by
# authentication outcome (only those ingest checked): the console's share of verified packets
# per minute. The strings as stored, decoded where coded (PostgreSQL, migration 0022).
ROLL_UP_SQL = """
INSERT INTO activity_minutes (minute, series, shard, value)
SELECT minute, series, 0, count(*) FROM (
  SELECT {minute} AS minute, substr('{ingested}' || coalesce(nullif({system_type}, ''), 'unknown')
    || ':' || coalesce(nullif(coalesce({cognitive_state}, {state}), ''), 'unknown'), 1, 96)
    AS series
  FROM packets WHERE seq > :after AND seq <= :through
  UNION ALL
  SELECT {minute}, substr('{auth}' || {auth_outcome}, 1, 96) FROM packets
  WHERE seq > :after AND seq <= :through AND {auth_outcome} IS NOT NULL
) AS booked WHERE true GROUP BY minute, series
ON CONFLICT (minute, series, shard) DO UPDATE SET value = activity_minutes.value + excluded.value
"""


def book(after: int, through: int) -> int:
    """Roll the packets with ``after`` < seq <= ``through`` into their minutes (in the
    booking's transaction); how many there were."""
    bounds = {"after": after, "through": through}
    strings = {name: column_sql(name) for name in ("system_type", "cognitive_state", "state")}
    roll_up = ROLL_UP_SQL.format(
        minute=MINUTE_OF[dialect_name()],
        ingested=INGESTED,
        auth=AUTH,
        auth_outcome=column_sql("auth_outcome"),
        **strings,
    )
    db.session.execute(text(roll_up), bounds)
    return db.session.execute(
        text("SELECT count(*) FROM packets WHERE seq > :after AND seq <= :through"), bounds
    ).scalar_one()


def processed(count: int, now: float) -> None:
    """SQLite's acknowledgements: ``count`` packets processed at ``now``."""
    if count:
        add(
            [
                {
                    "minute": int(now // 60),
                    "series": PROCESSED,
                    "shard": counters.random_shard(),
                    "value": count,
                }
            ]
        )


def refused(reasons: dict[str, int]) -> None:
    """Packets refused by authenticated ingest, by reason, added to this minute and committed
    (``status`` and the console read them; a refusal writes nothing else)."""
    minute = int(epoch_now() // 60)
    add(
        [
            {
                "minute": minute,
                "series": f"{REFUSED}{reason}",
                "shard": counters.random_shard(),
                "value": count,
            }
            for reason, count in sorted(reasons.items())
            if count
        ]
    )
    db.session.commit()


def refusals(minutes: int = 24 * 60) -> dict[str, int]:
    """Packets refused by authenticated ingest over the last ``minutes``, by reason (every
    reason present, zero included); a bounded read of the roll-ups, committed."""
    first = int(epoch_now() // 60) - minutes + 1
    # On PostgreSQL the autocommit connection: no transaction to begin and commit (status).
    found = sql.run(
        "SELECT series, sum(value) FROM activity_minutes "
        "WHERE minute >= %(first)s AND series LIKE %(refused)s GROUP BY series",
        {"first": first, "refused": REFUSED + "%"},
    )
    sql.finish()
    counts = dict.fromkeys(AUTH_REFUSALS, 0)
    for series, count in found:
        counts[series[len(REFUSED) :]] = int(count)
    return counts


def minute_start(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


def timeseries(window: str) -> dict[str, Any]:
    """Ingested and processed per minute over the window (``1h`` or ``24h``), oldest first,
    and the mix of cognitive states per system over it."""
    minutes = WINDOWS[window]
    last = int(epoch_now() // 60)
    first = last - minutes + 1
    per_minute = db.session.execute(
        text(
            "SELECT minute, "
            "sum(CASE WHEN series = 'processed' THEN value ELSE 0 END), "
            "sum(CASE WHEN series LIKE 'ingested:%' THEN value ELSE 0 END) "
            "FROM activity_minutes WHERE minute >= :first GROUP BY minute"
        ),
        {"first": first},
    ).all()
    mix = db.session.execute(
        text(
            "SELECT series, sum(value) FROM activity_minutes "
            "WHERE minute >= :first AND series LIKE 'ingested:%' GROUP BY series"
        ),
        {"first": first},
    ).all()
    db.session.commit()
    ingested, done = [0] * minutes, [0] * minutes
    for minute, processed_count, ingested_count in per_minute:
        if first <= minute <= last:
            ingested[minute - first] = int(ingested_count)
            done[minute - first] = int(processed_count)
    states: dict[str, dict[str, int]] = {}
    for series, count in mix:
        system, _, state = series[len(INGESTED) :].partition(":")
        states.setdefault(system, {})[state] = int(count)
    verified_share, refused = auth_timeseries(first, last)
    return {
        "window": window,
        "minute_seconds": 60,
        "minutes": [minute_start(first + i) for i in range(minutes)],
        "ingested": ingested,
        "processed": done,
        "totals": {"ingested": sum(ingested), "processed": sum(done)},
        "states": states,
        "verified_share": verified_share,
        "refused": refused,
    }


def auth_timeseries(first: int, last: int) -> tuple[list[float | None], dict[str, list[int]]]:
    """Authenticated ingest per minute: the share of checked packets stored verified (None
    in a minute without any), and packets refused by reason."""
    rows = db.session.execute(
        text(
            "SELECT minute, series, sum(value) FROM activity_minutes WHERE minute >= :first "
            "AND (series LIKE 'auth:%' OR series LIKE 'refused:%') GROUP BY minute, series"
        ),
        {"first": first},
    ).all()
    db.session.commit()
    minutes = last - first + 1
    checked, verified = [0] * minutes, [0] * minutes
    refused = {reason: [0] * minutes for reason in AUTH_REFUSALS}
    for minute, series, count in rows:
        if not first <= minute <= last:
            continue
        at, count = minute - first, int(count)
        if series.startswith(AUTH):
            checked[at] += count
            if series == f"{AUTH}verified":
                verified[at] += count
        else:
            refused.setdefault(series[len(REFUSED) :], [0] * minutes)[at] += count
    share = [round(v / c, 4) if c else None for v, c in zip(verified, checked, strict=True)]
    return share, refused


def prune() -> int:
    """Drop minutes older than two days and commit; how many rows."""
    cutoff = int(epoch_now() // 60) - KEEP_MINUTES
    gone = db.session.execute(delete(A).where(A.c.minute < cutoff)).rowcount or 0
    db.session.commit()
    return gone
