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

from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import scoped_session, sessionmaker

from .config import DatabaseSettings, masked_url
from .errors import Diagnosis, ExtraCodes, classify, is_disconnect

log = logging.getLogger("worker.db")

# The one registry. It is created unbound (no engine, no connection, no work at
# import time) so that `from worker import Session` works anywhere; Database
# binds it to its engine.
# expire_on_commit=False: the worker commits after the job has returned and
# discards the Session right after, so expiring its objects would be wasted work.
Session = scoped_session(sessionmaker(expire_on_commit=False))


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
        self.statements = StatementTracker(self.engine, self.url.get_driver_name())
        # pyodbc: each checkout takes the thread's deadline as its query timeout.
        _skip_needless_reset(self.engine, self.statements.set_query_timeout
                             if self.url.get_driver_name() == "pyodbc" else None)
        if registry is not None:   # None: an engine of the worker's own (cluster table)
            registry.configure(bind=self.engine)

    @property
    def display_url(self) -> str:
        return masked_url(self.settings.url)

    def classify(self, exc: BaseException) -> Diagnosis:
        return classify(exc, self.dialect, self.extra_codes)

    def _mark_disconnect(self, context: Any) -> None:
        self.statements.forget_statement()
        # SQLAlchemy's own disconnect detection misses codes on some dialects
        # (mysql+pyodbc treats a killed connection as alive); a connection we
        # call dead is invalidated, so it never goes back into the pool.
        if not context.is_disconnect and is_disconnect(context.original_exception,
                                                       self.dialect):
            context.is_disconnect = True

    @staticmethod
    def refuse_aborted_commit(session) -> None:
        """Raise AbortedTransaction instead of committing a PostgreSQL transaction
        that a failed statement has aborted: the server would answer the COMMIT with
        a silent ROLLBACK, and a job that caught its error would count as a success
        that saved nothing. Other drivers: nothing to check (a failed statement
        there does not doom the rest of the transaction)."""
        if not session.in_transaction():
            return
        status = _libpq_transaction_status(session.connection().connection.dbapi_connection)
        if status == _LIBPQ_INERROR:
            raise AbortedTransaction(
                "a statement failed earlier in this transaction and the job went on, so "
                "PostgreSQL aborted the transaction (SQLSTATE 25P02); nothing was committed")

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


class AbortedTransaction(Exception):
    """The job returned, but its PostgreSQL transaction had already been aborted."""


class DirtyConnection(Exception):
    """A connection still in a transaction after its rollback on return to the pool."""


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
        _track_cursors(engine, self.started, self.forget_statement)

    def set_query_timeout(self, dbapi_connection) -> None:
        """pyodbc, at each checkout from the pool: the fallback for ODBC drivers that
        ignore SQLCancel is the query timeout (SQL_ATTR_QUERY_TIMEOUT, taken by
        each new cursor), a second behind the deadline so that the cancel normally
        wins. 0 clears it for jobs without a deadline."""
        deadline = self._deadlines.get(threading.get_ident())
        timeout = 0 if deadline is None else max(1, math.ceil(deadline - time.monotonic()) + 1)
        if dbapi_connection.timeout != timeout:
            dbapi_connection.timeout = timeout

    def started(self, cursor) -> None:
        """A statement is about to run on `cursor` in this thread."""
        thread = threading.get_ident()
        deadline = self._deadlines.get(thread)
        if deadline is not None and time.monotonic() >= deadline:
            # The deadline passed between two statements: start no new one.
            raise DeadlineExceeded("the job's deadline passed; no new statement may start")
        self._in_flight[thread] = (cursor.connection, cursor)

    def forget_statement(self) -> None:
        """The driver returned: nothing to cancel. (Holding on to the cursor would
        be worse than useless: freed after the connection went back to the pool, its
        statement handle is released on a connection another job is using.)"""
        self._in_flight.pop(threading.get_ident(), None)

    def forget(self, thread: int) -> None:
        """The thread's job has ended: no statement to cancel, no deadline."""
        self._in_flight.pop(thread, None)
        self._deadlines.pop(thread, None)

    def set_deadline(self, thread: int, deadline: float | None) -> None:
        """Statements of this thread started from now on get a driver-side timeout."""
        if deadline is None:
            self._deadlines.pop(thread, None)
        else:
            self._deadlines[thread] = deadline

    def cancel(self, thread: int) -> bool:
        """Cancel the statement this thread is running; False if there is none."""
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


