"""SQLite's writers take turns (bucket/sqlite_turns.py): across threads and forked workers, none
waits on SQLite's busy polling, and every way a transaction ends hands the turn on."""

from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import sqlite3
import threading
import time

import pytest

from bucket import sqlite_turns
from bucket.sqlite_turns import TurnTakingConnection, turns_for
from tests.concurrency import run_threads, wait_until

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

    def begin_write_and_commit(index: int) -> None:
        second.begin_immediate()
        second.execute("INSERT INTO writes VALUES (1, ?, 0, 0)", (index,))
        second.commit()

    run_threads(1, begin_write_and_commit, timeout=5)
    assert second.execute("SELECT worker, thread FROM writes").fetchall() == [(1, 0)]
    assert not turns._threads.locked()
    second.close()
    if ending != "close":
        first.close()


def test_a_begin_refused_because_an_outside_connection_holds_the_lock_hands_the_turn_on(
    database,
):
    """A connection outside the turns (a plain sqlite3 shell, say) holds SQLite's write lock:
    the turn taker's ``BEGIN IMMEDIATE`` fails with "database is locked" after the busy timeout,
    and the turn it took is handed on, not kept for a transaction that never began."""
    turns = turns_for(database)
    outsider = sqlite3.connect(database, isolation_level=None)
    outsider.execute("BEGIN IMMEDIATE")
    connection = connect(database, busy_timeout=0.05)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            connection.begin_immediate()
        assert not connection.in_transaction
        assert not turns._threads.locked(), "the failed BEGIN kept the turn"
    finally:
        outsider.rollback()
        outsider.close()
    # Once the outsider is gone, the next writer gets in at once.
    connection.begin_immediate()
    connection.execute("INSERT INTO writes VALUES (0, 0, 0, 0)")
    connection.commit()
    assert not turns._threads.locked()
    connection.close()


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
    assert turns_for("file::memory:?cache=shared") is None  # a shared in-memory URI


def test_a_writer_held_up_by_another_process_gives_up_in_time_and_the_next_one_gets_in(database):
    """A blocking flock cannot time out; the wait goes to the keeper thread, and the writer
    waits for it only until its deadline. Then SQLite's busy timeout decides, as before."""
    turns = turns_for(database)
    other_process = os.open(turns.lock_path, os.O_RDWR)  # another open file: another holder
    fcntl.flock(other_process, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        assert turns.take(timeout=0.3) is False
        assert 0.25 < time.monotonic() - started < 5
        assert not turns._threads.locked()
    finally:
        fcntl.flock(other_process, fcntl.LOCK_UN)
        os.close(other_process)
    # The keeper, still waiting for the file on behalf of the writer that gave up, gets it,
    # finds no one waiting and lets it go, or hands it to the next writer.
    for _ in range(3):
        assert turns.take(timeout=5) is True
        generation = turns.generation
        turns.give_back(generation)
    # No turn is left with the keeper: another process gets the file at once.
    other_process = os.open(turns.lock_path, os.O_RDWR)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the keeper kept the file"
                time.sleep(0.01)
    finally:
        os.close(other_process)


def test_a_writer_waiting_for_another_process_gets_in_as_soon_as_it_lets_go(database):
    """The keeper thread waits for the file in the kernel's queue on the writer's behalf: when
    the other process lets go, the writer gets its turn at once, not at its deadline, and
    again and again for the writers after it."""
    turns = turns_for(database)
    for _ in range(2):
        other_process = os.open(turns.lock_path, os.O_RDWR)
        fcntl.flock(other_process, fcntl.LOCK_EX)
        release = threading.Timer(0.2, fcntl.flock, (other_process, fcntl.LOCK_UN))
        release.start()
        try:
            started = time.monotonic()
            assert turns.take(timeout=10) is True
            assert time.monotonic() - started < 3, "the writer waited for its deadline"
            assert turns._threads.locked()
        finally:
            release.join()
            os.close(other_process)
        turns.give_back(turns.generation)
        assert not turns._threads.locked()


def test_a_connection_collected_without_close_hands_the_turn_on(database):
    turns = turns_for(database)
    connection = connect(database, busy_timeout=0.05)
    connection.begin_immediate()
    assert turns._threads.locked()
    del connection
    gc.collect()
    assert not turns._threads.locked()


def test_a_commit_that_fails_keeps_the_turn_until_the_rollback(database):
    """A deferred foreign key checked at COMMIT fails it and leaves the transaction open."""
    turns = turns_for(database)
    connection = connect(database, busy_timeout=0.05)
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    connection.execute(
        "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id)"
        " DEFERRABLE INITIALLY DEFERRED)"
    )
    connection.begin_immediate()
    connection.execute("INSERT INTO child VALUES (42)")
    with pytest.raises(sqlite3.IntegrityError):
        connection.commit()
    assert connection.in_transaction
    assert turns._threads.locked()
    connection.rollback()
    assert not turns._threads.locked()
    connection.close()


def test_a_turn_taken_before_a_fork_is_not_given_back_by_the_child(database):
    """The child has locks of its own; ending a transaction inherited from the parent must
    neither fail nor release them."""
    turns = turns_for(database)
    connection = connect(database, busy_timeout=0.05)
    connection.begin_immediate()
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_end_inherited_transaction, args=(connection, turns))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert turns._threads.locked()  # the parent's turn is the parent's until it ends
    connection.rollback()
    assert not turns._threads.locked()
    connection.close()


