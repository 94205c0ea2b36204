"""Storage: the bytes a stored packet costs on PostgreSQL, measured on a set-based fill.

    .venv/bin/python -m bench.storage                     # 20M packets over 30 days
    .venv/bin/python -m bench.storage --quick             # 200k over 3 days
    .venv/bin/python -m bench.storage --smoke             # seconds: proves it still runs
    .venv/bin/python -m bench.storage --packets 2000000 --days 10

A database of its own (created, migrated and dropped here, on the benchmark's private
PostgreSQL) is filled as a deployment would have filled it, without HTTP: one INSERT ...
SELECT generate_series per day of ``received_at``, in time order, packets and their
deliveries in one statement. Nearly every packet is processed (a quarter of them with a karma
action, one in a hundred after a retry), a few are dead, and the newest ``backlog`` are
unfinished (pending, one in a hundred leased). Audit seals cover every packet (one seal per
``SEAL_PACKETS``, as the sealer makes them at 1,000 learners, their leaves packed as it packs
them since migration 0019: ids as 16 raw bytes, no seqs for a whole range), a day of purged
packets is recorded in ``audit_purges``, and two days of activity minutes are rolled up.

The fill follows the tables' real columns (read from ``pg_attribute``): each column it knows
gets a realistic value (``raw_signals`` shaped like the real packets in
/work/shared/fixtures, as canonical JSON), cast to the column's current type; a column it does
not know is left to its default, or NULL, or a value of its type when it is NOT NULL without
default (reported as ``unfilled_columns``). Sizes sum a partitioned table over its partitions
(``pg_partition_tree``), so a layout partitioned by day measures the same way.

Measured after ``VACUUM (ANALYZE)``: every relation's heap, TOAST and each index; bytes per
stored packet of the tables that grow with packets; disk per day per 1,000 learners; the WAL
of the fill per packet; each column's average stored width (``pg_stats``); a few alternative
index definitions, built and dropped, for the bytes they would save; and the hot delivery
table's size with only the backlog stored against with all ``packets`` stored. Then the real
``flask bucket partitions compact`` (``compact_partitions``), as the daily cron would have run
it on these past days, and every relation measured again: bytes per packet as filled and
compacted. Bytes do not depend on the machine's load, so one run suffices. Prints a table and
one JSON line (``BENCH_STORAGE_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.harness import Database, day_tables, exists, migrate  # noqa: E402
from bucket.models import PACKET_CODES, PACKET_SCALES  # noqa: E402
from bucket.services import codes  # noqa: E402

# (packets, days, unfinished backlog) of each mode.
SIZES = {
    "full": (20_000_000, 30, 10_000),
    "quick": (200_000, 3, 10_000),
    "smoke": (3_000, 2, 200),
}
LEARNER_PACKETS_PER_DAY = 17_280  # one packet every 5 s, all day
# The basis of the 2026-12-03 figure (5.4 GB) and of the 2.5 GB target: about 7 active
# hours a day (bench/report.py).
LEARNER_PACKETS_PER_ACTIVE_DAY = 5_000
# Learners sending at once, round-robin: how many places of the user indexes take inserts.
LEARNERS = 1_000
# The tables polls and acks touch: their size should follow the backlog, not the history.
# Since migration 0014 that is the hot partition of deliveries (pending, leased and dead),
# measured on its own; a layout without it measures the whole of deliveries.
HOT_TABLES = ("deliveries",)
HOT_PARTITION = "deliveries_hot"
# Processed deliveries, partitioned by day like the packets (migration 0014).
PROCESSED_TABLE = "deliveries_processed"
# Tables whose size does not grow with the packets stored (bounded, or growing with purges).
NOT_PER_PACKET = (
    "alembic_version",
    "packet_counters",
    "quarantine",
    "activity_minutes",
    "signal_key_sets",
)
PURGE_TABLE = "audit_purges"  # grows with every packet ever purged (reported per purged packet)
# Packets per audit seal: the sealer seals every 5 s; 1,000 learners send 200 packets/s.
SEAL_PACKETS = 1_000
DEAD_EVERY = 20_000  # one dead packet in this many
KEEP_ACTIVITY_DAYS = 2  # services/activity.py prunes minutes older than two days
STATES = ("DEEP_FOCUS", "ON_TASK", "THINKING", "IDLE", "DISTRACTED", "AWAY", "OFF_TASK")
EMS_STATES = ("WORKING", "IDLE", "AWAY", "DISTRACTED", "FAKING")

# What each known column of packets holds, over ``src`` (g: the packet's number, t: received
# at (naive UTC), u: its learner, ems: an EMS packet, h: a random hex digest, pid: its id).
PACKET_VALUES = {
    "packet_id": "pid",
    # A digest of the packet's id stands in for the digest of its fields (``KEY_VALUES``).
    "dedup_key": "md5(pid)",
    "user_id": "CASE WHEN ems THEN 'emp_' ELSE 'stu_' END || lpad(u::text, 4, '0')",
    "employee_id": "CASE WHEN ems THEN 'emp_' || lpad(u::text, 4, '0') END",
    "session_id": (
        "CASE WHEN ems THEN 'ems_sess_' ELSE 'sess_' END"
        " || substr(md5(u::text || '-' || floor(extract(epoch FROM t) / 3600)::text), 1, 6)"
    ),
    "lesson_id": "CASE WHEN NOT ems THEN 'lesson_algebra_' || lpad((u % 40)::text, 2, '0') END",
    "task_id": "CASE WHEN ems THEN 'task_invoice_review' END",
    "system_type": "CASE WHEN ems THEN 'ems' ELSE 'gurukul' END",
    "role": "CASE WHEN ems THEN 'employee' ELSE 'student' END",
    "client_timestamp": "date_trunc('milliseconds', t - make_interval(secs => (g % 50) / 100.0))",
    "cognitive_state": (
        "CASE WHEN NOT ems THEN (ARRAY['" + "','".join(STATES) + "'])[1 + g % 7] END"
    ),
    "state": "CASE WHEN ems THEN (ARRAY['" + "','".join(EMS_STATES) + "'])[1 + g % 5] END",
    "active_seconds": "(g % 51) / 10.0",
    "idle_seconds": "5.0 - (g % 51) / 10.0",
    "away_seconds": "0.0",
    "focus_score": "CASE WHEN NOT ems THEN g % 101 END",
    "integrity_score": "CASE WHEN ems THEN (g % 100) / 100.0 END",
    # Canonical JSON (sorted keys, no spaces), as ingest stores it; the fixtures' fields.
    "raw_signals": (
        'CASE WHEN ems THEN format(\'{"browser_visibility":"visible","idle_seconds":%s,'
        '"keystroke_count":%s,"mouse_events":%s,"window_focus":true}\','
        " 5.0 - (g % 51) / 10.0, g % 97, g % 31)"
        ' ELSE format(\'{"dwell_time_ms":%s,"hover_loops":%s,"inactivity_ms":%s,'
        '"mouse_velocity":%s,"panel_focused":%s,"rapid_click_count":%s,'
        '"scroll_depth":%s,"tab_visible":%s}\', 1000 + g % 60000, g % 4, g % 5000,'
        " round(((g % 9000) / 10.0)::numeric, 1), (g % 5 > 0)::text, g % 3,"
        " round(((g % 100) / 100.0)::numeric, 2), (g % 9 > 0)::text) END"
    ),
    "received_at": "t",
    "stale": "false",
    # Left NULL as deployed: most packets carry no Idempotency-Key, and ingest checks no
    # token by default (BUCKET_INGEST_AUTH=off).
    "idempotency_key": "NULL",
    "auth_outcome": "NULL",
    "auth_subject": "NULL",
}
# Since migration 0024 the five strings' columns are named <name>_text (bucket/services/codes),
# since 0026 the five numbers' <name>_float.
PACKET_VALUES.update({f"{name}_text": PACKET_VALUES[name] for name in PACKET_CODES})
PACKET_VALUES.update({f"{name}_float": PACKET_VALUES[name] for name in PACKET_SCALES})
# Since migration 0026, the same numbers as ingest stores them on PostgreSQL: each value
# times its scale as a smallint, float NULL (every value filled has few decimals).
SCALED_VALUES = {f"{name}_float": "NULL" for name in PACKET_SCALES}
SCALED_VALUES.update(
    {
        f"{name}_scaled": f"round(({PACKET_VALUES[name]}) * {scale})"
        for name, scale in PACKET_SCALES.items()
    }
)
# Since migration 0020 (a dictionary of raw_signals' key sets), the same signals as ingest
# stores them on PostgreSQL: the id of their key set (sorted keys) and the values' canonical
# texts in key order joined by U+001F, raw_signals NULL (bucket/services/signals.py).
SIGNAL_KEY_SETS = {
    "ems": (
        "browser_visibility",
        "idle_seconds",
        "keystroke_count",
        "mouse_events",
        "window_focus",
    ),
    "gurukul": (
        "dwell_time_ms",
        "hover_loops",
        "inactivity_ms",
        "mouse_velocity",
        "panel_focused",
        "rapid_click_count",
        "scroll_depth",
        "tab_visible",
    ),
}


def code_of(name: str, value: str) -> str:
    return "'" + PACKET_CODES[name][value] + "'"


def codes_array(name: str, values: tuple[str, ...]) -> str:
    return "ARRAY[" + ",".join(code_of(name, value) for value in values) + "]"


# Since migration 0022, the same strings as ingest stores them on PostgreSQL: known values as
# one-byte codes, text NULL; an EMS packet's employee_id (its user_id) NULL, flagged
# (bucket/services/codes.py).
CODED_VALUES = {
    "system_type": "NULL",
    "system_type_code": (
        f"CASE WHEN ems THEN {code_of('system_type', 'ems')} "
        f"ELSE {code_of('system_type', 'gurukul')} END"
    ),
    "role": "NULL",
    "role_code": (
        f"CASE WHEN ems THEN {code_of('role', 'employee')} ELSE {code_of('role', 'student')} END"
    ),
    "cognitive_state": "NULL",
    "cognitive_state_code": (
        f"CASE WHEN NOT ems THEN ({codes_array('cognitive_state', STATES)})[1 + g % 7] END"
    ),
    "state": "NULL",
    "state_code": f"CASE WHEN ems THEN ({codes_array('state', EMS_STATES)})[1 + g % 5] END",
    "auth_outcome_code": "NULL",
    "employee_id": "NULL",
    "employee_is_user": "CASE WHEN ems THEN true END",
}
CODED_VALUES.update({f"{name}_text": "NULL" for name in PACKET_CODES})


def key_set_literal(kind: str) -> str:
    return "ARRAY['" + "','".join(SIGNAL_KEY_SETS[kind]) + "']::text[]"


COMPACT_SIGNAL_VALUES = {
    "raw_signals": "NULL",
    # Uncorrelated: each looked up once per statement.
    "signal_keys": (
        "CASE WHEN ems THEN (SELECT id FROM signal_key_sets WHERE keys = "
        + key_set_literal("ems")
        + ") ELSE (SELECT id FROM signal_key_sets WHERE keys = "
        + key_set_literal("gurukul")
        + ") END"
    ),
    "signal_values": (
        "CASE WHEN ems THEN format(E'\"visible\"\\x1f%s\\x1f%s\\x1f%s\\x1ftrue',"
        " 5.0 - (g % 51) / 10.0, g % 97, g % 31)"
        " ELSE format(E'%s\\x1f%s\\x1f%s\\x1f%s\\x1f%s\\x1f%s\\x1f%s\\x1f%s',"
        " 1000 + g % 60000, g % 4, g % 5000,"
        " round(((g % 9000) / 10.0)::numeric, 1), (g % 5 > 0)::text, g % 3,"
        " round(((g % 100) / 100.0)::numeric, 2), (g % 9 > 0)::text) END"
    ),
}
KEY_SETS_SQL = "INSERT INTO signal_key_sets (keys) VALUES ({}), ({}) ON CONFLICT DO NOTHING".format(
    key_set_literal("ems"), key_set_literal("gurukul")
)
# What each known column of deliveries holds, over ``d`` (packet_id, received_at, e: its epoch
# seconds, k: the delivery's state, hh: a hash of the id).
DELIVERY_VALUES = {
    "packet_id": "packet_id",
    "received_at": "received_at",
    "delivery_state": "k",
    "visible_at": (
        "CASE k WHEN 'processed' THEN e + 3 WHEN 'dead' THEN e + 600"
        " WHEN 'leased' THEN e + 30 ELSE e END"
    ),
    "lease_id": "CASE WHEN k = 'leased' THEN md5(packet_id::text) END",
    "delivery_count": (
        "CASE k WHEN 'processed' THEN 1 + (hh % 100 = 0)::int WHEN 'dead' THEN 5"
        " WHEN 'leased' THEN 1 ELSE 0 END"
    ),
    "last_error": (
        "CASE WHEN k = 'dead' THEN 'karma API answered 500'"
        " WHEN k = 'processed' AND hh % 100 = 0 THEN 'karma API timed out' END"
    ),
    "last_delivered_at": "CASE WHEN k <> 'pending' THEN received_at + interval '2 s' END",
    # Since migration 0021 a processed row keeps the time it was processed in visible_at only.
    "processed_at": "NULL",
    "processed_by_karma": "k = 'processed'",
    # The client acknowledges [] without an action, else its action naming the packet, which
    # is stored as a mark since migration 0021 (services/delivery/actions).
    "karma_actions": (
        "CASE WHEN k <> 'processed' THEN NULL WHEN hh % 4 = 0 THEN"
        ' \'[{"action":"completing_lessons","packet_id":\' || chr(9)'
        " || '0,\"intensity\":0.85}]' ELSE '[]' END"
    ),
    "dead_at": "CASE WHEN k = 'dead' THEN received_at + interval '600 s' END",
}
# A value of the column's type category for a NOT NULL column without default the fill does
# not know (another layout's): strings, numbers, booleans, times, anything else.
FALLBACK = {"S": "''", "N": "0", "B": "false", "D": "t", "U": "NULL"}

FILL_SQL = """
WITH src AS (
  SELECT g, t, g %% %(learners)s AS u, g %% 10 = 0 AS ems, h,
    substr(lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0'), 1, 8) || '-'
      || substr(lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0'), 9, 4) || '-7'
      || substr(h, 1, 3) || '-8' || substr(h, 4, 3) || '-' || substr(h, 7, 12) AS pid
  FROM (
    SELECT g, to_timestamp(%(t0)s + g * %(step)s) AT TIME ZONE 'UTC' AS t,
      md5(%(run)s || g::text) AS h
    FROM generate_series(%(lo)s, %(hi)s - 1) AS g
  ) AS numbered
), stored AS (
  INSERT INTO packets ({packet_columns}) SELECT {packet_values} FROM src
  RETURNING packet_id, received_at, dedup_key, idempotency_key, client_timestamp
){keys}, d AS (
  SELECT packet_id, received_at, extract(epoch FROM received_at)::float8 AS e,
    abs(hashtext(packet_id::text)::bigint) AS hh,
    CASE WHEN %(backlog)s THEN
      CASE WHEN abs(hashtext(packet_id::text)::bigint) %% 100 = 0 THEN 'leased'
      ELSE 'pending' END
    WHEN abs(hashtext(packet_id::text)::bigint) %% %(dead_every)s = 0 THEN 'dead'
    ELSE 'processed' END AS k
  FROM stored
)
INSERT INTO deliveries ({delivery_columns}) SELECT {delivery_values} FROM d
"""

KEYS_CTE = """, keyed AS (
  INSERT INTO packet_keys ({key_columns}) SELECT {key_values} FROM stored
)"""
# What each known column of packet_keys holds, over ``stored``, cast to packet_keys' own column
# types like every other fill value: the packet's own id and the digest standing in for its
# identity (``PACKET_VALUES``; uuid since migrations 0015 and 0016, text before; on the
# packet too before 0027), and since 0015 its client day; the
# Idempotency-Key only in the layouts before 0015 (the fill sends none, so
# packet_idempotency_keys stays empty).
KEY_VALUES = {
    "dedup_key": "md5(packet_id::text)",
    "client_day": "client_timestamp::date",
    "idempotency_key": "idempotency_key",
    "packet_id": "packet_id",
    "received_at": "received_at",
}

SEALS_SQL = """
INSERT INTO audit_seals (seq, sealed_at, after_seq, last_seq, packet_count, packets_total,
  root, previous_hash, hash, leaf_seqs, leaf_uuids, leaf_hashes, leaf_format, packet_layout)
SELECT row_number() OVER (ORDER BY min(seq)), max(received_at) + interval '5 s', min(seq) - 1,
  max(seq), count(*), max(seq), md5(min(seq)::text) || md5(max(seq)::text),
  md5(min(seq)::text || 'p') || md5(max(seq)::text || 'p'),
  md5(min(seq)::text || 'h') || md5(max(seq)::text || 'h'),
  CASE WHEN count(*) = max(seq) - min(seq) + 1 THEN ''::bytea
       ELSE string_agg(int8send(seq), ''::bytea ORDER BY seq) END,
  string_agg(uuid_send(packet_id::uuid), ''::bytea ORDER BY seq),
  string_agg(sha256(convert_to(packet_id::text, 'UTF8')), ''::bytea ORDER BY seq), 3, 22
FROM packets GROUP BY (seq - 1) / %(per_seal)s
"""
PURGES_SQL = """
INSERT INTO audit_purges (packet_seq, packet_id, purged_at)
SELECT g, substr(md5(g::text), 1, 8) || '-' || substr(md5(g::text), 9, 4) || '-7'
  || substr(md5(g::text), 14, 3) || '-8' || substr(md5(g::text), 18, 3) || '-'
  || substr(md5(g::text), 21, 12), %(purged_at)s
FROM generate_series(1, %(rows)s) AS g
"""
ACTIVITY_SQL = """
INSERT INTO activity_minutes (minute, series, shard, value)
SELECT floor(extract(epoch FROM received_at) / 60)::bigint,
  left('ingested:' || coalesce({system_type}, 'unknown') || ':'
       || coalesce({cognitive_state}, {state}, 'unknown'), 96), 0, count(*)
FROM packets WHERE received_at >= %(since)s GROUP BY 1, 2
UNION ALL
SELECT m, 'processed', s, greatest(1, n / 8) FROM (
  SELECT floor(extract(epoch FROM received_at) / 60)::bigint AS m, count(*) AS n
  FROM packets WHERE received_at >= %(since)s GROUP BY 1) AS per_minute,
  generate_series(0, 7) AS s
"""

# Index definitions that could replace today's, built on the filled tables and dropped again:
# (name, what it stands for, CREATE INDEX body). A name whose columns a layout no longer has
# is skipped (its build fails and is reported as such).
ALTERNATIVES = (
    (
        "packets_pkey_as_uuid",
        "packets' primary key on packet_id as uuid (16 bytes) instead of varchar(36)",
        "packets ((packet_id::uuid))",
    ),
    (
        "dedup_key_as_uuid",
        "uq_packets_dedup_key on the 16-byte digest as uuid instead of 32 hex characters",
        "packets ((dedup_key::uuid))",
    ),
    (
        "user_with_packet_id",
        "ix_packets_user as before migration 0013, with packet_id",
        "packets (user_id, received_at, packet_id)",
    ),
    (
        "seq_brin",
        "ix_packets_seq as a BRIN index (seq follows the insert order)",
        "packets USING brin (seq)",
    ),
    (
        "employee_everywhere",
        "ix_packets_employee as before migration 0013, over every packet with packet_id",
        "packets (employee_id, received_at, packet_id)",
    ),
    (
        "deliveries_pkey_as_uuid",
        "deliveries' primary key on packet_id as uuid",
        "deliveries ((packet_id::uuid))",
    ),
    (
        "queue_unfinished_only",
        "ix_deliveries_queue only over unfinished and dead deliveries",
        "deliveries (delivery_state, visible_at) WHERE delivery_state <> 'processed'",
    ),
    (
        "packet_id_hash",
        "a hash index on packets' packet_id (equality only, not unique) instead of the primary key",
        "packets USING hash (packet_id)",
    ),
    (
        "user_by_id",
        "ix_packets_user on the user id itself, as before migration 0028 (its 8-byte key now)",
        "packets (user_id, received_at)",
    ),
    (
        "processed_packet_hash",
        "the processed deliveries' packet_id index as a hash index",
        "deliveries USING hash (packet_id) WHERE delivery_state = 'processed'",
    ),
    (
        "key_digest_alone",
        "packet_keys' index on the digest alone (a unique index per partition: the digest "
        "covers the client's timestamp, so it fixes the day) instead of on digest and day",
        "packet_keys (dedup_key) WITH (fillfactor = 100)",
    ),
    (
        "packet_keys_pkey_packed",
        "packet_keys' primary key built afresh at fillfactor 100, as the compaction leaves it "
        "(beside key_digest_alone)",
        "packet_keys (dedup_key, client_day) WITH (fillfactor = 100)",
    ),
)

# Row layouts that could replace today's, measured on a sample of the filled rows copied into
# a table of each shape (and dropped): bytes per row of the copy as it is against the copy
# reshaped. (name, what it stands for, source table, SELECT list.)
SAMPLE_ROWS = 200_000
HEAP_ALTERNATIVES = (
    (
        "packets_coded_eight_first",
        "packets as stored since migration 0026 (strings as codes, numbers scaled), "
        "reordered: the 8-byte columns first, then the fixed-width ones, then the "
        "variable-width ones",
        "packets",
        "seq, client_timestamp, received_at, active_seconds_float, idle_seconds_float, "
        "away_seconds_float, focus_score_float, integrity_score_float, packet_id, dedup_key, "
        "signal_keys, active_seconds_scaled, idle_seconds_scaled, away_seconds_scaled, "
        "focus_score_scaled, integrity_score_scaled, stale, "
        "system_type_code, role_code, cognitive_state_code, state_code, auth_outcome_code, "
        "employee_is_user, idempotency_key, user_id, employee_id, session_id, lesson_id, "
        "task_id, system_type_text, role_text, cognitive_state_text, state_text, "
        "auth_outcome_text, auth_subject, "
        "raw_signals, signal_values",
    ),
    (
        "deliveries_compact",
        "deliveries with packet_id as uuid, the state as a one-byte code, delivery_count as "
        "smallint, without processed_by_karma (= processed) and processed_at (= visible_at "
        "once processed), karma_actions without the packet's own id",
        "deliveries",
        "received_at, visible_at, last_delivered_at, dead_at, packet_id::uuid AS packet_id, "
        "delivery_count::smallint AS delivery_count, "
        'left(delivery_state, 1)::"char" AS delivery_state, lease_id, last_error, '
        "replace(karma_actions::text, '\"packet_id\":\"' || packet_id || '\",', '')::json "
        "AS karma_actions",
    ),
    (
        "packets_context_id",
        "packets with session, lesson, task, system type, role and employee flag as one "
        "4-byte id of a dictionary of contexts (user_id kept for its index)",
        "packets",
        "seq, client_timestamp, received_at, active_seconds_float, idle_seconds_float, "
        "away_seconds_float, focus_score_float, integrity_score_float, packet_id, dedup_key, "
        "signal_keys, 0::int AS context_id, active_seconds_scaled, idle_seconds_scaled, "
        "away_seconds_scaled, focus_score_scaled, integrity_score_scaled, stale, "
        "cognitive_state_code, state_code, auth_outcome_code, idempotency_key, user_id, "
        "employee_id, cognitive_state_text, state_text, auth_outcome_text, auth_subject, "
        "raw_signals, signal_values",
    ),
    (
        "packet_keys_seq",
        "packet_keys with the packet's seq (8 bytes) instead of its packet_id",
        "packet_keys",
        "dedup_key, client_day, received_at, 0::bigint AS seq",
    ),
    (
        "finished_record",
        "what a finished packet needs once it leaves the hot table (processed time, attempts, "
        "karma actions without the packet's own id, last error), keyed by packet_id as uuid",
        "deliveries",
        "coalesce(processed_at, to_timestamp(visible_at) AT TIME ZONE 'UTC') AS processed_at, "
        "packet_id::uuid AS packet_id, delivery_count::smallint AS attempts, "
        "last_error, replace(karma_actions::text, '\"packet_id\":\"' || packet_id || '\",', '')"
        "::json AS karma_actions",
    ),
    (
        "finished_record_dated",
        "finished_record with what the day partitions and the user listing need of it too: "
        "received_at (the partition key) and last_delivered_at",
        "deliveries",
        "received_at, coalesce(processed_at, to_timestamp(visible_at) AT TIME ZONE 'UTC') "
        "AS processed_at, last_delivered_at, packet_id::uuid AS packet_id, "
        "delivery_count::smallint AS attempts, last_error, "
        "replace(karma_actions::text, '\"packet_id\":\"' || packet_id || '\",', '')"
        "::json AS karma_actions",
    ),
)


def columns(conn: psycopg.Connection, table: str) -> list[tuple[str, str, bool, bool, str]]:
    """(name, type, NOT NULL, has a default or is identity/generated, type category) of each
    column of ``table``, in order."""
    return conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
          a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', t.typcategory
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (table,),
    ).fetchall()


def insert_parts(
    conn: psycopg.Connection, table: str, values: dict[str, str], unfilled: list[str]
) -> tuple[str, str]:
    """The column list and the SELECT list that fill ``table`` with ``values``, each cast to
    the column's current type; columns the fill does not know are named in ``unfilled``."""
    names, exprs = [], []
    for name, kind, not_null, defaulted, category in columns(conn, table):
        if name in values:
            expr = values[name]
        elif defaulted:
            continue  # its default (an identity such as seq) fills it
        elif not_null and FALLBACK.get(category, "NULL") != "NULL":
            expr = FALLBACK[category]
            unfilled.append(f"{table}.{name} = {expr}")
        else:
            unfilled.append(f"{table}.{name} = NULL")
            continue
        names.append(name)
        exprs.append(f"({expr})::{kind}")
    return ", ".join(names), ", ".join(exprs)


# The leaf relations of a table or index: its partitions' (pg_partition_tree), or itself when
# it is not partitioned (pg_partition_tree lists nothing for a plain table).
LEAVES = (
    "(SELECT relid FROM pg_partition_tree({0}) WHERE isleaf UNION ALL "
    "SELECT {0} WHERE (SELECT relkind FROM pg_class WHERE oid = {0}) NOT IN ('p', 'I'))"
)


def relation_sizes(conn: psycopg.Connection) -> dict[str, dict]:
    """Every table of the schema (a partitioned one summed over its leaf partitions): rows,
    heap (with its free space and visibility maps), TOAST (with its index), each index, and
    whatever index of a partition no parent index accounts for."""
    tables = [
        name
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND NOT c.relispartition ORDER BY c.relname"
        )
    ]
    sizes = {}
    for table in tables:
        heap, toast, total, partitions = conn.execute(
            """
            SELECT coalesce(sum(pg_relation_size(c.oid, 'main') + pg_relation_size(c.oid, 'fsm')
                                + pg_relation_size(c.oid, 'vm')), 0),
              coalesce(sum(CASE WHEN c.reltoastrelid <> 0
                           THEN pg_total_relation_size(c.reltoastrelid) ELSE 0 END), 0),
              coalesce(sum(pg_total_relation_size(c.oid)), 0), count(*)
            FROM pg_class c WHERE c.oid IN {leaves}
            """.format(leaves=LEAVES.format("%(t)s::regclass")),
            {"t": table},
        ).fetchone()
        indexes = {
            name: int(size)
            for name, size in conn.execute(
                """
                SELECT i.relname, coalesce((
                  SELECT sum(pg_relation_size(leaf.relid)) FROM {leaves} AS leaf(relid)), 0)
                FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                WHERE x.indrelid = %s::regclass ORDER BY i.relname
                """.format(leaves=LEAVES.format("i.oid::regclass")),
                (table,),
            )
        }
        rows = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        other = int(total) - int(heap) - int(toast) - sum(indexes.values())
        sizes[table] = {
            "rows": rows,
            "partitions": int(partitions),
            "heap": int(heap),
            "toast": int(toast),
            "indexes": indexes,
            "other_indexes": other,  # indexes of partitions that no parent index accounts for
            "total": int(total),
        }
    return sizes


def column_widths(conn: psycopg.Connection, table: str) -> dict[str, dict]:
    """Each column's average stored width in bytes and share of NULLs (pg_stats, after
    ANALYZE; a partitioned table's statistics over all its partitions)."""
    partitioned = conn.execute(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = %s::regclass", (table,)
    ).fetchone()[0]
    return {
        name: {"avg_width": width, "null_frac": round(float(nulls), 4)}
        for name, width, nulls in conn.execute(
            "SELECT attname, avg_width, null_frac FROM pg_stats "
            "WHERE schemaname = current_schema() AND tablename = %s AND inherited = %s",
            (table, partitioned),
        )
    }


def index_bytes(conn: psycopg.Connection, index: str) -> int:
    """An index's bytes over its partitions."""
    return int(
        conn.execute(
            "SELECT coalesce(sum(pg_relation_size(leaf.relid)), 0) FROM "
            + LEAVES.format("%(i)s::regclass")
            + " AS leaf(relid)",
            {"i": index},
        ).fetchone()[0]
    )


def rebuilt(conn: psycopg.Connection, tables: tuple[str, ...]) -> dict[str, int]:
    """Each index of ``tables`` built afresh beside itself (its definition, another name) and
    dropped: its size packed by one build, against its size grown by the fill's inserts in
    time order (as a deployment grows it). The alternatives are built the same way, so they
    compare with these figures."""
    sizes = {}
    for table in tables:
        indexes = conn.execute(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = %s::regclass "
            "ORDER BY i.relname",
            (table,),
        ).fetchall()
        for name, definition in indexes:
            copy = "bench_copy"
            statement = (
                definition.replace("CREATE UNIQUE INDEX", "CREATE INDEX", 1)
                .replace(f"INDEX {name} ON ", f"INDEX {copy} ON ", 1)
                .replace(" ON ONLY ", " ON ", 1)
            )
            try:
                conn.execute(statement)
                sizes[name] = index_bytes(conn, copy)
            finally:
                conn.execute(f"DROP INDEX IF EXISTS {copy}")
    return sizes


def alternatives(conn: psycopg.Connection) -> dict[str, dict]:
    """Build each alternative index on the filled tables, measure it, and drop it."""
    measured = {}
    for name, meaning, body in ALTERNATIVES:
        index = f"bench_alt_{name}"
        try:
            conn.execute(f"CREATE INDEX {index} ON {body}")
            measured[name] = {"meaning": meaning, "bytes": index_bytes(conn, index)}
        except psycopg.Error as exc:
            measured[name] = {"meaning": meaning, "error": str(exc).splitlines()[0]}
        finally:
            conn.execute(f"DROP INDEX IF EXISTS {index}")
    return measured


LARGEST_LEAF_SQL = """
SELECT coalesce((
  SELECT t.relid::regclass::text FROM pg_partition_tree(%s::regclass) AS t
  JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf ORDER BY c.reltuples DESC LIMIT 1
), %s)
"""


def heap_alternatives(conn: psycopg.Connection) -> dict[str, dict]:
    """Copy a sample of each source table as it is and reshaped; bytes per row of each."""
    measured = {}
    for name, meaning, source, select in HEAP_ALTERNATIVES:
        try:
            # From its largest leaf, in that leaf's column order (a partition of processed
            # deliveries orders them otherwise than its parent since migration 0021).
            (leaf,) = conn.execute(LARGEST_LEAF_SQL, (source, source)).fetchone()
            conn.execute(f"CREATE TABLE bench_as_is (LIKE {leaf})")
            conn.execute(f"INSERT INTO bench_as_is SELECT * FROM {leaf} LIMIT {SAMPLE_ROWS}")
            conn.execute(f"CREATE TABLE bench_reshaped AS SELECT {select} FROM bench_as_is")
            conn.execute("VACUUM bench_as_is, bench_reshaped")
            rows, as_is, reshaped = conn.execute(
                "SELECT (SELECT count(*) FROM bench_as_is), "
                "pg_table_size('bench_as_is'), pg_table_size('bench_reshaped')"
            ).fetchone()
            measured[name] = {
                "meaning": meaning,
                "rows": rows,
                "as_is_bytes_per_row": as_is / max(rows, 1),
                "reshaped_bytes_per_row": reshaped / max(rows, 1),
            }
        except psycopg.Error as exc:
            measured[name] = {"meaning": meaning, "error": str(exc).splitlines()[0]}
        finally:
            conn.execute("DROP TABLE IF EXISTS bench_as_is, bench_reshaped")
    return measured


def wal_lsn(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])


