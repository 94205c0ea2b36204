"""Operator commands: ``flask bucket stats|requeue|replay|purge|rebuild-queue|recount|book``."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from flask import current_app
from flask.cli import AppGroup

from bucket.models import DeliveryState
from bucket.services import delivery
from bucket.services.bookkeeping import book_new_packets
from bucket.services.counters import recount
from bucket.services.retention import purge
from bucket.services.stats import collect_stats

bucket_cli = AppGroup("bucket", help="Inspect and repair the packet queue.")


def parse_moment(value: str | None) -> datetime | None:
    """Parse an ISO-8601 option value; naive means UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
    help="Age in days after processing (default BUCKET_RETENTION_DAYS).",
)
@click.option("--include-dead", is_flag=True, help="Also delete dead packets past that age.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Rows deleted per transaction (default BUCKET_PURGE_BATCH_SIZE).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def purge_command(
    older_than_days: float | None, include_dead: bool, batch_size: int | None, dry_run: bool
) -> None:
    """Delete processed packets older than the retention period, in short batches.

    Dead packets are kept unless --include-dead is given. Schedule this daily (a cron job
    running ``flask --app wsgi bucket purge``); it is safe beside live traffic.
    """
    config = current_app.config
    days = config["BUCKET_RETENTION_DAYS"] if older_than_days is None else older_than_days
    report = purge(
        days,
        include_dead=include_dead,
        batch_size=batch_size or config["BUCKET_PURGE_BATCH_SIZE"],
        dry_run=dry_run,
    )
    states = " and ".join(report.states)
    cutoff = report.cutoff.isoformat()
    if report.dry_run:
        click.echo(f"would purge {report.packets} {states} packets older than {cutoff}")
    else:
        click.echo(
            f"purged {report.packets} {states} packets older than {cutoff} "
            f"in {report.batches} batches"
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
