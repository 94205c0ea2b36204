"""The background bookkeeper: a thread per worker process that runs the service's periodic work.

It knows nothing of that work: the application factory hands it the tasks (book new packets,
seal them into the audit log, drop expired quarantine entries and old roll-ups), each with its
own period, and the thread runs every due task in the order given, once per round.

Started by gunicorn's ``post_worker_init`` hook (``gunicorn.conf.py``), so neither tests,
``flask shell`` nor CLI commands run it unasked; ``flask bucket book`` does one round by hand.
Every worker of every instance runs one, and the database lets one book at a time
(``services/bookkeeping``), so a dead worker or instance is never missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)
EXTENSION_KEY = "bucket.bookkeeper"


@dataclass(frozen=True)
class PeriodicTask:
    """One piece of background work: ``run`` every ``every`` seconds (0: every round).

    A task whose period is negative is left out (its feature is switched off)."""

    name: str
    run: Callable[[], object]
    every: float = 0.0


class BookkeeperState:
    """One application's bookkeeping thread, its pace and its tasks."""

    def __init__(self, interval: float, tasks: Sequence[PeriodicTask]) -> None:
        self.interval = interval
        self.tasks = [task for task in tasks if task.every >= 0]
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.rounds = 0
        self.next_run = dict.fromkeys((task.name for task in self.tasks), 0.0)


class Bookkeeper:
    """Flask extension running periodic tasks in the background of a serving process."""

    def __init__(self, app: Flask | None = None, tasks: Sequence[PeriodicTask] = ()) -> None:
        if app is not None:
            self.init_app(app, tasks)

    def init_app(self, app: Flask, tasks: Sequence[PeriodicTask] = ()) -> None:
        """Keep this app's tasks; the thread runs a round every BUCKET_BOOKKEEPING_INTERVAL s."""
        app.extensions[EXTENSION_KEY] = BookkeeperState(
            app.config["BUCKET_BOOKKEEPING_INTERVAL"], tasks
        )

    def start(self, app: Flask) -> None:
        """Start this process's thread (idempotent); a zero interval disables it."""
        state: BookkeeperState = app.extensions[EXTENSION_KEY]
        if state.interval <= 0 or (state.thread is not None and state.thread.is_alive()):
            return
        state.stop.clear()
        state.thread = threading.Thread(
            target=self._run, args=(app, state), name="bucket-bookkeeper", daemon=True
        )
        state.thread.start()

    def stop(self, app: Flask, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it."""
        state: BookkeeperState = app.extensions[EXTENSION_KEY]
        state.stop.set()
        if state.thread is not None:
            state.thread.join(timeout)

    def _run(self, app: Flask, state: BookkeeperState) -> None:
        while not state.stop.wait(state.interval):
            started = time.monotonic()
            # Leaving the app context removes the database session (Flask-SQLAlchemy).
            with app.app_context():
                run_round(state)
            state.rounds += 1
            log.debug("bookkeeping round took %.1f ms", (time.monotonic() - started) * 1000)


def run_round(state: BookkeeperState) -> None:
    """Run every due task in order; a failure skips the rest of the round, as the later tasks
    build on the earlier ones (sealing stops at the bookkeeper's horizon)."""
    for task in state.tasks:
        now = time.monotonic()
        if now < state.next_run[task.name]:
            continue
        state.next_run[task.name] = now + task.every
        try:
            task.run()
        except SQLAlchemyError as exc:  # the database is away: try again next round
            log.warning("%s failed: %s", task.name, exc.__class__.__name__)
            return
        except Exception:  # noqa: BLE001 - a bug must not end the thread
            log.exception("%s failed", task.name)
            return
