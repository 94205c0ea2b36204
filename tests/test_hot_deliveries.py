"""PostgreSQL: the hot table follows the backlog (migration 0014). Deliveries are partitioned
by state: pending, leased and dead ones in ``deliveries_hot``, processed ones in day partitions
beside the packets'. Polls and acks touch the hot partition only; a processed packet's row
moves out of it, and back when it is replayed; an ack racing another for one packet (or a
lease change racing an ack) is answered, never a 500; retention drops a day's processed
deliveries with its packets, deleting none. SQLite keeps one table."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from bucket.services import partitions
from bucket.services.audit.sealing import seal_everything
from bucket.services.counters import recount
from bucket.services.delivery.acks import PG_ACK, ack_item, ack_params
from bucket.services.delivery.claims import PG_HEADS, PG_LEASE, lease_params
from bucket.services.delivery.settings import EXHAUSTED_LEASE_ERROR, DeliverySettings
from bucket.services.stats import queue_params
from bucket.timeutil import epoch_now, from_epoch, utc_now
from tests.concurrency import join_all, run_threads, wait_until
from tests.queue_helpers import API, ack, ingest_many, listing, poll, sql, status
from tests.statements import captured_statements

pytestmark = pytest.mark.parametrize("backend", ["postgres"])
# An id in the form the service hands out that names no stored packet.
NO_SUCH_ID = "00000000-0000-7000-8000-000000000000"


def placement(app) -> dict[str, int]:
    """Deliveries by the partition holding them."""
    rows = sql(app, "SELECT tableoid::regclass::text, count(*) FROM deliveries GROUP BY 1")
    return dict(rows)


def url_of(app) -> str:
    return app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")


def today_processed() -> str:
    return partitions.processed_name(partitions.day_name(utc_now().date()))


def drain(client, count: int) -> None:
    done = 0
    while done < count:
        packets = poll(client, limit=50)["packets"]
        assert packets, f"only {done} of {count} served"
        for packet in packets:
            assert ack(client, packet["packet_id"]).status_code == 200
        done += len(packets)


def hot_bytes(app) -> tuple[int, int]:
    """Heap and heap + index bytes of the hot partition after a VACUUM (as autovacuum keeps
    it), and of everything else of deliveries."""
    with psycopg.connect(url_of(app), autocommit=True) as conn:
        # A B-tree page emptied by one VACUUM is recycled by a later one, once every
        # transaction that might still see it has ended: the next transaction id must have
        # moved on in between (on a quiet server nothing else moves it). Autovacuum does
        # this over time; here it is done at once.
        conn.execute("VACUUM deliveries_hot")
        conn.execute("SELECT txid_current()")
        conn.execute("VACUUM deliveries_hot")
        ((heap, total),) = conn.execute(
            "SELECT pg_relation_size('deliveries_hot'), pg_total_relation_size('deliveries_hot')"
        ).fetchall()
    return heap, total


def test_the_hot_partition_holds_only_unfinished_and_dead_packets(app, client, backend):
    """Three rounds of 150 packets stored and processed: the hot partition's bytes stay within
    twice their size after the first round (its free space is reused), while the processed
    ones pile up in today's partition of processed deliveries, which has no queue index.
    Then 15 unfinished (pending, leased, retrying) and one dead: the hot partition holds
    those 16 rows and no other. The listing and status still see every packet."""
    sizes = []
    for _ in range(3):
        ingest_many(client, 150)
        drain(client, 150)
        sizes.append(hot_bytes(app))
    assert placement(app) == {today_processed(): 450}
    # Nothing unfinished: no heap left (VACUUM truncated it). The indexes keep pages emptied
    # by earlier rounds until a VACUUM may recycle them, which waits for every snapshot that
    # might still see them (the app's own background transactions among them): measured 9,
    # 13, 13 pages where they were recycled and 12, 15, 18 where not. Either way within
    # issue 22's bound, twice the size at the first round, while three times as many
    # packets are stored.
    assert all(heap <= 8192 for heap, _ in sizes), sizes
    assert sizes[2][1] <= 2 * sizes[0][1], sizes
    unfinished = ingest_many(client, 15, user_id="hot-user")
    leased = [p["packet_id"] for p in poll(client, limit=5)["packets"]]
    assert ack(client, leased[0], success=False).status_code == 200  # retrying
    ((first,),) = sql(app, "SELECT packet_id FROM deliveries ORDER BY received_at LIMIT 1")
    sql(
        app,
        "UPDATE deliveries SET delivery_state = 'dead', dead_at = now() WHERE packet_id = :p",
        p=first,
    )
    with app.app_context():
        recount()
    assert placement(app) == {"deliveries_hot": 16, today_processed(): 449}
    hot_states = sql(app, "SELECT delivery_state, count(*) FROM deliveries_hot GROUP BY 1")
    assert dict(hot_states) == {"pending": 11, "leased": 4, "dead": 1}
    indexes = sql(app, "SELECT indexdef FROM pg_indexes WHERE tablename = :t", t=today_processed())
    assert [d for (d,) in indexes if "visible_at" in d] == [] and len(indexes) == 1
    assert hot_bytes(app)[0] <= 2 * 8192  # 16 narrow rows
    rows = listing(client, "hot-user", limit=50)
    assert sorted(r["packet_id"] for r in rows) == sorted(unfinished)
    figures = status(client)
    assert figures["total_packets"] == 465 and figures["processed_packets"] == 449
    assert figures["dead_packets"] == 1 and figures["pending_packets"] == 15


def test_an_ack_moves_the_row_out_and_a_replay_moves_it_back(app, client, backend):
    """A processed row leaves the hot partition, keeps its outcome where the listing finds
    it, and answers a second ack as already processed; a replay brings it back hot."""
    (packet_id,) = ingest_many(client, 1, user_id="mover")
    assert placement(app) == {"deliveries_hot": 1}
    poll(client)
    assert ack(client, packet_id).json["outcome"] == "processed"
    assert placement(app) == {today_processed(): 1}
    again = ack(client, packet_id)
    assert again.status_code == 200 and again.json["outcome"] == "already_processed"
    (row,) = listing(client, "mover")
    assert row["processed_by_karma"] is True and row["karma_actions"]
    replayed = client.post(f"{API}/packets/replay", json={"user_id": "mover"})
    assert replayed.status_code == 200, replayed.json
    assert placement(app) == {"deliveries_hot": 1}
    assert [p["packet_id"] for p in poll(client)["packets"]] == [packet_id]


def plan(app, statement: str, params: dict) -> str:
    with psycopg.connect(url_of(app)) as conn:
        rows = conn.execute("EXPLAIN " + statement, params).fetchall()
        conn.rollback()
    return "\n".join(line for (line,) in rows)


def test_polls_and_acks_plan_the_hot_partition_only(app, client, backend):
    """The claim's statements never name a partition of processed deliveries; the ack's
    update and lock reach the hot partition only (its lookup of finished packets alone reads
    the processed days)."""
    ingest_many(client, 3)
    with app.app_context():
        settings = DeliverySettings.from_app()
        now = epoch_now()
        heads = {
            **queue_params(now),
            "now_ts": from_epoch(now),
            "exhausted_error": EXHAUSTED_LEASE_ERROR,
            "shard": 0,
        }
        lease = lease_params(
            now, settings.max_attempts, receipt="r", until=now + 60, source="pending", limit=10
        )
        items = [ack_item({"packet_id": NO_SUCH_ID, "success": True})]
        acks = ack_params(items, settings, now)
    for statement, params in ((PG_HEADS, heads), (PG_LEASE, lease)):
        found = plan(app, statement, params)
        assert "deliveries_hot" in found and "deliveries_processed" not in found, found
    found = plan(app, PG_ACK, acks)
    assert "Update on deliveries_hot" in found, found
    assert "Update on deliveries_processed" not in found, found
    locking = found.split("CTE locked")[1].split("CTE u")[0]
    assert "deliveries_hot" in locking and "deliveries_processed" not in locking, found


def blocked_on_lock(app) -> bool:
    rows = sql(
        app,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()",
    )
    return rows[0][0] > 0


def race_with_a_moving_ack(app, packet_id: str, request) -> object:
    """Hold ``packet_id``'s row moved to processed in an open transaction (an ack another
    worker is committing), send ``request`` meanwhile (it waits on the row), then commit:
    the request's statement finds its row gone to another partition."""
    answers = []
    with psycopg.connect(url_of(app)) as other:
        other.execute(
            "UPDATE deliveries SET delivery_state = 'processed', lease_id = NULL, "
            "processed_at = now() AT TIME ZONE 'UTC', processed_by_karma = true "
            "WHERE packet_id = %s",
            (packet_id,),
        )
        thread = threading.Thread(target=lambda: answers.append(request()), daemon=True)
        thread.start()
        wait_until(lambda: blocked_on_lock(app), 10, "the request never waited on the row")
        other.commit()
    join_all([thread], 30)
    return answers[0]


