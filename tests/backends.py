"""The databases the scenario suite runs on, and which scenarios each can express.

A backend says how to reach its database, and (through `Backend.admin()`, a
connection on the side that is not the worker's) how to make it misbehave: kill a
connection, hold a row lock, count the statements its server saw. The scenarios
(tests/test_scenarios.py, and the cluster scenarios in tests/test_cluster.py) ask
for a backend by name through `@scenario(NAME)`; every pair of scenario and
backend either runs or is a gap in GAPS with its reason, so nothing is skipped
silently, and test_every_scenario_and_backend_is_run_or_explained keeps the table
complete.

SQL Server is Microsoft's ODBC Driver 18 (mssql+pyodbc) against the TDS test server
(tests/sqlserver, SQLite behind it), one per test session (conftest.tds_server); its
Admin is what a DBA would do on SQL Server (sys.dm_exec_sessions, KILL, a transaction
holding a row); the server's own lock manager finds deadlocks and times lock waits
out. FreeTDS and mssql-python run their own scenarios in tests/test_sqlserver.py.
"""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import MARIADB_ODBC, MARIADB_URL, POSTGRES_URL

ALL_BACKENDS = ("sqlite", "mariadb", "postgresql", "sqlserver")

NO_SERVER = "SQLite has no server: no connection to kill or cut from outside"
TDS_NO_SERVER_TIMEOUT = ("SQL Server has no server-side statement timeout (its query "
                         "timeout is the client's), so its deadline and the server's "
                         "never share one error")
NO_COUNTERS = "SQLite has no server that could count the statements it received"

# scenario -> {backend: why it cannot run there}. A backend missing from a row runs it.
GAPS: dict[str, dict[str, str]] = {
    "story_sixteen_jobs": {},
    "killed_mid_query": {"sqlite": NO_SERVER},
    "killed_connection_is_a_disconnect": {"sqlite": NO_SERVER},
    "idle_pooled_connections_killed": {"sqlite": NO_SERVER},
    "deadlock_storm": {
        "sqlite": "SQLite locks the whole database for a writer, so two transactions "
                  "never wait for each other in a cycle (its SQLITE_BUSY is the lock "
                  "timeout scenario)"},
    "serialization_failure": {
        "sqlite": "SQLite has no SET TRANSACTION ISOLATION LEVEL; its transactions are "
                  "serialized by the database lock (the lock timeout scenario)",
        "mariadb": "InnoDB's SERIALIZABLE makes reads take shared locks instead of "
                   "failing late with 40001: the concurrent update just waits; InnoDB's "
                   "40001 is the deadlock (1213), covered by the deadlock storm",
        "sqlserver": "SQL Server's SERIALIZABLE holds shared range locks, so the other "
                     "connection's update waits for the job (as on the TDS test server's "
                     "lock manager), never a late 40001. Its late failure, SNAPSHOT's "
                     "3960, is a classifier row tested in tests/test_sqlserver.py"},
    "lock_timeout": {},
    "deadline_cuts_a_lock_wait": {
        "sqlite": "SQLite's lock wait is its busy handler inside the driver: the "
                  "lock timeout scenario, not a deadline's cancel"},
    "writers_on_different_rows_never_wait": {
        "sqlite": "SQLite locks the whole database for a writer"},
    "deadline_cancels_the_statement": {},
    "server_statement_timeout_is_not_our_deadline": {
        "sqlite": "SQLite has no server-side statement timeout",
        "mariadb": "MariaDB's max_statement_time has a code of its own (1969); the "
                   "scenario is about PostgreSQL's two cancels sharing 57014",
        "sqlserver": TDS_NO_SERVER_TIMEOUT},
    "database_vanishes": {"sqlite": NO_SERVER},
    "statements_per_job": {"sqlite": NO_COUNTERS},
    "failed_job_rolled_back_once": {"sqlite": NO_COUNTERS},
    "connection_returned_open_is_rolled_back": {"sqlite": NO_COUNTERS},
    "connection_rolled_back_on_close_not_again": {"sqlite": NO_COUNTERS},
    "failed_job_connection_goes_back_clean": {},
    "swallowed_error_in_a_job": {},
    "savepoint_recovers_from_a_failed_statement": {},
    "a_failed_jobs_raw_write_is_not_committed_by_the_next_job": {},  # tests/test_db.py
    "enqueue_process_purge": {},                            # tests/test_jobs.py
    "jobs_racing_to_create_the_schema_all_succeed": {},     # tests/test_jobs.py
    "three_nodes_run_each_occurrence_exactly_once": {},     # tests/test_cluster.py
    "a_killed_nodes_idempotent_run_is_recovered": {},       # tests/test_cluster.py
}
# Backends with no implementation yet: a gap in every scenario, for this reason.
NOT_YET: dict[str, str] = {}


