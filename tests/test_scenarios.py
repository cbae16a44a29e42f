"""The fault and behaviour scenarios, one suite over every backend.

Each test is one scenario, run on every backend of tests/backends.py that can
express it; GAPS there names the backends that cannot, and why (they show up as
skips with that reason). The cluster scenarios live in tests/test_cluster.py and
the example jobs' in tests/test_jobs.py, under the same table. Every scenario
prints one line of measured outcome (`pytest -s`)."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from worker.callables import resolve
from worker.config import DatabaseSettings, JobSpec, RetryPolicy
from worker.db import Database, Session
from worker.errors import error_codes
from worker.pool import WorkerPool
from worker.runner import Outcome, run_job
from tests.batch import run_all, run_batch
from tests.backends import ALL_BACKENDS, BACKENDS, GAPS, NOT_YET, gap, scenario
from tests.conftest import rows, spec, timed
from tests.tcpproxy import TcpProxy


@pytest.fixture
def server(backend_server):
    return backend_server


@pytest.fixture
def admin(server, tmp_path):
    with server.admin(tmp_path) as admin:
        yield admin


def outcome(name: str, backend: str, line: str) -> None:
    print(f"\n[{name} / {backend}] {line}")


def retrying(name, call, attempts=20, wait_initial=0.01, wait_max=0.2, idempotent=False,
             timeout=None, **kwargs) -> JobSpec:
    return JobSpec(name=name, call=call, kwargs=kwargs, idempotent=idempotent,
                   timeout=timeout, retry=RetryPolicy(attempts=attempts,
                                                      wait_initial=wait_initial,
                                                      wait_max=wait_max))


def run(job: JobSpec, database: Database):
    return run_job(job, resolve(job.call), database)


def counters(database) -> dict[int, int]:
    with database.engine.connect() as connection:
        return dict(connection.execute(text("SELECT id, value FROM worker_test_counters")).all())


def seed_counters(database, *ids: int) -> None:
    run(spec("setup", "tests.jobfuncs:create_counters"), database)
    with database.engine.begin() as connection:
        for row in ids:
            connection.execute(text("INSERT INTO worker_test_counters VALUES (:i, 0)"),
                               {"i": row})


def worker_connection_id(database) -> int:
    """Runs a job that reports its connection's server id (pool_size=1: the one
    connection every later job gets)."""
    seen: list = []
    assert run(spec("whoami", "tests.jobfuncs:record_connection_id", seen=seen), database).ok
    return seen[0]


def test_every_scenario_and_backend_is_run_or_explained():
    """The table is complete: every scenario has a test, and every backend without
    an implementation is a gap, with a reason, in every row."""
    from tests import test_cluster, test_db, test_jobs
    modules = (globals(), vars(test_cluster), vars(test_db), vars(test_jobs))
    for name, row in GAPS.items():
        assert any(f"test_{name}" in module for module in modules), name
        assert set(row) <= set(ALL_BACKENDS), name
        for backend in ALL_BACKENDS:
            reason = gap(name, backend)
            assert backend in BACKENDS or reason, (name, backend)
            assert reason is None or reason.strip(), (name, backend)
    assert set(BACKENDS) <= set(ALL_BACKENDS)
    assert not set(BACKENDS) & set(NOT_YET)


# --- the story ---------------------------------------------------------------------

JOBS = 16


@scenario("story_sixteen_jobs")
def test_story_sixteen_jobs(make_database, backend):
    """Sixteen jobs at once in the old global `Session` style: each has its own
    Session and its own server connection (16 MariaDB thread ids / PostgreSQL pids)."""
    database = make_database(pool_size=JOBS)
    # The table exists before the sixteen meet: on PostgreSQL a CREATE TABLE waits
    # for another transaction's uncommitted CREATE of the same table, and these
    # transactions stay open at the barrier until all sixteen have arrived.
    run(spec("schema", "tests.jobfuncs:create_commands_table"), database)
    barrier = threading.Barrier(JOBS)     # all 16 hold their Session at the same time
    seen: list = []
    job = spec("reader", "tests.jobfuncs:global_style_reader", barrier=barrier, seen=seen)
    function = resolve(job.call)
    started = time.monotonic()
    with WorkerPool(JOBS) as pool:
        results = run_all(pool, [lambda: run_job(job, function, database)] * JOBS)
    outcome("story", backend, f"{JOBS} jobs, {len({i for _, i in seen})} server connections, "
            f"{sum(not r.ok for r in results)} errors, {time.monotonic() - started:.2f}s")
    assert [r.error for r in results if not r.ok] == []           # zero errors
    assert all(r.attempts == 1 for r in results)
    assert len(seen) == JOBS
    assert all(same for same, _ in seen)              # Session() is the job's session
    assert len({ident for _, ident in seen}) == JOBS  # 16 distinct server connections
    assert database.checked_out() == 0                # every Session was removed


# --- killed connections ------------------------------------------------------------

@scenario("killed_mid_query")
def test_killed_mid_query(make_database, admin, backend):
    """mysql+pyodbc alone would pool the killed connection again: here it is seen as
    dead, its cleanup does not hide the error, the job re-runs in a new Session, and
    no later job is handed it. (MariaDB: KILL; PostgreSQL: pg_terminate_backend.)"""
    database = make_database(pool_size=1)
    calls: list = []
    started = time.monotonic()
    result = run_job(spec("killed", "tests.jobfuncs:kill_own_connection_once", attempts=3,
                          kill=admin.kill, calls=calls), resolve(
                              "tests.jobfuncs:kill_own_connection_once"), database)
    outcome("killed mid-query", backend, f"{result.outcome.value} after {result.attempts} "
            f"attempts, {time.monotonic() - started:.2f}s")
    assert result.outcome is Outcome.SUCCESS and result.attempts == 2
    assert database.checked_out() == 0
    select_one = resolve("tests.jobfuncs:select_one")
    after = [run_job(spec(f"after-{n}", attempts=1), select_one, database) for n in range(20)]
    assert [r.attempts for r in after if r.ok] == [1] * 20


@scenario("killed_connection_is_a_disconnect")
def test_killed_connection_is_a_disconnect(make_database, admin, server, backend):
    """mysql+pyodbc alone says connection_invalidated=False here (its pyodbc
    connector's is_disconnect wins over the MySQL dialect's list); the handle_error
    listener makes SQLAlchemy invalidate it. PostgreSQL: the
    terminated backend's next use raises psycopg's AdminShutdown (57P01)."""
    database = make_database(pool_size=1)
    session = Session()
    try:
        own_id = resolve("tests.jobfuncs:connection_id")(session)
        admin.kill(own_id)
        for _ in range(100):                  # the server has ended that connection
            if own_id not in admin.worker_connections():
                break
            time.sleep(0.05)
        with pytest.raises(sa_exc.DBAPIError) as raised:
            session.execute(text("SELECT 1"))
        assert raised.value.connection_invalidated is True
        diagnosis = database.classify(raised.value)
        assert diagnosis.disconnect
        if server.killed_sqlstate:
            assert error_codes(raised.value)[0] == server.killed_sqlstate
        outcome("killed connection", backend, f"{type(raised.value.orig).__name__}, "
                f"{diagnosis.codes}: {diagnosis.reason}, disconnect, invalidated")
    finally:
        Session.remove()                        # must not raise after invalidation
    assert database.checked_out() == 0


@scenario("idle_pooled_connections_killed")
def test_idle_pooled_connections_killed(make_database, admin, backend):
    database = make_database(pool_size=2)
    select_one = resolve("tests.jobfuncs:select_one")
    job = spec("probe", attempts=3)
    with WorkerPool(2) as pool:
        assert all(r.ok for r in run_all(pool, [lambda: run_job(job, select_one, database)] * 4))
    pooled = admin.worker_connections()
    assert len(pooled) == 2                      # both pooled connections sit idle
    for connection_id in pooled:
        admin.kill(connection_id)
    results = [run_job(job, select_one, database) for _ in range(6)]
    outcome("idle connections killed", backend,
            f"attempts of the next jobs {[r.attempts for r in results]}")
    assert all(r.outcome is Outcome.SUCCESS for r in results)
    # each dead connection costs at most one retry, and is then gone for good
    assert sum(r.attempts - 1 for r in results) <= 2
    assert all(r.attempts == 1 for r in results[2:])
    assert database.checked_out() == 0


# --- conflicts between transactions ---------------------------------------------------

@scenario("deadlock_storm")
def test_deadlock_storm(make_database, admin, server, backend, caplog):
    database = make_database(pool_size=8, **server.storm_settings(admin))
    seed_counters(database, 1, 2)
    # Every server finds the cycles of the two update orders itself (SQL Server: the
    # TDS test server's lock manager); a server that cannot is told its victims.
    victims = 20
    injected = admin.inject_deadlocks("update worker_test_counters", victims)
    jobs = [retrying(f"transfer-{n}", "tests.jobfuncs:transfer", attempts=50,
                     forward=n % 2 == 0) for n in range(60)]
    functions = {job.name: resolve(job.call) for job in jobs}
    before = server.server_counters()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="worker.runner"), WorkerPool(8) as pool:
        batch = run_batch(jobs, functions, database, pool)
    elapsed = time.monotonic() - started
    found = {name: value - before.get(name, 0)
             for name, value in server.server_counters().items()}
    deadlocks = sum(server.deadlock_code in r.getMessage() for r in caplog.records)
    outcome("deadlock storm", backend, f"60 jobs, {deadlocks} deadlocks retried, max "
            f"attempts {max(r.attempts for r in batch.results)}, {elapsed:.2f}s"
            + (f", server: {found}" if found else ""))
    assert [r.error for r in batch.results if not r.ok] == []
    assert counters(database) == {1: 60, 2: 60}  # every job applied exactly once
    assert deadlocks > 0                          # the storm really deadlocked
    if injected:
        assert deadlocks == victims               # each victim retried once, no more
    if found:                                     # each victim the server chose, retried once
        assert found["deadlock_victims"] == found["deadlocks"] == deadlocks
    assert database.checked_out() == 0


@scenario("writers_on_different_rows_never_wait")
def test_writers_on_different_rows_never_wait(make_database, server, backend):
    """Two jobs, each updating its own row and then holding its transaction open
    until the other has updated too: a lock on more than the row would keep them
    apart until the barrier's timeout breaks it."""
    database = make_database(pool_size=2)
    seed_counters(database, 1, 2)
    meeting = threading.Barrier(2)
    before = server.server_counters()
    jobs = [spec(f"writer-{row}", "tests.jobfuncs:update_row_then_meet", row=row,
                 meeting=meeting) for row in (1, 2)]
    functions = {job.name: resolve(job.call) for job in jobs}
    with WorkerPool(2) as pool:
        batch = run_batch(jobs, functions, database, pool)
    assert [r.error for r in batch.results if not r.ok] == []
    assert counters(database) == {1: 1, 2: 1}
    after = server.server_counters()
    if after:
        assert after["lock_waits"] == before["lock_waits"]


