"""Several hosts, one schedule: runs coordinated through a table in the database.

One row per scheduled occurrence, keyed uniquely by (job, slot). A node claims an
occurrence by inserting its row; the unique key lets exactly one node win on every
backend, and no lock is held while the job runs. A running row is heartbeated; a
row whose heartbeat stopped for longer than the lease is marked abandoned by the
survivors, and an abandoned run of an idempotent job is claimed again (a single
conditional UPDATE) and re-run by one of them.

Every time here is the database's clock (epoch milliseconds), read at each
heartbeat and carried forward with the local clock in between, so hosts with
skewed clocks still agree on slots and leases.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import (BigInteger, Column, Index, Integer, MetaData, String, Table,
                        UniqueConstraint, and_, delete, event, func, insert, select, text,
                        update)
from sqlalchemy.exc import DBAPIError, IntegrityError

from .config import ClusterSettings, DatabaseSettings
from .db import Database, create_tables, record_schema_version
from .errors import describe

log = logging.getLogger("worker.cluster")

# 1: the first run table. 2: lease_ms, each row's own lease (nodes may differ).
SCHEMA_VERSION = 2
RUNNING, ABANDONED = "running", "abandoned"
PRUNE_BATCH = 500    # old rows deleted per statement

metadata = MetaData()
runs = Table(
    "worker_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(200), nullable=False),
    Column("slot_ms", BigInteger, nullable=False),      # the occurrence, epoch ms
    Column("node", String(200), nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("heartbeat_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=True),
    Column("outcome", String(16), nullable=False),      # running, success, failed, ...
    Column("attempts", Integer, nullable=False),
    Column("recovered", Integer, nullable=False),       # re-runs after being abandoned
    Column("error", String(1000), nullable=True),
    # The claiming node's lease: a row is abandoned when its own lease has passed
    # since its heartbeat. NULL on rows written by schema version 1.
    Column("lease_ms", BigInteger, nullable=True),
    UniqueConstraint("job", "slot_ms", name="uq_worker_runs_job_slot"),
    Index("ix_worker_runs_outcome_heartbeat", "outcome", "heartbeat_ms"),
    Index("ix_worker_runs_job_started", "job", "started_ms"),
)
# What --list and --history read: the version 1 columns, so that they work (read
# only) on a table no node of this version has upgraded yet.
_SHOWN = tuple(column for column in runs.columns if column.name != "lease_ms")
JOB_NAME_MAX = runs.c.job.type.length
NODE_NAME_MAX = runs.c.node.type.length
schema_versions = Table(
    "worker_schema", metadata,
    Column("component", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
)

# The database's clock as epoch seconds, per dialect.
_CLOCK_SQL = {
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
    "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
    "mariadb": "SELECT UNIX_TIMESTAMP(NOW(6))",
    "postgresql": "SELECT extract(epoch from clock_timestamp())",
    "mssql": "SELECT CAST(DATEDIFF_BIG(millisecond, '19700101', SYSUTCDATETIME()) "
             "AS FLOAT) / 1000.0",
}


def cluster_name_problems(job_names: Iterable[str], node: str | None = None) -> list[str]:
    """What makes these names unusable in the run table, one message each (empty:
    fine). Validation refuses them (exit 78) when a `cluster` section is present:
    names that differ only in case are one key under the case-insensitive default
    collations of MariaDB/MySQL and SQL Server, so one of the jobs would never run;
    a name longer than its column makes every claim of that job fail."""
    names = list(job_names)
    problems = []
    first_spelling: dict[str, str] = {}
    for name in names:
        other = first_spelling.setdefault(name.casefold(), name)
        if other != name:
            problems.append(f"job names {other!r} and {name!r} differ only in case: the "
                            f"run table (case-insensitive on MariaDB, MySQL and SQL "
                            f"Server) would take them for one job; rename one")
    for name in names:
        if len(name) > JOB_NAME_MAX:
            problems.append(f"job name {name[:40]!r}... is {len(name)} characters long; "
                            f"in cluster mode a job name may have at most {JOB_NAME_MAX} "
                            f"(the run table's column)")
    if node is not None and len(node) > NODE_NAME_MAX:
        problems.append(f"cluster.node is {len(node)} characters long; at most "
                        f"{NODE_NAME_MAX} (the run table's column)")
    return problems


def default_node_name() -> str:
    """`hostname:pid:random`, new at each start: two containers both running as
    PID 1 with one hostname, or a node restarted with its old pid, must not share a
    name (a live node heartbeats every running row of its name, so a dead one
    would never be found out)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class DbClock:
    """The database's clock: read at each sync, carried by the local clock between."""

    def __init__(self, dialect: str) -> None:
        self.sql = _CLOCK_SQL.get(dialect)
        self.offset = 0.0
        if self.sql is None:
            log.warning("no clock query for dialect %s: using this host's clock", dialect)

    def sync(self, connection) -> None:
        if self.sql is None:
            return
        before = time.time()
        database_now = float(connection.execute(text(self.sql)).scalar_one())
        after = time.time()
        self.offset = database_now - (before + after) / 2

    def now(self) -> float:
        return time.time() + self.offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)


