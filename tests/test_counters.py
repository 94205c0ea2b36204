"""Status counts read from counters stay exact through every path in or out of "processed".

Each test compares the status figures with a ``count(*)`` of the rows themselves, the ground
truth the counter replaces, after acks, duplicate and batch acks, replays, purges, concurrent
acks, a migration on a populated database and a recount (tests/test_scaling.py checks that
reading them stays cheap however big the table grows).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psycopg
import pytest
from sqlalchemy import column, func, insert, select, table, text, update

from bucket import create_app
from bucket.extensions import db
from bucket.models import Delivery, DeliveryState, Packet, UuidString
from bucket.schemas import PacketSchema
from bucket.services.audit.sealing import seal_everything
from bucket.services.bookkeeping import book_new_packets
from bucket.services.codes import CODE_COLUMNS, field_name
from bucket.services.counters import recount
from bucket.services.delivery.acks import PG_ACK, ack_item, ack_params
from bucket.services.delivery.settings import DeliverySettings
from bucket.services.ingest import delivery_row, packet_row
from bucket.services.retention import purge_rows as purge
from bucket.timeutil import utc_now
from tests.concurrency import join_all, run_threads, wait_until
from tests.factories import make_packet
from tests.queue_helpers import API, ack, poll, status
from tests.servers import dispose_engines

T = Delivery.__table__  # the delivery columns these tests set and read
P = Packet.__table__
ACK = f"{API}/packets/mark-processed"
DAY = 86400.0


def ingest_many(client, count: int, **fields) -> list[str]:
    """Ingest ``count`` packets in batch envelopes of up to 100; return their ids in order."""
    ids: list[str] = []
    while len(ids) < count:
        size = min(100, count - len(ids))
        response = client.post(
            f"{API}/ingest", json={"packets": [make_packet(**fields) for _ in range(size)]}
        )
        assert response.status_code == 200, response.json
        ids += [result["packet_id"] for result in response.json["results"]]
    return ids


def truth(app) -> Counter:
    """How many rows are in each delivery state, counted the slow way."""
    with app.app_context():
        rows = db.session.execute(
            select(T.c.delivery_state, func.count()).group_by(T.c.delivery_state)
        ).all()
        db.session.commit()
    return Counter(dict(rows))


def assert_exact(app, client) -> dict:
    """Status agrees with the rows: processed, dead, unfinished and the total."""
    rows = truth(app)
    figures = status(client)
    unfinished = rows[DeliveryState.PENDING] + rows[DeliveryState.LEASED]
    assert figures["processed_packets"] == rows[DeliveryState.PROCESSED], (figures, rows)
    assert figures["dead_packets"] == rows[DeliveryState.DEAD], (figures, rows)
    assert figures["pending_packets"] == unfinished, (figures, rows)
    assert figures["total_packets"] == rows.total(), (figures, rows)
    return figures


def test_counts_stay_exact_across_single_duplicate_and_batch_acks(app, client):
    """Acks raise processed once per packet; repeats, failures and stale acks change nothing."""
    ids = ingest_many(client, 8)
    served = {p["packet_id"]: p for p in poll(client, limit=8)["packets"]}
    assert ack(client, ids[0]).status_code == 200
    assert assert_exact(app, client)["processed_packets"] == 1
    assert ack(client, ids[0]).json["outcome"] == "already_processed"
    assert ack(client, ids[1], success=False).status_code == 200
    assert assert_exact(app, client)["processed_packets"] == 1

    results = [{"packet_id": pid, "success": True} for pid in (ids[2], ids[3], ids[2], ids[0])]
    results.append({"packet_id": ids[4], "success": True, "receipt": "not-the-lease"})
    results.append({"packet_id": ids[5], "success": True, "receipt": served[ids[5]]["receipt"]})
    response = client.post(ACK, json={"results": results})
    assert response.status_code == 207
    statuses = [r["status"] for r in response.json["results"]]
    assert statuses == [
        "processed",
        "processed",
        "processed",
        "already_processed",
        "stale_receipt",
        "processed",
    ]
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["total_packets"]) == (4, 8)


def test_replaying_processed_packets_lowers_and_reprocessing_restores_the_count(app, client):
    """``replay`` moves processed packets back to pending, and the counter follows both ways."""
    alice = ingest_many(client, 4, user_id="alice")
    bob = ingest_many(client, 2, user_id="bob")
    for packet_id in alice + bob:
        assert ack(client, packet_id).status_code == 200
    assert assert_exact(app, client)["processed_packets"] == 6

    replayed = app.test_cli_runner().invoke(args=["bucket", "replay", "--user", "alice"])
    assert replayed.exit_code == 0 and "replayed 4 packets" in replayed.output
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["pending_packets"]) == (2, 4)

    for packet in poll(client, limit=10)["packets"]:
        assert ack(client, packet["packet_id"]).status_code == 200
    assert assert_exact(app, client)["processed_packets"] == 6


def test_requeue_of_dead_packets_leaves_the_processed_count_alone(make_app):
    """Dead → pending is no processed transition; a dead packet acked after requeue counts."""
    app = make_app(BUCKET_MAX_ATTEMPTS=1, BUCKET_RETRY_BACKOFF=0)
    client = app.test_client()
    done, doomed = ingest_many(client, 2)
    assert ack(client, done).status_code == 200
    assert ack(client, doomed, success=False).json["outcome"] == "dead"
    assert assert_exact(app, client)["dead_packets"] == 1
    result = app.test_cli_runner().invoke(args=["bucket", "requeue"])
    assert result.exit_code == 0 and "requeued 1 packets" in result.output
    assert assert_exact(app, client)["processed_packets"] == 1
    assert ack(client, doomed).status_code == 200
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["dead_packets"]) == (2, 0)


def test_purge_lowers_the_count_by_the_processed_packets_it_deletes(app, client):
    """Purging old processed (then also dead) packets in batches keeps every figure exact."""
    old = ingest_many(client, 5)
    for packet_id in old:
        assert ack(client, packet_id).status_code == 200
    recent = ingest_many(client, 2)
    for packet_id in recent:
        assert ack(client, packet_id).status_code == 200
    dead = ingest_many(client, 2)
    waiting = ingest_many(client, 1)
    with app.app_context():
        db.session.execute(
            update(T).where(T.c.packet_id.in_(dead)).values(delivery_state=DeliveryState.DEAD)
        )
        db.session.execute(
            update(T)
            .where(T.c.packet_id.in_(old + dead + waiting))
            .values(visible_at=time.time() - 40 * DAY)
        )
        db.session.commit()
        recount()  # the dead-lettering above was by hand
    assert assert_exact(app, client)["processed_packets"] == 7

    with app.app_context():
        assert purge(30, batch_size=2).packets == 5
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["dead_packets"]) == (2, 2)

    with app.app_context():
        assert purge(30, include_dead=True, batch_size=1).packets == 2
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["dead_packets"]) == (2, 0)
    assert figures["total_packets"] == 3


def test_recount_repairs_the_counter_after_rows_were_changed_by_hand(app, client, runner):
    """``flask bucket recount`` sets processed from the rows, e.g. after hand-written SQL."""
    ids = ingest_many(client, 4)
    for packet_id in ids[:2]:
        assert ack(client, packet_id).status_code == 200
    with app.app_context():
        db.session.execute(
            update(T).where(T.c.packet_id.in_(ids[2:])).values(delivery_state="processed")
        )
        db.session.commit()
    assert status(client)["processed_packets"] == 2  # the counter never saw that UPDATE
    result = runner.invoke(args=["bucket", "recount"])
    assert result.exit_code == 0 and "processed packets: 4" in result.output
    assert assert_exact(app, client)["processed_packets"] == 4
    assert ack(client, ids[0]).json["outcome"] == "already_processed"
    assert assert_exact(app, client)["processed_packets"] == 4


def test_recount_never_lowers_the_seq_counter_after_the_newest_packets_are_purged(app, client):
    """Purging the highest-numbered packets, then recounting: the next packet still gets a
    ``seq`` above every one handed out (a reused number would be one already sealed, and the
    new packet would never be sealed), and the sealer takes it."""
    ids = ingest_many(client, 3)
    for packet_id in ids:
        assert ack(client, packet_id).status_code == 200
    with app.app_context():
        highest = db.session.execute(select(func.max(P.c.seq))).scalar_one()
        db.session.execute(update(T).values(visible_at=time.time() - 40 * DAY))
        db.session.commit()
        assert purge(30).packets == 3
        recount()
    (newer,) = ingest_many(client, 1)
    with app.app_context():
        seq = db.session.execute(select(P.c.seq).where(P.c.packet_id == newer)).scalar_one()
        db.session.commit()
        assert seq > highest
        assert [made.packet_count for made in seal_everything()] == [1]


# Only SQLite hands out seq from a counter (PostgreSQL has a sequence).
@pytest.mark.parametrize("backend", ["sqlite"])
def test_recount_sets_every_figure_from_the_rows_and_raises_the_seq_counter_only(backend, app):
    """On an empty database every figure is 0; afterwards the seq counter is the highest stored
    seq when it was lower or missing (rows written by hand), and is left alone when higher."""
    with app.app_context():
        assert recount() == {"processed": 0, "dead": 0, "stored": 0, "booked": 0, "allocated": 0}
    ingest_many(app.test_client(), 3)
    allocated = text("UPDATE packet_counters SET value = :v WHERE name = 'allocated'")
    with app.app_context():
        db.session.execute(allocated, {"v": 10})
        db.session.commit()
        assert recount()["allocated"] == 10
        db.session.execute(text("DELETE FROM packet_counters WHERE name = 'allocated'"))
        db.session.commit()
        figures = recount()
    assert figures == {"processed": 0, "dead": 0, "stored": 3, "booked": 3, "allocated": 3}


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_recount_waits_for_an_ack_still_committing_and_counts_it_exactly_once(
    backend, app, client
):
    """PostgreSQL: an ack whose transaction is open when a recount starts is counted once.
    The recount locks the counter table first, so it waits for the ack and counts its row;
    without the lock it would count the rows without the ack, wait only at the DELETE of the
    counter row the ack raised, delete that row once the ack commits, and write the old count:
    the ack's packet processed but never counted."""
    ids = ingest_many(client, 3)
    assert ack(client, ids[0]).status_code == 200
    with app.app_context():
        assert recount()["processed"] == 1  # every figure now in shard 0
        settings = DeliverySettings.from_app()
        params = ack_params(
            [ack_item({"packet_id": ids[1], "success": True})], settings, time.time()
        )
        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    params["shard"] = 0  # the ack raises the very row the recount rewrites
    outcome: dict = {}

    def recount_meanwhile() -> None:
        with app.app_context():
            try:
                outcome["figures"] = recount()
            except BaseException as exc:  # surfaced below, not lost in the thread
                outcome["error"] = exc

    with psycopg.connect(dsn) as other, psycopg.connect(dsn, autocommit=True) as watcher:
        ((packet_id, state, *_rest, updated),) = other.execute(PG_ACK, params).fetchall()
        # A plain psycopg connection reads the uuid column as uuid.UUID (the app's, as text).
        assert (str(packet_id), state, updated) == (ids[1], DeliveryState.PROCESSED, True)
        worker = threading.Thread(target=recount_meanwhile)
        worker.start()
        # Until the recount waits for a lock the open ack holds (a wait, not a timed check).
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        while not watcher.execute(blocked, (other.info.backend_pid,)).fetchone()[0]:
            assert worker.is_alive(), outcome
            time.sleep(0.01)
        other.commit()
        worker.join()
    assert "error" not in outcome, outcome
    assert outcome["figures"]["processed"] == 2
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["total_packets"]) == (2, 3)


