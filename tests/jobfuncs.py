"""Every job function the tests use, in one place.

They follow the job contract, fn(session, **kwargs), and never commit or close
the Session (except the few that test a job doing so). Test state (barriers,
counters) comes in through kwargs.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

from worker import Session


def select_one(session) -> int:
    return session.execute(text("SELECT 1")).scalar_one()


def noop(session) -> None:
    return None


def fail_with_value_error(session) -> None:
    raise ValueError("bug in the job")


def syntax_error(session) -> None:
    session.execute(text("SELEC 1"))


def touch(session, path: str) -> None:
    """Leaves a file behind, so a test can tell whether the job ran."""
    Path(path).write_text("ran")


def write_repr(session, path: str, value) -> None:
    """Writes repr(value), so a test can tell the type a kwarg arrived with."""
    Path(path).write_text(repr(value))


def needs_two_args(session, a, b) -> None:
    return None


NOT_CALLABLE = 42


def create_commands_table(session) -> None:
    from jobs.commands import ensure_schema
    ensure_schema(session)


def _mssql_create(session, name: str, *columns) -> None:
    """SQL Server has no CREATE TABLE IF NOT EXISTS: the worker's own check-then-create."""
    from sqlalchemy import MetaData, Table
    from worker.db import create_tables
    metadata = MetaData()
    Table(name, metadata, *columns)
    create_tables(session.connection(), metadata)


def create_counters(session) -> None:
    if _dialect(session) == "mssql":
        from sqlalchemy import Column, Integer
        _mssql_create(session, "worker_test_counters",
                      Column("id", Integer, primary_key=True, autoincrement=False),
                      Column("value", Integer, nullable=False))
        return
    if _dialect(session) == "postgresql":
        # Concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL (duplicate
        # pg_type row): one creator at a time, each waiting for the last to commit.
        session.execute(text("SELECT pg_advisory_xact_lock(20261124)"))
    session.execute(text("CREATE TABLE IF NOT EXISTS worker_test_counters "
                         "(id INTEGER PRIMARY KEY, value INTEGER NOT NULL)"))


def insert_row(session, value: int) -> None:
    create_counters(session)
    session.execute(text("INSERT INTO worker_test_counters (id, value) VALUES (:v, :v)"),
                    {"v": value})


def insert_counter(session, value: int) -> None:
    """insert_row into an existing table: one statement, which only writes."""
    session.execute(text("INSERT INTO worker_test_counters (id, value) VALUES (:v, :v)"),
                    {"v": value})


def insert_then_fail(session, value: int) -> None:
    insert_row(session, value)
    raise ValueError("failing after the insert: it must be rolled back")


def global_style_reader(session, barrier: threading.Barrier, seen: list) -> None:
    """The story's job, written in the old global style: it never touches `session`.

    Every job waits at the barrier, so all of them hold their Session at once.
    """
    from jobs.commands import Command, ensure_schema
    ensure_schema(Session())
    Session.query(Command).all()
    connection = Session.connection()
    if connection.dialect.name == "sqlite":
        ident = id(connection.connection.dbapi_connection)
    elif connection.dialect.name == "mssql":
        ident = Session.execute(text("SELECT @@SPID")).scalar_one()
    else:
        ident = connection_id(Session())
    barrier.wait(timeout=30)
    seen.append((Session() is session, ident))


def _dialect(session) -> str:
    return session.connection().dialect.name


def connection_id(session) -> int:
    """The server's id of this job's connection (MariaDB thread id, PostgreSQL pid;
    SQLite: the Python id of its sqlite3 connection)."""
    if _dialect(session) == "sqlite":
        return id(session.connection().connection.dbapi_connection)
    query = {"postgresql": "SELECT pg_backend_pid()",
             "mssql": "SELECT @@SPID"}.get(_dialect(session), "SELECT CONNECTION_ID()")
    return session.execute(text(query)).scalar_one()