def gap(name: str, backend: str) -> str | None:
    """Why the scenario cannot run on the backend; None when it runs there."""
    return GAPS[name].get(backend) or NOT_YET.get(backend)


def scenario(name: str):
    """Parametrize a test over every backend: a gap is a skip whose reason says why."""
    params = [pytest.param(backend, id=backend, marks=pytest.mark.skip(
                  reason=f"{name} on {backend}: {gap(name, backend)}"))
              if gap(name, backend) else pytest.param(backend, id=backend)
              for backend in ALL_BACKENDS]
    return pytest.mark.parametrize("backend", params, indirect=True)


class Admin:
    """A connection beside the worker's pool (autocommit), for the faults."""

    def worker_connections(self) -> set[int]:
        """Ids of the other connections to the test database."""
        raise NotImplementedError

    def kill(self, connection_id: int) -> None:
        raise NotImplementedError

    def execute(self, sql: str) -> None:
        raise NotImplementedError

    def hold_row_lock(self, row: int, seconds: float) -> None:
        """Lock counter `row` from another connection, release it `seconds` later."""
        raise NotImplementedError

    def open_transaction(self, connection_id: int | None) -> bool:
        """True if the worker's connection still has a transaction open."""
        raise NotImplementedError

    def inject_deadlocks(self, statement: str, times: int) -> bool:
        """Make the server choose the next `times` matching statements as deadlock
        victims. False: this server finds its deadlocks itself (the test provokes them)."""
        return False

    def statements(self, connection_id: int):
        """A context manager yielding a dict that is filled on exit with what the
        server saw from the connection inside the block: BEGIN, SELECT, COMMIT,
        ROLLBACK, ping, and any other."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Backend:
    name: str
    url: str
    explicit_begin = False        # the driver sends BEGIN (psycopg) or not (ODBC, implicit)
    error_aborts_transaction = False  # PostgreSQL: one failed statement dooms the rest
    deadlock_code = ""            # how the runner's retry log line names a deadlock
    lock_timeout_code = ""
    killed_sqlstate: str | None = None  # what a killed connection's next use raises
    counts_per_connection = False  # admin.statements() sees only the worker's connection
    upstream_host = "127.0.0.1"
    upstream_port = 0

    def proxied_url(self, port: int) -> str:
        """The same database through a TCP proxy listening on 127.0.0.1:port."""
        raise NotImplementedError

    def lock_settings(self) -> dict:
        """DatabaseSettings extras for the lock timeout scenario."""
        return {}

    def storm_settings(self, admin: Admin) -> dict:
        """DatabaseSettings extras for the deadlock storm."""
        return {}

    def counting_settings(self, admin: Admin) -> dict:
        """DatabaseSettings extras that let admin.statements() see the worker's."""
        return {}

    def admin(self, tmp_path: Path):
        """A context manager yielding this backend's Admin."""
        raise NotImplementedError

    def server_counters(self) -> dict:
        """What the server's lock manager counted (lock_waits, lock_timeouts, deadlocks,
        deadlock_victims); {} when the server does not say."""
        return {}

    def on(self, tds) -> "Backend":
        """This backend for a test, given the session's TDS test server (only SQL
        Server uses it)."""
        return self


# --- SQLite ---------------------------------------------------------------------