def fill_range(
    conn: psycopg.Connection,
    sql: str,
    lo: int,
    hi: int,
    t0: float,
    step: float,
    backlog: bool,
    learners: int,
    run: str,
) -> None:
    """Packets ``lo`` to ``hi`` - 1, received from ``t0`` every ``step`` seconds."""
    if hi <= lo:
        return
    if exists(conn, "signal_key_sets"):  # as ingest adds them (a TRUNCATE may have emptied it)
        conn.execute(KEY_SETS_SQL)
    conn.execute(
        sql,
        {
            "lo": lo,
            "hi": hi,
            "t0": t0,
            "step": step,
            "backlog": backlog,
            "learners": learners,
            "run": run,
            "dead_every": DEAD_EVERY,
        },
    )


def coded(conn: psycopg.Connection) -> bool:
    """Whether packets stores its low-cardinality strings as codes (migration 0022)."""
    return "system_type_code" in {column[0] for column in columns(conn, "packets")}


def activity_sql(conn: psycopg.Connection) -> str:
    """ACTIVITY_SQL over the strings as stored (decoded where coded)."""
    names = ("system_type", "cognitive_state", "state")
    if coded(conn):
        return ACTIVITY_SQL.format(**{name: codes.decoded_sql(name, "packets") for name in names})
    return ACTIVITY_SQL.format(**{name: name for name in names})


