"""Shared fixtures: real databases only (SQLite files, MariaDB through pyodbc,
PostgreSQL through psycopg, SQL Server's drivers against the TDS test server;
tests/backends.py describes each)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from worker.config import DatabaseSettings, JobSpec, RetryPolicy
from worker.db import Database, Session

ROOT = Path(__file__).resolve().parent.parent

# scripts/test.sh creates this user and its databases; override to test elsewhere.
# Under pytest-xdist (scripts/test.sh runs `-n 2`) each worker process has a database
# of its own, worker_test_gw0 and worker_test_gw1: the tests drop and create tables
# and kill their own connections, which two workers on one database would do to each
# other. An explicit TEST_* variable is used as it is, by every worker.
TEST_DATABASE = "worker_test" + (f"_{os.environ['PYTEST_XDIST_WORKER']}"
                                 if os.environ.get("PYTEST_XDIST_WORKER") else "")
MARIADB_URL = os.environ.get(
    "TEST_MARIADB_URL",
    f"mysql+pyodbc://worker_test:worker_test@127.0.0.1/{TEST_DATABASE}"
    "?driver=MariaDB+Unicode&Port=3306")
MARIADB_ODBC = os.environ.get(
    "TEST_MARIADB_ODBC",
    f"DRIVER={{MariaDB Unicode}};SERVER=127.0.0.1;PORT=3306;DATABASE={TEST_DATABASE};"
    "UID=worker_test;PWD=worker_test")
# scripts/setup-postgres.sh creates this role and its databases.
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL",
    f"postgresql+psycopg://worker_test:worker_test@127.0.0.1:5432/{TEST_DATABASE}")


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


def backend_url(server, tmp_path: Path, sqlite_file: str = "test.db") -> str:
    """The URL of a test database on a backend (tests.backends.Backend)."""
    if server.name == "sqlite":
        return f"sqlite:///{tmp_path / sqlite_file}"
    return server.url


@pytest.fixture(scope="session")
def tds_server(tmp_path_factory):
    """The TDS test server (tests/sqlserver), one for the whole session: started by
    the first test that needs SQL Server. Tests leave its faults empty."""
    from tests.sqlserver.process import TdsServerProcess
    server = TdsServerProcess(tmp_path_factory.mktemp("tds"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tds_run_table_server(tmp_path_factory):
    """A second TDS test server, for the cluster's run table when the jobs' tables are
    on tds_server (tests/test_cluster.py): the run table's faults then reach the
    claims only, and its counters count the claims only."""
    from tests.sqlserver.process import TdsServerProcess
    server = TdsServerProcess(tmp_path_factory.mktemp("tds-runs"), name="runs")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "mariadb"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def backend_server(backend, request):
    """The parametrised backend (tests.backends.Backend); SQL Server's on the
    session's TDS test server, with no faults before and after the test."""
    from tests.backends import BACKENDS
    if backend != "sqlserver":
        yield BACKENDS[backend]
        return
    tds = request.getfixturevalue("tds_server")
    tds.set_faults("[]\n")
    yield BACKENDS[backend].on(tds)
    tds.set_faults("[]\n")


@pytest.fixture
def make_database(tmp_path, backend_server):
    """Factory: Database(pool_size=...) on the parametrised backend; disposed after."""
    made: list[Database] = []

    def make(pool_size: int = 4, **settings) -> Database:
        url = backend_url(backend_server, tmp_path)
        database = Database(DatabaseSettings(url=url, pool_size=pool_size, **settings))
        made.append(database)
        return database

    yield make
    Session.remove()
    for database in made:
        if database.dialect != "sqlite":
            with database.engine.begin() as connection:
                for table in ("commands", "worker_test_counters", "worker_test_runs"):
                    connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        database.dispose()


@pytest.fixture
def database(make_database) -> Database:
    return make_database()



def spec(name: str = "job", call: str = "tests.jobfuncs:select_one", *, attempts: int = 3,
         wait: float = 0.01, idempotent: bool = False, **kwargs) -> JobSpec:
    """A JobSpec for tests: fast retries by default."""
    return JobSpec(name=name, call=call, kwargs=kwargs, idempotent=idempotent,
                   retry=RetryPolicy(attempts=attempts, wait_initial=wait, wait_max=wait))


def timed(name: str, call: str, timeout: float, attempts: int = 3, on_timeout: bool = False,
          **kwargs) -> JobSpec:
    """A JobSpec with a `timeout` for tests: fast retries."""
    return JobSpec(name=name, call=call, kwargs=kwargs, timeout=timeout,
                   retry=RetryPolicy(attempts=attempts, wait_initial=0.01, wait_max=0.01,
                                     on_timeout=on_timeout))


def rows(database) -> int:
    """Rows in the tests' counters table."""
    with database.engine.connect() as connection:
        return connection.execute(text("SELECT COUNT(*) FROM worker_test_counters")).scalar()


@pytest.fixture
def daemons():
    """Factory: start worker processes; any still running are killed afterwards."""
    from tests.processes import Daemon
    started: list = []

    def start(*args, **kwargs):
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.wait()


@pytest.fixture
def db_url(backend_server, tmp_path):
    """The parametrised backend's URL with an empty worker_test_runs table and no run
    history (worker_history) before and after the test."""
    from sqlalchemy import create_engine
    url = backend_url(backend_server, tmp_path, "daemon.db")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_runs"))
        connection.execute(text("DROP TABLE IF EXISTS worker_history"))
        connection.execute(text("CREATE TABLE worker_test_runs "
                                "(name VARCHAR(64) NOT NULL, at FLOAT NOT NULL)"))
    yield url
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_runs"))
        connection.execute(text("DROP TABLE IF EXISTS worker_history"))
    engine.dispose()
