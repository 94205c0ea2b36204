"""Operator commands: ``flask bucket stats|requeue|replay|purge|rebuild-queue|recount|book``,
``flask bucket seal|verify``, ``flask bucket partitions list|ensure|compact|backfill-keys`` and
``flask bucket quarantine list|show|replay|purge``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
from flask import current_app
from flask.cli import AppGroup

from bucket.models import DeliveryState
from bucket.services import delivery, partitions, quarantine
from bucket.services.audit.sealing import seal_everything
from bucket.services.audit.verification import verify
from bucket.services.bookkeeping import book_new_packets
from bucket.services.compaction import DEFAULT_LOCK_TIMEOUT, compact_partitions
from bucket.services.counters import recount
from bucket.services.retention import DayPurgeReport, purge_days, purge_rows
from bucket.services.stats import collect_stats

bucket_cli = AppGroup(
    "bucket",
    help="Inspect and repair the packet queue. Daily from cron: `purge`, then (PostgreSQL) "
    "`partitions compact`, which packs the indexes of the days that ended.",
)


def parse_moment(value: str | None) -> datetime | None:
    """Parse an ISO-8601 option value, in UTC; naive means UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time") from exc
    if not moment.tzinfo:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError as exc:  # year 1 with a positive offset, year 9999 with a negative one
        raise click.BadParameter(f"{value!r} is not a moment UTC can hold") from exc


def echo_table(figures: dict) -> None:
    """Print name/value pairs as two aligned columns."""
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        click.echo(f"{name:<{width}}  {value}")


@bucket_cli.command("stats")
def stats_command() -> None:
    """Print the status figures as a table."""
    echo_table(collect_stats().as_dict())


@bucket_cli.command("requeue")
@click.option("--user", "user_id", help="Only this user's packets.")
@click.option("--since", help="Only packets received at or after this ISO-8601 time.")
@click.option("--until", help="Only packets received before this ISO-8601 time.")
@click.option(
    "--include-retrying",
    is_flag=True,
    help="Also make packets waiting out a retry back-off visible now.",
)
def requeue_command(
    user_id: str | None, since: str | None, until: str | None, include_retrying: bool
) -> None:
    """Put dead (and optionally retrying) packets back in the queue with fresh attempts."""
    states = (DeliveryState.DEAD,)
    if include_retrying:
        states = (DeliveryState.DEAD, DeliveryState.PENDING)
    count = delivery.requeue(states, user_id, parse_moment(since), parse_moment(until))
    click.echo(f"requeued {count} packets")


@bucket_cli.command("replay")
@click.option("--user", "user_id", required=True, help="The user whose packets to replay.")
@click.option("--since", help="Only packets received at or after this ISO-8601 time.")
@click.option("--until", help="Only packets received before this ISO-8601 time.")
def replay_command(user_id: str, since: str | None, until: str | None) -> None:
    """Serve one user's packets again: processed, dead and retrying ones become pending now.

    Packets leased right now are left to their consumer. Karma Tracker receives the replayed
    packets as new deliveries and records its outcome again.
    """
    states = (DeliveryState.PROCESSED, DeliveryState.DEAD, DeliveryState.PENDING)
    count = delivery.requeue(states, user_id, parse_moment(since), parse_moment(until))
    click.echo(f"replayed {count} packets of user {user_id}")


@bucket_cli.command("purge")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    help="Age in days (default BUCKET_RETENTION_DAYS): of the day received on PostgreSQL, "
    "since processing by rows.",
)
@click.option("--include-dead", is_flag=True, help="Also purge dead packets past that age.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Rows deleted per transaction (default BUCKET_PURGE_BATCH_SIZE).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be purged; purge nothing.")
@click.option(
    "--by-rows",
    is_flag=True,
    help="PostgreSQL: delete old processed packets in batches instead of dropping whole days "
    "(e.g. the processed packets of a day kept for an unfinished one). SQLite always does.",
)
def purge_command(
    older_than_days: float | None,
    include_dead: bool,
    batch_size: int | None,
    dry_run: bool,
    by_rows: bool,
) -> None:
    """Purge packets older than the retention period.

    PostgreSQL drops whole days (their partitions) received more than that long ago, after
    sealing them and recording their seq ranges in the audit log; a day still holding an
    unfinished packet, or a dead one without --include-dead, is kept whole and named. SQLite
    (and --by-rows) deletes packets processed that long ago in short batches. Dead packets are
    kept unless --include-dead is given. Schedule this daily (a cron job running
    ``flask --app wsgi bucket purge``); it is safe beside live traffic.
    """
    config = current_app.config
    days = config["BUCKET_RETENTION_DAYS"] if older_than_days is None else older_than_days
    batch_size = batch_size or config["BUCKET_PURGE_BATCH_SIZE"]
    if partitions.partitioned() and not by_rows:
        day_report = purge_days(days, include_dead, batch_size, dry_run)
        echo_day_purge(day_report)
        for name, reason in day_report.undropped:
            click.echo(
                f"could not drop {name}: {reason}; it stays detached (no read sees it) and "
                "the next purge drops it",
                err=True,
            )
        if day_report.undropped:
            raise SystemExit(1)
        return
    report = purge_rows(days, include_dead=include_dead, batch_size=batch_size, dry_run=dry_run)
    states = " and ".join(report.states)
    cutoff = report.cutoff.isoformat()
    if report.dry_run:
        click.echo(f"would purge {report.packets} {states} packets older than {cutoff}")
    else:
        click.echo(
            f"purged {report.packets} {states} packets older than {cutoff} "
            f"in {report.batches} batches"
        )