def test_an_ack_racing_another_for_one_packet_is_answered_already_processed(app, client, backend):
    """Two consumers ack one packet at once: the second's statement waits on the row the
    first moves out of the hot partition, is refused for it (40001) and runs again: 200,
    already processed, and the packet counted processed once."""
    (packet_id,) = ingest_many(client, 1)
    poll(client)
    answer = race_with_a_moving_ack(app, packet_id, lambda: ack(app.test_client(), packet_id))
    assert answer.status_code == 200, answer.json
    assert answer.json["outcome"] == "already_processed"
    assert placement(app) == {today_processed(): 1}


def test_a_lease_change_racing_an_ack_is_refused_not_failed(app, client, backend):
    """A consumer extends its lease while the packet's ack commits: 409 not_leased."""
    (packet_id,) = ingest_many(client, 1)
    receipt = poll(client)["packets"][0]["receipt"]

    def extend():
        return app.test_client().post(
            f"{API}/packets/lease",
            json={"packet_id": packet_id, "receipt": receipt, "visibility_timeout": 60},
        )

    answer = race_with_a_moving_ack(app, packet_id, extend)
    assert answer.status_code == 409 and "live lease" in answer.json["message"], answer.json


def test_a_replay_racing_an_ack_is_answered_and_serves_the_packet_again(app, client, backend):
    """An operator replays a learner's packets while one of them (waiting, never leased) is
    being acknowledged: the replay's UPDATE waits on the row the ack moves out of the hot
    partition, is refused for it and runs again, replaying the now processed packet: 200,
    and the packet is served again."""
    (packet_id,) = ingest_many(client, 1, user_id="replayed")

    def replay():
        return app.test_client().post(f"{API}/packets/replay", json={"user_id": "replayed"})

    answer = race_with_a_moving_ack(app, packet_id, replay)
    assert answer.status_code == 200 and answer.json["requeued"] == 1, answer.json
    assert placement(app) == {"deliveries_hot": 1}
    assert [p["packet_id"] for p in poll(client)["packets"]] == [packet_id]


