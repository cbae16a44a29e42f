"""The database layer: one engine, one sessionmaker, one scoped Session registry.

`Session` below is the only Session registry in the process. Job code that uses
the old global style (`Session.query(...)`) gets the Session of the job running
in its thread, because the runner calls the registry inside that thread and
clears it (`Session.remove()`) when the job ends.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import scoped_session, sessionmaker

from .config import DatabaseSettings, masked_url
from .errors import Diagnosis, ExtraCodes, classify, is_disconnect

log = logging.getLogger("worker.db")

# The one registry. It is created unbound (no engine, no connection, no work at
# import time) so that `from worker import Session` works anywhere; Database
# binds it to its engine.
Session = scoped_session(sessionmaker())


class Database:
    """Engine + the registry's binding + error classification for one URL."""

    def __init__(self, settings: DatabaseSettings, extra_codes: ExtraCodes | None = None,
                 registry: scoped_session | None = Session) -> None:
        self.settings = settings
        self.url = make_url(settings.url)
        self.extra_codes = extra_codes
        self.registry = registry
        if self.url.get_driver_name() == "pyodbc":
            _disable_odbc_pooling()
        self.engine: Engine = create_engine(self.url, **_engine_options(settings))
        self.dialect = self.engine.dialect.name
        event.listen(self.engine, "handle_error", self._mark_disconnect)
        _skip_needless_reset(self.engine)
        self.statements = StatementTracker(self.engine, self.url.get_driver_name())
        if registry is not None:   # None: an engine of the worker's own (cluster table)
            registry.configure(bind=self.engine)

    @property
    def display_url(self) -> str:
        return masked_url(self.settings.url)

    def classify(self, exc: BaseException) -> Diagnosis:
        return classify(exc, self.dialect, self.extra_codes)

    def _mark_disconnect(self, context: Any) -> None:
        self.statements.forget_current()
        # SQLAlchemy's own disconnect detection misses codes on some dialects
        # (mysql+pyodbc treats a killed connection as alive); a connection we
        # call dead is invalidated, so it never goes back into the pool.
        if not context.is_disconnect and is_disconnect(context.original_exception,
                                                       self.dialect):
            context.is_disconnect = True

    def cancel_statement(self, thread: int) -> bool:
        return self.statements.cancel(thread)

    def ping(self) -> None:
        """Open one connection and run a trivial statement; raise on failure."""
        with self.engine.connect() as connection:
            connection.execute(select(1)).scalar_one()

    def checked_out(self) -> int:
        """Connections currently lent out by the pool (0 when every job cleaned up)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return checkedout() if checkedout else 0

    def dispose(self) -> None:
        self.engine.dispose()


class DeadlineExceeded(Exception):
    """Raised instead of running a statement once the job's deadline has passed."""


class StatementTracker:
    """Knows the statement each job thread has in flight, so that another thread
    (a deadline, a shutdown) can cancel it through the driver."""

    def __init__(self, engine: Engine, driver: str) -> None:
        self.driver = driver
        self._in_flight: dict[int, tuple[Any, Any]] = {}  # thread id -> (dbapi conn, cursor)
        self._deadlines: dict[int, float] = {}             # thread id -> monotonic deadline
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        if driver == "pyodbc":
            event.listen(engine, "begin", self._set_query_timeout)

    def _set_query_timeout(self, conn) -> None:
        # Fallback for ODBC drivers that ignore SQLCancel: the query timeout
        # (SQL_ATTR_QUERY_TIMEOUT, taken by each new cursor), a second behind the
        # deadline so that the cancel normally wins. 0 clears it for jobs without one.
        deadline = self._deadlines.get(threading.get_ident())
        timeout = 0 if deadline is None else max(1, math.ceil(deadline - time.monotonic()) + 1)
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection.timeout != timeout:
            dbapi_connection.timeout = timeout

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        deadline = self._deadlines.get(threading.get_ident())
        if deadline is not None and time.monotonic() >= deadline:
            # The deadline passed between two statements: start no new one.
            raise DeadlineExceeded("the job's deadline passed; no new statement may start")
        with self._lock:
            self._in_flight[threading.get_ident()] = (conn.connection.dbapi_connection,
                                                      cursor)

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.forget_current()

    def forget_current(self) -> None:
        with self._lock:
            self._in_flight.pop(threading.get_ident(), None)

    def set_deadline(self, thread: int, deadline: float | None) -> None:
        """Statements of this thread started from now on get a driver-side timeout."""
        if deadline is None:
            self._deadlines.pop(thread, None)
        else:
            self._deadlines[thread] = deadline

    def running(self, thread: int) -> bool:
        return thread in self._in_flight

    def cancel(self, thread: int) -> bool:
        """Cancel the statement this thread is running; False if there is none."""
        with self._lock:
            entry = self._in_flight.get(thread)
        if entry is None:
            return False
        dbapi_connection, cursor = entry
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


def _skip_needless_reset(engine: Engine) -> None:
    """Roll back a connection returned to the pool only if a transaction is open.

    SQLAlchemy's default reset-on-return sends a ROLLBACK for every connection
    that comes back after a Session commit, although the COMMIT already ended
    the transaction: one wasted round trip per job (field-notes §5). We track
    whether a transaction is open and roll back only then; a connection whose
    rollback fails is invalidated by the pool, as before.
    """
    def began(conn) -> None:
        conn.connection.info["worker_in_transaction"] = True   # the pool entry's info

    def ended(conn) -> None:
        if not conn.invalidated:    # a dead connection leaves the pool anyway
            conn.connection.info["worker_in_transaction"] = False

    def reset(dbapi_connection, record, reset_state) -> None:
        if record is not None and record.info.get("worker_in_transaction", True) \
                and not reset_state.terminate_only:
            dbapi_connection.rollback()
            record.info["worker_in_transaction"] = False

    event.listen(engine, "begin", began)
    event.listen(engine, "commit", ended)
    event.listen(engine, "rollback", ended)
    event.listen(engine.pool, "reset", reset)


def _engine_options(settings: DatabaseSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle if settings.pool_recycle >= 0 else -1,
        "pool_pre_ping": settings.pool_pre_ping,
        "pool_reset_on_return": None,   # _skip_needless_reset decides instead
    }
    if settings.connect_args:
        options["connect_args"] = dict(settings.connect_args)
    return options


def _disable_odbc_pooling() -> None:
    # SQLAlchemy pools; if the ODBC driver manager pools too, it keeps
    # connections that SQLAlchemy has already invalidated.
    import pyodbc
    pyodbc.pooling = False


def installed_odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return list(pyodbc.drivers())
