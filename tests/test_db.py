"""worker.db: the engine, the one registry, and dead connections leaving the pool."""
from __future__ import annotations

import pyodbc
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from worker.config import DatabaseSettings
from worker.db import Database, Session
from tests.conftest import MARIADB_URL

mariadb_only = pytest.mark.parametrize("backend", ["mariadb"], indirect=True)


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


@mariadb_only
def test_killed_connection_is_reported_as_a_disconnect(make_database, admin_odbc):
    """mysql+pyodbc alone says connection_invalidated=False here (its pyodbc
    connector's is_disconnect wins over the MySQL dialect's list);
    the handle_error listener makes SQLAlchemy invalidate it."""
    database = make_database(pool_size=1)
    session = Session()
    try:
        own_id = session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        admin_odbc.execute(f"KILL {own_id}")
        with pytest.raises(sa_exc.DBAPIError) as raised:
            session.execute(text("SELECT 1"))
        assert raised.value.connection_invalidated is True
        assert database.classify(raised.value).disconnect
    finally:
        Session.remove()                        # must not raise after invalidation
    assert database.checked_out() == 0


def server_counters(admin) -> dict[str, int]:
    names = ("Com_select", "Com_commit", "Com_rollback", "Com_admin_commands")
    rows = admin.execute("SHOW GLOBAL STATUS WHERE Variable_name IN "
                         f"({', '.join('?' * len(names))})", *names).fetchall()
    return {name: int(value) for name, value in rows}


@mariadb_only
def test_a_job_costs_its_statements_and_one_commit_nothing_else(make_database, admin_odbc):
    """Counted at the server: no ROLLBACK when the connection returns to the pool
    after a COMMIT (SQLAlchemy's default reset would send one: 3 round trips where
    2 carry the work), and no ping on checkout."""
    from worker.callables import resolve
    from worker.runner import run_job
    from tests.conftest import spec
    database = make_database(pool_size=1)
    job, select_one = spec("one", attempts=1), resolve("tests.jobfuncs:select_one")
    assert run_job(job, select_one, database).ok        # connects and warms the pool
    before = server_counters(admin_odbc)
    for _ in range(10):
        assert run_job(job, select_one, database).ok
    after = server_counters(admin_odbc)
    delta = {name: after[name] - before[name] for name in before}
    assert delta == {"Com_select": 10, "Com_commit": 10, "Com_rollback": 0,
                     "Com_admin_commands": 0}


@mariadb_only
def test_a_failed_job_is_rolled_back_once(make_database, admin_odbc):
    from worker.callables import resolve
    from worker.runner import run_job
    from tests.conftest import spec
    database = make_database(pool_size=1)
    assert run_job(spec("warm"), resolve("tests.jobfuncs:select_one"), database).ok
    before = server_counters(admin_odbc)
    result = run_job(spec("bad", attempts=1), resolve("tests.jobfuncs:fail_after_select"),
                     database)
    after = server_counters(admin_odbc)
    assert not result.ok
    assert after["Com_rollback"] - before["Com_rollback"] == 1
    assert after["Com_commit"] - before["Com_commit"] == 0


@mariadb_only
def test_a_connection_returned_with_work_open_is_still_rolled_back(make_database,
                                                                   admin_odbc):
    """The ROLLBACK on return is skipped only after a COMMIT the runner saw succeed:
    a raw DBAPI connection given back with a transaction open is rolled back."""
    database = make_database(pool_size=1)
    with database.engine.connect() as connection:       # warm the pool
        connection.exec_driver_sql("SELECT 1")
    before = server_counters(admin_odbc)
    raw = database.engine.raw_connection()
    raw.cursor().execute("SELECT 1")
    raw.close()                                          # back to the pool, uncommitted
    after = server_counters(admin_odbc)
    assert after["Com_rollback"] - before["Com_rollback"] == 1


@mariadb_only
def test_a_connection_that_rolled_back_on_close_is_not_rolled_back_again(make_database,
                                                                         admin_odbc):
    database = make_database(pool_size=1)
    with database.engine.connect() as connection:       # warm the pool
        connection.exec_driver_sql("SELECT 1")
    before = server_counters(admin_odbc)
    with database.engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")          # close() rolls back once
    after = server_counters(admin_odbc)
    assert after["Com_rollback"] - before["Com_rollback"] == 1


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