@pytest.mark.parametrize("backend", ["postgres"])
def test_concurrent_acks_from_several_threads_count_each_packet_once(backend, app, client):
    """Six threads ack the same 240 packets in shuffled batches: processed ends at exactly 240."""
    ids = ingest_many(client, 240)
    poll(client, limit=240)  # some leased, so acks without a receipt race on leased rows too

    def acker(seed: int) -> None:
        mine = ids[:]
        random.Random(seed).shuffle(mine)
        worker = app.test_client()
        for offset in range(0, len(mine), 20):
            chunk = mine[offset : offset + 20]
            body = {"results": [{"packet_id": pid, "success": True} for pid in chunk]}
            response = worker.post(ACK, json=body)
            assert response.status_code == 200, response.json

    run_threads(6, acker)
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["total_packets"]) == (240, 240)
    with app.app_context():
        shards = db.session.execute(text("SELECT count(*) FROM packet_counters")).scalar_one()
        db.session.commit()
    assert shards > 1  # the acks spread over several shards instead of one hot row


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_batch_ack_that_loses_a_race_for_each_of_its_packets_still_answers_every_outcome(
    backend, app, client
):
    """PostgreSQL: a batch ack naming nine leased packets, eight of which another consumer
    acknowledges while the batch waits on their rows, one after another. Each of those acks
    moves its row to the processed partition just as the batch would lock it, so PostgreSQL
    refuses the batch's statement (40001) eight times in a row; it runs again each time (one
    more run per packet named, not ``sql.run``'s usual five) and answers 200: the eight
    already processed, the ninth processed by it, every packet counted once.

    Forced without timing: each racing ack holds its row's lock from its own connection from
    the start, and commits only once PostgreSQL reports the batch blocked by that connection
    (``pg_blocking_pids``)."""
    ids = ingest_many(client, 9)
    poll(client, limit=9)  # leased: the acks name no receipt, as deployed consumers may
    raced, alone = ids[:8], ids[8]
    with app.app_context():
        settings = DeliverySettings.from_app()
        dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    outcome: dict = {}

    def batch() -> None:
        body = {"results": [{"packet_id": pid, "success": True} for pid in ids]}
        try:
            outcome["response"] = app.test_client().post(ACK, json=body)
        except BaseException as exc:  # surfaced below, not lost in the thread
            outcome["error"] = exc

    blockers = (
        "SELECT DISTINCT unnest(pg_blocking_pids(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database()"
    )
    committed: list[str] = []
    others: dict[int, tuple[psycopg.Connection, str]] = {}
    worker = threading.Thread(target=batch, daemon=True)
    with psycopg.connect(dsn, autocommit=True) as watcher:

        def waited_on() -> int | None:
            """The racing consumer whose row the batch waits on, if any."""
            held = [pid for (pid,) in watcher.execute(blockers) if pid in others]
            return held[0] if held else None

        try:
            for packet_id in raced:  # each racing consumer has its row locked, ack not sent yet
                other = psycopg.connect(dsn)
                other.execute(
                    "SELECT 1 FROM deliveries WHERE packet_id = %s FOR UPDATE", (packet_id,)
                )
                others[other.info.backend_pid] = (other, packet_id)
            worker.start()
            while others and worker.is_alive():
                # Until the batch waits on a row one of them holds (a wait, not a timed check).
                wait_until(
                    lambda: waited_on() is not None or not worker.is_alive(),
                    30,
                    f"the batch never waited on a held row ({len(committed)} acks committed)",
                )
                holder = waited_on()
                if holder is None:  # the batch ended (answered, or refused for good)
                    break
                other, packet_id = others.pop(holder)
                params = ack_params(
                    [ack_item({"packet_id": packet_id, "success": True})], settings, time.time()
                )
                ((acked, state, *_rest, updated),) = other.execute(PG_ACK, params).fetchall()
                assert (str(acked), state, updated) == (packet_id, DeliveryState.PROCESSED, True)
                other.commit()  # moves the row the batch waits on to the processed partition
                committed.append(packet_id)
                other.close()
        finally:
            for other, _ in others.values():
                other.rollback()
                other.close()
            join_all([worker], 60, "batch ack")
    assert "error" not in outcome, outcome
    response = outcome["response"]
    assert response.status_code == 200, response.json
    assert sorted(committed) == sorted(raced)  # the batch waited on, and lost, every race
    answered = {r["packet_id"]: r["status"] for r in response.json["results"]}
    assert answered == {**dict.fromkeys(raced, "already_processed"), alone: "processed"}
    figures = assert_exact(app, client)
    assert (figures["processed_packets"], figures["total_packets"]) == (9, 9)