def kill_own_connection_once(session, kill, calls: list) -> None:
    """First attempt: a DBA kills this job's connection mid-query (`kill(id)`, from
    another connection); then it works."""
    calls.append(time.monotonic())
    if len(calls) == 1:
        threading.Timer(0.3, kill, args=(connection_id(session),)).start()
        sleep_query(session, 5)
    session.execute(text("SELECT 1"))


def sleep_query(session, seconds: float) -> None:
    """One statement that sleeps at the server."""
    if _dialect(session) == "postgresql":
        session.execute(text(f"SELECT pg_sleep({float(seconds)})"))
    elif _dialect(session) == "mssql":
        whole, millis = divmod(round(float(seconds) * 1000), 1000)
        minutes, secs = divmod(whole, 60)
        session.execute(text(f"WAITFOR DELAY '00:{minutes:02d}:{secs:02d}.{millis:03d}'"))
    else:
        session.execute(text(f"SELECT SLEEP({float(seconds)})"))


def sqlite_write(session, value: int) -> None:
    """Writes to SQLite; fails with 'database is locked' while another connection
    holds the write lock and the busy timeout is short."""
    insert_row(session, value)


def sqlite_long_query(session) -> None:
    """Keeps SQLite busy for minutes unless interrupted."""
    session.execute(text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                         "WHERE x < 5000000000) SELECT count(*) FROM c")).scalar()


def long_query(session, seconds: float = 30) -> None:
    """A statement that runs `seconds` on a server, or very long on SQLite."""
    if session.connection().dialect.name == "sqlite":
        sqlite_long_query(session)
    else:
        sleep_query(session, seconds)


def python_sleep(session, seconds: float) -> None:
    """Stuck in pure Python: no statement to cancel."""
    time.sleep(seconds)


def sleep_then_insert(session, seconds: float, value: int) -> None:
    time.sleep(seconds)
    insert_row(session, value)


def insert_then_sleep(session, seconds: float, value: int) -> None:
    insert_row(session, value)
    time.sleep(seconds)


def slow_first_attempt(session, calls: list, seconds: float) -> None:
    """Runs a long statement on the first attempt only."""
    calls.append(1)
    if len(calls) == 1:
        long_query(session, seconds)
    select_one(session)


def transfer(session, forward: bool, pause: float = 0.005) -> None:
    """Updates rows 1 and 2 in one order or the other: run many at once for deadlocks."""
    first, second = (1, 2) if forward else (2, 1)
    update = text("UPDATE worker_test_counters SET value = value + 1 WHERE id = :id")
    session.execute(update, {"id": first})
    time.sleep(pause)
    session.execute(update, {"id": second})


def update_row_then_meet(session, row: int, meeting: threading.Barrier) -> None:
    """Updates its row, then holds the transaction until the other writer has updated
    its own (a BrokenBarrierError after 10 s if one waited for the other)."""
    session.execute(text("UPDATE worker_test_counters SET value = value + 1 WHERE id = :id"),
                    {"id": row})
    meeting.wait(timeout=10)


def update_row_then_hold(session, row: int, seconds: float, updated: threading.Event) -> None:
    """Updates its row, says so, and keeps the transaction (and the row's lock) open
    `seconds` longer."""
    session.execute(text("UPDATE worker_test_counters SET value = value + 1 WHERE id = :id"),
                    {"id": row})
    session.flush()
    updated.set()
    time.sleep(seconds)


def bump_counter_after(session, event: threading.Event, row: int = 1) -> None:
    """Waits for another job's signal, then updates the row (and waits for its lock)."""
    event.wait(10)
    bump_counter(session, row)


def update_with_short_lock_wait(session, row: int) -> None:
    """Waits at most about a second for the row's lock. SQLite: the busy timeout
    the test gives the connection."""
    dialect = _dialect(session)
    if dialect == "postgresql":
        session.execute(text("SET LOCAL lock_timeout = '1s'"))   # this transaction only
    elif dialect == "mssql":
        session.execute(text("SET LOCK_TIMEOUT 1000"))            # milliseconds, 1222 after
    elif dialect != "sqlite":
        session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
    session.execute(text("UPDATE worker_test_counters SET value = value + 1 WHERE id = :id"),
                    {"id": row})