def fill_statement(conn: psycopg.Connection, unfilled: list[str]) -> str:
    # Each packet column and whether it is NOT NULL: the layout whose packets the fill writes
    # as ingest would.
    layout = {column[0]: column[2] for column in columns(conn, "packets")}
    values = PACKET_VALUES
    if "signal_values" in layout:
        values = {**values, **COMPACT_SIGNAL_VALUES}
    if coded(conn):
        values = {**values, **CODED_VALUES}
    if "active_seconds_scaled" in layout:
        values = {**values, **SCALED_VALUES}
    if not layout["dedup_key"]:
        values = {**values, "dedup_key": "NULL"}  # in packet_keys only (migration 0027)
    packet_columns, packet_values = insert_parts(conn, "packets", values, unfilled)
    delivery_columns, delivery_values = insert_parts(conn, "deliveries", DELIVERY_VALUES, unfilled)
    # The values' SQL holds % (modulo): doubled for psycopg, whose placeholders are %(name)s.
    # PostgreSQL keeps the unique keys in a table of their own (migration 0012): filled too.
    keys = ""
    if conn.execute("SELECT to_regclass('packet_keys') IS NOT NULL").fetchone()[0]:
        key_columns, key_values = insert_parts(conn, "packet_keys", KEY_VALUES, unfilled)
        keys = KEYS_CTE.format(key_columns=key_columns, key_values=key_values.replace("%", "%%"))
    return FILL_SQL.format(
        keys=keys,
        packet_columns=packet_columns,
        packet_values=packet_values.replace("%", "%%"),
        delivery_columns=delivery_columns,
        delivery_values=delivery_values.replace("%", "%%"),
    )