@dataclass(frozen=True)
class Claim:
    id: int
    job: str
    slot_ms: int
    recovered: bool = False


class ClaimError(Exception):
    """A claim the database did not let through (nor refuse for another node's row):
    that job's run fails."""


@dataclass
class _Unsettled:
    """A run's end not written yet: its outcome (`values`), or, with None, its
    release (a run claimed ahead and never started: the row is deleted). Retried
    until `deadline` (monotonic), when the row's lease runs out."""
    claim: Claim
    values: dict | None
    deadline: float
    failures: int = 0
    error: str | None = None       # the last try's


def statement_timeout(lease: float) -> float:
    """Seconds a statement on the run table may wait for a lock or run: a sixth of
    the lease (at least 1 s, at most 10 s), so that a claim, a heartbeat or an
    outcome blocked by another node's lock fails well within the lease instead of
    waiting for ever (SQL Server's default) or 50 s (InnoDB's)."""
    return min(max(lease / 6, 1.0), 10.0)


def limit_statements(engine, dialect: str, seconds: float) -> None:
    """Give every connection of the run table's engine its lock and statement
    timeouts, set once when it is opened."""
    ms = int(seconds * 1000)

    def on_connect(dbapi_connection, _record) -> None:
        if dialect == "sqlite":
            statements = [f"PRAGMA busy_timeout = {ms}"]
        elif dialect in ("mysql", "mariadb"):
            statements = [f"SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds))}",
                          f"SET SESSION max_statement_time = {seconds:g}"]   # MariaDB only
        elif dialect == "postgresql":
            statements = [f"SET lock_timeout = {ms}", f"SET statement_timeout = {ms}"]
        elif dialect == "mssql":
            statements = [f"SET LOCK_TIMEOUT {ms}"]
        else:
            return
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                try:
                    cursor.execute(statement)
                except Exception as exc:  # a server without the setting (MySQL)
                    log.debug("run table connection: %s refused: %s", statement, exc)
        finally:
            cursor.close()
        if dialect in ("postgresql", "mysql", "mariadb", "mssql"):
            dbapi_connection.commit()     # SET ... must not leave a transaction open

    event.listen(engine, "connect", on_connect)
    if dialect == "mssql":
        # A statement the server holds (not a lock) still ends: pyodbc's query
        # timeout, set at each checkout after the statement tracker clears it.
        def on_checkout(dbapi_connection, _record, _proxy) -> None:
            if hasattr(dbapi_connection, "timeout"):
                dbapi_connection.timeout = max(1, round(seconds))
        event.listen(engine, "checkout", on_checkout)