def echo_day_purge(report: DayPurgeReport) -> None:
    """One line per day dropped or kept, then the totals."""
    verb = "would drop" if report.dry_run else "dropped"
    for day in report.dropped:
        click.echo(
            f"{verb} {day.partition}: {day.packets} packets ({day.dead} dead), "
            f"{day.ranges} seq ranges recorded in the audit log"
        )
    for day in report.kept:
        click.echo(f"kept {day.partition}: {day.kept}")
    for keys in report.key_days:
        click.echo(
            f"kept {keys.partition}: {keys.kept}" if keys.kept else f"{verb} {keys.partition}"
        )
    if report.default_keys:
        click.echo(f"removed {report.default_keys} keys of purged packets from the default")
    verb = "would purge" if report.dry_run else "purged"
    click.echo(
        f"{verb} {report.packets} packets in {len(report.dropped)} days received before "
        f"{report.cutoff.isoformat()}; {len(report.kept)} days kept"
    )


@bucket_cli.command("rebuild-queue")
def rebuild_queue_command() -> None:
    """Rebuild the queue from the database and wake every waiting poll.

    Dead-letters packets whose last allowed lease expired, reports what is ready, retrying,
    leased and awaiting redelivery, and announces readiness on the queue service.
    """
    echo_table(delivery.rebuild_queue().as_dict())


@bucket_cli.command("recount")
def recount_command() -> None:
    """Recount stored, processed and dead packets from the table and reset the counters.

    The counters are kept exact by every ack, replay, purge and booking; run this after
    changing rows by hand in SQL, or after a deploy during which an older version (without
    the counters) still answered acks. It reads every row, so it takes a while on a big table.
    """
    figures = recount()
    click.echo(
        f"stored packets: {figures['stored']}, processed packets: {figures['processed']}, "
        f"dead packets: {figures['dead']}"
    )


@bucket_cli.command("book")
def book_command() -> None:
    """Book the packets stored since the last booking now (the workers do it every
    BUCKET_BOOKKEEPING_INTERVAL seconds)."""
    booking = book_new_packets()
    if booking is None:
        click.echo("another bookkeeper is booking right now; nothing done")
    else:
        click.echo(f"booked {booking.packets} packets (seq {booking.after + 1}..{booking.through})")


partitions_cli = AppGroup(
    "partitions",
    help="The day partitions of packets and of their keys (PostgreSQL): list, ensure, "
    "compact past days' indexes, backfill keys.",
)
bucket_cli.add_command(partitions_cli)


@partitions_cli.command("list")
def partitions_list_command() -> None:
    """List the partitions of packets, of processed deliveries, then of packet keys (oldest
    first, estimated rows), and the rows in each default partition."""
    if not partitions.partitioned():
        click.echo("SQLite keeps one packets table: no partitions")
        return
    for parent in ("packets", partitions.PROCESSED, partitions.KEYS):
        for part in partitions.partitions(parent):
            start = part.start.date().isoformat() if part.start else "-"
            end = part.end.date().isoformat() if part.end else "-"
            click.echo(f"{part.name}\t{start}\t{end}\t~{part.estimated_rows} rows")
    held_packets, held_deliveries, held_keys = partitions.defaults_held()
    click.echo(
        f"default partitions: {held_packets} packets, {held_deliveries} processed deliveries, "
        f"{held_keys} packet keys; days ahead: {partitions.days_ahead()}"
    )