@scenario("serialization_failure")
def test_serialization_failure(make_database, admin, backend, caplog):
    """A job that makes its own transaction SERIALIZABLE; another connection changes
    the row between its read and its write: 40001, the whole job re-run."""
    database = make_database(pool_size=1)
    seed_counters(database, 1)
    calls: list = []
    job = retrying("serial", "tests.jobfuncs:serializable_increment", attempts=5, row=1,
                   calls=calls, interfere=lambda: admin.execute(
                       "UPDATE worker_test_counters SET value = value + 100 WHERE id = 1"))
    with caplog.at_level("WARNING", logger="worker.runner"):
        result = run(job, database)
    outcome("serialization failure", backend, f"{result.outcome.value} after "
            f"{result.attempts} attempts, {result.duration:.2f}s")
    assert result.outcome is Outcome.SUCCESS and result.attempts == 2 and len(calls) == 2
    assert any("SQLSTATE 40001" in r.getMessage() for r in caplog.records)
    assert counters(database) == {1: 101}        # the other update kept, ours once


@scenario("lock_timeout")
def test_lock_timeout(make_database, admin, server, backend, caplog):
    """Another connection holds the row for 2.5 s; the job waits about a second for
    it (MariaDB innodb_lock_wait_timeout: 1205; PostgreSQL SET LOCAL lock_timeout:
    55P03; SQLite busy timeout: SQLITE_BUSY) and is retried until it gets it."""
    database = make_database(pool_size=1, **server.lock_settings())
    seed_counters(database, 1)
    admin.hold_row_lock(1, 2.5)
    job = retrying("waits", "tests.jobfuncs:update_with_short_lock_wait", attempts=10,
                   wait_initial=0.2, wait_max=0.5, row=1)
    with caplog.at_level("WARNING", logger="worker.runner"):
        result = run(job, database)
    outcome("lock timeout", backend, f"{result.outcome.value} after {result.attempts} "
            f"attempts, {result.duration:.2f}s")
    assert result.outcome is Outcome.SUCCESS and result.attempts >= 2
    retry_lines = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retry_lines and "job=waits attempt=1/10" in retry_lines[0]
    assert any(server.lock_timeout_code in line for line in retry_lines)
    assert counters(database) == {1: 1}