def first_type(kind):
    """A column's type as migration 0001 made it: the ids and keys were strings (uuid on
    PostgreSQL only since migration 0016)."""
    return kind.impl if isinstance(kind, UuidString) else kind


# The packets table as migration 0001 made it: content and delivery in one row.
FIRST_SCHEMA_PACKETS = table(
    "packets",
    # Neither seq nor the columns of migrations 0010 (who sent it), 0020 and 0022 existed yet;
    # the strings' columns had the fields' names (before migration 0024).
    *[
        column(field_name(c.name), first_type(c.type))
        for c in Packet.__table__.c
        if c.name
        not in (
            "seq",
            "auth_outcome_text",
            "auth_subject",
            "stale",
            "signal_keys",
            "signal_values",
            *CODE_COLUMNS,
        )
    ],
    *[
        column(c.name, c.type)
        for c in Delivery.__table__.c
        if c.name not in ("packet_id", "received_at")
    ],
)


def insert_as_an_older_version(app, count: int) -> list[str]:
    """Rows as the first schema's code stored them (one wide row, no ``seq``); their ids."""
    with app.app_context():
        rows = []
        for _ in range(count):
            content = packet_row(PacketSchema().load(make_packet()), utc_now(), None)
            row = {**content, **delivery_row(content)}
            rows.append(
                {
                    field_name(name): value
                    for name, value in row.items()
                    if field_name(name) in FIRST_SCHEMA_PACKETS.c
                }
            )
        db.session.execute(insert(FIRST_SCHEMA_PACKETS), rows)
        db.session.commit()
    return [row["packet_id"] for row in rows]