class SqliteAdmin(Admin):
    """"Another process" on the same file: a second sqlite3 connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def hold_row_lock(self, row: int, seconds: float) -> None:
        holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")         # SQLite locks the whole file

        def release():
            holder.execute("COMMIT")
            holder.close()
        threading.Timer(seconds, release).start()

    def open_transaction(self, connection_id: int | None) -> bool:
        # A connection that kept its transaction keeps its lock: nobody else can write.
        probe = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                return True
            raise
        finally:
            probe.close()


class SqliteBackend(Backend):
    name = "sqlite"
    url = ""                      # per test: conftest.backend_url()
    lock_timeout_code = "native 5"

    def lock_settings(self) -> dict:
        return {"connect_args": {"timeout": 0.1}}   # the busy timeout: SQLITE_BUSY after 0.1 s

    @contextmanager
    def admin(self, tmp_path: Path) -> Iterator[Admin]:
        yield SqliteAdmin(tmp_path / "test.db")


# --- MariaDB through pyodbc -------------------------------------------------------

class MariadbAdmin(Admin):
    COUNTERS = {"Com_begin": "BEGIN", "Com_select": "SELECT", "Com_commit": "COMMIT",
                "Com_rollback": "ROLLBACK", "Com_admin_commands": "ping"}

    def __init__(self) -> None:
        import pyodbc
        self.connection = pyodbc.connect(MARIADB_ODBC, autocommit=True)
        self._lock = threading.Lock()     # pyodbc connections are not thread-safe

    def execute(self, sql: str) -> None:
        with self._lock:
            self.connection.execute(sql)

    def worker_connections(self) -> set[int]:
        # DB = DATABASE(): other test runs on this machine use the same user.
        with self._lock:
            rows = self.connection.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'worker_test' "
                "AND DB = DATABASE() AND ID <> CONNECTION_ID()").fetchall()
        return {row[0] for row in rows}

    def kill(self, connection_id: int) -> None:
        self.execute(f"KILL {int(connection_id)}")

    def hold_row_lock(self, row: int, seconds: float) -> None:
        import pyodbc
        holder = pyodbc.connect(MARIADB_ODBC, autocommit=False)
        holder.execute("UPDATE worker_test_counters SET value = value WHERE id = ?", row)

        def release():
            holder.commit()
            holder.close()
        threading.Timer(seconds, release).start()

    def open_transaction(self, connection_id: int | None) -> bool:
        with self._lock:
            return self.connection.execute(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX "
                "WHERE trx_mysql_thread_id = ?", connection_id).fetchone()[0] > 0

    def _counters(self) -> dict[str, int]:
        names = list(self.COUNTERS)
        with self._lock:
            rows = self.connection.execute(
                "SHOW GLOBAL STATUS WHERE Variable_name IN "
                f"({', '.join('?' * len(names))})", *names).fetchall()
        return {self.COUNTERS[name]: int(value) for name, value in rows}

    @contextmanager
    def statements(self, connection_id: int) -> Iterator[dict]:
        # Server-wide counters: other clients running at the same moment show up too.
        seen: dict = {}
        before = self._counters()
        yield seen
        after = self._counters()
        seen.update({kind: after[kind] - before[kind] for kind in before})

    def close(self) -> None:
        self.connection.close()


class MariadbBackend(Backend):
    name = "mariadb"
    url = MARIADB_URL
    deadlock_code = "native 1213"
    lock_timeout_code = "native 1205"
    upstream_port = 3306

    def proxied_url(self, port: int) -> str:
        url = MARIADB_URL.replace(f"Port={self.upstream_port}", f"Port={port}")
        assert f"Port={port}" in url
        return url

    @contextmanager
    def admin(self, tmp_path: Path) -> Iterator[Admin]:
        admin = MariadbAdmin()
        try:
            yield admin
        finally:
            admin.close()


# --- PostgreSQL through psycopg 3 -------------------------------------------------

# How PostgreSQL logs a statement (log_statement = 'all', Debian's log_line_prefix
# '%m [%p] %q%u@%d '): simple protocol "statement: ...", extended "execute <name>: ...".
_PG_LOGGED = re.compile(r"\[(\d+)\].*?LOG:\s+(?:statement|execute [^:]*): ?(.*)$")


class PostgresAdmin(Admin):
    def __init__(self, conninfo: str) -> None:
        import psycopg
        self.conninfo = conninfo
        self.connection = psycopg.connect(conninfo, autocommit=True)  # thread-safe

    def value(self, sql: str, *params):
        return self.connection.execute(sql, params or None).fetchone()[0]

    def execute(self, sql: str) -> None:
        self.connection.execute(sql)

    def worker_connections(self) -> set[int]:
        rows = self.connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND usename = current_user AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()").fetchall()
        return {row[0] for row in rows}

    def kill(self, connection_id: int) -> None:
        # A role may terminate its own role's backends: no superuser needed.
        assert self.value("SELECT pg_terminate_backend(%s)", connection_id) is True

    def hold_row_lock(self, row: int, seconds: float) -> None:
        import psycopg
        holder = psycopg.connect(self.conninfo)
        holder.execute("UPDATE worker_test_counters SET value = value WHERE id = %s", (row,))

        def release():
            holder.commit()
            holder.close()
        threading.Timer(seconds, release).start()

    def open_transaction(self, connection_id: int | None) -> bool:
        state = self.value("SELECT state FROM pg_stat_activity WHERE pid = %s",
                           connection_id)
        return state != "idle"        # "idle in transaction", "... (aborted)"

    def may_set(self, parameter: str) -> bool:
        """The test role may SET this superuser parameter (GRANT SET ON PARAMETER,
        PostgreSQL 15+, given by scripts/setup-postgres.sh)."""
        if int(self.value("SHOW server_version_num")) < 150000:
            return bool(self.value("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        return bool(self.value("SELECT has_parameter_privilege(%s, 'SET')", parameter))

    def log_path(self) -> Path:
        import os
        if os.environ.get("TEST_POSTGRES_LOG"):
            return Path(os.environ["TEST_POSTGRES_LOG"])
        # Debian: /var/log/postgresql/postgresql-15-main.log for cluster_name "15/main"
        cluster = self.value("SHOW cluster_name").replace("/", "-")
        return Path(f"/var/log/postgresql/postgresql-{cluster}.log")

    @contextmanager
    def statements(self, connection_id: int) -> Iterator[dict]:
        path = self.log_path()
        try:
            start = path.stat().st_size
        except OSError as exc:
            pytest.skip(f"the PostgreSQL server log is not readable here ({exc}); "
                        f"set TEST_POSTGRES_LOG")
        seen: dict = {}
        yield seen
        # The server writes its log as it goes; wait until the last COMMIT or
        # ROLLBACK the block caused is in, then a moment for anything after it.
        counted: dict = {}
        for _ in range(50):
            time.sleep(0.1)
            latest = self._read_log(path, start, connection_id)
            if latest == counted and latest:
                break
            counted = latest
        seen.update({"BEGIN": 0, "SELECT": 0, "COMMIT": 0, "ROLLBACK": 0, "ping": 0})
        seen.update(counted)

    @staticmethod
    def _read_log(path: Path, start: int, connection_id: int) -> dict:
        with open(path, "rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace").splitlines()
        counted: dict = {}
        for line in lines:
            match = _PG_LOGGED.search(line)
            if not match or int(match.group(1)) != connection_id:
                continue
            statement = match.group(2).strip()
            kind = "ping" if statement in ("", ";") else statement.split()[0].upper()
            counted[kind] = counted.get(kind, 0) + 1
        return counted

    def close(self) -> None:
        self.connection.close()


class PostgresBackend(Backend):
    name = "postgresql"
    url = POSTGRES_URL
    explicit_begin = True
    error_aborts_transaction = True
    deadlock_code = "SQLSTATE 40P01"
    lock_timeout_code = "SQLSTATE 55P03"
    killed_sqlstate = "57P01"     # psycopg.errors.AdminShutdown
    counts_per_connection = True  # the server log, filtered by the backend's pid

    @property
    def upstream_host(self) -> str:
        return make_url(POSTGRES_URL).host or "127.0.0.1"

    @property
    def upstream_port(self) -> int:
        return make_url(POSTGRES_URL).port or 5432

    def proxied_url(self, port: int) -> str:
        return make_url(POSTGRES_URL).set(host="127.0.0.1", port=port) \
            .render_as_string(hide_password=False)

    def storm_settings(self, admin: Admin) -> dict:
        # The server looks for deadlocks only after deadlock_timeout (1 s by default)
        # of waiting: 20 ms keeps the storm short (measured: 15 s at 100 ms, about 2 s
        # at 20 ms). Without the grant it is just slower.
        if admin.may_set("deadlock_timeout"):
            return {"connect_args": {"options": "-c deadlock_timeout=20ms"}}
        return {}

    def counting_settings(self, admin: Admin) -> dict:
        if not admin.may_set("log_statement"):
            pytest.skip("the test role may not SET log_statement "
                        "(scripts/setup-postgres.sh grants it on PostgreSQL 15+)")
        return {"connect_args": {"options": "-c log_statement=all"}}

    @contextmanager
    def admin(self, tmp_path: Path) -> Iterator[Admin]:
        url = make_url(POSTGRES_URL)
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        admin = PostgresAdmin(conninfo)
        try:
            yield admin
        finally:
            admin.close()


# --- SQL Server through Microsoft's ODBC Driver 18, on the TDS test server ----------



class SqlServerAdmin(Admin):
    """A DBA's connection (autocommit) to the TDS test server, plus its faults for what
    a server cannot do by itself (failover codes, dropped sockets). Its deadlocks and
    lock timeouts are its lock manager's (tests/sqlserver/locks.py), as on SQL Server."""

    def __init__(self, tds) -> None:
        from tests.sqlserver.process import HARNESS_APP
        self.tds = tds
        self.harness_app = HARNESS_APP
        self.connection = tds.odbc(autocommit=True)
        self._lock = threading.Lock()     # pyodbc connections are not thread-safe

    def _rows(self, sql: str, *params) -> list:
        with self._lock:
            return self.connection.execute(sql, *params).fetchall()

    def execute(self, sql: str) -> None:
        with self._lock:
            self.connection.execute(sql)

    def worker_connections(self) -> set[int]:
        # The tests' own connections (this one, the counters') log in as the harness.
        rows = self._rows("SELECT session_id FROM sys.dm_exec_sessions WHERE "
                          "is_user_process = 1 AND program_name <> ? AND session_id <> @@SPID",
                          self.harness_app)
        return {row[0] for row in rows}

    def kill(self, connection_id: int) -> None:
        self.execute(f"KILL {int(connection_id)}")

    def open_transaction(self, connection_id: int | None) -> bool:
        # Microsoft's driver, autocommit off, begins the next transaction with each
        # COMMIT or ROLLBACK (open_transaction_count stays 1): what counts is whether
        # that transaction has touched the database yet.
        rows = self._rows(
            "SELECT COUNT(*) FROM sys.dm_tran_session_transactions AS s "
            "JOIN sys.dm_tran_database_transactions AS d ON d.transaction_id = s.transaction_id "
            "WHERE s.session_id = ? AND d.database_transaction_begin_time IS NOT NULL",
            connection_id)
        return rows[0][0] > 0

    def hold_row_lock(self, row: int, seconds: float) -> None:
        """A transaction that updates the row: the server's lock manager makes every
        other writer of it wait (1222 after its LOCK_TIMEOUT)."""
        holder = self.tds.odbc(autocommit=False)
        holder.execute("UPDATE worker_test_counters SET value = value WHERE id = ?", row)

        def release():
            holder.commit()
            holder.close()
        threading.Timer(seconds, release).start()

    @contextmanager
    def statements(self, connection_id: int) -> Iterator[dict]:
        """The server's counters (tds_stats, not counted themselves) around the block.
        Microsoft's driver begins implicitly and commits with a transaction manager
        request; a ping is a `SELECT 1` too, so it shows up as one more SELECT."""
        seen: dict = {}
        before = self.tds.stats()
        yield seen
        after = self.tds.stats()
        delta = {name: after[name] - before[name] for name in before}
        seen.update({"BEGIN": 0, "SELECT": delta["statements"] - delta["unprepares"],
                     "COMMIT": delta["commits"], "ROLLBACK": delta["rollbacks"], "ping": 0})
        other = delta["requests"] - delta["statements"] - delta["commits"] - delta["rollbacks"]
        if other:
            seen["other"] = other

    def close(self) -> None:
        self.tds.set_faults("[]\n")
        self.connection.close()