def _end_inherited_transaction(connection, turns) -> None:
    connection.rollback()
    assert not turns._threads.locked()
    assert turns.take(timeout=0.2) is False  # the parent still holds the file
    assert not turns._threads.locked()


def test_a_forked_child_reopens_every_turn_even_after_one_whose_directory_is_gone(
    database, tmp_path
):
    """A turn registered for a database whose directory has since been deleted (a temporary
    one, say) cannot be reopened in a forked child; the turns registered after it still must
    be, or the child would share the parent's lock file and both would hold it at once."""
    gone = tmp_path / "gone"
    gone.mkdir()
    turns_for(str(gone / "old.sqlite3"))
    os.remove(gone / "old.sqlite3-turn.lock")
    gone.rmdir()
    later = str(tmp_path / "later.sqlite3")
    turns = turns_for(later)
    assert turns.take(timeout=1)
    try:
        context = multiprocessing.get_context("fork")
        child = context.Process(target=_end_inherited_then_take, args=(later, turns.generation))
        child.start()
        child.join(30)
        assert child.exitcode == 0  # the child could not take the file the parent holds
    finally:
        turns.give_back(turns.generation)


def _end_inherited_then_take(path: str, generation: int) -> None:
    """In the child: end the transaction inherited from the parent, then try for a turn."""
    turns = turns_for(path)
    turns.give_back(generation)  # not this process's turn: must release nothing
    if turns.take(timeout=0.2):
        os._exit(3)
    os._exit(0)


# The keeper's handover, step by step. A test holds the keeper at a gate right after its
# blocking flock returns (the file is then this process's, the keeper's flags not yet updated),
# so that a writer can arrive in exactly that window; every wait below has a deadline and fails
# with a message instead of hanging.


class KeeperGate:
    """Stands in for the module's ``fcntl``: every lock operation is the real one, but the
    keeper's blocking wait for the file (the only ``LOCK_EX`` without ``LOCK_NB``), once it has
    the file, waits until the test opens the gate."""

    LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

    def __init__(self) -> None:
        self.keeper_has_file = threading.Event()
        self.opened = threading.Event()

    def flock(self, fd: int, operation: int) -> None:
        fcntl.flock(fd, operation)
        if operation == fcntl.LOCK_EX:
            self.keeper_has_file.set()
            assert self.opened.wait(30), "the test never opened the gate"


def held_by_another_process(path: str):
    """An open file of its own on the lock file, holding it (as another worker would)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def let_go(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def free_for_another_process(path: str) -> bool:
    """Whether another process could take the file at once (taken and given back if so)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the open file lets go of a lock taken on it
    return True


def keeper_idle(turns) -> bool:
    """The keeper is back waiting for a writer to want the file (or has died, which the
    caller's next assertion then shows)."""
    if not turns._keeper.is_alive():
        return True
    with turns._handover:
        # Inside Condition.wait the keeper is one of the condition's waiters; no writer waits
        # for it when this is asked.
        return bool(turns._handover._waiters) and not turns._wanted


def test_a_writer_that_gave_up_leaves_the_file_free_once_the_other_process_lets_go(database):
    """The keeper gets the file on behalf of a writer that stopped waiting: it must let go of
    it, or every other process would wait for this one forever."""
    turns = turns_for(database)
    other_process = held_by_another_process(turns.lock_path)
    try:
        assert turns.take(timeout=0.1) is False
    finally:
        let_go(other_process)
    wait_until(lambda: keeper_idle(turns), 10, "the keeper never came back to wait")
    assert turns._keeper.is_alive(), "the keeper died"
    assert free_for_another_process(turns.lock_path), "the keeper kept the file for no one"
    assert turns.take(timeout=0) is True
    turns.give_back(turns.generation)


