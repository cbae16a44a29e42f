"""Fault injection against the real MariaDB through pyodbc and unixODBC: killed
connections, deadlocks, lock wait timeouts, and the server vanishing for seconds."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from tests.batch import run_all, run_batch
from worker.callables import resolve
from worker.config import DatabaseSettings, JobSpec, RetryPolicy
from worker.db import Database
from worker.pool import WorkerPool
from worker.runner import Outcome, run_job
from tests.conftest import MARIADB_URL, spec
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.parametrize("backend", ["mariadb"], indirect=True)


def retrying(name, call, attempts=20, wait_initial=0.01, wait_max=0.2, idempotent=False,
             **kwargs) -> JobSpec:
    return JobSpec(name=name, call=call, kwargs=kwargs, idempotent=idempotent,
                   retry=RetryPolicy(attempts=attempts, wait_initial=wait_initial,
                                     wait_max=wait_max))


def worker_connections(admin) -> set[int]:
    rows = admin.execute("SELECT ID FROM information_schema.PROCESSLIST "
                         "WHERE USER = 'worker_test' AND DB = DATABASE() "
                         "AND ID <> CONNECTION_ID()").fetchall()
    return {row[0] for row in rows}


def counters(database) -> dict[int, int]:
    with database.engine.connect() as connection:
        return dict(connection.execute(text("SELECT id, value FROM worker_test_counters")).all())


def seed_counters(database, *ids: int) -> None:
    run_job(spec("setup"), resolve("tests.jobfuncs:create_counters"), database)
    with database.engine.begin() as connection:
        for row in ids:
            connection.execute(text("INSERT INTO worker_test_counters VALUES (:i, 0)"),
                               {"i": row})


def test_connection_killed_mid_query_is_retried_and_never_pooled_again(
        make_database, admin_odbc):
    """mysql+pyodbc alone would pool the killed connection again: here it is seen as
    dead, its cleanup does not hide the error, the job re-runs in a new Session, and
    no later job is handed it."""
    database = make_database(pool_size=1)
    calls: list = []
    started = time.monotonic()
    result = run_job(spec("killed", "tests.jobfuncs:kill_own_connection_once", attempts=3,
                          admin=admin_odbc, calls=calls), resolve(
                              "tests.jobfuncs:kill_own_connection_once"), database)
    print(f"\nkilled mid-query: {result.outcome.value} after {result.attempts} attempts, "
          f"{time.monotonic() - started:.2f}s")
    assert result.outcome is Outcome.SUCCESS and result.attempts == 2
    assert database.checked_out() == 0
    select_one = resolve("tests.jobfuncs:select_one")
    after = [run_job(spec(f"after-{n}", attempts=1), select_one, database) for n in range(20)]
    assert [r.attempts for r in after if r.ok] == [1] * 20


def test_idle_pooled_connections_killed_between_jobs(make_database, admin_odbc):
    database = make_database(pool_size=2)
    select_one = resolve("tests.jobfuncs:select_one")
    job = spec("probe", attempts=3)
    with WorkerPool(2) as pool:
        assert all(r.ok for r in run_all(pool, [lambda: run_job(job, select_one, database)] * 4))
    pooled = worker_connections(admin_odbc)
    assert len(pooled) == 2                      # both pooled connections sit idle
    for connection_id in pooled:
        admin_odbc.execute(f"KILL {connection_id}")
    results = [run_job(job, select_one, database) for _ in range(6)]
    print(f"\nidle connections killed: attempts of the next jobs {[r.attempts for r in results]}")
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    # each dead connection costs at most one retry, and is then gone for good
    assert sum(r.attempts - 1 for r in results) <= 2
    assert all(r.attempts == 1 for r in results[2:])
    assert database.checked_out() == 0


def test_deadlock_storm_loses_nothing_and_applies_nothing_twice(make_database, caplog):
    database = make_database(pool_size=8)
    seed_counters(database, 1, 2)
    jobs = [retrying(f"transfer-{n}", "tests.jobfuncs:transfer", attempts=50,
                     forward=n % 2 == 0) for n in range(60)]
    functions = {job.name: resolve(job.call) for job in jobs}
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="worker.runner"), WorkerPool(8) as pool:
        batch = run_batch(jobs, functions, database, pool)
    elapsed = time.monotonic() - started
    deadlocks = sum("native 1213" in r.getMessage() for r in caplog.records)
    print(f"\ndeadlock storm: 60 jobs, {deadlocks} deadlocks retried, "
          f"max attempts {max(r.attempts for r in batch.results)}, {elapsed:.2f}s")
    assert [r.error for r in batch.results if not r.ok] == []
    assert counters(database) == {1: 60, 2: 60}  # every job applied exactly once
    assert deadlocks > 0                          # the storm really deadlocked
    assert database.checked_out() == 0


def test_lock_wait_timeout_is_retried(make_database, admin_odbc, caplog):
    database = make_database(pool_size=1)
    seed_counters(database, 1)
    admin_odbc.autocommit = False
    admin_odbc.execute("UPDATE worker_test_counters SET value = value WHERE id = 1")
    threading.Timer(2.5, admin_odbc.commit).start()     # holds the row lock for 2.5 s
    job = retrying("waits", "tests.jobfuncs:update_with_short_lock_wait", attempts=10,
                   wait_initial=0.2, wait_max=0.5, row=1)
    with caplog.at_level("WARNING", logger="worker.runner"):
        result = run_job(job, resolve(job.call), database)
    admin_odbc.autocommit = True
    print(f"\nlock wait timeout: {result.outcome.value} after {result.attempts} attempts, "
          f"{result.duration:.2f}s")
    assert result.outcome is Outcome.SUCCESS and result.attempts >= 2
    assert any("native 1205" in r.getMessage() for r in caplog.records)
    assert counters(database) == {1: 1}


def test_database_vanishes_mid_batch_and_comes_back(backend, tmp_path):
    """Every connection is cut and new ones refused for 4 s in the middle of a batch:
    every job finishes after the server returns, none lost, none doubled."""
    proxy = TcpProxy(3306)
    url = MARIADB_URL.replace("Port=3306", f"Port={proxy.port}")
    assert f"Port={proxy.port}" in url
    database = Database(DatabaseSettings(url=url, pool_size=4, pool_timeout=5))
    try:
        seed_counters(database)
        jobs = [retrying(f"insert-{n}", "tests.jobfuncs:insert_unique", attempts=40,
                         wait_initial=0.2, wait_max=1.0, idempotent=True, value=n)
                for n in range(40)]
        functions = {job.name: resolve(job.call) for job in jobs}
        outage = 4.0

        def outage_in_the_middle():
            time.sleep(0.2)
            proxy.cut()
            time.sleep(outage)
            restored.append(time.monotonic())
            proxy.restore()

        restored: list = []
        cutter = threading.Thread(target=outage_in_the_middle)
        with WorkerPool(4) as pool:
            cutter.start()
            batch = run_batch(jobs, functions, database, pool)
            finished = time.monotonic()
        cutter.join()
        results = batch.results
        done_during = sum(1 for r in results if r.attempts == 1)
        print(f"\ndatabase gone for {outage}s: {proxy.refused} connections refused, "
              f"{len(results) - done_during} jobs retried (max attempts "
              f"{max(r.attempts for r in results)}), batch done "
              f"{finished - restored[0]:.2f}s after the server came back")
        assert [r.error for r in results if not r.ok] == []
        assert proxy.refused > 0                     # jobs really hit the outage
        values = counters(database)
        assert sorted(values) == list(range(40))    # none lost, none doubled
        assert database.checked_out() == 0
    finally:
        database.dispose()
        proxy.close()
        with Database(DatabaseSettings(url=MARIADB_URL, pool_size=1)).engine.begin() as c:
            c.execute(text("DROP TABLE IF EXISTS worker_test_counters"))