def insert_unique(session, value: int) -> None:
    """Idempotent insert: re-running it after an unknown COMMIT cannot double it."""
    if _dialect(session) in ("mysql", "mariadb"):
        insert = "INSERT IGNORE INTO worker_test_counters (id, value) VALUES (:v, :v)"
    elif _dialect(session) == "mssql":
        insert = ("INSERT INTO worker_test_counters (id, value) SELECT :v, :v WHERE NOT "
                  "EXISTS (SELECT 1 FROM worker_test_counters WHERE id = :v)")
    else:
        insert = ("INSERT INTO worker_test_counters (id, value) VALUES (:v, :v) "
                  "ON CONFLICT (id) DO NOTHING")
    session.execute(text(insert), {"v": value})
    time.sleep(0.05)


def record_run(session, name: str) -> None:
    """Appends one row per run, so a test can count runs from outside the process.
    SQL Server has no CREATE TABLE IF NOT EXISTS: there the test creates the table
    (conftest.db_url), and the run only writes."""
    if _dialect(session) != "mssql":
        session.execute(text("CREATE TABLE IF NOT EXISTS worker_test_runs "
                             "(name VARCHAR(64) NOT NULL, at FLOAT NOT NULL)"))
    session.execute(text("INSERT INTO worker_test_runs (name, at) VALUES (:n, :t)"),
                    {"n": name, "t": time.time()})


def slow_record(session, name: str, seconds: float) -> None:
    """Records the run, then spends `seconds` inside one database call before the
    commit: on a server a sleeping statement, on SQLite a Python sleep while holding the row."""
    record_run(session, name)
    if session.connection().dialect.name == "sqlite":
        time.sleep(seconds)
    else:
        sleep_query(session, seconds)


def record_then_long_query(session, name: str, seconds: float = 30) -> None:
    """Records the run, then runs a long statement: a stop must roll the row back."""
    record_run(session, name)
    long_query(session, seconds)


def fail_after_select(session) -> None:
    select_one(session)
    raise ValueError("failing after a statement")


def serializable_increment(session, row: int, calls: list, interfere) -> None:
    """Adds 1 to a counter in a SERIALIZABLE transaction the job sets itself. On the
    first attempt `interfere()` changes the row from another connection between
    the read and the write: PostgreSQL then fails the write with 40001."""
    calls.append(1)
    session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    value = session.execute(text("SELECT value FROM worker_test_counters WHERE id = :id"),
                            {"id": row}).scalar_one()
    if len(calls) == 1:
        interfere()
    session.execute(text("UPDATE worker_test_counters SET value = :v WHERE id = :id"),
                    {"v": value + 1, "id": row})


def insert_after_a_swallowed_error(session, value: int) -> None:
    """Inserts a row, then catches a failing statement and returns as if all was
    well: on PostgreSQL the failure aborted the whole transaction."""
    from sqlalchemy.exc import DBAPIError
    insert_row(session, value)
    try:
        session.execute(text("SELECT 1 FROM worker_test_no_such_table"))
    except DBAPIError:
        pass


def server_statement_timeout(session, seconds: float) -> None:
    """Sleeps at the server under a server-side statement timeout of 1 s
    (PostgreSQL statement_timeout, this transaction only)."""
    session.execute(text("SET LOCAL statement_timeout = '1s'"))
    sleep_query(session, seconds)


def record_connection_id(session, seen: list) -> None:
    """Tells the test which server connection the job ran on."""
    seen.append(connection_id(session))