def hot_bytes(conn: psycopg.Connection, sizes: dict[str, dict]) -> int:
    """The hot table's total bytes (heap, TOAST, indexes): the hot partition of deliveries
    where there is one, else the hot tables' from ``relation_sizes``."""
    if exists(conn, HOT_PARTITION):
        return conn.execute("SELECT pg_total_relation_size(%s)", (HOT_PARTITION,)).fetchone()[0]
    return sum(sizes[table]["total"] for table in HOT_TABLES if table in sizes)


def hot_name(conn: psycopg.Connection) -> str:
    return HOT_PARTITION if exists(conn, HOT_PARTITION) else "+".join(HOT_TABLES)


def delivery_tables(conn: psycopg.Connection) -> tuple[str, ...]:
    """The tables holding deliveries' own indexes: the parent, or its partitions by state."""
    parts = tuple(t for t in (HOT_PARTITION, PROCESSED_TABLE) if exists(conn, t))
    return parts or ("deliveries",)


def measure_database(
    dsn: str,
    packets: int,
    days: int,
    backlog: int,
    compact: Callable[[], dict | None] | None = None,
) -> dict:
    """Fill the (migrated, empty) database at ``dsn`` and measure it; then ``compact`` it (the
    daily compaction), measured again, before any index is built or dropped beside the
    layout's (the alternatives' builds on a partitioned table may adopt and then drop an index
    of the layout's)."""
    run = uuid.uuid4().hex[:8]
    learners = LEARNERS
    day_packets = packets // days
    step = 86400.0 / day_packets
    # The last day ends a minute ago, so the backlog is the last minutes' packets.
    first = time.time() - days * 86400.0 - 60
    figures: dict = {"packets": packets, "days": days, "backlog": backlog, "learners": learners}
    figures["backlog_since"] = first + (packets - backlog) * step
    unfilled: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = fill_statement(conn, unfilled)
        figures["unfilled_columns"] = sorted(set(unfilled))
        figures["partitions_created"] = day_tables(conn, first, days)
        figures["hot_table"] = hot_name(conn)
        # The hot table with only the backlog stored, in a first pass emptied again.
        fill_range(conn, sql, packets - backlog, packets, first, step, True, learners, run)
        conn.execute("VACUUM (ANALYZE)")
        sizes = relation_sizes(conn)
        figures["hot_bytes_at_backlog"] = hot_bytes(conn, sizes)
        tables = ", ".join(name for name in sizes if name != "alembic_version")
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY")
        # A day of purged packets in the audit log, below the stored packets' seqs.
        purged = day_packets
        conn.execute(
            PURGES_SQL,
            {"rows": purged, "purged_at": time.strftime("%Y-%m-%d", time.gmtime(first))},
        )
        conn.execute("SELECT setval(pg_get_serial_sequence('packets', 'seq'), %s)", (purged,))
        began, wal = time.monotonic(), wal_lsn(conn)
        for day in range(days):
            lo, hi = day * day_packets, (day + 1) * day_packets
            if day == days - 1:
                hi = packets
            history_end = max(lo, hi - backlog) if day == days - 1 else hi
            fill_range(conn, sql, lo, history_end, first, step, False, learners, run)
            fill_range(conn, sql, history_end, hi, first, step, True, learners, run)
        figures["fill_seconds"] = round(time.monotonic() - began, 1)
        figures["fill_wal_bytes"] = wal_lsn(conn) - wal
        wal = wal_lsn(conn)
        conn.execute(SEALS_SQL, {"per_seal": SEAL_PACKETS})
        figures["seal_wal_bytes"] = wal_lsn(conn) - wal
        since = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.gmtime(first + (days - KEEP_ACTIVITY_DAYS) * 86400)
        )
        conn.execute(activity_sql(conn), {"since": since})
        began, wal = time.monotonic(), wal_lsn(conn)
        conn.execute("VACUUM (ANALYZE)")
        figures["vacuum_seconds"] = round(time.monotonic() - began, 1)
        figures["vacuum_wal_bytes"] = wal_lsn(conn) - wal
        figures["relations"] = relation_sizes(conn)
        figures["states"] = dict(
            conn.execute("SELECT delivery_state, count(*) FROM deliveries GROUP BY 1").fetchall()
        )
        figures["columns"] = {
            table: column_widths(conn, table) for table in ("packets", "deliveries")
        }
        figures["hot_bytes_at_stored"] = hot_bytes(conn, figures["relations"])
        if compact is not None:
            figures["compacted"] = compact()
        began = time.monotonic()
        figures["rebuilt_indexes"] = rebuilt(conn, ("packets", *delivery_tables(conn)))
        figures["alternatives"] = alternatives(conn)
        figures["heap_alternatives"] = heap_alternatives(conn)
        figures["alternatives_seconds"] = round(time.monotonic() - began, 1)
    figures.update(derived(figures))
    return figures