class RunEnds:
    """How the ends of this node's runs reach the run table: a run's outcome, or
    (values None) the release of a run claimed ahead and never started. Written at
    once if the database lets it, else retried (`retry`: by the heartbeat thread,
    and by the cluster's stop) until the row's lease runs out; then given up: said
    in the log and added to `lost` (the process exits non-zero), the row left
    'running' to be marked abandoned like a dead node's."""

    def __init__(self, database: Database, node: str, clock: DbClock, lease: float,
                 lost: list[str]) -> None:
        self.database = database
        self.node = node
        self.clock = clock
        self.lease = lease
        self.lost = lost
        self._unsettled: list[_Unsettled] = []
        self._lock = threading.Lock()

    def waiting(self) -> int:
        with self._lock:
            return len(self._unsettled)

    def settle(self, claim: Claim, values: dict | None, deadline: float) -> None:
        unsettled = _Unsettled(claim, values, deadline)
        if not self._write(unsettled):
            with self._lock:
                self._unsettled.append(unsettled)

    def retry(self) -> bool:
        """Retry every unwritten end once; one whose lease ran out is given up (and
        reported). True while some are left."""
        with self._lock:
            unsettled, self._unsettled = self._unsettled, []
        left = []
        for each in unsettled:
            if time.monotonic() >= each.deadline:
                self._give_up(each)
            elif not self._write(each):
                left.append(each)
        with self._lock:
            self._unsettled[:0] = left
            return bool(self._unsettled)

    def _write(self, unsettled: _Unsettled) -> bool:
        """One try; True when nothing is left to do for it."""
        claim, values = unsettled.claim, unsettled.values
        mine = and_(runs.c.id == claim.id, runs.c.node == self.node,
                    runs.c.outcome == RUNNING)
        try:
            with self.database.engine.begin() as connection:
                result = connection.execute(self._statement(unsettled, mine))
        except Exception as exc:  # of any kind: retried until the lease runs out
            unsettled.failures += 1
            unsettled.error = describe(exc)
            if unsettled.failures == 1:
                log.warning("job=%s could not %s yet (%s); retrying for %.1fs (until its "
                            "lease runs out)", claim.job, _what(values), describe(exc),
                            max(0.0, unsettled.deadline - time.monotonic()),
                            extra={"job": claim.job})
            return False
        if result.rowcount == 0 and not (unsettled.failures and self._already_written(
                unsettled)):
            log.warning("job=%s finished a run that the cluster had already marked "
                        "abandoned (this node missed its lease); could not %s",
                        claim.job, _what(values), extra={"job": claim.job})
        elif unsettled.failures:
            log.info("job=%s: %s after %d failed attempt(s)", claim.job,
                     "run released" if values is None else "outcome recorded",
                     unsettled.failures, extra={"job": claim.job})
        return True

    def _already_written(self, unsettled: _Unsettled) -> bool:
        """After a failed try: did it reach the database after all (its COMMIT
        applied, the answer lost)? Then the retry finds nothing left to change."""
        try:
            with self.database.engine.connect() as connection:
                row = connection.execute(select(runs.c.node, runs.c.outcome).where(
                    runs.c.id == unsettled.claim.id)).first()
        except Exception:  # of any kind: unknown, reported as not written by us
            return False
        if unsettled.values is None:
            return row is None or (row.node == self.node and row.outcome == ABANDONED)
        return row is not None and row.node == self.node and \
            row.outcome == unsettled.values["outcome"]

    def _statement(self, unsettled: _Unsettled, mine):
        if unsettled.values is not None:
            return update(runs).where(mine).values(**unsettled.values)
        if unsettled.claim.recovered:
            # A recovered run given back stays a lost run, to be offered again.
            return update(runs).where(mine).values(
                outcome=ABANDONED, ended_ms=self.clock.now_ms(),
                error=f"node {self.node} took it over and gave it back unstarted")
        return delete(runs).where(mine)

    def _give_up(self, unsettled: _Unsettled) -> None:
        claim = unsettled.claim
        self.lost.append(claim.job)
        log.error("job=%s could not %s within its lease (%gs: %s); its row stays "
                  "'running' and will be marked abandoned (and run again if the job is "
                  "idempotent)", claim.job, _what(unsettled.values), self.lease,
                  unsettled.error, extra={"job": claim.job})