def insert_after_a_failure_in_a_savepoint(session, value: int) -> None:
    """The right way to go on after an expected error: the failing statement in a
    savepoint, rolled back to it, and the transaction stays usable everywhere."""
    from sqlalchemy.exc import DBAPIError
    insert_row(session, value)
    try:
        with session.begin_nested():
            session.execute(text("SELECT 1 FROM worker_test_no_such_table"))
    except DBAPIError:
        pass
    insert_row(session, value + 1)


def raw_write_then_fail(session, value: int) -> None:
    """Writes through a raw DBAPI connection of the job's engine (not its Session),
    then raises: the write must be rolled back, never committed by the next job."""
    raw = session.get_bind().raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"INSERT INTO worker_test_counters (id, value) "
                       f"VALUES ({value}, {value})")
        cursor.close()
        raise ValueError("failing after a raw write")
    finally:
        raw.close()          # back to the pool, its transaction still open


def raise_system_exit(session, code: int = 0) -> None:
    session.execute(text("SELECT 1"))
    raise SystemExit(code)


def raise_keyboard_interrupt(session) -> None:
    raise KeyboardInterrupt


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


def raise_unprintable(session) -> None:
    raise _Unprintable()

# --- Functions whose call does not run their body: the worker must refuse them ----------
# Each would leave the file `path` behind if its body ran, so a test can tell.

def generator_job(session, path: str):
    Path(path).write_text("ran")
    yield


async def async_job(session, path: str) -> None:
    Path(path).write_text("ran")


async def async_generator_job(session, path: str):
    Path(path).write_text("ran")
    yield


class AsyncCallable:
    """An object whose __call__ is a coroutine function."""

    async def __call__(self, session, path: str) -> None:
        Path(path).write_text("ran")


class GeneratorCallable:
    """An object whose __call__ is a generator function."""

    def __call__(self, session, path: str):
        Path(path).write_text("ran")
        yield


class PlainCallable:
    """The control for the two above: an ordinary __call__."""

    def __call__(self, session, path: str) -> None:
        Path(path).write_text("ran")


ASYNC_CALLABLE = AsyncCallable()
GENERATOR_CALLABLE = GeneratorCallable()
PLAIN_CALLABLE = PlainCallable()
PARTIAL_OF_GENERATOR = functools.partial(generator_job)
PARTIAL_OF_ASYNC = functools.partial(async_job)
PARTIAL_OF_PARTIAL_OF_ASYNC_CALLABLE = functools.partial(functools.partial(ASYNC_CALLABLE))
PARTIAL_OF_TOUCH = functools.partial(touch)


def wait_for_file(session, path: str, timeout: float = 60) -> None:
    """Holds the run (and its host lock) until the test creates `path`."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def select_then_wait_for_file(session, path: str, timeout: float = 60) -> None:
    """Holds the run and one pooled connection until the test creates `path`."""
    select_one(session)
    wait_for_file(session, path, timeout)


DEADLOCK_TABLE = "worker_test_deadlock"   # rows 1..10, made by the test


def deadlock_first_attempt(session, marker: str) -> None:
    """MariaDB: the first attempt (no `marker` file yet) is the victim of a real
    deadlock with a second connection; every later attempt just updates a row.

    The job locks row 1; the other connection locks rows 2..10 and then waits for
    row 1; the job asks for row 2 and closes the cycle. InnoDB rolls back the
    lighter transaction, the job's (1 row against 9), with error 1213."""
    update = text(f"UPDATE {DEADLOCK_TABLE} SET value = value + 1 WHERE id BETWEEN :a AND :b")
    if Path(marker).exists():
        session.execute(update, {"a": 1, "b": 1})
        return
    Path(marker).touch()
    session.execute(update, {"a": 1, "b": 1})
    holding = threading.Event()

    def other() -> None:
        with session.get_bind().connect() as connection:
            connection.execute(update, {"a": 2, "b": 10})
            holding.set()
            connection.execute(update, {"a": 1, "b": 1})   # waits for the job's row 1
            connection.commit()

    thread = threading.Thread(target=other, name="deadlock-peer")
    thread.start()
    try:
        holding.wait(10)
        time.sleep(0.3)          # the peer is now waiting for row 1
        session.execute(update, {"a": 2, "b": 2})
    finally:
        thread.join(15)


