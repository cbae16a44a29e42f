"""worker.db: the engine, the one registry, and dead connections leaving the pool."""
from __future__ import annotations

import pyodbc

from worker.config import DatabaseSettings
from worker.db import Database, Session
from tests.conftest import MARIADB_URL


def test_pool_settings_reach_the_engine(make_database):
    database = make_database(pool_size=3, max_overflow=2, pool_timeout=7)
    assert database.engine.pool.size() == 3
    assert database.engine.pool._max_overflow == 2
    assert database.engine.pool._timeout == 7


def test_registry_is_bound_to_the_database(database):
    session = Session()
    try:
        assert session.get_bind() is database.engine
    finally:
        Session.remove()


def test_display_url_hides_the_password():
    database = Database(DatabaseSettings(url=MARIADB_URL, pool_size=1))
    try:
        assert "worker_test:***@" in database.display_url
        assert "worker_test:worker_test" not in database.display_url
    finally:
        database.dispose()


def test_pyodbc_url_turns_odbc_pooling_off():
    pyodbc.pooling = True
    database = Database(DatabaseSettings(url=MARIADB_URL, pool_size=1))
    try:
        assert pyodbc.pooling is False
    finally:
        database.dispose()


# The killed-connection and statements-at-the-server tests that were here are
# scenarios of tests/test_scenarios.py now, on every backend that can run them.