# --- time limits --------------------------------------------------------------------

@scenario("deadline_cuts_a_lock_wait")
def test_deadline_cuts_a_lock_wait(make_database, server, backend):
    """A job blocked behind another job's row lock (the blocker holds it 4 s) is cut
    at its 1 s deadline; the blocker is not disturbed and commits its update."""
    database = make_database(pool_size=2)
    seed_counters(database, 1)
    updated = threading.Event()
    before = server.server_counters()
    blocker = spec("blocker", "tests.jobfuncs:update_row_then_hold", attempts=1, row=1,
                   seconds=4.0, updated=updated)
    blocked = timed("blocked", "tests.jobfuncs:bump_counter_after", 1.0, event=updated, row=1)
    jobs = [blocker, blocked]
    functions = {job.name: resolve(job.call) for job in jobs}
    with WorkerPool(2) as pool:
        batch = run_batch(jobs, functions, database, pool)
    blocker_result, blocked_result = batch.results
    outcome("deadline in a lock wait", backend, f"{blocked_result.outcome.value} after "
            f"{blocked_result.duration:.2f}s; the blocker {blocker_result.outcome.value} "
            f"after {blocker_result.duration:.2f}s")
    assert blocked_result.outcome is Outcome.TIMEOUT and blocked_result.attempts == 1
    assert blocked_result.duration < 2.5
    assert blocker_result.ok and blocker_result.attempts == 1
    assert counters(database) == {1: 1}          # the blocker's update; ours was cut
    after = server.server_counters()
    if after:
        assert after["lock_waits"] > before["lock_waits"]
    assert database.checked_out() == 0


