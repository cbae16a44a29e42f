"""The run history: every run one row, in every mode, kept across restarts.

`History` is an observer of the work loop (monitoring.observe): when a run ends
(scheduled, `--once`, recovered from a dead cluster node, or started by hand) it
turns the run into a row and hands it to a `HistoryWriter`, whose thread writes
rows in batches through an engine of its own (never a job's Session, connection or
transaction), to one table, `worker_history`, in the job database or in a local
SQLite file (`history.url`). A write that fails never fails a job: the rows wait
for the next try (at most MAX_QUEUED of them), the failure is counted
(`failed_writes`, a metric) and logged once per streak.

The table is versioned as the component "history" of the cluster's
`worker_schema` table, beside the run table's "runs": a node that knows only the
run table reads its own row and is not refused.

`--history JOB` and the status page read it back (`HistoryStore.runs_of`,
`HistoryStore.recent`: one query for every job).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from .config import Config, DatabaseSettings, HistorySettings, mask_secrets, masked_url
from .errors import describe
from .monitoring.observe import NoObserver

log = logging.getLogger("worker.history")

COMPONENT, SCHEMA_VERSION = "history", 1     # its row in worker_schema
# What started a run (the `kind` column).
SCHEDULED, ONCE, RECOVERED, RUN_NOW = "scheduled", "once", "recovered", "run_now"
BATCH_ROWS = 500          # a batch is written once this many rows wait...
FLUSH_EVERY = 1.0         # ...or its first row has waited this long (seconds)
ROWS_PER_INSERT = 200     # 2,000 parameters: SQL Server takes at most 2,100
MAX_QUEUED = 50_000       # rows kept while the store is out of reach; the oldest go first
RETRY_WAIT_MAX = 30.0     # seconds between tries while the store is out of reach
PRUNE_EVERY = 600.0       # seconds between retention passes
CLOSE_WAIT = 2.0          # seconds a stop waits for the last rows to be written, at
                          # least (beside the hooks and the parts: worker.app)
CLOSING_TRIES = 4         # a stop tries the last rows this often (a deadlock, a lock)...
CLOSING_RETRY_WAIT = 0.1  # ...this many seconds apart at first, doubling
ERROR_MAX = 1000          # characters of an error kept

TABLE = "worker_history"
_COLUMNS = ("job", "kind", "scheduled_ms", "started_ms", "ended_ms", "outcome",
            "attempts", "node", "pid", "error")


def history_tables():
    """(metadata, the history table, the schema versions table). Built when a store
    is, on the thread that needs it: importing this module must stay cheap, since
    the loop's process imports it at start-up (the tables and the cluster module
    cost 10 ms there)."""
    from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table

    from .cluster import schema_versions
    metadata = MetaData()
    runs = Table(
        TABLE, metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job", String(200), nullable=False),
        Column("kind", String(16), nullable=False),         # SCHEDULED, ONCE, ...
        Column("scheduled_ms", BigInteger, nullable=True),  # the occurrence; NULL: --once
        Column("started_ms", BigInteger, nullable=False),
        Column("ended_ms", BigInteger, nullable=False),
        Column("outcome", String(16), nullable=False),      # success, failed, timeout...
        Column("attempts", Integer, nullable=False),
        Column("node", String(200), nullable=False),        # cluster node, else host
        Column("pid", Integer, nullable=False),
        Column("error", String(ERROR_MAX), nullable=True),  # masked
        Index("ix_worker_history_job_id", "job", "id"),
        Index("ix_worker_history_ended", "ended_ms"),
    )
    return metadata, runs, schema_versions.to_metadata(metadata)


def store_url(config: Config) -> str:
    """Where the history of this config is kept: history.url, else the job database."""
    return config.history.url or config.database.url


def open_store(config: Config) -> "HistoryStore":
    """The history store of this config (no connection opened yet)."""
    url = store_url(config)
    connect_args = config.database.connect_args if url == config.database.url else {}
    return HistoryStore(url, connect_args, config.extra_codes)


class HistoryStore:
    """The history table in one database: an engine of its own (2 connections)."""

    def __init__(self, url: str, connect_args=None, extra_codes=None) -> None:
        from .db import Database
        self.url = url
        self.metadata, self.runs, self.versions = history_tables()
        self.database = Database(DatabaseSettings(url=url, pool_size=2, max_overflow=2,
                                                  pool_timeout=10,
                                                  connect_args=dict(connect_args or {})),
                                 extra_codes, for_jobs=False)
        self._schema_ready = False
        self._inserts: dict[int, str] = {}     # rows -> the INSERT for that many

    @property
    def display_url(self) -> str:
        return self.database.display_url

    def ensure_schema(self) -> None:
        """Create the table and its version row if missing (safe when several
        processes start at once); refuse a table of a newer version."""
        if self._schema_ready:
            return
        from sqlalchemy import select

        from .db import create_tables, record_schema_version
        versions = self.versions
        engine = self.database.engine
        with engine.begin() as connection:
            create_tables(connection, self.metadata)
        record_schema_version(engine, COMPONENT, SCHEMA_VERSION)
        with engine.connect() as connection:
            version = connection.execute(select(versions.c.version).where(
                versions.c.component == COMPONENT)).scalar_one()
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"the history table has schema version {version}; this "
                               f"worker knows version {SCHEMA_VERSION}")
        self._schema_ready = True

    def write(self, rows: list[tuple]) -> None:
        """Insert rows (tuples in _COLUMNS order) in one transaction, ROWS_PER_INSERT
        to a statement. The statement is the driver's own SQL, built once per size:
        SQLAlchemy compiles a multi-row VALUES list anew for every batch (0.7 CPU
        seconds per 3,000 rows), and an executemany is a round trip per row on most
        drivers, each giving up the interpreter lock the job threads wait for (a
        3,000-job MariaDB batch 27% slower)."""
        self.ensure_schema()
        with self.database.engine.begin() as connection:
            if connection.dialect.paramstyle not in ("qmark", "format", "pyformat"):
                # A driver of another style (named, numeric): SQLAlchemy's executemany.
                from sqlalchemy import insert
                connection.execute(insert(self.runs),
                                   [dict(zip(_COLUMNS, row)) for row in rows])
                return
            for start in range(0, len(rows), ROWS_PER_INSERT):
                chunk = rows[start:start + ROWS_PER_INSERT]
                connection.exec_driver_sql(self._insert_sql(len(chunk)),
                                           tuple(value for row in chunk for value in row))

    def _insert_sql(self, count: int) -> str:
        sql = self._inserts.get(count)
        if sql is None:
            marker = "?" if self.database.engine.dialect.paramstyle == "qmark" else "%s"
            row = "(" + ", ".join([marker] * len(_COLUMNS)) + ")"
            sql = self._inserts[count] = (f"INSERT INTO {TABLE} ({', '.join(_COLUMNS)}) "
                                          f"VALUES " + ", ".join([row] * count))
        return sql

    def prune(self, keep: float, per_job: int) -> int:
        """Delete rows that ended more than `keep` seconds ago and, of each job, all
        but its newest `per_job` rows; how many went."""
        from sqlalchemy import delete, func, select
        self.ensure_schema()
        runs = self.runs
        cutoff = int((time.time() - keep) * 1000)
        ranked = select(runs.c.id, func.row_number().over(
            partition_by=runs.c.job, order_by=runs.c.id.desc()).label("newest")).subquery()
        # The ids in a derived table of their own: MariaDB refuses a DELETE whose
        # subquery reads the table it deletes from, unless it is materialised first.
        beyond_cap = select(ranked.c.id).where(ranked.c.newest > per_job).subquery()
        # Whether any job has too many rows: a scan of the (job, id) index, a tenth
        # of the ranking's cost (SQLite, 42,000 rows: 4 ms against 50 ms).
        over_cap = select(runs.c.job).group_by(runs.c.job).having(
            func.count() > per_job).limit(1)
        with self.database.engine.begin() as connection:
            deleted = connection.execute(delete(runs).where(
                runs.c.ended_ms < cutoff)).rowcount
            if connection.execute(over_cap).first() is not None:
                deleted += connection.execute(delete(runs).where(
                    runs.c.id.in_(select(beyond_cap.c.id)))).rowcount
        return max(deleted, 0)

    def runs_of(self, job: str, limit: int = 20) -> list[Any]:
        """The newest `limit` rows of `job`, newest first (none: no table yet)."""
        from sqlalchemy import inspect, select
        runs = self.runs
        with self.database.engine.connect() as connection:
            if not self._schema_ready and not inspect(connection).has_table(TABLE):
                return []
            return connection.execute(select(runs).where(runs.c.job == job)
                                      .order_by(runs.c.id.desc()).limit(limit)).all()

    def recent(self, limit: int) -> dict[str, list[Any]]:
        """Each job's newest `limit` rows, newest first: one query (once the table
        is known to exist; this creates it, as the daemon's first write would)."""
        from sqlalchemy import func, select
        self.ensure_schema()
        runs = self.runs
        ranked = select(runs, func.row_number().over(
            partition_by=runs.c.job, order_by=runs.c.id.desc()).label("newest")).subquery()
        found: dict[str, list[Any]] = {}
        with self.database.engine.connect() as connection:
            for row in connection.execute(select(ranked).where(ranked.c.newest <= limit)
                                          .order_by(ranked.c.job, ranked.c.newest)):
                found.setdefault(row.job, []).append(row)
        return found

    def dispose(self) -> None:
        self.database.dispose()