def derived(figures: dict) -> dict:
    """Bytes per packet, disk per day per 1,000 learners, WAL per packet, the hot table's
    growth."""
    relations = figures["relations"]
    stored = relations["packets"]["rows"]
    core = ("packets", "deliveries")
    per_packet, per_table = bytes_per_packet(relations)
    purges = relations.get(PURGE_TABLE, {})
    return {
        "stored": stored,
        "bytes_per_packet": per_packet,
        "bytes_per_packet_by_table": per_table,
        "core_bytes_per_packet": sum(per_table.get(name, 0) for name in core),
        "disk_gb_per_day_per_1000_learners": per_packet * LEARNER_PACKETS_PER_DAY * 1000 / 1e9,
        "disk_gb_per_day_per_1000_learners_at_5000": (
            per_packet * LEARNER_PACKETS_PER_ACTIVE_DAY * 1000 / 1e9
        ),
        "fill_wal_bytes_per_packet": figures["fill_wal_bytes"] / max(figures["packets"], 1),
        "purge_bytes_per_purged_packet": (
            purges["total"] / max(purges["rows"], 1) if purges else None
        ),
        "hot_ratio": figures["hot_bytes_at_stored"] / max(figures["hot_bytes_at_backlog"], 1),
    }


def bytes_per_packet(relations: dict[str, dict]) -> tuple[float, dict[str, float]]:
    """Bytes per stored packet of every table that grows with packets, and of each."""
    stored = max(relations["packets"]["rows"], 1)
    growing = {
        name: size
        for name, size in relations.items()
        if name not in NOT_PER_PACKET and name != PURGE_TABLE
    }
    per_table = {name: size["total"] / stored for name, size in growing.items()}
    return sum(size["total"] for size in growing.values()) / stored, per_table


