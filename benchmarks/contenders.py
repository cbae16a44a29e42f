"""The three ways to run a job, and the feeder that drives any of them.

- WorkerPath: this project. JobSpec + worker.runner.run_job submitted directly
  on worker.pool.WorkerPool: the per-job path of the CLI's batch, without the
  work loop's bookkeeping (it waits on every pending future per completion and
  keeps per-job watches, which would measure the collector instead of the
  per-job path).
- HandWrittenFix: ThreadPoolExecutor + scoped_session(sessionmaker(engine)); each
  task runs the statement, commits, and calls Session.remove() in finally: the
  usual fix, which sends a ROLLBACK after every COMMIT when the connection goes
  back to the pool. Plain engine defaults, or pool_pre_ping=True.
- RawDriver: the floor. One DB-API connection per thread (pyodbc, autocommit
  off; or sqlite3), each job: execute, fetch, commit. It is fed through the same
  kind of ThreadPoolExecutor, so all three pay the same dispatch cost.

Every contender has submit() (one job), error_of(future), close(), and
on_own_connection(fn), which runs fn(DB-API connection) on the connection its
jobs use when it has one thread (for the round-trip counts).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, TypeVar

from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker

from worker.config import DatabaseSettings, JobSpec
from worker.db import Database
from worker.pool import WorkerPool
from worker.runner import run_job

from .backends import Backend
from .common import now
from .jobs import JobKind

WORKER, HAND, RAW = "worker", "hand-written fix", "raw driver"
HAND_PRE_PING = "hand + pre_ping"
CONTENDERS = (WORKER, HAND, RAW)
T = TypeVar("T")


def _on_pooled_connection(engine, fn: Callable[[Any], T]) -> T:
    """fn(DB-API connection) on a connection checked out of the engine's pool: with
    pool_size 1, the very connection the jobs use."""
    with engine.connect() as connection:
        return fn(connection.connection.dbapi_connection)


def _exception_of(future: Future) -> str | None:
    exception = future.exception()
    return None if exception is None else repr(exception)


class WorkerPath:
    def __init__(self, backend: Backend, kind: JobKind, workers: int) -> None:
        self.database = Database(DatabaseSettings(url=backend.url, pool_size=workers))
        self.pool = WorkerPool(workers)
        self.function = kind.function()
        self.spec = JobSpec(name=f"bench-{kind.name}",
                            call=f"{self.function.__module__}:{self.function.__qualname__}")

    def submit(self) -> Future:
        return self.pool.submit(partial(run_job, self.spec, self.function, self.database))

    def on_own_connection(self, fn: Callable[[Any], T]) -> T:
        return _on_pooled_connection(self.database.engine, fn)

    @staticmethod
    def error_of(future: Future) -> str | None:
        if future.exception() is not None:
            return repr(future.exception())
        result = future.result()
        return None if result.ok else f"{result.outcome.value}: {result.error}"

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.database.dispose()


class HandWrittenFix:
    def __init__(self, backend: Backend, kind: JobKind, workers: int,
                 pre_ping: bool = False) -> None:
        self.engine = create_engine(backend.url, pool_size=workers, max_overflow=0,
                                    pool_pre_ping=pre_ping)
        self.Session = scoped_session(sessionmaker(bind=self.engine))
        self.executor = ThreadPoolExecutor(workers)
        self.statement = text(kind.sql)
        self.params = dict(kind.params)

    def _task(self) -> None:
        Session = self.Session
        try:
            Session.execute(self.statement, self.params)
            Session.commit()
        finally:
            Session.remove()

    def submit(self) -> Future:
        return self.executor.submit(self._task)

    def on_own_connection(self, fn: Callable[[Any], T]) -> T:
        return _on_pooled_connection(self.engine, fn)

    error_of = staticmethod(_exception_of)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.engine.dispose()


class RawDriver:
    def __init__(self, backend: Backend, kind: JobKind, workers: int) -> None:
        self.connect = backend.raw_connect
        self.kind = kind
        self.executor = ThreadPoolExecutor(workers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.connect()
            with self._lock:
                self._connections.append(connection)
        return connection

    def _task(self) -> None:
        connection = self._connection()
        cursor = connection.cursor()
        cursor.execute(self.kind.raw_sql, self.kind.raw_params)
        if self.kind.returns_rows:
            cursor.fetchall()
        cursor.close()
        connection.commit()

    def submit(self) -> Future:
        return self.executor.submit(self._task)

    def on_own_connection(self, fn: Callable[[Any], T]) -> T:
        """fn(connection) in a job thread (the only one, with one worker)."""
        return self.executor.submit(lambda: fn(self._connection())).result()

    error_of = staticmethod(_exception_of)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for connection in self._connections:
            connection.close()


def build(name: str, backend: Backend, kind: JobKind, workers: int):
    if name == WORKER:
        return WorkerPath(backend, kind, workers)
    if name == HAND:
        return HandWrittenFix(backend, kind, workers)
    if name == HAND_PRE_PING:
        return HandWrittenFix(backend, kind, workers, pre_ping=True)
    if name == RAW:
        return RawDriver(backend, kind, workers)
    raise ValueError(f"unknown contender {name!r}")


@dataclass
class Feed:
    """What one feeding produced."""
    jobs: int
    seconds: float
    failures: int
    first_error: str | None

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


def feed(contender, window: int, keep_going: Callable[[int], bool]) -> Feed:
    """Submit jobs while keep_going(submitted) is true, never more than `window` in
    flight (the pool's queue stays full, memory stays flat), then wait for all.
    No future is kept: a done-callback tallies failures and frees a slot."""
    slots = threading.Semaphore(window)
    errors: list[str] = []

    def done(future: Future) -> None:
        try:
            error = contender.error_of(future)
        except Exception as exc:  # a bug here must not leave a slot taken for ever
            error = f"checking the job's result failed: {exc!r}"
        if error is not None:
            errors.append(error)
        slots.release()

    submitted = 0
    started = now()
    while keep_going(submitted):
        slots.acquire()
        contender.submit().add_done_callback(done)
        submitted += 1
    for _ in range(window):   # every slot back: every job has finished
        slots.acquire()
    elapsed = now() - started
    return Feed(submitted, elapsed, len(errors), errors[0] if errors else None)


def feed_for(contender, seconds: float, window: int) -> Feed:
    deadline = now() + seconds
    return feed(contender, window, lambda _submitted: now() < deadline)


def feed_count(contender, jobs: int, window: int) -> Feed:
    return feed(contender, window, lambda submitted: submitted < jobs)