class HistoryWriter:
    """Rows in, batches out: one thread writes them to the current store. The job
    threads and the loop only append to a list."""

    def __init__(self) -> None:
        self.settings: HistorySettings | None = None
        self._store: HistoryStore | None = None
        self._make_store: Callable[[], HistoryStore] | None = None
        self.failed_writes = 0       # batches that could not be written (metric)
        self.dropped_rows = 0        # rows given up: too many waiting, or left at close
        self._rows: list[tuple] = []
        self._key: str | None = None
        self._retired: list[HistoryStore] = []
        self._closing = False
        self._close_by = 0.0         # monotonic: when close() stops waiting
        self._writing = 0            # rows taken by the thread, not written yet
        self._failing = False
        # The store refused us in a way no wait can fix (a login refused): rows are
        # dropped until the next use() (a reload), so that a wrong password is not
        # tried again and again (an account lockout policy would count each try).
        self._given_up = False
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last_prune = float("-inf")

    def use(self, key: str, make_store: Callable[[], HistoryStore],
            settings: HistorySettings) -> None:
        """Write to the store named `key` from now on (built by `make_store`, when
        first needed and by whoever needs it: never the loop). Rows still waiting
        go to the new store."""
        with self._wake:
            self.settings = settings
            if key != self._key:
                if self._key is not None:
                    log.info("run history now kept in %s", masked_url(key))
                if self._store is not None:
                    self._retired.append(self._store)
                self._store, self._make_store, self._key = None, make_store, key
            self._given_up = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="history-writer",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    @property
    def store(self) -> HistoryStore | None:
        """The store rows go to (built now if not yet); None before use()."""
        with self._wake:
            if self._store is None and self._make_store is not None:
                self._store = self._make_store()
            return self._store

    def add(self, row: tuple) -> None:
        with self._wake:
            if self._given_up:
                self.dropped_rows += 1
                return
            self._rows.append(row)
            waiting = len(self._rows)
            if waiting == 1 or waiting == BATCH_ROWS:
                self._wake.notify()

    def begin_close(self, within: float = CLOSE_WAIT) -> None:
        """Start writing the last rows now, to be waited for by close() at most until
        `within` seconds from now (the first call decides): the stop waits for the
        hooks and the parts meanwhile, not after."""
        with self._wake:
            if not self._closing:
                self._closing = True
                self._close_by = time.monotonic() + within
                self._wake.notify()

    def close(self, within: float = CLOSE_WAIT) -> None:
        """Write what waits (until begin_close's time, or `within` seconds), then let
        the store go."""
        self.begin_close(within)
        if self._thread is not None:
            self._thread.join(max(0.0, self._close_by - time.monotonic()))
            if self._thread.is_alive():
                with self._wake:     # those being written count: they are lost too
                    lost = len(self._rows) + self._writing
                    self.dropped_rows += lost
                log.warning("run history: the last rows were not written in time for "
                            "the stop; %d row(s) lost", lost)
                return
        for store in self._retired + ([self._store] if self._store is not None else []):
            store.dispose()

    def _run(self) -> None:
        delay = FLUSH_EVERY
        closing_tries = 0
        while True:
            with self._wake:
                self._wait_for_batch()
                rows, self._rows = self._rows, []
                self._writing = len(rows)
                settings, closing = self.settings, self._closing
                retired, self._retired = self._retired, []
            for old in retired:
                old.dispose()
            written = not rows or self._write(rows)
            if written:
                with self._wake:
                    self._writing = 0
                delay = FLUSH_EVERY
                if self._store is not None and not self._given_up:
                    self._prune(self._store, settings)
            else:
                self._keep(rows)
            if closing:
                closing_tries += not written
                if written or closing_tries >= CLOSING_TRIES:
                    if not written:
                        self._give_up()
                    return
                time.sleep(CLOSING_RETRY_WAIT * 2 ** (closing_tries - 1))
            elif not written:
                with self._wake:
                    if not self._closing:
                        self._wake.wait(delay)
                delay = min(delay * 2, RETRY_WAIT_MAX)

    def _wait_for_batch(self) -> None:
        """(With the lock held.) Until a batch is due: rows have waited FLUSH_EVERY,
        BATCH_ROWS wait, or a stop came."""
        while not self._rows and not self._closing:
            self._wake.wait()
        deadline = time.monotonic() + FLUSH_EVERY
        while len(self._rows) < BATCH_ROWS and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(left)

    def _write(self, rows: list[tuple]) -> bool:
        try:
            self.store.write([_masked(row) for row in rows])
        except Exception as exc:  # whatever the store says: the jobs go on
            self.failed_writes += 1
            if self._store is not None and self._store.database.classify(exc).permanent:
                self._given_up = True
                self.dropped_rows += len(rows)
                log.warning("run history: %s refuses us in a way waiting cannot fix "
                            "(%s): no rows are written until a reload", masked_url(self._key),
                            describe(exc))
                return True      # nothing to try again
            if not self._failing:
                self._failing = True
                log.warning("run history: cannot write to %s (%s); the rows wait and are "
                            "tried again (this is logged once until it works)",
                            masked_url(self._key), describe(exc))
            return False
        if self._failing:
            self._failing = False
            log.info("run history: writing to %s works again", masked_url(self._key))
        return True

    def _keep(self, rows: list[tuple]) -> None:
        """Rows that could not be written go back first in line, bounded."""
        with self._wake:
            self._rows[:0] = rows
            self._writing = 0
            excess = len(self._rows) - MAX_QUEUED
            if excess > 0:
                del self._rows[:excess]
                self.dropped_rows += excess

    def _give_up(self) -> None:
        with self._wake:
            lost, self._rows = len(self._rows), []
        self.dropped_rows += lost
        log.warning("run history: %d row(s) could not be written before the stop", lost)

    def _prune(self, store: HistoryStore, settings: HistorySettings | None) -> None:
        if settings is None or time.monotonic() - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = time.monotonic()
        try:
            deleted = store.prune(settings.keep, settings.max_runs_per_job)
        except Exception as exc:  # retention waits for the next pass
            log.warning("run history: retention could not be applied: %s", describe(exc))
            return
        if deleted:
            log.info("run history: pruned %d row(s)", deleted)


