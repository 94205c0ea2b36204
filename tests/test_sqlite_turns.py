"""SQLite's writers take turns (bucket/sqlite_turns.py): across threads and forked workers, none
waits on SQLite's busy polling, and every way a transaction ends hands the turn on."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from bucket.sqlite_turns import TurnTakingConnection, turns_for
from tests.concurrency import run_threads

WORKERS = 2
THREADS = 8
TRANSACTIONS = 40


def connect(path: str, busy_timeout: float) -> TurnTakingConnection:
    connection = sqlite3.connect(
        path,
        timeout=busy_timeout,
        isolation_level=None,
        check_same_thread=False,
        factory=TurnTakingConnection,
    )
    connection.turns = turns_for(path)
    return connection


def write_in_turns(path: str, worker: int) -> None:
    """A worker's threads each commit TRANSACTIONS inserts, each a read and a write."""

    def thread_body(thread: int) -> None:
        connection = connect(path, busy_timeout=0.05)
        try:
            for n in range(TRANSACTIONS):
                connection.begin_immediate()
                (count,) = connection.execute("SELECT count(*) FROM writes").fetchone()
                connection.execute(
                    "INSERT INTO writes (worker, thread, n, seen) VALUES (?, ?, ?, ?)",
                    (worker, thread, n, count),
                )
                connection.commit()
        finally:
            connection.close()

    run_threads(THREADS, thread_body, timeout=60)


@pytest.fixture
def database(tmp_path) -> str:
    path = str(tmp_path / "turns.sqlite3")
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(
        "CREATE TABLE writes (worker INTEGER, thread INTEGER, n INTEGER, seen INTEGER, "
        "PRIMARY KEY (worker, thread, n))"
    )
    setup.close()
    return path


def test_forked_workers_and_their_threads_write_in_turn_without_busy_waits(database):
    """With a busy timeout of 50 ms, any writer that met SQLite's lock held by another would
    fail with "database is locked"; taking turns, all 640 transactions commit, each seeing
    every one committed before it."""
    turns_for(database)  # opened before the fork, as when a worker inherits the app's module
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_in_turns, args=(database, w)) for w in range(WORKERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * WORKERS

    check = sqlite3.connect(database)
    rows = check.execute("SELECT seen FROM writes ORDER BY seen").fetchall()
    check.close()
    total = WORKERS * THREADS * TRANSACTIONS
    # Serialised: the k-th transaction to commit saw exactly the k before it.
    assert [seen for (seen,) in rows] == list(range(total))


@pytest.mark.parametrize("ending", ["commit", "rollback", "close", "failed statement"])
def test_every_end_of_a_transaction_hands_the_turn_on(database, ending):
    turns = turns_for(database)
    first = connect(database, busy_timeout=0.05)
    first.begin_immediate()
    assert turns._threads.locked()
    if ending == "failed statement":
        with pytest.raises(sqlite3.OperationalError):
            first.execute("INSERT INTO no_such_table VALUES (1)")
        first.rollback()
    else:
        getattr(first, ending)()
    assert not turns._threads.locked()

    # The next writer, in another thread, gets its turn at once.
    second = connect(database, busy_timeout=0.05)
    started = threading.Event()

    def begin_and_commit(_index: int) -> None:
        second.begin_immediate()
        started.set()
        second.commit()

    run_threads(1, begin_and_commit, timeout=5)
    assert started.is_set()
    second.close()
    if ending != "close":
        first.close()


def test_a_begin_inside_a_transaction_fails_and_keeps_the_turn_until_the_end(database):
    turns = turns_for(database)
    connection = connect(database, busy_timeout=0.05)
    connection.begin_immediate()
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        connection.begin_immediate()
    assert turns._threads.locked()  # the first transaction is still open
    connection.rollback()
    assert not turns._threads.locked()
    connection.close()


def test_an_in_memory_database_has_no_turns():
    assert turns_for(":memory:") is None
    assert turns_for("") is None