def url_of(server_url: str, name: str) -> str:
    """The server's URL naming database ``name``."""
    return server_url.rsplit("/", 1)[0] + "/" + name


# Runs in a process of its own with the service's settings: the real purge of the oldest days,
# timed inside (not the interpreter's and the app's start).
PURGE_SCRIPT = """
import json, sys, time
from bucket import create_app
from bucket.services.retention import purge_days
app = create_app()
with app.app_context():
    began = time.perf_counter()
    report = purge_days(float(sys.argv[1]), include_dead=True)
    seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "dropped": [[d.partition, d.packets] for d in report.dropped],
                  "kept": [[d.partition, d.kept] for d in report.kept],
                  "key_days": [[k.partition, k.kept] for k in getattr(report, "key_days", [])]}))
"""
# The real compaction of the past days, as the daily cron runs it, in a process of its own.
COMPACT_SCRIPT = """
import json, time
from bucket import create_app
try:
    from bucket.services.compaction import compact_partitions
except ImportError:  # a layout from before the compaction
    print(json.dumps(None))
    raise SystemExit
app = create_app()
with app.app_context():
    began = time.perf_counter()
    report = compact_partitions()
    seconds = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "stopped": report.stopped, "indexes": [
    [i.partition, i.index, i.before, i.after, i.outcome] for i in report.indexes]}))
"""
DELETED_SQL = (
    "SELECT coalesce(sum(n_tup_del), 0)::bigint FROM pg_stat_user_tables WHERE relname = %s"
)