def raise_secret_error(session) -> None:
    """Fails with a message that quotes a URL with a password (must be masked)."""
    raise ValueError("cannot reach mysql://app:s3cr3t-pw@db.example/prod")


# --- hooks (called as fn(result) with the run's JobResult) ---------------------------

def noop_hook(result) -> None:
    """A hook that does nothing."""


def write_result_hook(result) -> None:
    """Appends 'job outcome attempts' to $HOOK_OUT (the test reads it)."""
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(f"global {result.job} {result.outcome.value} {result.attempts}\n")


def own_result_hook(result) -> None:
    """A job's own hook: like write_result_hook, tagged 'own'."""
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(f"own {result.job} {result.outcome.value} {result.attempts}\n")


def raising_hook(result) -> None:
    raise RuntimeError(f"hook failed for {result.job}")


def slow_hook(result) -> None:
    """Sleeps $HOOK_SLEEP seconds, then appends 'slow <job>' to $HOOK_OUT."""
    time.sleep(float(os.environ.get("HOOK_SLEEP", "30")))
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(f"slow {result.job}\n")


def hook_with_two_args(result, other) -> None:
    """Not a valid hook: hooks are called as fn(result)."""



# --- Jobs that end their Session's transaction themselves -------------------------------

def insert_close_insert(session, value: int, style: str = "argument") -> None:
    """Inserts `value`, closes the Session (losing that insert), inserts value + 1.
    style "global": through worker.Session, as old-style job code would."""
    insert_row(session, value)
    if style == "global":
        Session.close()
    else:
        session.close()
    insert_row(session, value + 1)


def insert_and_commit(session, value: int) -> None:
    insert_row(session, value)
    session.commit()


# --- A job that forks -------------------------------------------------------------------

def _connection_identity(session) -> str:
    """Which server connection (MariaDB) or DBAPI connection (SQLite) a Session uses."""
    if session.connection().dialect.name == "sqlite":
        return f"sqlite:{id(session.connection().connection.dbapi_connection)}"
    return f"mariadb:{session.execute(text('SELECT CONNECTION_ID()')).scalar_one()}"


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    partial.rename(path)


def fork_child(session, report: str, child_returns: bool = False) -> None:
    """Forks while holding its Session's connection. The child reports (into
    `report`.child) the connection a new Session gets and whether the parent's
    Session was refused, then either waits to be ended by SIGTERM or returns into
    the worker. The parent (into `report`.parent) sends SIGTERM, reaps the child, and
    reports its connection before and after and how the child ended; then it
    writes a row."""
    before = _connection_identity(session)
    child_report, parent_report = Path(report + ".child"), Path(report + ".parent")
    pid = os.fork()
    if pid == 0:
        seen: dict = {"pid": os.getpid(), "new_session": _connection_identity(Session())}
        try:
            session.execute(text("SELECT 1"))
            seen["parent_session"] = "used"
        except Exception as exc:
            seen["parent_session"] = f"refused: {type(exc).__name__}: {exc}"
        _write_json(child_report, seen)
        if child_returns:
            return               # back into the worker: it must end the child there
        time.sleep(30)           # SIGTERM should end this
        os._exit(3)
    deadline = time.monotonic() + 20
    while not child_report.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not child_returns:
        os.kill(pid, signal.SIGTERM)
    sent = time.monotonic()
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped or time.monotonic() - sent > 10:
            break
        time.sleep(0.02)
    if not reaped:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        ended = "did not end within 10 s"
    elif os.WIFSIGNALED(status):
        ended = f"signal {os.WTERMSIG(status)}"
    else:
        ended = f"exit {os.WEXITSTATUS(status)}"
    after = _connection_identity(session)
    insert_row(session, 1)
    _write_json(parent_report, {"before": before, "after": after, "child": ended,
                                "ended_in": time.monotonic() - sent})