def _track_cursors(engine: Engine, started, finished) -> None:
    """Call `started(cursor)` before every statement the engine runs, `finished()`
    when the driver returns from it.

    Done by wrapping the dialect's do_execute* methods (the methods a dialect
    subclass would override) rather than with a before_cursor_execute listener:
    any Connection execution listener moves SQLAlchemy off its fast path, which
    measured about 20 µs per statement, the largest part of the worker's cost per
    job. handle_error and the commit/rollback listeners cost nothing measurable.
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


# pool-entry info flag: this checkout's transaction ended in a COMMIT or ROLLBACK
TRANSACTION_ENDED = "worker_transaction_ended"

# libpq's PQtransactionStatus (psycopg 3 and psycopg2 report it as
# connection.info.transaction_status): idle, or inside a failed transaction.
_LIBPQ_IDLE, _LIBPQ_INERROR = 0, 3


def _libpq_transaction_status(dbapi_connection) -> int | None:
    """libpq's own word on the connection's transaction; None for other drivers."""
    status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    return None if status is None else int(status)


def _note_transaction_ends(engine: Engine) -> None:
    """Mark a pool entry whose COMMIT or ROLLBACK through SQLAlchemy succeeded, at
    the moment it succeeded.

    Wraps the dialect's do_commit and do_rollback (as _track_cursors wraps
    do_execute) because the mark must be there before SQLAlchemy hands the
    connection back to the pool, which happens inside Session.commit() and
    Session.rollback(): a mark set by the runner after commit() returned was read
    by the next return of that connection instead (one checkout late), so a raw
    connection given back with its transaction open after a successful job skipped
    its ROLLBACK, while a failed job's connection was rolled back twice."""
    dialect = engine.dialect
    for name in ("do_commit", "do_rollback"):
        original = getattr(dialect, name)

        def ended(pooled_connection, _original=original) -> None:
            _original(pooled_connection)
            # A checked-out connection's info is its pool entry's, the one the
            # reset listener reads; the engine's first-connect probe has none.
            try:
                pooled_connection.info[TRANSACTION_ENDED] = True
            except (AttributeError, NotImplementedError):
                pass
        setattr(dialect, name, ended)


def _skip_needless_reset(engine: Engine, on_checkout=None) -> None:
    """Roll back a connection returned to the pool unless its transaction is known
    to be over.

    SQLAlchemy's default reset-on-return sends a ROLLBACK for every connection
    that comes back after a Session commit, although the COMMIT already ended the
    transaction: one wasted round trip per job (field-notes §5). A connection
    whose COMMIT or ROLLBACK succeeded is marked (_note_transaction_ends), and
    SQLAlchemy tells us when a Connection already rolled back on close. Anything
    else (a raw_connection() left open) is rolled back as before, and a
    connection whose rollback fails is invalidated by the pool. On PostgreSQL
    libpq knows the transaction state exactly: roll back when a transaction is
    open or aborted ("idle in transaction"), never otherwise, and a connection
    still not idle after that is invalidated rather than pooled dirty. Only Pool
    events and the dialect's do_commit/do_rollback are used: Connection event
    listeners (begin/commit/rollback) would move every statement off
    SQLAlchemy's fast path.
    """
    def reset(dbapi_connection, record, reset_state) -> None:
        ended = record.info.pop(TRANSACTION_ENDED, False) if record is not None else False
        if reset_state.terminate_only:
            return
        status = _libpq_transaction_status(dbapi_connection)
        if status is not None:
            if status != _LIBPQ_IDLE:
                dbapi_connection.rollback()
            if _libpq_transaction_status(dbapi_connection) != _LIBPQ_IDLE:
                raise DirtyConnection("still inside a transaction after ROLLBACK")
            return
        if ended or reset_state.transaction_was_reset:
            return
        dbapi_connection.rollback()

    _note_transaction_ends(engine)
    event.listen(engine.pool, "reset", reset)
    if on_checkout is not None:
        event.listen(engine.pool, "checkout",
                     lambda dbapi_connection, record, proxy: on_checkout(dbapi_connection))


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


_CREATE_TABLES_LOCK = 0x776F726B   # PostgreSQL advisory lock key of create_tables ("work")


def create_tables(connection, metadata) -> None:
    """Create the metadata's missing tables and indexes; safe when several jobs or
    processes race to do it (CREATE ... IF NOT EXISTS where the dialect has it;
    SQL Server has not, so there it is a check, then CREATE)."""
    if connection.dialect.name in ("sqlite", "mysql", "mariadb", "postgresql"):
        from sqlalchemy.schema import CreateIndex, CreateTable
        if connection.dialect.name == "postgresql":
            if not _missing_relations(connection, metadata):
                return   # no lock taken: jobs that only check never wait for each other
            # PostgreSQL's IF NOT EXISTS is not race-safe: a second creator waits for
            # the first's uncommitted CREATE, then fails (23505 on pg_type). One
            # creator at a time (a lock held until this transaction ends), so the
            # next one sees the table and skips it.
            connection.execute(select(func.pg_advisory_xact_lock(_CREATE_TABLES_LOCK)))
        for table in metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))
    else:
        metadata.create_all(connection, checkfirst=True)


def _missing_relations(connection, metadata) -> bool:
    """PostgreSQL: True if a table or index of the metadata does not exist yet."""
    names = [table.fullname for table in metadata.sorted_tables]
    names += [index.name for table in metadata.sorted_tables for index in table.indexes
              if index.name]
    missing = connection.execute(text(
        "SELECT count(*) FROM unnest(CAST(:names AS text[])) AS name "
        "WHERE to_regclass(name) IS NULL"), {"names": names}).scalar_one()
    return missing > 0


def installed_odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return list(pyodbc.drivers())
