"""Operator commands: ``flask bucket stats``, ``requeue``, ``rebuild-queue``."""

from __future__ import annotations

from datetime import datetime, timezone

import click
from flask.cli import AppGroup

from bucket.models import DeliveryState
from bucket.services import delivery
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
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@bucket_cli.command("stats")
def stats_command() -> None:
    """Print the status figures as a table."""
    figures = collect_stats().as_dict()
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        click.echo(f"{name:<{width}}  {value}")


@bucket_cli.command("requeue")
@click.option("--user", "user_id", help="Only this user's packets.")
@click.option("--since", help="Only packets received at or after this ISO-8601 time.")
@click.option("--until", help="Only packets received before this ISO-8601 time.")
@click.option(
    "--include-retrying",
    is_flag=True,
    help="Also make packets waiting out a retry back-off visible now.",
)
def requeue_command(user_id: str | None, since: str | None, until: str | None,
                    include_retrying: bool) -> None:
    """Put dead (and optionally retrying) packets back in the queue with fresh attempts."""
    states = (DeliveryState.DEAD,)
    if include_retrying:
        states = (DeliveryState.DEAD, DeliveryState.PENDING)
    count = delivery.requeue(states, user_id, parse_moment(since), parse_moment(until))
    click.echo(f"requeued {count} packets")