@scenario("deadline_cancels_the_statement")
def test_deadline_cancels_the_statement(make_database, backend):
    """MariaDB: SELECT SLEEP(30), PostgreSQL: SELECT pg_sleep(30) (psycopg's cancel),
    SQLite: a query of minutes (interrupt); timeout 2 s: `timeout` within 3 s."""
    database = make_database(pool_size=5)
    # The table first, so the other jobs only write: on the TDS test server a job that
    # reads, then writes while another commits, loses SQLite's snapshot (a 1205).
    seed_counters(database)
    slow = timed("slow", "tests.jobfuncs:long_query", 2.0, seconds=30)
    others = [spec(f"other-{n}", "tests.jobfuncs:insert_counter", value=n) for n in range(4)]
    jobs = [slow] + others
    functions = {job.name: resolve(job.call) for job in jobs}
    started = time.monotonic()
    with WorkerPool(5) as pool:
        batch = run_batch(jobs, functions, database, pool)
    elapsed = time.monotonic() - started
    slow_result, *other_results = batch.results
    outcome("deadline", backend, f"a 30 s statement with timeout 2s ended as "
            f"{slow_result.outcome.value} after {slow_result.duration:.2f}s")
    assert slow_result.outcome is Outcome.TIMEOUT
    assert slow_result.attempts == 1                 # a timeout is not retried by default
    assert slow_result.duration < 3                  # the bound
    assert elapsed < 6                               # the deadline, not the statement, ended it
    assert all(r.ok and r.attempts == 1 for r in other_results)
    assert rows(database) == 4                       # the other jobs were not disturbed
    assert batch.abandoned == 0
    assert database.checked_out() == 0
    assert run_job(spec("next"), resolve("tests.jobfuncs:select_one"), database).ok