class Cluster:
    def __init__(self, settings: ClusterSettings, database_url: str,
                 extra_codes=None, lost_outcomes: list[str] | None = None) -> None:
        """`lost_outcomes`: where the names of jobs whose run's end could not be
        written within its lease are appended (the process exits non-zero)."""
        self.settings = settings
        self.node = settings.node or default_node_name()
        url = settings.url or database_url
        self.statement_timeout = statement_timeout(settings.lease)
        # An engine of its own: claims and heartbeats must not wait behind jobs for
        # the jobs' pool, and it must not rebind the jobs' Session registry.
        self.database = Database(DatabaseSettings(url=url, pool_size=2, max_overflow=2,
                                                  pool_timeout=self.statement_timeout),
                                 extra_codes, for_jobs=False)
        limit_statements(self.database.engine, self.database.dialect,
                         self.statement_timeout)
        self.clock = DbClock(self.database.dialect)
        self.lease_ms = int(settings.lease * 1000)
        self.ends = RunEnds(self.database, self.node, self.clock, settings.lease,
                            lost_outcomes if lost_outcomes is not None else [])
        # Claims this node runs: id -> when (monotonic) its row was last heartbeated.
        self._running: dict[int, float] = {}
        self._last_beat_ok: float | None = None   # monotonic; None: not joined
        self._beat_error: str | None = None       # why the last heartbeat failed
        self._said_unhealthy = False               # the log said so (once per outage)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = float("-inf")   # not 0: monotonic starts near 0 at boot
        self.abandoned_marked = 0    # runs of silent nodes marked abandoned (metrics)
        # A daemon's row in worker_nodes (worker.control_cluster.NodeRow): written
        # by the cluster-commands thread while heartbeats work, removed at the stop.
        self.membership = None

    # --- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Create the schema if needed, read the clock, start heartbeating."""
        self.ensure_schema()
        with self.database.engine.connect() as connection:
            self.clock.sync(connection)
        self._last_beat_ok = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                        name="cluster-heartbeat")
        self._thread.start()
        log.info("cluster node %s joined through %s (lease %gs, heartbeat %gs)",
                 self.node, self.database.display_url, self.settings.lease,
                 self.settings.heartbeat)

    def stop(self) -> None:
        """Stop heartbeating; write the ends still unwritten, each until its lease
        runs out (then it is reported lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        membership, self.membership = self.membership, None
        if membership is not None:      # after the last heartbeat: it stays gone
            membership.leave()
        while self.ends.retry():
            time.sleep(min(0.2, self.settings.heartbeat))
        self.database.dispose()

    @property
    def lost_outcomes(self) -> list[str]:
        return self.ends.lost

    # --- health -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.readiness_problem() is None

    def readiness_problem(self) -> str | None:
        """Why this node must not claim runs (and is not ready), or None: its last
        heartbeat failed, or none has succeeded within the lease (a heartbeat
        thread stuck in a statement looks like that too)."""
        if self._last_beat_ok is None:
            return "the cluster node has not joined the run table"
        if self._beat_error is not None:
            return f"the cluster heartbeat failed ({self._beat_error})"
        silent = time.monotonic() - self._last_beat_ok
        if silent > self.settings.lease:
            return (f"the cluster heartbeat has not succeeded for {silent:.1f}s "
                    f"(lease {self.settings.lease:g}s)")
        return None

    def check_health(self) -> bool:
        """healthy, and the log told (once) when that changes."""
        problem = self.readiness_problem()
        with self._lock:
            changed = (problem is not None) != self._said_unhealthy
            self._said_unhealthy = problem is not None
        if changed and problem is not None:
            log.error("%s: this node stops claiming runs and is not ready until a "
                      "heartbeat succeeds", problem)
        elif changed:
            log.info("cluster heartbeat works again: this node claims runs again")
        return problem is None

    def ensure_schema(self) -> None:
        """Create the run table, or bring a version 1 table to this version (safe
        when several nodes start at once)."""
        with self.database.engine.begin() as connection:
            create_tables(connection, metadata)
        record_schema_version(self.database.engine, "runs", SCHEMA_VERSION)
        version = self._schema_version()
        if version == 1:
            self._add_lease_column()
            with self.database.engine.begin() as connection:
                connection.execute(update(schema_versions).where(
                    schema_versions.c.component == "runs",
                    schema_versions.c.version == 1).values(version=SCHEMA_VERSION))
            log.info("run table upgraded to schema version %d (each row's own lease)",
                     SCHEMA_VERSION)
            version = self._schema_version()
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"the run table has schema version {version}; this worker "
                               f"knows version {SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        with self.database.engine.connect() as connection:
            return connection.execute(select(schema_versions.c.version).where(
                schema_versions.c.component == "runs")).scalar_one()

    def _add_lease_column(self) -> None:
        """ALTER TABLE ... ADD lease_ms, unless a node starting beside us did it."""
        if self._has_lease_column():
            return
        column = runs.c.lease_ms.type.compile(dialect=self.database.engine.dialect)
        try:
            with self.database.engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE worker_runs ADD lease_ms {column} "
                                        f"NULL"))
        except DBAPIError:
            if not self._has_lease_column():   # not a race lost: a real failure
                raise

    def _has_lease_column(self) -> bool:
        from sqlalchemy import inspect
        with self.database.engine.connect() as connection:
            return "lease_ms" in {column["name"] for column in
                                  inspect(connection).get_columns("worker_runs")}

    # --- claims (called from the work loop) ---------------------------------------------

    def claim(self, job: str, slot_ms: int) -> Claim | None:
        """Insert the occurrence's row; None when another node has it. ClaimError
        when the database let no answer through (this job's run fails; other jobs go
        on claiming: only a failed heartbeat stops every claim)."""
        now = self.clock.now_ms()
        values = dict(job=job, slot_ms=slot_ms, node=self.node, started_ms=now,
                      heartbeat_ms=now, outcome=RUNNING, attempts=0, recovered=0,
                      lease_ms=self.lease_ms)
        outcome_unknown = False     # an attempt failed: its INSERT may be committed
        began = time.monotonic()
        for attempt in range(3):
            try:
                with self.database.engine.begin() as connection:
                    result = connection.execute(insert(runs).values(**values))
                return self._track(Claim(result.inserted_primary_key[0], job, slot_ms))
            except IntegrityError:
                # The unique key: another node won, or our own earlier attempt did.
                return self._own_row(job, slot_ms, now) if outcome_unknown else None
            except Exception as exc:  # of any kind (a pool timeout too): never the loop's
                outcome_unknown = True
                retry = isinstance(exc, DBAPIError) and \
                    self.database.classify(exc).should_retry(False)
                # Retried while quick (a deadlock), not after a lock timeout: the
                # claim, its retries and the look-up stay well within the lease.
                if not retry or attempt == 2 or \
                        time.monotonic() - began >= self.statement_timeout / 2:
                    claim = self._own_row(job, slot_ms, now)
                    if claim is None:
                        raise ClaimError(describe(exc)) from exc
                    return claim
                time.sleep(0.05 * (attempt + 1))
        return None

    def _own_row(self, job: str, slot_ms: int, started_ms: int) -> Claim | None:
        """The claim whose COMMIT may have been applied without our hearing of it:
        the occurrence's row if it is the one we inserted (this node, this start
        time, still running), else None; ClaimError when it cannot be looked up (a
        row of ours is then not heartbeated (see beat), so it is marked abandoned
        after its lease)."""
        try:
            with self.database.engine.connect() as connection:
                row = connection.execute(select(runs.c.id, runs.c.node, runs.c.started_ms,
                                                runs.c.outcome).where(
                    runs.c.job == job, runs.c.slot_ms == slot_ms)).first()
        except Exception as exc:  # of any kind: the claim's fate is unknown
            raise ClaimError(f"whether its claim was recorded is unknown: "
                             f"{describe(exc)}") from exc
        if row is None or (row.node, row.started_ms, row.outcome) != \
                (self.node, started_ms, RUNNING):
            return None
        log.info("job=%s the run table has our claim although its commit was not "
                 "confirmed: running it", job, extra={"job": job})
        return self._track(Claim(row.id, job, slot_ms))

    def _track(self, claim: Claim) -> Claim:
        """A claim this node now runs: its row is heartbeated until its outcome is
        written."""
        with self._lock:
            self._running[claim.id] = time.monotonic()
        return claim

    def holder(self, job: str, slot_ms: int) -> str:
        try:
            with self.database.engine.connect() as connection:
                node = connection.execute(select(runs.c.node).where(
                    runs.c.job == job, runs.c.slot_ms == slot_ms)).scalar()
            return node or "?"
        except Exception:  # of any kind: the name is only shown
            return "?"

    def finish(self, claim: Claim, outcome: str, attempts: int, error: str | None) -> None:
        """Write the run's end: at once if the database lets us, else retried (by the
        heartbeat thread, and by stop) until the row's lease runs out."""
        self._settle(claim, dict(outcome=outcome, attempts=attempts,
                                 ended_ms=self.clock.now_ms(),
                                 heartbeat_ms=self.clock.now_ms(),
                                 error=error[:1000] if error else None))

    def release(self, claim: Claim) -> None:
        """Give back a run claimed ahead and never started: its row is deleted, as
        if it had never been claimed, so that another node may run it."""
        self._settle(claim, None)

    def _settle(self, claim: Claim, values: dict | None) -> None:
        # The row is heartbeated no more: its lease runs from its last heartbeat.
        with self._lock:
            beaten = self._running.pop(claim.id, time.monotonic())
        self.ends.settle(claim, values, beaten + self.settings.lease)

    def abandoned_runs(self, idempotent_jobs: Iterable[str]) -> list[Claim]:
        """Abandoned runs of these (idempotent) jobs, oldest first: candidates to run
        again. Nothing is claimed yet: see reclaim()."""
        names = list(idempotent_jobs)
        if not names or not self.healthy:
            return []
        try:
            with self.database.engine.connect() as connection:
                rows = connection.execute(select(runs.c.id, runs.c.job, runs.c.slot_ms)
                                          .where(runs.c.outcome == ABANDONED,
                                                 runs.c.job.in_(names))
                                          .order_by(runs.c.id).limit(10)).all()
        except Exception as exc:  # of any kind: looked for again at the next heartbeat
            log.warning("could not look for abandoned runs: %s", describe(exc))
            return []
        return [Claim(row.id, row.job, row.slot_ms, recovered=True) for row in rows]

    def reclaim(self, candidate: Claim) -> Claim | None:
        """Take over an abandoned run: one conditional UPDATE, so one node wins."""
        now = self.clock.now_ms()
        try:
            with self.database.engine.begin() as connection:
                result = connection.execute(update(runs).where(
                    runs.c.id == candidate.id, runs.c.outcome == ABANDONED).values(
                    outcome=RUNNING, node=self.node, started_ms=now, heartbeat_ms=now,
                    lease_ms=self.lease_ms, recovered=runs.c.recovered + 1, error=None))
        except Exception as exc:  # of any kind: offered again at the next heartbeat
            log.warning("job=%s could not take over its abandoned run: %s", candidate.job,
                        describe(exc), extra={"job": candidate.job})
            return None
        return self._track(candidate) if result.rowcount == 1 else None

    # --- heartbeat thread ---------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat):
            try:
                self.beat()
            except Exception as exc:  # the thread lives as long as the process
                self._beat_error = describe(exc)
                log.error("cluster heartbeat: unexpected error: %s", describe(exc),
                          exc_info=exc)

    def beat(self) -> None:
        """One heartbeat: clock, own rows, unwritten ends, abandoned rows, pruning.
        Only the rows this node knows it runs are heartbeated: a row it may have
        inserted without knowing (a claim whose commit outcome stayed unknown) is
        left to be marked abandoned."""
        with self._lock:
            running_ids = sorted(self._running)
        started = time.monotonic()
        try:
            with self.database.engine.begin() as connection:
                self.clock.sync(connection)
                if running_ids:
                    connection.execute(update(runs).where(
                        runs.c.id.in_(running_ids), runs.c.node == self.node,
                        runs.c.outcome == RUNNING).values(heartbeat_ms=self.clock.now_ms()))
        except Exception as exc:  # of any kind (a pool timeout too)
            self._beat_error = describe(exc)
            self.check_health()
            # Tried even so: an end whose lease ran out is reported now, not when
            # the database is back.
            self.ends.retry()
            return
        with self._lock:
            for claim_id in running_ids:
                if claim_id in self._running:
                    self._running[claim_id] = started
        self._last_beat_ok, self._beat_error = started, None
        self.check_health()
        self.ends.retry()
        # The node's row in worker_nodes (`membership`) is written by its own thread
        # (worker.control_cluster): a locked control table must not hold up this
        # heartbeat, whose silence past the lease stops the claims.
        try:
            self._mark_abandoned()
            self._prune()
        except Exception as exc:  # of any kind: done again at the next heartbeat
            log.warning("cluster housekeeping failed: %s", describe(exc))

    def _mark_abandoned(self) -> None:
        """Mark running rows abandoned whose heartbeat is older than *their* lease
        (the claiming node's: nodes may be configured differently). A row from
        schema version 1 has none: it is judged by this node's lease."""
        lease = func.coalesce(runs.c.lease_ms, self.lease_ms)
        stale = and_(runs.c.outcome == RUNNING,
                     runs.c.heartbeat_ms + lease < self.clock.now_ms())
        with self.database.engine.connect() as connection:
            rows = connection.execute(select(runs.c.id, runs.c.job, runs.c.node,
                                             runs.c.heartbeat_ms, lease.label("lease"))
                                      .where(stale)).all()
        for row in rows:
            with self.database.engine.begin() as connection:
                result = connection.execute(update(runs).where(runs.c.id == row.id, stale)
                                            .values(outcome=ABANDONED, ended_ms=self.clock
                                                    .now_ms(), error=f"node {row.node} "
                                                    f"stopped heartbeating"))
            if result.rowcount == 1:
                self.abandoned_marked += 1
                silent = (self.clock.now_ms() - row.heartbeat_ms) / 1000
                log.warning("job=%s run on node %s marked abandoned: no heartbeat for "
                            "%.1fs (its lease %gs)", row.job, row.node, silent,
                            row.lease / 1000, extra={"job": row.job})

    def _prune(self) -> None:
        if time.monotonic() - self._last_prune < 600:
            return
        self._last_prune = time.monotonic()
        cutoff = self.clock.now_ms() - int(self.settings.keep_history * 1000)
        old = and_(runs.c.outcome != RUNNING, runs.c.heartbeat_ms < cutoff)
        deleted, batch = 0, PRUNE_BATCH
        # In batches: each statement stays well within the statement timeout
        # however long the backlog (a node that was down for weeks).
        while batch == PRUNE_BATCH:
            with self.database.engine.begin() as connection:
                ids = connection.execute(select(runs.c.id).where(old)
                                         .limit(PRUNE_BATCH)).scalars().all()
                if ids:
                    connection.execute(delete(runs).where(runs.c.id.in_(ids)))
            deleted, batch = deleted + len(ids), len(ids)
        if deleted:
            log.info("pruned %d run(s) older than %gs from the run table", deleted,
                     self.settings.keep_history)

    # --- history (for people) -------------------------------------------------------

    def last_runs(self) -> dict[str, Any]:
        """The newest row of each job."""
        newest = select(func.max(runs.c.id)).group_by(runs.c.job)
        with self.database.engine.connect() as connection:
            return {row.job: row for row in connection.execute(
                select(*_SHOWN).where(runs.c.id.in_(newest)))}

    def recent_runs(self, jobs: Iterable[str], limit: int = 20) -> dict[str, list[Any]]:
        """The newest `limit` rows of each job, newest first, in one query (a status
        page reads the run table once per request, whatever the number of jobs)."""
        names = list(jobs)
        if not names:
            return {}
        place = func.row_number().over(partition_by=runs.c.job, order_by=(
            runs.c.slot_ms.desc(), runs.c.id.desc())).label("newest_first")
        ranked = select(*_SHOWN, place).where(runs.c.job.in_(names)).subquery()
        recent: dict[str, list[Any]] = {name: [] for name in names}
        with self.database.engine.connect() as connection:
            for row in connection.execute(select(ranked).where(
                    ranked.c.newest_first <= limit).order_by(ranked.c.job,
                                                            ranked.c.newest_first)):
                recent[row.job].append(row)
        return recent

    def history(self, job: str, limit: int = 20) -> list[Any]:
        with self.database.engine.connect() as connection:
            return connection.execute(select(*_SHOWN).where(runs.c.job == job)
                                      .order_by(runs.c.slot_ms.desc(), runs.c.id.desc())
                                      .limit(limit)).all()


def _what(values: dict | None) -> str:
    return "release its run claimed ahead" if values is None else \
        f"record its outcome ({values['outcome']})"


def nearest_slot(schedule, now: float, batch_slot: float) -> float:
    """The occurrence a `--once` run on several hosts is for: the one nearest to now,
    so that cron invocations a little before or after a boundary agree on it. A job
    without a schedule uses a grid of `batch_slot` seconds."""
    if schedule is None:
        return round(now / batch_slot) * batch_slot
    after = schedule.next_after(now, now)
    before = schedule.previous_at_or_before(now)
    return after if after - now < now - before else before