def _masked(row: tuple) -> tuple:
    error = row[-1]
    if not error:
        return row
    return row[:-1] + (mask_secrets(error)[:ERROR_MAX],)


def run_kind(run) -> str:
    """What started `run` (a scheduler.DueRun). A run started by hand says so
    itself (its `kind`)."""
    kind = getattr(run, "kind", None)
    if kind:
        return kind
    if run.recovering is not None:
        return RECOVERED
    return ONCE if run.slot is None else SCHEDULED


class History(NoObserver):
    """The process's run history, as an observer: it outlives reloads (a reload
    that moves the history switches the writer's store) and is closed at exit."""

    def __init__(self) -> None:
        self.writer = HistoryWriter()
        self.enabled = False
        self._node = socket.gethostname()
        self._pid = os.getpid()
        self._scheduled: dict[str, int | None] = {}    # job -> its run's occurrence (ms)

    @property
    def store(self) -> HistoryStore | None:
        """The store rows go to (None: the history is off)."""
        if not self.enabled:
            return None
        try:
            return self.writer.store
        except Exception as exc:  # an engine that cannot be made: as if unreachable
            log.debug("run history: no store: %s", describe(exc))
            return None

    def runtime_changed(self, runtime) -> None:
        config = runtime.config
        self.enabled = config.history.enabled
        if not self.enabled:
            return
        self._node = runtime.cluster.node if runtime.cluster is not None \
            else socket.gethostname()
        self.writer.use(store_url(config), lambda: open_store(config), config.history)

    def run_started(self, run, runtime) -> None:
        if not self.enabled:
            return
        if run.slot is None:
            scheduled = None
        elif runtime.cluster is not None or run.job.cron is not None:
            # The slot is an epoch time (the database's clock, or a cron fire time on
            # the wall clock): exact even if the wall clock stepped since it was due.
            scheduled = round(run.slot * 1000)
        else:                               # `every` runs on the monotonic clock
            scheduled = round((time.time() - run.lateness) * 1000)
        self._scheduled[run.job.name] = scheduled

    def run_finished(self, run, result) -> None:
        if not self.enabled:
            return
        ended = time.time()
        self.writer.add((result.job, run_kind(run), self._scheduled.pop(result.job, None),
                         round((ended - result.duration) * 1000), round(ended * 1000),
                         result.outcome.value, result.attempts, self._node, self._pid,
                         result.error))

    def begin_close(self, within: float = CLOSE_WAIT) -> None:
        self.writer.begin_close(within)

    def close(self, within: float = CLOSE_WAIT) -> None:
        self.writer.close(within)