def test_a_writer_arriving_while_the_keeper_waits_for_one_who_gave_up_gets_the_file_from_it(
    database, monkeypatch
):
    """A flock belongs to the open file: a writer that took it while the keeper was still
    waiting for it (or had just got it) would take the keeper's lock, which the keeper, finding
    no one waiting, then lets go of under the writer. The writer must wait for the keeper's
    handover instead, and then hold the file against other processes."""
    turns = turns_for(database)
    gate = KeeperGate()
    monkeypatch.setattr(sqlite_turns, "fcntl", gate)
    other_process = held_by_another_process(turns.lock_path)
    try:
        assert turns.take(timeout=0.1) is False  # gave up; the keeper still waits for it
    finally:
        let_go(other_process)
    assert gate.keeper_has_file.wait(10), "the keeper never got the file"

    taken: list[bool] = []
    writer = threading.Thread(target=lambda: taken.append(turns.take(timeout=30)), daemon=True)
    writer.start()
    wait_until(
        lambda: turns._wanted or taken, 10, "the writer neither waited for the keeper nor went on"
    )
    gate.opened.set()
    writer.join(30)
    assert taken == [True]
    wait_until(lambda: keeper_idle(turns), 10, "the keeper never came back to wait")
    assert not free_for_another_process(turns.lock_path), "the writer's turn holds no file"
    turns.give_back(turns.generation)
    assert free_for_another_process(turns.lock_path)


def test_a_free_turn_is_taken_at_once_with_no_time_to_wait_also_after_a_handover(database):
    """A free file is taken without the keeper, so even a writer with no time left gets it;
    the keeper's handover must not leave it believed to be waiting."""
    turns = turns_for(database)
    assert turns.take(timeout=0) is True
    turns.give_back(turns.generation)

    other_process = held_by_another_process(turns.lock_path)
    taken: list[bool] = []
    writer = threading.Thread(target=lambda: taken.append(turns.take(timeout=30)), daemon=True)
    try:
        writer.start()
        wait_until(lambda: turns._wanted, 10, "the writer never asked the keeper")
    finally:
        let_go(other_process)
    writer.join(30)
    assert taken == [True]
    turns.give_back(turns.generation)
    wait_until(lambda: keeper_idle(turns), 10, "the keeper never came back to wait")

    assert turns.take(timeout=0) is True
    turns.give_back(turns.generation)


def test_a_writer_that_waits_out_another_threads_turn_gets_none(database):
    turns = turns_for(database)
    assert turns.take(timeout=1) is True
    try:
        answers = run_threads(1, lambda index: turns.take(timeout=0.05), timeout=10)
        assert answers == [False]
    finally:
        turns.give_back(turns.generation)
    assert not turns._threads.locked()
    assert free_for_another_process(turns.lock_path)


def test_a_process_whose_writer_gave_up_can_exit_while_another_holds_the_file(database):
    """The keeper may wait for the file for ever; it must not keep its process from exiting
    (a worker being stopped while a ``flask shell`` holds a transaction, say). Python waits at
    exit for every thread but a daemon one; a forked child shows the exit itself."""
    turns = turns_for(database)
    other_process = held_by_another_process(turns.lock_path)
    try:
        assert turns.take(timeout=0.1) is False
        assert turns._keeper.daemon, "this process could not exit while its keeper waits"
        context = multiprocessing.get_context("fork")
        child = context.Process(target=_give_up_then_exit, args=(database,))
        child.start()
        child.join(30)
        still_running = child.is_alive()
        if still_running:
            child.kill()
            child.join(10)
        assert not still_running, "the child could not exit while its keeper waited"
        assert child.exitcode == 0
    finally:
        let_go(other_process)


def _give_up_then_exit(path: str) -> None:
    """In the child: wait for the file the parent holds, give up, and return (the process then
    exits as any other, joining its non-daemon threads)."""
    turns = turns_for(path)
    assert turns.take(timeout=0.1) is False
    assert turns._keeper is not None and turns._keeper.is_alive()


def test_a_turn_whose_lock_file_cannot_be_reopened_after_a_fork_takes_no_turn(tmp_path):
    """Reopening after a fork fails when the database's directory is gone; the turn must then
    hold no descriptor at all: taking it answers False (and SQLite alone decides), it neither
    fails with another error nor locks some other open file that has that number."""
    gone = tmp_path / "gone"
    gone.mkdir()
    turns = turns_for(str(gone / "db.sqlite3"))
    os.remove(turns.lock_path)
    gone.rmdir()
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_take_without_a_lock_file, args=(turns,))
    child.start()
    child.join(30)
    assert child.exitcode == 0


def _take_without_a_lock_file(turns) -> None:
    if turns.take(timeout=0.2) is not False:
        os._exit(3)
    if turns._threads.locked():
        os._exit(4)
    os._exit(0)


def test_the_lock_file_is_readable_and_writable_by_its_owner_only(tmp_path):
    previous = os.umask(0o022)
    try:
        turns = turns_for(str(tmp_path / "private.sqlite3"))
    finally:
        os.umask(previous)
    assert os.stat(turns.lock_path).st_mode & 0o777 == 0o600
