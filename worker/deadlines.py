"""Everything about an attempt's time limit, in one place.

- `StatementTracker` (one per engine) knows the statement each job thread has in
  flight and which attempt's deadline governs that thread; another thread (a
  deadline's timer, a shutdown) cancels through it: pyodbc's SQLCancel, sqlite3's
  interrupt(), psycopg's cancel. Once a deadline has passed no new statement starts.
- The ODBC query timeout is the fallback for drivers that ignore SQLCancel: set on
  each checkout from the pool, a second behind the thread's deadline.
- `Deadline` is one attempt's timer. It belongs to that attempt only: after the
  attempt ends it can touch nothing, even if its timer fires late.
- `RunWatch` is what the loop sees of a run: its attempt, whether the current
  attempt is overdue (for the stuck-job report), and how to cancel it at a stop.

As in dramatiq's time-limit middleware, one owner holds the map from thread to
deadline; the runner and the loop only ask it.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .config import format_duration

log = logging.getLogger("worker.deadlines")


class DeadlineExceeded(Exception):
    """Raised instead of running a statement once the attempt's deadline has passed."""


class ParentConnection(Exception):
    """Raised in a forked child instead of running a statement on a connection that
    the parent process opened (and may be using at this moment)."""


# Drivers whose connections take a query timeout in whole seconds (`timeout`), and how
# far behind the deadline it is set. pyodbc can cancel, so its timeout is only the
# fallback and comes a second late; mssql-python cannot cancel a running statement
# (its issue #424), so its query timeout is the deadline itself.
QUERY_TIMEOUT_SLACK = {"pyodbc": 1, "mssqlpython": 0}


class StatementTracker:
    """Per engine: thread -> the statement in flight and the deadline in force."""

    def __init__(self, engine: Engine, driver: str) -> None:
        self.driver = driver
        # thread id -> (owner, dbapi connection, cursor); owner: the Deadline or None
        self._in_flight: dict[int, tuple[Any, Any, Any]] = {}
        self._deadlines: dict[int, tuple[Any, float]] = {}   # thread -> (owner, deadline)
        # In a forked child: ids of the DBAPI connections the child opened itself.
        self._child_connections: set[int] | None = None
        self._cancelling: dict[int, threading.Event] = {}    # thread -> set when cancel returns
        self._lock = threading.Lock()
        _track_cursors(engine, self._started, self.forget_statement)
        if driver in QUERY_TIMEOUT_SLACK:
            self._slack = QUERY_TIMEOUT_SLACK[driver]
            event.listen(engine.pool, "checkout",
                         lambda dbapi_connection, record, proxy:
                         self._set_query_timeout(dbapi_connection))

    # --- the job thread -------------------------------------------------------------

    def _started(self, cursor) -> None:
        """A statement is about to run on `cursor` in this thread."""
        if self._child_connections is not None and \
                id(cursor.connection) not in self._child_connections:
            raise ParentConnection(
                "this Session's connection belongs to the process the job forked from; "
                "in the child, use a new Session (worker.Session())")
        thread = threading.get_ident()
        entry = self._deadlines.get(thread)
        owner = None
        if entry is not None:
            owner, deadline = entry
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("the job's deadline passed; no new statement "
                                       "may start")
        self._in_flight[thread] = (owner, cursor.connection, cursor)

    def forget_statement(self) -> None:
        """The driver returned: nothing to cancel. (Holding on to the cursor would be
        worse than useless: freed after the connection went back to the pool, its
        statement handle is released on a connection another job is using.)

        If another thread is inside the driver's cancel for this statement, wait for
        it to return first: Microsoft's ODBC driver lets the cancelled statement
        return while SQLCancel is still running in the other thread, and closing the
        cursor or rolling back under it crashed the process (segfault or abort)."""
        thread = threading.get_ident()
        with self._lock:
            self._in_flight.pop(thread, None)
            cancelling = self._cancelling.get(thread)
        if cancelling is not None:
            cancelling.wait()

    def _set_query_timeout(self, dbapi_connection) -> None:
        """pyodbc and mssql-python, at each checkout: the query timeout
        (SQL_ATTR_QUERY_TIMEOUT, taken by each new cursor). For pyodbc it is the
        fallback for ODBC drivers that ignore SQLCancel, a second behind the deadline
        so that the cancel normally wins; for mssql-python, which cannot cancel, it is
        the deadline itself. 0 clears it for jobs without a deadline."""
        entry = self._deadlines.get(threading.get_ident())
        timeout = 0 if entry is None else max(
            1, math.ceil(entry[1] - time.monotonic()) + self._slack)
        if dbapi_connection.timeout != timeout:
            dbapi_connection.timeout = timeout

    def forked(self, engine: Engine) -> None:
        """In a forked child, after the engine got its new pool: only connections
        made from now on may run statements here. The parent's deadlines and
        statements in flight mean nothing in the child."""
        self._in_flight.clear()
        self._deadlines.clear()
        self._cancelling.clear()
        self._lock = threading.Lock()       # another thread may have held it at the fork
        self._child_connections = set()
        event.listen(engine.pool, "connect",
                     lambda dbapi_connection, record:
                     self._child_connections.add(id(dbapi_connection)))

    # --- deadlines ------------------------------------------------------------------

    def set_deadline(self, thread: int, owner: Any, deadline: float) -> None:
        self._deadlines[thread] = (owner, deadline)

    def clear_deadline(self, thread: int, owner: Any) -> None:
        entry = self._deadlines.get(thread)
        if entry is not None and entry[0] is owner:
            del self._deadlines[thread]

    def forget(self, thread: int) -> None:
        """The thread's job has ended: no statement to cancel, no deadline."""
        self._in_flight.pop(thread, None)
        self._deadlines.pop(thread, None)

    def cancel(self, thread: int, owner: Any = None) -> bool:
        """Cancel the statement this thread is running; with `owner`, only if that
        statement runs under that deadline. False if there is none."""
        with self._lock:
            entry = self._in_flight.get(thread)
            if entry is None or (owner is not None and entry[0] is not owner):
                return False
            cancelling = self._cancelling[thread] = threading.Event()
        try:
            return self._cancel(entry[1], entry[2])
        finally:
            with self._lock:
                self._cancelling.pop(thread, None)
            cancelling.set()

    def _cancel(self, dbapi_connection, cursor) -> bool:
        try:
            if self.driver == "pyodbc":
                cursor.cancel()                   # SQLCancel; the statement fails HY008
            elif hasattr(dbapi_connection, "interrupt"):
                dbapi_connection.interrupt()      # sqlite3
            elif hasattr(dbapi_connection, "cancel"):
                dbapi_connection.cancel()         # psycopg 2 and 3
            else:
                log.warning("driver %s cannot cancel a running statement", self.driver)
                return False
        except Exception as exc:  # the statement may have just finished
            log.debug("cancelling a statement failed: %s", exc)
            return False
        return True


