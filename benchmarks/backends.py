"""The two databases: a SQLite file in a temp dir, and MariaDB through pyodbc.

Each backend knows its SQLAlchemy URL (the form the worker is configured with)
and how to open a raw DB-API connection (for the floor contender and for setup).
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# The same defaults and override variables as tests/conftest.py.
MARIADB_URL = os.environ.get(
    "TEST_MARIADB_URL",
    "mysql+pyodbc://worker_test:worker_test@127.0.0.1/worker_test"
    "?driver=MariaDB+Unicode&Port=3306")
MARIADB_ODBC = os.environ.get(
    "TEST_MARIADB_ODBC",
    "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=worker_test;"
    "UID=worker_test;PWD=worker_test")

BENCH_TABLE = "bench_items"


@dataclass(frozen=True)
class Backend:
    name: str                          # "sqlite" or "mariadb"
    url: str                           # SQLAlchemy URL, as in the worker's config
    raw_connect: Callable[[], Any]     # a new DB-API connection, autocommit off

    @property
    def is_mariadb(self) -> bool:
        return self.name == "mariadb"


def sqlite_backend(directory: Path) -> Backend:
    """A SQLite file, with the settings the worker uses for `sqlite:///path`
    (SQLAlchemy's defaults: rollback journal, pysqlite's 5 s busy timeout)."""
    path = directory / "bench.db"

    def connect() -> sqlite3.Connection:
        # check_same_thread=False only so that the main thread can close the
        # per-thread connections at the end; each is used by one thread.
        return sqlite3.connect(path, check_same_thread=False)

    return Backend("sqlite", f"sqlite:///{path}", connect)


def mariadb_backend() -> Backend:
    def connect() -> Any:
        import pyodbc
        return pyodbc.connect(MARIADB_ODBC, autocommit=False)

    return Backend("mariadb", MARIADB_URL, connect)


def prepare_odbc() -> None:
    """Turn the ODBC driver manager's pooling off before the first connection, as
    worker.db.Database does, so that every contender runs under the same setting."""
    import pyodbc
    pyodbc.pooling = False


def mariadb_problem() -> str | None:
    """Why MariaDB cannot be benchmarked, or None when it answers."""
    try:
        prepare_odbc()
        connection = mariadb_backend().raw_connect()
    except Exception as exc:  # any driver or server failure: report and skip MariaDB
        return f"{type(exc).__name__}: {exc}"
    connection.close()
    return None


def create_bench_table(backend: Backend) -> None:
    if backend.is_mariadb:
        ddl = (f"CREATE TABLE IF NOT EXISTS {BENCH_TABLE} "
               f"(id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB")
    else:
        ddl = f"CREATE TABLE IF NOT EXISTS {BENCH_TABLE} (id INTEGER PRIMARY KEY, v INTEGER)"
    _run_ddl(backend, ddl)


def drop_bench_table(backend: Backend) -> None:
    _run_ddl(backend, f"DROP TABLE IF EXISTS {BENCH_TABLE}")


def _run_ddl(backend: Backend, ddl: str) -> None:
    connection = backend.raw_connect()
    try:
        connection.cursor().execute(ddl)
        connection.commit()
    finally:
        connection.close()