def test_migration_seeds_the_counters_from_the_packets_already_stored(empty_database):
    """Upgrading a populated 0001 database starts every counter at its rows, and the new code
    carries on from there (new packets numbered after the old ones, acks counted)."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": empty_database, "REDIS_URL": None}, testing=True)
    cli = app.test_cli_runner()
    try:
        assert cli.invoke(args=["db", "upgrade", "0001_create_packets"]).exit_code == 0
        client = app.test_client()
        ids = insert_as_an_older_version(app, 6)
        with app.app_context():
            legacy = FIRST_SCHEMA_PACKETS
            db.session.execute(
                update(legacy)
                .where(legacy.c.packet_id.in_(ids[:3]))
                .values(delivery_state="processed")
            )
            db.session.execute(
                update(legacy).where(legacy.c.packet_id == ids[3]).values(delivery_state="dead")
            )
            db.session.commit()
        result = cli.invoke(args=["db", "upgrade"])
        assert result.exit_code == 0, result.output
        figures = assert_exact(app, client)
        assert (figures["processed_packets"], figures["total_packets"]) == (3, 6)
        assert figures["dead_packets"] == 1
        assert ack(client, ids[4]).status_code == 200
        assert assert_exact(app, client)["processed_packets"] == 4
        ingest_many(client, 2)
        assert assert_exact(app, client)["total_packets"] == 8
        with app.app_context():
            booking = book_new_packets()
            numbers = db.session.execute(select(P.c.seq).order_by(P.c.seq)).scalars().all()
            db.session.commit()
        assert booking.packets == 2 and numbers == list(range(1, 9))
        assert assert_exact(app, client)["total_packets"] == 8

        assert cli.invoke(args=["db", "downgrade", "0001_create_packets"]).exit_code == 0
        assert cli.invoke(args=["db", "upgrade"]).exit_code == 0
        assert assert_exact(app, client)["processed_packets"] == 4
    finally:
        dispose_engines(app)
