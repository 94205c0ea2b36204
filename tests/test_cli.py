"""``flask bucket …`` operator commands and ``flask shell`` helpers, through the CLI runner."""

import time

from sqlalchemy import select, update

from bucket.extensions import db
from bucket.models import Delivery, DeliveryState
from bucket.services.counters import recount
from tests.concurrency import join_all
from tests.factories import make_packet
from tests.queue_helpers import Waiter, wait_until_listening

API = "/api/v1/bucket/prana"
T = Delivery.__table__  # the delivery columns these tests set and read
DAY = 86400.0


def ingest(client, count, **fields):
    return [
        client.post(f"{API}/ingest", json=make_packet(**fields)).json["packet_id"]
        for _ in range(count)
    ]


def process_all(client):
    while packets := client.get(f"{API}/packets/pending?limit=100").json["packets"]:
        results = [{"packet_id": p["packet_id"], "success": True} for p in packets]
        client.post(f"{API}/packets/mark-processed", json={"results": results})


def poll_all(client) -> list[dict]:
    """Lease everything visible now (one poll of up to 100)."""
    return client.get(f"{API}/packets/pending?limit=100").json["packets"]


def delivery_counts(app, ids) -> dict[str, int]:
    """Each packet's delivery count as stored."""
    with app.app_context():
        rows = db.session.execute(
            select(T.c.packet_id, T.c.delivery_count).where(T.c.packet_id.in_(ids))
        ).all()
        db.session.commit()
    return dict(rows)


def set_rows(app, ids, **values):
    """Change rows by hand; a state change is followed by a recount, as the README says."""
    with app.app_context():
        db.session.execute(update(T).where(T.c.packet_id.in_(ids)).values(**values))
        db.session.commit()
        if "delivery_state" in values:
            recount()


def row_states(app):
    with app.app_context():
        rows = dict(db.session.execute(select(T.c.packet_id, T.c.delivery_state)).all())
        db.session.commit()
        return rows


def test_every_option_has_help(app):
    """Each bucket command and option documents itself (kebab-case names)."""
    group = app.cli.commands["bucket"]
    assert set(group.commands) >= {
        "stats",
        "requeue",
        "replay",
        "purge",
        "rebuild-queue",
        "recount",
    }
    for name, command in group.commands.items():
        assert command.help, name
        for param in command.params:
            assert getattr(param, "help", None), (name, param.name)
            assert "_" not in param.opts[0], (name, param.opts)


