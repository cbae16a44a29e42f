"""Every job function the tests use, in one place.

They follow the job contract, fn(session, **kwargs), and never commit or close
the Session. Test state (barriers, counters) comes in through kwargs.
"""
from __future__ import annotations

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


def needs_two_args(session, a, b) -> None:
    return None


NOT_CALLABLE = 42


def create_counters(session) -> None:
    session.execute(text("CREATE TABLE IF NOT EXISTS worker_test_counters "
                         "(id INTEGER PRIMARY KEY, value INTEGER NOT NULL)"))


def insert_row(session, value: int) -> None:
    create_counters(session)
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
    else:
        ident = Session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
    barrier.wait(timeout=30)
    seen.append((Session() is session, ident))


def kill_own_connection_once(session, admin, calls: list) -> None:
    """First attempt: a DBA kills this job's connection mid-query; then it works."""
    calls.append(time.monotonic())
    if len(calls) == 1:
        connection_id = session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        threading.Timer(0.3, admin.execute, args=(f"KILL {connection_id}",)).start()
        session.execute(text("SELECT SLEEP(5)"))
    session.execute(text("SELECT 1"))


def sleep_query(session, seconds: float) -> None:
    session.execute(text(f"SELECT SLEEP({float(seconds)})"))


def sqlite_write(session, value: int) -> None:
    """Writes to SQLite; fails with 'database is locked' while another connection
    holds the write lock and the busy timeout is short."""
    insert_row(session, value)