def run_script(env: dict, script: str, *args: str):
    """Run one of the scripts above with the service's code and settings, in a process of its
    own; the JSON of its last line."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=3600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def purge_age(days: int, backlog_since: float) -> float:
    """``purge_days``' age in days for the timed purge: the oldest two calendar days (the fill's
    first, partial one and the first whole one), and never the day the backlog begins in: a run
    that crosses UTC midnight after the fill has the backlog's minutes in yesterday."""
    backlog_day = backlog_since // 86400 * 86400
    return max(days - 2, (time.time() - backlog_day) / 86400)


def timed_purge(env: dict, dsn: str, days: int, backlog_since: float) -> dict:
    """``purge_days`` on the filled database, dropping the oldest days but the backlog's (see
    ``purge_age``), everything counted booked as the bookkeeper would have it: seconds, packets
    dropped, and the rows each table had deleted one by one."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM packet_counters WHERE name = 'booked'")
        conn.execute(
            "INSERT INTO packet_counters (name, shard, value) "
            "SELECT 'booked', 0, max(seq) FROM packets"
        )
        tables = [row[0] for row in conn.execute("SELECT relname FROM pg_stat_user_tables")]
        before = {t: conn.execute(DELETED_SQL, (t,)).fetchone()[0] for t in tables}
    figures = run_script(env, PURGE_SCRIPT, str(purge_age(days, backlog_since)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        after = {t: conn.execute(DELETED_SQL, (t,)).fetchone()[0] for t in tables}
    figures["rows_deleted"] = {
        t: after[t] - before[t] for t in tables if after.get(t, 0) > before[t]
    }
    figures["packets"] = sum(n for _, n in figures["dropped"])
    figures["us_per_packet"] = figures["seconds"] * 1e6 / max(figures["packets"], 1)
    return figures


def compacted(env: dict, dsn: str) -> dict | None:
    """``compact_partitions`` on the filled database, then every relation again: what the
    daily compaction makes of the past days (None where the code has no compaction)."""
    figures = run_script(env, COMPACT_SCRIPT)
    if figures is None:
        return None
    with psycopg.connect(dsn, autocommit=True) as conn:
        figures["relations"] = relation_sizes(conn)
    per_packet, per_table = bytes_per_packet(figures["relations"])
    figures["bytes_per_packet"] = per_packet
    figures["bytes_per_packet_by_table"] = per_table
    figures["disk_gb_per_day_per_1000_learners_at_5000"] = (
        per_packet * LEARNER_PACKETS_PER_ACTIVE_DAY * 1000 / 1e9
    )
    return figures


def run(server_dsn: str, server_url: str, env: dict, mode: str, **override: int) -> dict:
    """Create a database on the server, migrate it with ``env``, fill and measure it, drop it.
    ``override``: packets, days or backlog instead of the mode's."""
    packets, days, backlog = SIZES[mode]
    packets = override.get("packets") or packets
    days = override.get("days") or days
    backlog = override.get("backlog") or backlog
    name = f"bench_storage_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate({**env, "DATABASE_URL": url_of(server_url, name)})
        dsn = server_dsn.rsplit("/", 1)[0] + "/" + name
        app_env = {**env, "DATABASE_URL": url_of(server_url, name)}
        figures = measure_database(
            dsn, packets, days, backlog, compact=lambda: compacted(app_env, dsn)
        )
        figures["purge"] = timed_purge(
            {**env, "DATABASE_URL": url_of(server_url, name)}, dsn, days, figures["backlog_since"]
        )
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    figures["mode"] = mode
    return figures