def test_stats_prints_the_status_figures(client, runner):
    """stats: one aligned line per status figure."""
    ingest(client, 3)
    result = runner.invoke(args=["bucket", "stats"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["total_packets"] == "3" and lines["queue_size"] == "3"
    assert "consumer_auth" in lines


def test_purge_with_dry_run_then_for_real(app, client, runner):
    """purge --dry-run counts; purge deletes old processed packets in batches, keeps dead ones
    (by rows: SQLite's way, and PostgreSQL's with --by-rows)."""
    old = ingest(client, 3)
    process_all(client)
    dead = ingest(client, 1)
    set_rows(app, dead, delivery_state=DeliveryState.DEAD)
    set_rows(app, old + dead, visible_at=time.time() - 40 * DAY)
    dry = runner.invoke(args=["bucket", "purge", "--by-rows", "--dry-run"])
    assert dry.exit_code == 0 and "would purge 3 processed packets" in dry.output
    assert len(row_states(app)) == 4
    real = runner.invoke(args=["bucket", "purge", "--by-rows", "--batch-size", "2"])
    assert real.exit_code == 0 and "purged 3 processed packets" in real.output
    assert "in 2 batches" in real.output
    assert list(row_states(app)) == dead
    gone = runner.invoke(
        args=["bucket", "purge", "--by-rows", "--include-dead", "--older-than-days", "30"]
    )
    assert "purged 1 processed and dead packets" in gone.output
    assert row_states(app) == {}


def test_purge_refuses_a_negative_age(runner):
    """Bad option values are usage errors, not stack traces."""
    result = runner.invoke(args=["bucket", "purge", "--older-than-days", "-1"])
    assert result.exit_code == 2


def test_replay_puts_one_users_packets_back_in_the_queue(app, client, runner):
    """replay --user: that user's processed packets in the range are served again, others not."""
    mine = ingest(client, 2, user_id="replayed")
    other = ingest(client, 1, user_id="someone-else")
    process_all(client)
    result = runner.invoke(
        args=["bucket", "replay", "--user", "replayed", "--since", "2000-01-01T00:00:00"]
    )
    assert result.exit_code == 0 and "replayed 2 packets of user replayed" in result.output
    served = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    assert sorted(p["packet_id"] for p in served) == sorted(mine)
    assert row_states(app)[other[0]] == DeliveryState.PROCESSED
    empty = runner.invoke(args=["bucket", "replay", "--user", "replayed", "--until", "2000-01-01"])
    assert "replayed 0 packets" in empty.output


def test_replay_needs_a_user_and_valid_times(runner):
    """replay without --user, or with a bad time, is a usage error."""
    assert runner.invoke(args=["bucket", "replay"]).exit_code == 2
    bad = runner.invoke(args=["bucket", "replay", "--user", "u", "--since", "yesterday"])
    assert bad.exit_code == 2 and "ISO-8601" in bad.output


def test_requeue_brings_dead_packets_back(app, client, runner):
    """requeue --user: dead packets of that user are pending again with fresh attempts."""
    dead = ingest(client, 2, user_id="unlucky")
    set_rows(app, dead, delivery_state=DeliveryState.DEAD, delivery_count=5)
    result = runner.invoke(args=["bucket", "requeue", "--user", "unlucky"])
    assert result.exit_code == 0 and "requeued 2 packets" in result.output
    assert set(row_states(app).values()) == {DeliveryState.PENDING}
    assert set(delivery_counts(app, dead).values()) == {0}, "attempts start over"
    served = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    assert sorted(p["packet_id"] for p in served) == sorted(dead)


def test_requeue_include_retrying_ends_back_offs_now(app, client, runner):
    """--include-retrying also makes packets waiting out a back-off visible, attempts reset;
    without it they keep waiting."""
    dead = ingest(client, 1, user_id="mixed")
    retrying = ingest(client, 1, user_id="mixed")
    set_rows(app, dead, delivery_state=DeliveryState.DEAD, delivery_count=5)
    set_rows(app, retrying, delivery_count=2, visible_at=time.time() + 3600)
    plain = runner.invoke(args=["bucket", "requeue"])
    assert "requeued 1 packets" in plain.output
    assert [p["packet_id"] for p in poll_all(client)] == dead
    set_rows(app, dead, delivery_state=DeliveryState.DEAD, delivery_count=5)
    wider = runner.invoke(args=["bucket", "requeue", "--include-retrying"])
    assert wider.exit_code == 0 and "requeued 2 packets" in wider.output
    assert sorted(p["packet_id"] for p in poll_all(client)) == sorted(dead + retrying)
    assert set(delivery_counts(app, dead + retrying).values()) == {1}  # reset, then leased once


def test_replay_serves_dead_and_retrying_packets_and_leaves_leased_ones(app, client, runner):
    """replay covers processed, dead and retrying packets of the user; a leased one stays with
    its consumer (its receipt still acknowledges it)."""
    processed, dead, retrying, leased = ingest(client, 4, user_id="replay-all")
    leases = {p["packet_id"]: p for p in poll_all(client)}
    ack = f"{API}/packets/mark-processed"
    assert client.post(ack, json={"packet_id": processed, "success": True}).status_code == 200
    set_rows(app, [dead], delivery_state=DeliveryState.DEAD)
    set_rows(app, [retrying], delivery_state=DeliveryState.PENDING, visible_at=time.time() + 3600)
    result = runner.invoke(args=["bucket", "replay", "--user", "replay-all"])
    assert result.exit_code == 0 and "replayed 3 packets" in result.output
    assert row_states(app)[leased] == DeliveryState.LEASED
    served = sorted(p["packet_id"] for p in poll_all(client))
    assert served == sorted([processed, dead, retrying])
    receipt = leases[leased]["receipt"]
    done = client.post(ack, json={"packet_id": leased, "success": True, "receipt": receipt})
    assert done.status_code == 200


def test_rebuild_queue_wakes_polls_that_are_waiting(make_app):
    """A packet that reached the table without an announcement (restored from a backup, a
    lost wake-up) is handed to a waiting poll as soon as rebuild-queue runs."""
    app = make_app(BUCKET_LONG_POLL_INTERVAL=30)  # only a wake-up can end the wait early
    client = app.test_client()
    packet_id = ingest(client, 1, user_id="silent")[0]
    set_rows(app, [packet_id], visible_at=time.time() + 3600)  # not visible to the first look
    waiter = Waiter(app, 15)
    started = time.monotonic()
    waiter.start()
    wait_until_listening(app)
    set_rows(app, [packet_id], visible_at=time.time() - 1)  # visible, and nobody announced it
    assert app.test_cli_runner().invoke(args=["bucket", "rebuild-queue"]).exit_code == 0
    join_all([waiter], 20, "long poll")
    assert [p["packet_id"] for p in waiter.body["packets"]] == [packet_id]
    assert waiter.returned_at - started < 10, "the waiting poll was not woken"


def test_rebuild_queue_dead_letters_exhausted_leases_and_reports(app, client, runner):
    """rebuild-queue: exhausted expired leases die now; the rest is reported, polls can take it."""
    ids = ingest(client, 4)
    leased = client.get(f"{API}/packets/pending?limit=2").json["packets"]
    exhausted, expired = sorted(p["packet_id"] for p in leased)
    past = time.time() - 5
    set_rows(app, [exhausted], visible_at=past, delivery_count=app.config["BUCKET_MAX_ATTEMPTS"])
    set_rows(app, [expired], visible_at=past)
    result = runner.invoke(args=["bucket", "rebuild-queue"])
    assert result.exit_code == 0, result.output
    report = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert report["dead_lettered"] == "1"
    assert report["expired_leases"] == "1"
    assert report["ready"] == "2"
    assert report["leased"] == "0"
    assert row_states(app)[exhausted] == DeliveryState.DEAD
    served = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    assert served and all(p["packet_id"] in ids for p in served)


def test_shell_context_keeps_the_operator_helpers(app):
    """flask shell still pre-loads db, the model, the queue and the service functions."""
    with app.app_context():
        context = app.make_shell_context()
    for name in ("db", "Packet", "queue", "stats", "requeue", "claim", "acknowledge"):
        assert name in context