@partitions_cli.command("ensure")
@click.option(
    "--days-ahead",
    type=click.IntRange(min=0),
    help="Days after today to cover (default BUCKET_PARTITION_DAYS_AHEAD).",
)
def partitions_ensure_command(days_ahead: int | None) -> None:
    """Create the day partitions up to N days ahead and move any packets out of the default
    partition into their own day's (the workers do it every few minutes)."""
    if not partitions.partitioned():
        click.echo("SQLite keeps one packets table: nothing to do")
        return
    done = partitions.ensure_partitions(days_ahead)
    for name in done.created:
        moved = done.moved.get(name)
        click.echo(
            f"created {name}" + (f" ({moved} packets moved from the default)" if moved else "")
        )
    if done.skipped:
        click.echo(f"not finished: {done.skipped}; try again")
        raise SystemExit(1)
    click.echo(
        f"{len(done.created)} partitions created; days ahead: {partitions.days_ahead()}; "
        f"default partition: {partitions.default_rows()} packets"
    )


@partitions_cli.command("compact")
@click.option(
    "--days-back",
    type=click.IntRange(min=1),
    help="Only the days that ended within the last N days (default: every past day still "
    "kept); keys and processed deliveries, settled a day later, need 2 or more.",
)
@click.option("--dry-run", is_flag=True, help="Name the indexes it would rebuild; rebuild none.")
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_LOCK_TIMEOUT,
    show_default=True,
    help="Seconds a rebuild may wait for a lock (or a transaction in flight) before it stops.",
)
def partitions_compact_command(days_back: int | None, dry_run: bool, lock_timeout: float) -> None:
    """Rebuild packed the indexes of past days, one at a time, without blocking ingest.

    Every b-tree index of each day partition of packets whose day ended, of each day of
    packet_keys a day after it ended, and of each day of processed deliveries a day after it
    ended once none of its packets is pending or leased, is rebuilt once at fillfactor 100
    with REINDEX INDEX CONCURRENTLY: the user indexes and the keys' primary key grow
    half-full while their day is written, the others keep a tenth of each page free for
    inserts a past day no longer takes (a comment on the index and its fillfactor record the
    rebuild, so the next run skips it). --days-back counts from each day's end: keys and
    processed deliveries need 2 or more. A rebuild that waits longer than --lock-timeout for
    a lock (a long transaction, a purge's detach) is undone and the run stops with exit 1;
    the next run goes on. Schedule it daily after the purge (``flask --app wsgi bucket partitions
    compact``): each rebuild reads its whole day, so it takes longer the more packets a day
    holds (never in the workers' maintenance). PostgreSQL only.
    """
    done = compact_partitions(days_back, dry_run, lock_timeout)
    if done is None:
        click.echo("SQLite keeps one packets table: nothing to compact")
        return
    for name in done.dropped_leftovers:
        click.echo(f"dropped {name}: the copy left by a rebuild that gave up")
    for index in done.indexes:
        if index.outcome == "compacted":
            click.echo(
                f"compacted {index.index} ({index.partition}): {index.before:,} -> "
                f"{index.after:,} bytes"
            )
        elif index.outcome == "would compact":
            click.echo(f"would compact {index.index} ({index.partition}): {index.before:,} bytes")
    compacted = done.having("compacted")
    before = sum(index.before for index in compacted)
    after = sum(index.after or 0 for index in compacted)
    already = len(done.having("already compacted"))
    if dry_run:
        waiting = done.having("would compact")
        click.echo(
            f"would compact {len(waiting)} indexes ({sum(i.before for i in waiting):,} bytes); "
            f"{already} compacted already"
        )
    else:
        click.echo(
            f"compacted {len(compacted)} indexes: {before:,} -> {after:,} bytes; "
            f"{already} compacted already"
        )
    if done.stopped:
        click.echo(f"not finished: {done.stopped}; the next run goes on")
        raise SystemExit(1)


@partitions_cli.command("backfill-keys")
@click.option("--since", required=True, help="Packets received at or after this ISO-8601 time.")
def partitions_backfill_keys_command(since: str) -> None:
    """Add the missing key rows of packets stored by the previous version while migration
    0012 rolled out, so a copy of one of them sent later is a duplicate again."""
    added = partitions.backfill_keys(parse_moment(since))
    if added is None:
        click.echo("SQLite keeps the keys on the packets table: nothing to do")
    else:
        click.echo(f"added {added} missing packet keys")


quarantine_cli = AppGroup("quarantine", help="See, replay and purge refused packets.")
bucket_cli.add_command(quarantine_cli)


def quarantine_filters(function):
    """The options that choose entries, shared by list, replay and purge."""
    for option in reversed(
        (
            click.option("--user", "user_id", help="Only entries naming this user."),
            click.option("--origin", help="Only entries from this Origin."),
            click.option("--field", help="Only entries refused for this field."),
            click.option("--since", help="Only entries last seen at or after this time."),
            click.option("--until", help="Only entries last seen before this time."),
        )
    ):
        function = option(function)
    return function


def filters_of(user_id, origin, field, since, until) -> quarantine.Filters:
    return quarantine.Filters(user_id, origin, field, parse_moment(since), parse_moment(until))