def wait_then_insert(session, path: str, value: int) -> None:
    wait_for_file(session, path)
    insert_row(session, value)


def touch_then_python_sleep(session, path: str, seconds: float) -> None:
    """Marks that it runs, then is stuck in Python: nothing a cancel can reach."""
    touch(session, path)
    time.sleep(seconds)


def touch_then_long_query(session, path: str, seconds: float = 60) -> None:
    """Marks that it runs, then is stuck in one long statement."""
    touch(session, path)
    long_query(session, seconds)
# --- SQL Server (the TDS test server, tests/sqlserver) -------------------------------

def bump_counter(session, row: int = 1) -> None:
    """One UPDATE (a fault can match "update worker_test_counters")."""
    session.execute(text("UPDATE worker_test_counters SET value = value + 1 WHERE id = :id"),
                    {"id": row})


def mssql_waitfor(session, seconds: int = 30) -> None:
    session.execute(text(f"WAITFOR DELAY '00:00:{int(seconds):02d}'"))


def select_big(session, rows: int = 3000) -> int:
    """A result of several packets (a fault can drop the connection half-way)."""
    # SQL Server stops a recursive CTE at 100 levels unless the query says otherwise (530)
    option = " OPTION (MAXRECURSION 0)" if _dialect(session) == "mssql" else ""
    return len(session.execute(text(
        f"WITH c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {int(rows)}) "
        f"SELECT x AS big FROM c{option}")).all())


def insert_marker(session, value: int) -> None:
    """Not idempotent: a second run inserts a second row."""
    session.execute(text("INSERT INTO worker_test_counters (id, value) VALUES "
                         "((SELECT COALESCE(MAX(id), 0) + 1 FROM worker_test_counters), :v)"),
                    {"v": value})


def select_classified(session) -> int:
    """A statement a fault can match ("as classified")."""
    return session.execute(text("SELECT 1 AS classified")).scalar_one()


def started_then_wait(session, started: threading.Event, release: threading.Event) -> None:
    """Say it began, then hold its thread until the test releases it."""
    started.set()
    release.wait(60)


def note_run(session, ran: list, name: str) -> None:
    ran.append(name)


def insert_card_twice(session, card: str) -> None:
    """A UNIQUE violation whose bind parameter is a card number: it must never
    reach the log."""
    session.execute(text("CREATE TABLE IF NOT EXISTS worker_test_cards (card VARCHAR(64) PRIMARY KEY)"))
    session.execute(text("INSERT INTO worker_test_cards (card) VALUES (:card)"), {"card": card})
    session.execute(text("INSERT INTO worker_test_cards (card) VALUES (:card)"), {"card": card})


def _raise_in_thread() -> None:
    raise RuntimeError("thread failed")


def raise_in_threads(session, count: int, unique_names: bool = False) -> None:
    """Threads that end by an exception, all alike: one log line, not `count`
    (also when each thread has a name of its own, `helper-<uuid>`)."""
    import uuid
    for _ in range(count):
        name = f"helper-{uuid.uuid4().hex}" if unique_names else "helper"
        thread = threading.Thread(target=_raise_in_thread, name=name)
        thread.start()
        thread.join()


def segfault(session) -> None:
    """Crashes the process, as a driver's `double free` does."""
    import ctypes
    logging.getLogger("tests.jobfuncs").info("about to crash")
    ctypes.string_at(0)


def _child_logs(count: int) -> None:
    for number in range(count):
        logging.getLogger("tests.jobfuncs").info("child line %d", number)


def fork_child_that_logs(session, count: int, ending: str = "return") -> None:
    """A multiprocessing child (fork) that logs `count` INFO lines, then ends by
    returning (multiprocessing's os._exit) or by sys.exit."""
    import multiprocessing
    target = _child_logs if ending == "return" else _child_logs_then_exit
    child = multiprocessing.get_context("fork").Process(target=target, args=(count,))
    child.start()
    child.join(60)


