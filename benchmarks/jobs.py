"""The benchmark's jobs, in the forms each contender needs.

`select_one` is also the trivial job of the start-up benchmark's one-shot run
(`call: benchmarks.jobs:select_one`), so this module imports nothing heavy
beyond what a job module would: `sqlalchemy.text`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import text

SLEEP_SECONDS = 0.05

_SELECT_ONE = text("SELECT 1")


def select_one(session) -> None:
    """The job contract: fn(session); the worker commits and closes."""
    session.execute(_SELECT_ONE)


@dataclass(frozen=True)
class JobKind:
    name: str
    sql: str                   # for SQLAlchemy text(), named parameters
    raw_sql: str               # for DB-API cursors (pyodbc and sqlite3 both take "?")
    params: dict[str, Any] = field(default_factory=dict)
    raw_params: tuple = ()
    returns_rows: bool = True  # the raw contender fetches what a SELECT returns
    own_selects: int = 1       # SELECT statements the job itself sends (round trips)

    def function(self) -> Callable[..., None]:
        """A job function for the worker: fn(session)."""
        if self.name == "select":
            return select_one
        statement, params = text(self.sql), dict(self.params)

        def job(session) -> None:
            session.execute(statement, params)

        job.__name__ = f"{self.name}_job"
        return job


SELECT_ONE = JobKind("select", "SELECT 1", "SELECT 1")
INSERT_ROW = JobKind("insert", "INSERT INTO bench_items (v) VALUES (:v)",
                     "INSERT INTO bench_items (v) VALUES (?)", {"v": 1}, (1,),
                     returns_rows=False, own_selects=0)
SLEEP = JobKind("sleep", f"SELECT SLEEP({SLEEP_SECONDS})", f"SELECT SLEEP({SLEEP_SECONDS})")


def stamp_select(session, out: str, tag: str) -> None:
    """The daemon-lateness job: append `<tag> <monotonic start time>` to `out` (one
    O_APPEND write, atomic for a short line), then SELECT 1. The harness reads
    the start times against the schedule's grid. CLOCK_MONOTONIC is system-wide
    on Linux, so the times of two processes compare."""
    stamp_only(session, out, tag)
    session.execute(_SELECT_ONE)


def stamp_only(session, out: str, tag: str) -> None:
    """stamp_select without its SELECT: what is left of a burst's cost is the
    scheduler's own, and the Session's that is never used."""
    started = time.monotonic()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag} {started:.6f}\n".encode())
    finally:
        os.close(fd)