@scenario("server_statement_timeout_is_not_our_deadline")
def test_server_statement_timeout_is_not_our_deadline(make_database, admin, backend,
                                                      caplog):
    """PostgreSQL cancels a statement with 57014 both when its own statement_timeout
    fires and when our deadline cancels it through psycopg: the outcome says which."""
    database = make_database(pool_size=1)
    server_side = timed("server-side", "tests.jobfuncs:server_statement_timeout", 5.0,
                        seconds=30)
    ours = timed("ours", "tests.jobfuncs:long_query", 1.0, seconds=30)
    with caplog.at_level("ERROR", logger="worker.runner"):
        by_server = run(server_side, database)
        by_deadline = run(ours, database)
    outcome("statement_timeout vs deadline", backend,
            f"server statement_timeout 1s under a 5s deadline: {by_server.outcome.value} "
            f"after {by_server.duration:.2f}s; deadline 1s: {by_deadline.outcome.value} "
            f"after {by_deadline.duration:.2f}s")
    # both are SQLSTATE 57014 (psycopg's QueryCanceled); only the message differs
    assert "canceling statement due to statement timeout" in by_server.error
    assert "canceling statement due to user request" in by_deadline.error
    assert by_server.outcome is Outcome.FAILED and by_server.attempts == 1
    assert by_server.duration < 5                    # the server's limit, not ours
    server_line = next(r.getMessage() for r in caplog.records
                       if "job=server-side" in r.getMessage())
    assert "server statement_timeout" in server_line and "SQLSTATE 57014" in server_line
    assert by_deadline.outcome is Outcome.TIMEOUT and by_deadline.attempts == 1
    deadline_line = next(r.getMessage() for r in caplog.records
                         if "job=ours" in r.getMessage())
    assert "deadline of 1s passed" in deadline_line
    assert not admin.open_transaction(worker_connection_id(database))


# --- the database gone for seconds ---------------------------------------------------

