"""The background bookkeeper: a thread per worker process that books new packets every few seconds
(seals new packets into the audit log every BUCKET_AUDIT_SEAL_INTERVAL seconds, and drops expired
quarantine entries once a minute).

Started by gunicorn's ``post_worker_init`` hook (``gunicorn.conf.py``), so neither tests,
``flask shell`` nor CLI commands run it unasked; ``flask bucket book`` does one round by hand.
Every worker of every instance runs one, and the database lets one book at a time
(``services/bookkeeping``), so a dead worker or instance is never missed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)
EXTENSION_KEY = "bucket.bookkeeper"
# Quarantine entries past BUCKET_QUARANTINE_RETENTION_DAYS are dropped this often (seconds).
QUARANTINE_EXPIRY_INTERVAL = 60.0


class BookkeeperState:
    """One application's bookkeeping thread and its pace."""

    def __init__(self, interval: float, seal_interval: float = 0.0) -> None:
        self.interval = interval
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.rounds = 0
        self.next_expiry = 0.0
        self.seal_interval = seal_interval
        self.next_seal = 0.0


class Bookkeeper:
    """Flask extension running ``book_new_packets`` in the background of a serving process."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION_KEY] = BookkeeperState(
            app.config["BUCKET_BOOKKEEPING_INTERVAL"], app.config["BUCKET_AUDIT_SEAL_INTERVAL"]
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
        from bucket.extensions import db
        from bucket.services import activity, quarantine
        from bucket.services.audit.sealing import seal_backlog
        from bucket.services.bookkeeping import book_new_packets

        while not state.stop.wait(state.interval):
            started = time.monotonic()
            with app.app_context():
                try:
                    book_new_packets()
                    if state.seal_interval > 0 and time.monotonic() >= state.next_seal:
                        state.next_seal = time.monotonic() + state.seal_interval
                        seal_backlog()
                    if time.monotonic() >= state.next_expiry:
                        state.next_expiry = time.monotonic() + QUARANTINE_EXPIRY_INTERVAL
                        quarantine.expire()
                        activity.prune()
                except SQLAlchemyError as exc:  # the database is away: try again next round
                    log.warning("bookkeeping failed: %s", exc.__class__.__name__)
                except Exception:  # noqa: BLE001 - a bug must not end the thread
                    log.exception("bookkeeping failed")
                finally:
                    db.session.remove()
            state.rounds += 1
            log.debug("bookkeeping round took %.1f ms", (time.monotonic() - started) * 1000)