class SqlServerBackend(Backend):
    name = "sqlserver"
    deadlock_code = "native 1205"
    lock_timeout_code = "native 1222"
    killed_sqlstate = "08S01"      # Microsoft's driver: communication link failure
    # The counters are server-wide, but the session's TDS server has no other client
    # while a scenario runs, and reading them is not counted.
    counts_per_connection = True

    def __init__(self, tds=None) -> None:
        self.tds = tds

    def on(self, tds) -> Backend:
        return SqlServerBackend(tds)

    @property
    def server(self):
        if self.tds is None:
            raise RuntimeError("SQL Server runs on the session's TDS test server: "
                               "use the backend_server fixture")
        return self.tds

    @property
    def url(self) -> str:
        return self.server.url("msodbc")

    @property
    def upstream_port(self) -> int:
        return self.server.port

    def proxied_url(self, port: int) -> str:
        url = self.url.replace(f":{self.server.port}/", f":{port}/")
        assert f":{port}/" in url
        return url

    def server_counters(self) -> dict:
        stats = self.server.stats()
        return {name: stats[name] for name in
                ("lock_waits", "lock_timeouts", "deadlocks", "deadlock_victims")}

    @contextmanager
    def admin(self, tmp_path: Path) -> Iterator[Admin]:
        admin = SqlServerAdmin(self.server)
        try:
            yield admin
        finally:
            admin.close()


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    SqliteBackend(), MariadbBackend(), PostgresBackend(), SqlServerBackend())}