def _track_cursors(engine: Engine, started: Callable, finished: Callable) -> None:
    """Call `started(cursor)` before every statement the engine runs, `finished()`
    when the driver returns from it.

    Done by wrapping the dialect's do_execute* methods (the methods a dialect
    subclass would override) rather than with a before_cursor_execute listener:
    any Connection execution listener moves SQLAlchemy off its fast path, which
    measured about 20 µs per statement, the largest part of the worker's cost per
    job. handle_error costs nothing measurable.
    """
    dialect = engine.dialect
    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        original = getattr(dialect, name)

        def tracked(cursor, *args, _original=original, **kwargs):
            started(cursor)
            try:
                return _original(cursor, *args, **kwargs)
            finally:
                finished()
        setattr(dialect, name, tracked)


@dataclass
class RunWatch:
    """What other threads may see of a run while it goes, and how they stop it."""
    attempt: int = 0
    started: float = field(default_factory=time.monotonic)
    thread: int | None = None            # the pool thread running the job
    tracker: StatementTracker | None = None   # its engine's tracker, once started
    overdue_since: float | None = None   # the current attempt passed its deadline then
    given_up: bool = False               # the loop reported it stuck (timed out) already
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> bool:
        """Stop the run: no further attempt, no new statement, the statement in flight
        cancelled through the driver. True if a statement was cancelled."""
        self.cancelled.set()
        thread, tracker = self.thread, self.tracker
        if thread is None or tracker is None:
            return False
        tracker.set_deadline(thread, self, time.monotonic())
        return tracker.cancel(thread)

    def stuck_for(self, now: float) -> float | None:
        """Seconds the current attempt has run past its deadline, or None."""
        overdue = self.overdue_since
        return None if overdue is None else now - overdue


class Deadline:
    """One attempt's deadline. When it passes, the statement in flight is cancelled
    from the timer's thread and no new statement may start. After the attempt has
    ended (``__exit__``), a late timer does nothing."""

    def __init__(self, seconds: float, tracker: StatementTracker, watch: RunWatch,
                 describe: str, log_fields: dict | None = None) -> None:
        self.seconds = seconds
        self.tracker = tracker
        self.watch = watch
        self.describe = describe          # "job=NAME attempt=N/M", for the log line
        self.log_fields = log_fields      # the same as structured fields (worker.logs)
        self.thread = threading.get_ident()
        self.expired = threading.Event()
        self._lock = threading.Lock()
        self._open = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "deadline"

    def __enter__(self) -> "Deadline":
        self.tracker.set_deadline(self.thread, self, time.monotonic() + self.seconds)
        self._open = True
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._open = False
            self._timer.cancel()
            self.tracker.clear_deadline(self.thread, self)
            if self.watch.overdue_since is not None:
                # Over: a backoff before the next attempt is not "stuck".
                self.watch.overdue_since = None

    def _expire(self) -> None:
        with self._lock:
            if not self._open:
                return
            self.expired.set()
            self.watch.overdue_since = time.monotonic()
            cancelled = self.tracker.cancel(self.thread, owner=self)
        log.warning("%s passed its deadline of %s; %s", self.describe,
                    format_duration(self.seconds),
                    "cancelling its statement" if cancelled else
                    "it is not inside a database call, so it ends at its next statement "
                    "or when it returns", extra=self.log_fields)