@scenario("database_vanishes")
def test_database_vanishes(server, backend):
    """Every connection is cut and new ones refused for 4 s in the middle of a batch:
    every job finishes after the server returns, none lost, none doubled."""
    proxy = TcpProxy(server.upstream_port, server.upstream_host)
    database = Database(DatabaseSettings(url=server.proxied_url(proxy.port), pool_size=4,
                                         pool_timeout=5))
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
        outcome("database gone", backend, f"{outage}s: {proxy.refused} connections refused, "
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
        direct = Database(DatabaseSettings(url=server.url, pool_size=1), for_jobs=False)
        with direct.engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS worker_test_counters"))
        direct.dispose()


# --- what the server sees ----------------------------------------------------------

def expected_statements(server, select=0, commit=0, rollback=0, begin=None) -> dict:
    begins = (commit + rollback if begin is None else begin) if server.explicit_begin else 0
    return {"BEGIN": begins, "SELECT": select, "COMMIT": commit, "ROLLBACK": rollback,
            "ping": 0}


def counted(admin, server, connection_id, block, wanted) -> dict:
    """What the server saw from `block()`. MariaDB's counters are server-wide, so
    another client (the other pytest worker, a chaos run) can add to them: the block
    is run again, up to 10 times a moment apart (out of another's burst), until one
    count is `wanted(seen)`. Others only ever add, so an extra statement of ours
    fails every time."""
    for attempt in range(1 if server.counts_per_connection else 10):
        time.sleep(0.2 * attempt)
        with admin.statements(connection_id) as seen:
            block()
        if wanted(seen):
            break
    return seen


@scenario("statements_per_job")
def test_statements_per_job(make_database, admin, server, backend):
    """Counted at the server (MariaDB: its Com_* counters; PostgreSQL: its log with
    log_statement = 'all'): per job the driver's BEGIN (psycopg; ODBC begins
    implicitly), the job's statement and one COMMIT; no ROLLBACK when the connection
    returns to the pool after a COMMIT (SQLAlchemy's default reset would send one),
    and no ping on checkout."""
    database = make_database(pool_size=1, **server.counting_settings(admin))
    job, select_one = spec("one", attempts=1), resolve("tests.jobfuncs:select_one")
    worker_id = worker_connection_id(database)           # connects and warms the pool
    expected = expected_statements(server, select=10, commit=10)

    def ten_jobs():
        for _ in range(10):
            assert run_job(job, select_one, database).ok
    seen = counted(admin, server, worker_id, ten_jobs, lambda seen: seen == expected)
    outcome("statements per job", backend, f"10 jobs: {seen}")
    assert seen == expected
    # The counting would see a ping: the same jobs with pool_pre_ping on differ.
    pinging = make_database(pool_size=1, pool_pre_ping=True,
                            **server.counting_settings(admin))
    pinging_id = worker_connection_id(pinging)
    with admin.statements(pinging_id) as seen_with_ping:
        for _ in range(3):
            assert run_job(job, select_one, pinging).ok
    assert seen_with_ping != expected_statements(server, select=3, commit=3)


@scenario("failed_job_rolled_back_once")
def test_failed_job_rolled_back_once(make_database, admin, server, backend):
    database = make_database(pool_size=1, **server.counting_settings(admin))
    worker_id = worker_connection_id(database)
    results = []
    seen = counted(admin, server, worker_id, lambda: results.append(
        run(spec("bad", "tests.jobfuncs:fail_after_select", attempts=1), database)),
        lambda seen: seen["ROLLBACK"] == 1 and seen["COMMIT"] == 0)
    assert not any(result.ok for result in results)
    assert seen["ROLLBACK"] == 1
    assert seen["COMMIT"] == 0
    if server.counts_per_connection:          # MariaDB's counters are server-wide
        assert seen == expected_statements(server, select=1, rollback=1)


@scenario("connection_returned_open_is_rolled_back")
def test_connection_returned_open_is_rolled_back(make_database, admin, server, backend):
    """The ROLLBACK on return is skipped only when the connection's transaction is
    known to be over: a raw DBAPI connection given back with a transaction open is
    rolled back."""
    database = make_database(pool_size=1, **server.counting_settings(admin))
    worker_id = worker_connection_id(database)           # warms the pool
    def return_open():
        raw = database.engine.raw_connection()
        raw.cursor().execute("SELECT 1")
        raw.close()                                      # back to the pool, uncommitted
    seen = counted(admin, server, worker_id, return_open,
                   lambda seen: seen["ROLLBACK"] == 1)
    assert seen["ROLLBACK"] == 1
    if server.counts_per_connection:          # MariaDB's counters are server-wide
        assert seen == expected_statements(server, select=1, rollback=1)


@scenario("connection_rolled_back_on_close_not_again")
def test_connection_rolled_back_on_close_not_again(make_database, admin, server, backend):
    database = make_database(pool_size=1, **server.counting_settings(admin))
    worker_id = worker_connection_id(database)
    def select_and_close():
        with database.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")      # close() rolls back once
    seen = counted(admin, server, worker_id, select_and_close,
                   lambda seen: seen["ROLLBACK"] == 1)
    assert seen["ROLLBACK"] == 1
    if server.counts_per_connection:          # MariaDB's counters are server-wide
        assert seen == expected_statements(server, select=1, rollback=1)


@scenario("failed_job_connection_goes_back_clean")
def test_failed_job_connection_goes_back_clean(make_database, admin, backend):
    """A job that fails inside its transaction (PostgreSQL leaves it "idle in
    transaction (aborted)") hands its connection back with no transaction open, and
    the next job on that same connection runs at its first attempt."""
    database = make_database(pool_size=1)
    run(spec("setup", "tests.jobfuncs:create_counters"), database)
    worker_id = worker_connection_id(database)
    failing = [spec("insert-then-fail", "tests.jobfuncs:insert_then_fail", value=1),
               spec("syntax", "tests.jobfuncs:syntax_error"),
               spec("after-select", "tests.jobfuncs:fail_after_select")]
    for job in failing:
        result = run(job, database)
        assert result.outcome is Outcome.FAILED and result.attempts == 1
        assert not admin.open_transaction(worker_id), job.name
        assert run(spec("next"), database).attempts == 1
    if backend != "sqlite":
        assert worker_connection_id(database) == worker_id   # reused, not replaced
    assert rows(database) == 0
    outcome("failed job's connection", backend, "3 failed jobs, connection idle after each")


@scenario("swallowed_error_in_a_job")
def test_swallowed_error_in_a_job(make_database, admin, server, backend):
    """A job catches a failed statement and returns. PostgreSQL has already aborted
    its whole transaction and would answer COMMIT with a silent ROLLBACK: the run
    must fail, not report a success that saved nothing. MariaDB and SQLite roll back
    only the failed statement, so the rest is committed as the job asked."""
    database = make_database(pool_size=1)
    run(spec("setup", "tests.jobfuncs:create_counters"), database)
    result = run(spec("swallows", "tests.jobfuncs:insert_after_a_swallowed_error", value=1),
                 database)
    outcome("swallowed error", backend, f"{result.outcome.value}, rows {rows(database)}"
            f"{': ' + result.error if result.error else ''}")
    if server.error_aborts_transaction:
        assert result.outcome is Outcome.FAILED and result.attempts == 1
        assert "aborted" in result.error
        assert rows(database) == 0
    else:
        assert result.outcome is Outcome.SUCCESS
        assert counters(database) == {1: 1}
    assert not admin.open_transaction(worker_connection_id(database))


@scenario("savepoint_recovers_from_a_failed_statement")
def test_savepoint_recovers_from_a_failed_statement(make_database, admin, backend):
    """What docs/postgresql.md tells such a job to do: the failing statement inside
    session.begin_nested(); the rest of the job commits on every backend."""
    database = make_database(pool_size=1)
    run(spec("setup", "tests.jobfuncs:create_counters"), database)
    result = run(spec("savepoint", "tests.jobfuncs:insert_after_a_failure_in_a_savepoint",
                      value=1), database)
    outcome("savepoint", backend, f"{result.outcome.value}, rows {counters(database)}")
    assert result.outcome is Outcome.SUCCESS and result.attempts == 1
    assert counters(database) == {1: 1, 2: 2}
    assert not admin.open_transaction(worker_connection_id(database))