def test_racing_duplicate_acks_all_answer_and_count_once(app, client, backend):
    """Eight threads ack the same ten packets at once, over and over: every answer is 200
    (processed once per packet, already processed otherwise), nothing stays hot, and the
    processed counter says ten."""
    ids = ingest_many(client, 10)
    poll(client, limit=10)

    def consumer(index: int) -> list[tuple[int, str]]:
        own = app.test_client()
        order = ids if index % 2 else list(reversed(ids))
        return [(r.status_code, r.json.get("outcome")) for r in (ack(own, p) for p in order)]

    answers = [a for result in run_threads(8, consumer) for a in result]
    assert {code for code, _ in answers} == {200}
    assert sum(1 for _, outcome in answers if outcome == "processed") == 10
    assert placement(app) == {today_processed(): 10}
    assert status(client)["processed_packets"] == 10


def test_purge_drops_a_days_processed_deliveries_without_deleting_them(app, client, backend):
    """An old day of processed packets: purge detaches and drops its partition of processed
    deliveries with its packets; no statement deletes a delivery (the day's default-partition
    leftovers, none here, aside), and the hot partition keeps today's unfinished packet."""
    old = utc_now().date() - timedelta(days=45)
    for name in (partitions.day_name(old), partitions.processed_name(partitions.day_name(old))):
        sql(app, f"DROP TABLE IF EXISTS {name}")
    with app.app_context():
        partitions.create_day(old, adopt=False)
    ids = ingest_many(client, 4)
    drain(client, 4)
    (waiting,) = ingest_many(client, 1)
    moment = datetime.combine(old, datetime.min.time(), tzinfo=UTC).replace(tzinfo=None)
    for table in ("packets", "deliveries", "packet_keys"):
        sql(
            app,
            f"UPDATE {table} SET received_at = :m WHERE packet_id = ANY(:ids)",
            m=moment,
            ids=ids,
        )
    old_processed = partitions.processed_name(partitions.day_name(old))
    assert placement(app) == {old_processed: 4, "deliveries_hot": 1}
    with app.app_context():
        seal_everything()
    with captured_statements(app) as statements:
        purged = app.test_cli_runner().invoke(args=["bucket", "purge"])
    assert purged.exit_code == 0, purged.output
    assert f"dropped {partitions.day_name(old)}: 4 packets (0 dead)" in purged.output
    deletes = [s for s in statements if s.lstrip().upper().startswith("DELETE FROM DELIVERIES")]
    assert [s for s in deletes if "deliveries_processed_default" not in s] == [], deletes
    assert f"DROP TABLE {old_processed}" in statements
    assert sql(app, "SELECT to_regclass(:n)", n=old_processed) == [(None,)]
    assert placement(app) == {"deliveries_hot": 1}
    assert [p["packet_id"] for p in poll(client)["packets"]] == [waiting]
    assert status(client)["processed_packets"] == 0


