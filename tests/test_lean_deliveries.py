"""A processed packet's delivery row is lean on PostgreSQL (migration 0021): no
``processed_at`` beside ``visible_at``, which holds the same instant; columns of its day's
partition ordered so that nothing is padded. What the listing,
an acknowledgement's answer and status show is what they showed before. SQLite keeps
``processed_at`` in its one table."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
import pytest

from bucket.services import partitions
from bucket.services.delivery.actions import PG_RESTORED
from bucket.timeutil import from_epoch, utc_now
from tests.queue_helpers import ack, ingest_many, listing, poll, sql, status

# A processed partition's columns in the order migration 0021 gives them: 8-byte times and
# the double, the integer, the uuid, the boolean, then text and json.
LEAN_ORDER = [
    "received_at",
    "visible_at",
    "last_delivered_at",
    "processed_at",
    "dead_at",
    "delivery_count",
    "packet_id",
    "processed_by_karma",
    "delivery_state",
    "lease_id",
    "last_error",
    "karma_actions",
]


def column_order(app, table: str) -> list[str]:
    rows = sql(
        app,
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        t=table,
    )
    return [name for (name,) in rows]


def test_a_processed_packet_lists_its_processed_time_from_its_one_clock(app, client, backend):
    """A processed packet (one after a failed delivery too) lists the time of its
    acknowledgement as ``processed_at``, exactly the instant its ``visible_at`` holds; on
    PostgreSQL the row stores no ``processed_at`` of its own. A repeated acknowledgement
    answers as before and changes nothing; a pending packet lists none."""
    first, second, waiting = ingest_many(client, 3, user_id="lean")
    poll(client, limit=2)
    assert ack(client, second, success=False, error_message="karma down").status_code == 200
    sql(app, "UPDATE deliveries SET visible_at = 0 WHERE packet_id = :p", p=second)
    before = utc_now()
    for packet_id in (first, second):
        if packet_id == second:
            poll(client, limit=3)
        answer = ack(client, packet_id)
        assert answer.status_code == 200 and answer.json["outcome"] == "processed", answer.json
    after = utc_now()
    stored = dict(
        (str(packet_id), (processed_at, visible_at))
        for packet_id, processed_at, visible_at in sql(
            app, "SELECT packet_id, processed_at, visible_at FROM deliveries"
        )
    )
    listed = {row["packet_id"]: row for row in listing(client, "lean")}
    for packet_id in (first, second):
        processed_at, visible_at = stored[packet_id]
        assert (processed_at is None) == (backend == "postgres"), processed_at
        shown = datetime.fromisoformat(listed[packet_id]["processed_at"])
        assert shown == from_epoch(visible_at), (shown, visible_at)
        assert before - timedelta(seconds=1) <= shown <= after + timedelta(seconds=1)
        assert listed[packet_id]["processed_by_karma"] is True
    assert listed[second]["delivery_count"] == 2 and listed[second]["last_error"] == "karma down"
    assert listed[waiting]["processed_at"] is None
    assert listed[waiting]["processed_by_karma"] is False
    again = ack(client, second)
    assert again.status_code == 200, again.json
    assert again.json == {
        "status": "ok",
        "outcome": "already_processed",
        "code": 200,
        "delivery_count": 2,
        "packet_id": second,
        "message": "Packet was already processed; its stored outcome is unchanged",
    }
    assert {row["packet_id"]: row for row in listing(client, "lean")} == listed
    assert status(client)["processed_packets"] == 2


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_processed_day_is_laid_out_without_padding(app, client, backend):
    """PostgreSQL: a partition of processed deliveries the maintenance makes (here today's,
    gone, so that an ack lands in the default partition and the maintenance adopts it) orders
    its columns 8-byte first and text last, like those the migration made, while the hot
    partition keeps the parent's order; a processed row with an empty list of karma actions
    takes 90 bytes as a tuple (108 in the parent's order with its processed_at: migration
    0021's test), and lists as before."""
    today = partitions.processed_name(partitions.day_name(utc_now().date()))
    assert column_order(app, today) == LEAN_ORDER
    assert column_order(app, partitions.PROCESSED_DEFAULT) == LEAN_ORDER
    assert column_order(app, "deliveries_hot") == column_order(app, "deliveries")
    sql(app, f"DROP TABLE {today}")
    (packet_id,) = ingest_many(client, 1, user_id="laid")
    poll(client)
    assert ack(client, packet_id, karma_actions=[]).status_code == 200
    ensured = app.test_cli_runner().invoke(args=["bucket", "partitions", "ensure"])
    assert ensured.exit_code == 0 and f"created {today}" in ensured.output, ensured.output
    assert column_order(app, today) == LEAN_ORDER
    ((size,),) = sql(app, f"SELECT pg_column_size(d.*) FROM {today} d")
    assert size == 90, size
    (listed,) = listing(client, "laid")
    assert listed["processed_at"] is not None and listed["karma_actions"] == []


def test_karma_actions_naming_their_packet_list_exactly_as_acknowledged(app, client, backend):
    """The Karma Tracker names the packet in its actions. On PostgreSQL each JSON string equal
    to the packet's id, where it stands as a value, is stored as a mark 36 bytes shorter, and
    the listing puts it back: the actions list exactly as acknowledged, the strings that only
    contain the id, an object key equal to it, and text that looks like a mark included.
    SQLite stores them as they came."""
    (packet_id,) = ingest_many(client, 1, user_id="named")
    poll(client)
    actions = [
        {"action": "completing_lessons", "packet_id": packet_id, "intensity": 0.85},
        {"list": [packet_id, [packet_id]], "nested": {"p": packet_id}},
        {packet_id: 1, "quoted": f'a"{packet_id}"', "inside": f"x{packet_id}", "upper": None},
        {"first": 0, packet_id: 1},
        {"tab": "\t0", "escaped": f"\\{packet_id}", "last": packet_id},
    ]
    actions[2]["upper"] = packet_id.upper()
    assert ack(client, packet_id, karma_actions=actions).status_code == 200
    (listed,) = listing(client, "named")
    assert listed["karma_actions"] == actions
    sent = orjson.dumps(actions).decode()
    ((stored, restored),) = sql(
        app,
        "SELECT CAST(karma_actions AS TEXT), CAST(:restored AS TEXT) FROM deliveries",
        restored=sent,
    )
    if backend == "postgres":
        ((restored,),) = sql(
            app,
            "SELECT CAST("
            + PG_RESTORED.format(actions="karma_actions", packet_id="packet_id")
            + " AS TEXT) FROM deliveries",
        )
        assert stored.count("\t0") == 5, stored
        assert len(stored) == len(sent) - 5 * 36
    else:
        assert stored == sent
    assert restored == sent