@quarantine_cli.command("list")
@quarantine_filters
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Entries shown."
)
def quarantine_list_command(user_id, origin, field, since, until, limit: int) -> None:
    """List refused packets, newest first: id, copies, last seen, user, refused fields."""
    rows, more = quarantine.entries(filters_of(user_id, origin, field, since, until), limit)
    for row in rows:
        fields = ",".join(sorted(row.errors)) if isinstance(row.errors, dict) else "?"
        click.echo(
            f"{row.id}\t{row.seen_count}x\t{row.last_seen_at.isoformat()}\t"
            f"{row.user_id or '-'}\t{fields}"
        )
    held, size = quarantine.totals()
    click.echo(
        f"{len(rows)} shown{' (more: raise --limit)' if more else ''}; {held} held, {size} bytes"
    )


@quarantine_cli.command("show")
@click.argument("entry_id", type=int)
def quarantine_show_command(entry_id: int) -> None:
    """Print one refused packet whole, as JSON."""
    from bucket.api.presenters import quarantine_entry_out

    row = quarantine.entry(entry_id)
    if row is None:
        raise click.ClickException(f"no quarantine entry {entry_id}")
    click.echo(json.dumps(quarantine_entry_out(row._mapping), indent=2, default=str))


@quarantine_cli.command("replay")
@click.argument("entry_ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every entry matching filters.")
@quarantine_filters
@click.option(
    "--limit", type=click.IntRange(min=1), default=500, show_default=True, help="Entries per chunk."
)
def quarantine_replay_command(
    entry_ids, replay_all: bool, user_id, origin, field, since, until, limit: int
) -> None:
    """Validate entries again under the rules in force and ingest those that pass.

    Name entries by id, or give --all (with optional filters). Packets that still fail stay
    in the quarantine with their new errors.
    """
    if bool(entry_ids) == replay_all:
        raise click.UsageError("name entry ids, or give --all")
    filters = filters_of(user_id, origin, field, since, until)
    total, after = quarantine.Replay(), None
    while True:  # in chunks of --limit, until every matching entry was looked at
        report = quarantine.replay(list(entry_ids) or None, filters, limit, after)
        for name in ("replayed", "ingested", "duplicates", "still_refused", "not_verified"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
        for item in report.results:
            if item["status"] == "not_verified":
                click.echo(f"kept {item['id']}: {item['reason']}")
        after = report.next_after
        if after is None:
            break
    click.echo(
        f"replayed {total.replayed}: ingested {total.ingested}, duplicates "
        f"{total.duplicates}, still refused {total.still_refused}, not verified "
        f"{total.not_verified}"
    )


@quarantine_cli.command("purge")
@quarantine_filters
@click.option(
    "--older-than-days", type=click.FloatRange(min=0), help="Only entries not seen for this long."
)
@click.option("--yes", is_flag=True, help="Purge every entry when no filter is given.")
def quarantine_purge_command(
    user_id, origin, field, since, until, older_than_days: float | None, yes: bool
) -> None:
    """Delete refused packets for good (the bounds and retention drop old ones anyway)."""
    filters = filters_of(user_id, origin, field, since, until)
    if not filters.conditions() and older_than_days is None and not yes:
        raise click.UsageError("this would purge every entry: give a filter or --yes")
    count = quarantine.purge(filters, older_than_days)
    click.echo(f"purged {count} quarantine entries")


@bucket_cli.command("seal")
def seal_command() -> None:
    """Seal every packet stored so far into the audit log now (the workers do it every
    BUCKET_AUDIT_SEAL_INTERVAL seconds)."""
    made = seal_everything()
    if not made:
        click.echo("nothing to seal (or another sealer is at it)")
    for seal in made:
        click.echo(f"seal {seal.seq}: {seal.packet_count} packets, hash {seal.hash}")


@bucket_cli.command("verify")
@click.option("--since", help="Only seals made at or after this ISO-8601 time.")
def verify_command(since: str | None) -> None:
    """Recompute every seal from the stored rows and the chain; exit 1 on any problem.

    Names each packet altered, deleted or inserted behind the log's back, and each seal
    edited or missing. Packets the retention purge deleted are listed as purged, not as
    problems. Compare the head hash with a copy kept elsewhere (README, "The audit trail").
    """
    report = verify(parse_moment(since))
    for line in report.purged:
        click.echo(f"purged: {line}")
    for problem in report.problems:
        click.echo(f"PROBLEM {problem}")
    click.echo(
        f"checked {report.seals} seals and {report.packets} packets; "
        f"{len(report.purged)} purged by retention, {report.unsealed} not sealed yet, "
        f"{len(report.problems)} problems"
    )
    if not report.ok:
        raise SystemExit(1)