def table(figures: dict) -> str:
    """The figures as lines: the issue's rows, then each relation and index per packet."""
    stored = max(figures["stored"], 1)
    lines = [
        f"{figures['stored']:,} packets over {figures['days']} days "
        f"({figures['learners']} learners), {figures['states']}",
        f"bytes per stored packet, every table that grows with packets: "
        f"{figures['bytes_per_packet']:,.0f} (packets + deliveries: "
        f"{figures['core_bytes_per_packet']:,.0f}; target <= 500)",
        f"disk per day per 1,000 learners: {figures['disk_gb_per_day_per_1000_learners']:.2f} GB "
        f"at {LEARNER_PACKETS_PER_DAY:,} packets a learner-day, "
        f"{figures['disk_gb_per_day_per_1000_learners_at_5000']:.2f} GB at "
        f"{LEARNER_PACKETS_PER_ACTIVE_DAY:,} (the 5.4 GB basis; target <= 2.5 GB)",
        f"hot table {figures.get('hot_table', '+'.join(HOT_TABLES))}: "
        f"{figures['hot_bytes_at_backlog']:,} bytes at "
        f"{figures['backlog']:,} stored, {figures['hot_bytes_at_stored']:,} at "
        f"{figures['stored']:,} (x{figures['hot_ratio']:.1f}; target <= 2x)",
        f"WAL of the fill per packet: {figures['fill_wal_bytes_per_packet']:,.0f} bytes "
        f"(seals {figures['seal_wal_bytes'] / stored:,.0f}, "
        f"VACUUM {figures['vacuum_wal_bytes'] / stored:,.0f})",
        f"{'relation':<34} {'rows':>12} {'total B':>14} {'B/packet':>9}",
    ]
    compaction = figures.get("compacted")
    if compaction:
        done = [item for item in compaction["indexes"] if item[4] == "compacted"]
        lines.insert(
            2,
            f"after the daily compaction of the past days (flask bucket partitions compact, "
            f"{len(done)} indexes rebuilt in {compaction['seconds']:.1f} s"
            f"{', stopped: ' + compaction['stopped'] if compaction['stopped'] else ''}): "
            f"{compaction['bytes_per_packet']:,.0f} bytes a packet (as filled: "
            f"{figures['bytes_per_packet']:,.0f}), "
            f"{compaction['disk_gb_per_day_per_1000_learners_at_5000']:.2f} GB a day per "
            f"1,000 learners at {LEARNER_PACKETS_PER_ACTIVE_DAY:,}",
        )
    purge = figures.get("purge")
    if purge:
        deleted = ", ".join(f"{t} {n:,}" for t, n in purge["rows_deleted"].items()) or "none"
        lines.insert(
            -1,
            f"purge of the oldest {len(purge['dropped'])} days ({purge['packets']:,} packets): "
            f"{purge['seconds']:.2f} s ({purge['us_per_packet']:.1f} us a packet; target: a "
            f"day of 5M <= 1 s); rows deleted one by one: {deleted}; kept: {purge['kept']}",
        )
        key_days = purge.get("key_days", [])
        if key_days:
            dropped = [name for name, kept in key_days if kept is None]
            lines.insert(
                -1,
                f"key days (packet_keys, by client day): dropped {dropped}; kept "
                f"{[[name, kept] for name, kept in key_days if kept is not None]}",
            )
    for name, size in figures["relations"].items():
        lines.append(
            f"{name:<34} {size['rows']:>12,} {size['total']:>14,} {size['total'] / stored:>9.1f}"
        )
        parts = [("heap", size["heap"]), ("TOAST", size["toast"]), *size["indexes"].items()]
        if size["other_indexes"]:
            parts.append(("other indexes", size["other_indexes"]))
        compacted = (compaction or {}).get("relations", {}).get(name, {})
        after = {**compacted.get("indexes", {}), "other indexes": compacted.get("other_indexes")}
        for part, value in parts:
            packed = figures["rebuilt_indexes"].get(part)
            note = f"  (built afresh: {packed / stored:.1f})" if packed is not None else ""
            if after.get(part) not in (None, value):
                note += f"  (compacted: {after[part] / stored:.1f})"
            lines.append(f"  {part:<32} {'':>12} {value:>14,} {value / stored:>9.1f}{note}")
    for name, alt in figures["alternatives"].items():
        value = f"{alt['bytes'] / stored:.1f} B/packet" if "bytes" in alt else alt["error"]
        lines.append(f"alternative {name}, built afresh: {value} ({alt['meaning']})")
    for name, alt in figures["heap_alternatives"].items():
        value = (
            f"{alt['as_is_bytes_per_row']:.1f} -> {alt['reshaped_bytes_per_row']:.1f} B/row"
            if "rows" in alt
            else alt["error"]
        )
        lines.append(f"heap alternative {name}: {value} ({alt['meaning']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    parser.add_argument("--packets", type=int, default=0, help="instead of the mode's")
    parser.add_argument("--days", type=int, default=0, help="instead of the mode's")
    parser.add_argument("--backlog", type=int, default=0, help="instead of the mode's")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    database = Database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_")}
    try:
        figures = run(
            database.dsn,
            database.url,
            env,
            name,
            packets=args.packets,
            days=args.days,
            backlog=args.backlog,
        )
    finally:
        database.stop()
    print(table(figures))
    print("BENCH_STORAGE_JSON " + json.dumps(figures, default=str))
    return figures


if __name__ == "__main__":
    main()
