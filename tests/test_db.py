"""worker.db: the engine, the one registry, and dead connections leaving the pool."""
from __future__ import annotations

import pyodbc
import pytest

from worker.config import DatabaseSettings
from worker.db import Database, Session
from tests.backends import scenario
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


@scenario("a_failed_jobs_raw_write_is_not_committed_by_the_next_job")
def test_a_failed_jobs_raw_write_is_not_committed_by_the_next_job(make_database):
    """The pool's "transaction ended" mark belongs to one check-out: job 1 commits,
    job 2 writes through a raw connection of the same engine and fails, job 3 runs
    SELECT 1 and commits: job 2's row must not be there."""
    from sqlalchemy import text as sql
    from worker.callables import resolve
    from worker.runner import run_job
    from tests.conftest import spec
    database = make_database(pool_size=1)
    assert run_job(spec("setup"), resolve("tests.jobfuncs:create_counters"), database).ok
    assert run_job(spec("one", value=1), resolve("tests.jobfuncs:insert_row"), database).ok
    failed = run_job(spec("two", attempts=1, value=2),
                     resolve("tests.jobfuncs:raw_write_then_fail"), database)
    assert not failed.ok
    assert run_job(spec("three"), resolve("tests.jobfuncs:select_one"), database).ok
    with database.engine.connect() as connection:
        ids = connection.execute(sql("SELECT id FROM worker_test_counters ORDER BY id")) \
            .scalars().all()
    assert ids == [1]
    assert database.checked_out() == 0


class _Untouchable:
    """A Session stand-in that fails on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the Session was asked for {name!r}")


def test_the_aborted_transaction_check_asks_nothing_of_a_sqlite_or_pyodbc_session(tmp_path):
    """Only libpq connections can be in an aborted transaction: on SQLite and pyodbc
    the check before each commit costs nothing (it asked the Session for its
    connection, 4-7 us a job)."""
    for url in (f"sqlite:///{tmp_path / 'w.db'}", MARIADB_URL):
        database = Database(DatabaseSettings(url=url, pool_size=1))
        try:
            database.refuse_aborted_commit(_Untouchable())
        finally:
            database.engine.dispose()


def test_the_aborted_transaction_check_stays_for_psycopg():
    database = Database(DatabaseSettings(
        url="postgresql+psycopg://u:p@127.0.0.1:1/none", pool_size=1))   # never connected
    try:
        with pytest.raises(AssertionError, match="in_transaction"):
            database.refuse_aborted_commit(_Untouchable())
    finally:
        database.engine.dispose()
