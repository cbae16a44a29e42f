"""The database layer: an engine, its sessionmaker and its scoped Session registry,
pool reset, and disconnect marking.

Each `Database` (one per configuration the worker runs: a reload that changes the
database section builds a new one) has its own registry. `Session` below is the
one name job code uses: it stands for the registry of the runtime that started the
job running in the calling thread. Job code in the old global style
(`Session.query(...)`) therefore gets its own job's Session, because the runner
calls the registry inside that thread and clears it (`remove()`) when the job ends.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from functools import partial
from typing import Any

from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

from .config import DatabaseSettings, masked_url
from .deadlines import StatementTracker
from .errors import Diagnosis, ExtraCodes, classify, is_disconnect

log = logging.getLogger("worker.db")


class JobSessionProxy:
    """`worker.Session`: the registry of the Database whose runtime started the job
    running in this thread (set by the runner for the job's duration). Outside a
    job it is the registry of the newest Database, as for scripts and tests that
    build one Database and use `Session()` directly."""

    def __init__(self) -> None:
        self._thread = threading.local()
        self._newest: weakref.ref | None = None

    def registry_in_use(self) -> scoped_session:
        registry = getattr(self._thread, "registry", None)
        if registry is not None:
            return registry
        database = self._newest() if self._newest is not None else None
        if database is None:
            raise RuntimeError("worker.Session is used outside a job and no Database "
                               "exists yet")
        return database.registry

    def enter_job(self, registry: scoped_session) -> scoped_session | None:
        """The calling thread runs a job on `registry` from now on; returns the one it
        used before (restored by leave_job)."""
        previous = getattr(self._thread, "registry", None)
        self._thread.registry = registry
        return previous

    def leave_job(self, previous: scoped_session | None) -> None:
        self._thread.registry = previous

    def newest(self, database: "Database") -> None:
        self._newest = weakref.ref(database)

    def __call__(self, **kwargs):
        return self.registry_in_use()(**kwargs)

    def __getattr__(self, name: str):   # Session.query, .execute, .remove, .registry...
        return getattr(self.registry_in_use(), name)


# The one name job code imports. Creating it opens nothing: no engine, no
# connection, no work at import time.
Session = JobSessionProxy()


class JobSession(OrmSession):
    """The Session class of every registry: it remembers being closed, so that the
    runner can tell a job that closed its own Session (and so threw away what it
    had not committed) from one that did not."""

    was_closed = False

    def close(self) -> None:
        self.was_closed = True
        super().close()


class Database:
    """Engine + the registry's binding + error classification for one URL."""

    def __init__(self, settings: DatabaseSettings, extra_codes: ExtraCodes | None = None,
                 *, for_jobs: bool = True) -> None:
        self.settings = settings
        self.url = make_url(settings.url)
        self.extra_codes = extra_codes
        if self.url.get_driver_name() == "pyodbc":
            _disable_odbc_pooling()
        self.engine: Engine = create_engine(self.url, **_engine_options(settings))
        self.dialect = self.engine.dialect.name
        event.listen(self.engine, "handle_error", self._mark_disconnect)
        self.statements = StatementTracker(self.engine, self.url.get_driver_name())
        if self.url.get_driver_name() in NO_ABORTED_TRANSACTIONS:
            # Nothing to check on these drivers: skip asking the Session for its
            # connection before every commit (4-7 us a job).
            self.refuse_aborted_commit = _nothing_to_refuse
        _skip_needless_reset(self.engine)
        # This engine's own registry. expire_on_commit=False: the worker commits
        # after the job has returned and discards the Session right after, so
        # expiring its objects would be wasted work.
        factory = sessionmaker(bind=self.engine, class_=JobSession, expire_on_commit=False)
        event.listen(factory, "after_begin", _remember_connection)
        event.listen(factory, "after_commit", _mark_transaction_ended)
        event.listen(factory, "after_rollback", _mark_transaction_ended)
        self.registry = scoped_session(factory)
        self._kept_from_parent: tuple = ()
        # A job may fork: the child must never touch this process's connections.
        os.register_at_fork(after_in_child=partial(_after_fork_in_child, weakref.ref(self)))
        if for_jobs:   # not for an engine of the worker's own (the cluster's run table)
            Session.newest(self)

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

    def forked(self) -> None:
        """In a child forked by a job (os.register_at_fork): the pool and the forking
        thread's Session belong to the parent. Closing their connections here, even
        by garbage collection, would end them for the parent too (a MariaDB ODBC
        connection closed in a child is lost to its parent), so they are kept,
        untouched, for the child's life; the child gets a new pool (SQLAlchemy's
        pattern: dispose(close=False)) and a new Session, and a statement on a
        connection the parent opened is refused."""
        parent_session = self.registry() if self.registry.registry.has() else None
        self._kept_from_parent = (self.engine.pool, parent_session)
        self.registry.registry.clear()
        self.engine.dispose(close=False)
        self.statements.forked(self.engine)


def _after_fork_in_child(database_ref: "weakref.ref[Database]") -> None:
    database = database_ref()
    if database is not None:
        database.forked()


# Drivers whose connections are never libpq's (no info.transaction_status), on
# databases where a failed statement does not abort the transaction:
# refuse_aborted_commit has nothing to check there.
NO_ABORTED_TRANSACTIONS = frozenset({"pysqlite", "pyodbc", "pymysql", "mysqldb",
                                     "mariadbconnector", "pymssql", "mssqlpython"})


def _nothing_to_refuse(session) -> None:
    pass


class AbortedTransaction(Exception):
    """The job returned, but its PostgreSQL transaction had already been aborted."""


class DirtyConnection(Exception):
    """A connection still in a transaction after its rollback on return to the pool."""


ENDED = "worker_transaction_ended"   # pool-entry info: the Session ended its transaction
SESSION_RECORD = "worker_pool_record"  # Session.info: its connection's pool-entry info
HAD_CONNECTION = "worker_had_connection"  # Session.info: it got a connection once


def _remember_connection(session, transaction, connection) -> None:
    """after_begin: which pooled connection this Session's transaction runs on, and
    that the Session got one (the job's first statement could be sent)."""
    session.info[SESSION_RECORD] = connection.connection.info
    session.info[HAD_CONNECTION] = True


def failed_before_first_statement(session, exc: BaseException) -> bool:
    """True when `exc` came out of the Session getting its first connection
    (pool checkout, connect, first-connect initialisation, pre-ping) and is the
    connection breaking: nothing of the job reached the database. Not when
    something answered: a driver error on a live connection is the server's or
    driver's word (MariaDB's 'access denied to database', 1044) and keeps its own
    classification; a Python error (TypeError from a bad connect_args keyword)
    is a bug that a retry repeats."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError
    if session.info.get(HAD_CONNECTION):
        return False
    if isinstance(exc, DBAPIError):
        if not exc.connection_invalidated:
            return False
    elif not isinstance(exc, (SQLAlchemyError, OSError)):
        return False
    frame = exc.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        if code.co_name == "_connection_for_bind" and "sqlalchemy" in code.co_filename:
            return True
        frame = frame.tb_next
    return False


def _mark_transaction_ended(session) -> None:
    """after_commit / after_rollback: the COMMIT or ROLLBACK of the Session's own
    transaction succeeded, and the connection is about to go back to the pool (in
    the same call): mark it so that the pool sends no ROLLBACK of its own. The
    mark is taken off at that return, so it belongs to this one check-out."""
    if session.in_nested_transaction():   # a SAVEPOINT: the transaction goes on
        return
    info = session.info.pop(SESSION_RECORD, None)
    if info is not None:
        info[ENDED] = True


# libpq's PQtransactionStatus (psycopg 3 and psycopg2 report it as
# connection.info.transaction_status): idle, or inside a failed transaction.
_LIBPQ_IDLE, _LIBPQ_INERROR = 0, 3


def _libpq_transaction_status(dbapi_connection) -> int | None:
    """libpq's own word on the connection's transaction; None for other drivers."""
    status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    return None if status is None else int(status)


def _skip_needless_reset(engine: Engine) -> None:
    """Roll back a connection returned to the pool unless its transaction is known
    to be over.

    SQLAlchemy's default reset-on-return sends a ROLLBACK for every connection
    that comes back after a Session commit, although the COMMIT already ended the
    transaction: one wasted round trip per job, and a second ROLLBACK after a
    failed job's own. A Session marks a connection whose COMMIT or ROLLBACK
    succeeded (_mark_transaction_ended); SQLAlchemy
    tells us when a Connection already rolled back on close. Anything else (a
    raw_connection() left open, a failed job) is rolled back as before, and a
    connection whose rollback fails is invalidated by the pool. On PostgreSQL
    libpq knows the transaction state exactly: roll back when a transaction is
    open or aborted ("idle in transaction"), never otherwise, and a connection
    still not idle after that is invalidated (the pool does so when reset raises)
    rather than pooled dirty. Only Pool events are used: Connection event
    listeners (begin/commit/rollback) would move every statement off
    SQLAlchemy's fast path.
    """
    def reset(dbapi_connection, record, reset_state) -> None:
        ended = record.info.pop(ENDED, False) if record is not None else False
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

    event.listen(engine.pool, "reset", reset)
    # A mark left by anything else must not skip the next check-out's reset.
    event.listen(engine.pool, "checkout",
                 lambda dbapi_connection, record, proxy: record.info.pop(ENDED, None))


def _engine_options(settings: DatabaseSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle if settings.pool_recycle >= 0 else -1,
        "pool_pre_ping": settings.pool_pre_ping,
        "pool_reset_on_return": None,   # _skip_needless_reset decides instead
        # An error's text and traceback would show the bind parameters (a card
        # number in a UNIQUE violation); logs never carry them.
        "hide_parameters": True,
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
    SQL Server has not, so there it is a check, then CREATE, under sp_getapplock)."""
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
        if connection.dialect.name == "mssql" and _missing_tables(connection, metadata):
            # SQL Server: a check, then CREATE. A second creator that checked before
            # the first committed waits for the first's CREATE, then fails with 2714
            # (not transient). One creator at a time (an application lock held until
            # this transaction ends), so the next one's check sees the table.
            connection.execute(text(
                "EXEC sp_getapplock @Resource = N'run-worker create_tables', "
                "@LockMode = 'Exclusive', @LockOwner = 'Transaction'"))
        metadata.create_all(connection, checkfirst=True)


def record_schema_version(engine, component: str, version: int) -> None:
    """Write `component`'s row in worker_schema (the run table's "runs", the
    history, the cluster's pauses), unless a process wrote one first (that one is
    read and checked, or upgraded, by the caller)."""
    from sqlalchemy import column, insert, table
    from sqlalchemy.exc import IntegrityError
    versions = table("worker_schema", column("component"), column("version"))
    try:
        with engine.begin() as connection:
            connection.execute(insert(versions).values(component=component,
                                                       version=version))
    except IntegrityError:
        pass   # another process wrote it first


def _missing_tables(connection, metadata) -> bool:
    """True if a table of the metadata does not exist yet (no lock needed otherwise:
    jobs that only check never wait for each other)."""
    from sqlalchemy import inspect
    inspector = inspect(connection)
    return any(not inspector.has_table(table.name, schema=table.schema)
               for table in metadata.sorted_tables)


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