def _child_logs_then_exit(count: int) -> None:
    _child_logs(count)
    sys.exit(0)


def lock_sqlite_file(session, path: str, seconds: float, after: float = 0.0) -> None:
    """After `after` seconds, holds an exclusive lock on the SQLite file at `path`
    for `seconds` (another program locking the cluster's run table)."""
    import sqlite3
    time.sleep(after)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def record_then_wait_for_file(session, name: str, path: str, timeout: float = 60) -> None:
    """Records the run, then holds it (uncommitted) until the test creates `path`:
    a run that is surely still going when the test kills its worker."""
    record_run(session, name)
    wait_for_file(session, path, timeout)


def chaos_job(session, name: str, host: str, node: str, lock: str, idem: bool,
              seconds: float = 0.0, mode: str = "ok", cluster: bool = False) -> None:
    """A chaos run's job (tests/chaos): does its work, then writes one row per
    execution into chaos_runs, committed with the run, so that the checker sees
    every run whose effect was committed: which job (its configured name), on which
    host and lock directory, in which process, and in cluster mode for which slot
    (this node's newest row of the job in the run table: the one it claimed)."""
    started = time.time()
    if mode == "timeout" and _dialect(session) != "sqlite":
        sleep_query(session, seconds)
    else:
        time.sleep(seconds)
    if mode == "fail":
        raise ValueError("chaos: this job fails by design")
    slot = None
    if cluster:
        # Read last, just before the commit: a transaction that read the run table
        # holds a share lock on it (PostgreSQL, MariaDB's metadata lock) while the
        # job sleeps, and would make a chaos "lock the run table" wait for the job.
        slot = session.execute(text(
            "SELECT slot_ms FROM worker_runs WHERE job = :j AND node = :n AND started_ms = "
            "(SELECT MAX(started_ms) FROM worker_runs WHERE job = :j AND node = :n)"),
            {"j": name, "n": node}).scalar()
    session.execute(text(
        "INSERT INTO chaos_runs (job, host, node, lock_tag, idempotent, pid, slot_ms, "
        "started, ended) VALUES (:job, :host, :node, :lock, :idem, :pid, :slot, :s, :e)"),
        {"job": name, "host": host, "node": node, "lock": lock, "idem": int(idem),
         "pid": os.getpid(), "slot": slot, "s": started, "e": time.time()})


# --- hooks for run ids and order (tests/test_control.py) ------------------------------

def start_hook(result) -> None:
    """on_start: sleeps 0.3 s (a later hook must wait for it), then appends
    'start <job> <run_id>' to $HOOK_OUT."""
    time.sleep(0.3)
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(f"start {result.job} {result.run_id}\n")


def end_hook(result) -> None:
    """on_failure/on_success: appends '<outcome> <job> <run_id> <exception type>
    <exception message>' to $HOOK_OUT."""
    error = result.exception
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(f"{result.outcome.value} {result.job} {result.run_id} "
                  f"{type(error).__name__ if error else '-'} {error or '-'}\n")


def record_control_run(session, name: str, seconds: float = 0.0) -> None:
    """Appends one row per run to worker_test_control_runs (a table of
    tests/test_control.py alone: other tests drop worker_test_runs), then sleeps
    `seconds`."""
    session.execute(text("CREATE TABLE IF NOT EXISTS worker_test_control_runs "
                         "(name VARCHAR(64) NOT NULL, at DOUBLE PRECISION NOT NULL)"))
    session.execute(text("INSERT INTO worker_test_control_runs (name, at) VALUES (:n, :t)"),
                    {"n": name, "t": time.time()})
    time.sleep(seconds)


def wait_then_record_control_run(session, name: str, path: str, timeout: float = 60) -> None:
    """Holds the run until the test creates `path` (no transaction open meanwhile),
    then appends its row as record_control_run does."""
    wait_for_file(session, path, timeout)
    record_control_run(session, name)