def test_processed_deliveries_of_a_day_without_partition_are_adopted(app, client, backend):
    """An ack of a packet whose day has no partition of processed deliveries lands in their
    default partition; the maintenance creates the day and moves it there."""
    day = utc_now().date()
    name = partitions.processed_name(partitions.day_name(day))
    sql(app, f"DROP TABLE {name}")
    (packet_id,) = ingest_many(client, 1)
    poll(client)
    assert ack(client, packet_id).status_code == 200
    assert placement(app) == {partitions.PROCESSED_DEFAULT: 1}
    assert status(client)["default_partition_deliveries"] == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "bucket_deliveries_default_partition 1.0" in metrics
    ensured = app.test_cli_runner().invoke(args=["bucket", "partitions", "ensure"])
    assert ensured.exit_code == 0 and f"created {name}" in ensured.output, ensured.output
    assert placement(app) == {name: 1}
    assert status(client)["default_partition_deliveries"] == 0


def test_a_claim_rewrites_each_delivery_on_its_own_page(app, client, backend):
    """Ingest fills each page of the hot partition to 40 % (fillfactor 40, migration 0025), so
    a claim's new version of a delivery goes on the page of the old one: PostgreSQL then logs
    the update compressed against the old version, and no lock of the old version before
    moving to another page (BENCHMARKS.md: about 70 bytes of WAL a drained packet). A full
    page would send every new version elsewhere."""
    ids = ingest_many(client, 300)
    where = "SELECT packet_id::text, (ctid::text::point)[0] FROM deliveries_hot"
    before = dict(sql(app, where))
    assert set(before) == set(ids) and len(set(before.values())) > 3
    for _ in range(3):
        assert len(poll(client, limit=100)["packets"]) == 100
    sizes = "SELECT avg(pg_column_size(d.*)) FROM deliveries_hot d"
    after = dict(sql(app, where))
    moved = {packet_id for packet_id, page in after.items() if page != before[packet_id]}
    assert moved == set(), (len(moved), sql(app, sizes))
