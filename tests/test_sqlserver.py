"""The worker on SQL Server, end to end, through the three drivers our users run:
Microsoft's ODBC Driver 18 (mssql+pyodbc), FreeTDS (mssql+pyodbc) and mssql-python
(mssql+mssqlpython), against the TDS test server (tests/sqlserver, SQLite behind it).
Microsoft's driver is also the SQL Server backend of the scenario suite
(tests/test_scenarios.py): a scenario that suite runs with the same assertions runs
here on the other two drivers only.

Every scenario prints one line: outcome, attempts, seconds."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from worker.callables import resolve
from worker.config import DatabaseSettings, JobSpec, RetryPolicy
from worker.db import Database, Session
from worker.pool import WorkerPool
from worker.runner import Outcome, run_job
from tests.batch import run_all
from tests.conftest import ROOT
from tests.sqlserver.process import DRIVERS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tds(tds_server):
    """The session's TDS test server (conftest), shared with the scenario suite."""
    return tds_server


@pytest.fixture(params=DRIVERS)
def driver(request) -> str:
    return request.param


@pytest.fixture
def make_database(tds, driver):
    """Factory: a Database on the test server through the parametrised driver, with an
    empty worker_test_counters table and no faults; disposed afterwards."""
    made: list[Database] = []
    tds.set_faults("[]\n")
    tds.execute("DROP TABLE IF EXISTS worker_test_counters")
    tds.execute("CREATE TABLE worker_test_counters (id INTEGER NOT NULL PRIMARY KEY, "
                "value INTEGER NOT NULL)")

    def make(pool_size: int = 4, url: str | None = None, **settings) -> Database:
        database = Database(DatabaseSettings(url=url or tds.url(driver), pool_size=pool_size,
                                             **settings))
        made.append(database)
        return database

    yield make
    tds.set_faults("[]\n")
    Session.remove()
    for database in made:
        database.dispose()


def job(name: str, call: str, attempts: int = 3, wait: float = 0.05, idempotent: bool = False,
        timeout: float | None = None, **kwargs) -> JobSpec:
    return JobSpec(name=name, call=call, kwargs=kwargs, idempotent=idempotent, timeout=timeout,
                   retry=RetryPolicy(attempts=attempts, wait_initial=wait, wait_max=wait))


def run(spec: JobSpec, database: Database):
    result = run_job(spec, resolve(spec.call), database)
    label = database.url.query.get("driver", database.url.get_driver_name())
    print(f"\n{spec.name} [{label}]: "
          f"{result.outcome.value}, {result.attempts} attempts, {result.duration:.2f}s"
          + (f" ({result.error})" if result.error else ""))
    return result


def counter(tds, row: int = 1) -> int | None:
    rows = tds.execute("SELECT value FROM worker_test_counters WHERE id = ?", row)
    return rows[0][0] if rows else None


def seed(tds, *rows: int) -> None:
    for row in rows:
        tds.execute("INSERT INTO worker_test_counters (id, value) VALUES (?, 0)", row)


# --- the story ----------------------------------------------------------------------

# Microsoft's driver: test_scenarios.py::test_story_sixteen_jobs[sqlserver]
@pytest.mark.parametrize("driver", ["freetds", "mssqlpython"])
def test_story_sixteen_jobs_at_once_each_with_its_own_connection(make_database, driver):
    database = make_database(pool_size=16)
    run(job("schema", "jobs.commands:ensure_schema"), database)   # not raced by 16 jobs
    barrier = threading.Barrier(16)
    seen: list = []
    spec = job("reader", "tests.jobfuncs:global_style_reader", barrier=barrier, seen=seen)
    function = resolve(spec.call)
    started = time.monotonic()
    with WorkerPool(16) as pool:
        results = run_all(pool, [lambda: run_job(spec, function, database)] * 16)
    print(f"\nstory [{driver}]: {sum(r.ok for r in results)}/16 ok, "
          f"{len({spid for _, spid in seen})} distinct @@SPID, "
          f"{time.monotonic() - started:.2f}s")
    assert [r.error for r in results if not r.ok] == []
    assert all(r.attempts == 1 for r in results)
    assert all(same for same, _ in seen)
    assert len({spid for _, spid in seen}) == 16
    assert database.checked_out() == 0


SHARED_SESSION_SCRIPT = """\
import sys, threading
from sqlalchemy import create_engine, text
from sqlalchemy.orm import scoped_session, sessionmaker
import pyodbc
pyodbc.pooling = False
engine = create_engine(sys.argv[1], pool_size=20, max_overflow=0)
Session = scoped_session(sessionmaker(bind=engine))
session = Session()            # the story's mistake: one Session for every thread
session.execute(text("SELECT 1"))   # its connection exists before the threads start
errors = []
def task():
    for _ in range(50):
        try:
            session.execute(text("WITH c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                                 "WHERE x < 300) SELECT x FROM c OPTION (MAXRECURSION 300)")).all()
        except Exception as exc:
            errors.append(" ".join(str(getattr(exc, "orig", exc)).split()))
            try:
                session.rollback()
            except Exception:
                pass
threads = [threading.Thread(target=task) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors))
for message in sorted(set(errors))[:5]:
    print(message)
"""


def test_story_bug_one_session_shared_by_threads_on_microsofts_driver(tds, tmp_path):
    """The story's bug, through Microsoft's driver, in a process of its own (a driver
    may abort the process): what does the driver really do?"""
    script = tmp_path / "shared.py"
    script.write_text(SHARED_SESSION_SCRIPT)
    done = subprocess.run([sys.executable, str(script), tds.url("msodbc")], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    print(f"\nshared Session, 4 threads, Microsoft's driver: exit {done.returncode}; "
          f"{done.stdout.strip()[:600]} {done.stderr.strip()[-300:]}")
    crashed = done.returncode < 0
    busy = "Connection is busy with results for another command" in done.stdout
    assert crashed or busy, (done.returncode, done.stdout, done.stderr[-2000:])
    if not crashed:
        assert int(done.stdout.split()[0]) > 0


# --- retried server errors ------------------------------------------------------------

DEADLOCK = ("Transaction (Process ID {spid}) was deadlocked on lock resources with another "
            "process and has been chosen as the deadlock victim. Rerun the transaction.")


def test_deadlock_1205_is_retried_and_succeeds(tds, make_database, driver, caplog):
    database = make_database(pool_size=2)
    seed(tds, 1)
    tds.set_faults(f"""\
- match: "update worker_test_counters"
  times: 2
  error: {{number: 1205, state: 51, class: 13, message: "{DEADLOCK}"}}
""")
    with caplog.at_level("WARNING", logger="worker.runner"):
        result = run(job("deadlock", "tests.jobfuncs:bump_counter", attempts=5), database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 3
    # read as SQL Server's 1205 even where the driver drops the number (mssql-python)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and all("deadlock victim" in m and "native 1205" in m
                                     for m in retries), retries
    assert counter(tds) == 1
    assert database.checked_out() == 0


AZURE_ERRORS = {
    40613: (1, 17, "Database 'test' on server 'tds' is not currently available. Please "
                   "retry the connection later."),
    40501: (1, 20, "The service is currently busy. Retry the request after 10 seconds. "
                   "Incident ID: {{00000000-0000-0000-0000-000000000000}}. Code: 1."),
    49918: (1, 16, "Cannot process request. Not enough resources to process request. "
                   "The service is currently busy. Please retry the request later."),
}


@pytest.mark.parametrize("number", [40613, 49918])
@pytest.mark.parametrize("where", ["statement", "login"])
def test_azure_transient_errors_are_retried(tds, make_database, driver, number, where):
    database = make_database(pool_size=1)
    seed(tds, 1)
    state, severity, message = AZURE_ERRORS[number]
    match = 'login: true' if where == "login" else 'match: "update worker_test_counters"'
    tds.set_faults(f"""\
- {match}
  times: 1
  error: {{number: {number}, state: {state}, class: {severity}, message: "{message}"}}
""")
    result = run(job(f"azure-{number}-{where}", "tests.jobfuncs:bump_counter", attempts=3),
                 database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 2
    assert counter(tds) == 1
    assert database.checked_out() == 0


@pytest.mark.parametrize("where", ["statement", "login"])
def test_service_busy_40501_waits_ten_seconds(tds, where):
    """40501 asks for 10 s; Microsoft's driver only (the wait is the whole test)."""
    database = Database(DatabaseSettings(url=tds.url("msodbc"), pool_size=1))
    try:
        tds.set_faults("[]\n")
        tds.execute("DROP TABLE IF EXISTS worker_test_counters")
        tds.execute("CREATE TABLE worker_test_counters (id INTEGER NOT NULL PRIMARY KEY, "
                    "value INTEGER NOT NULL)")
        seed(tds, 1)
        state, severity, message = AZURE_ERRORS[40501]
        match = 'login: true' if where == "login" else 'match: "update worker_test_counters"'
        tds.set_faults(f"""\
- {match}
  times: 1
  error: {{number: 40501, state: {state}, class: {severity}, message: "{message}"}}
""")
        result = run(job(f"busy-40501-{where}", "tests.jobfuncs:bump_counter", attempts=3),
                     database)
        assert result.outcome is Outcome.SUCCESS and result.attempts == 2
        assert result.duration >= 10.0
        assert counter(tds) == 1
    finally:
        tds.set_faults("[]\n")
        database.dispose()


# --- dropped connections ----------------------------------------------------------------

@pytest.mark.parametrize("fault,call", [
    ("disconnect: true", "tests.jobfuncs:bump_counter"),          # mid-query
    ("disconnect: midway", "tests.jobfuncs:select_big"),          # mid-result
], ids=["mid-query", "mid-result"])
def test_dropped_connection_is_retried_and_never_pooled_again(tds, make_database, driver,
                                                                fault, call):
    database = make_database(pool_size=1)
    seed(tds, 1)
    match = "update worker_test_counters" if "bump" in call else "as big"
    tds.set_faults(f'- match: "{match}"\n  times: 1\n  {fault}\n')
    result = run(job(f"dropped-{fault.split()[-1]}", call, attempts=3), database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 2
    if "bump" in call:
        assert counter(tds) == 1
    assert database.checked_out() == 0
    after = [run_job(job(f"after-{n}", "tests.jobfuncs:select_one", attempts=1),
                     resolve("tests.jobfuncs:select_one"), database) for n in range(20)]
    assert [r.attempts for r in after if r.ok] == [1] * 20


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_dropped_during_commit_retried_only_when_idempotent(tds, make_database, driver,
                                                              idempotent):
    database = make_database(pool_size=1)
    seed(tds, 1)
    tds.set_faults('- match: "commit transaction"\n  times: 1\n  disconnect: after\n')
    result = run(job(f"commit-dropped-{'idempotent' if idempotent else 'plain'}",
                     "tests.jobfuncs:bump_counter", attempts=3, idempotent=idempotent),
                 database)
    if idempotent:
        assert result.outcome is Outcome.SUCCESS and result.attempts == 2
        assert counter(tds) == 2        # the first COMMIT did apply: why only idempotent jobs
    else:
        assert result.outcome is Outcome.FAILED and result.attempts == 1
        assert result.error
        assert counter(tds) == 1
    assert database.checked_out() == 0


# --- deadline ---------------------------------------------------------------------------

def test_deadline_cancels_waitfor_within_three_seconds(tds, make_database, driver):
    database = make_database(pool_size=1)
    before = tds.stats()
    result = run(job("deadline", "tests.jobfuncs:mssql_waitfor", attempts=1, timeout=2.0,
                     seconds=30), database)
    after = tds.stats()
    assert result.outcome is Outcome.TIMEOUT
    assert result.duration < 3.0
    assert after["attentions"] > before["attentions"]    # stopped by ATTENTION, server side
    # the connection is still usable (or was thrown away): the next job succeeds first try
    assert run(job("after-deadline", "tests.jobfuncs:select_one", attempts=1),
               database).attempts == 1
    assert database.checked_out() == 0


def test_cancelling_at_deadlines_never_crashes_microsofts_driver(tds):
    """Microsoft's driver lets a cancelled execute() return while cursor.cancel() is
    still inside SQLCancel in the deadline's thread; rolling back under it crashed the
    process in 2 of 6 runs. Ten short deadlines in a row, in a process of their own."""
    script = textwrap.dedent(f"""\
        from worker.callables import resolve
        from worker.config import DatabaseSettings, JobSpec, RetryPolicy
        from worker.db import Database
        from worker.runner import run_job
        database = Database(DatabaseSettings(url={tds.url("msodbc")!r}, pool_size=1))
        spec = JobSpec(name="short", call="tests.jobfuncs:mssql_waitfor", kwargs={{}},
                       timeout=0.3, retry=RetryPolicy(attempts=1))
        outcomes = [run_job(spec, resolve(spec.call), database).outcome.value
                    for _ in range(10)]
        print(" ".join(outcomes))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    print(f"\n10 deadlines of 0.3 s through Microsoft's driver: exit {done.returncode}; "
          f"{done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["timeout"] * 10


# --- round trips ------------------------------------------------------------------------

def test_round_trips_per_job_are_the_statements_and_one_commit(tds, make_database, driver):
    database = make_database(pool_size=1)
    seed(tds, 1)
    spec = job("one-update", "tests.jobfuncs:bump_counter", attempts=1)
    run(spec, database)                     # first connect: the dialect's own queries
    before = tds.stats()
    for _ in range(10):
        assert run_job(spec, resolve(spec.call), database).ok
    after = tds.stats()
    requests = after["requests"] - before["requests"]
    unprepares = after["unprepares"] - before["unprepares"]
    commits = after["commits"] - before["commits"]
    rollbacks = after["rollbacks"] - before["rollbacks"]
    print(f"\nround trips [{driver}]: {requests / 10:.1f} per job, of which "
          f"{unprepares / 10:.1f} sp_unprepare ({commits} commits, {rollbacks} rollbacks "
          f"for 10 jobs)")
    assert commits == 10 and rollbacks == 0
    # the UPDATE and the COMMIT; a driver that prepares parameterised statements
    # (sp_prepexec) also frees each one with an sp_unprepare of its own
    assert requests - unprepares == 20


# --- the real CLI -------------------------------------------------------------------------

def write_config(path: Path, url: str, jobs: str, **worker) -> Path:
    settings = {"max_workers": 4, "shutdown_timeout": "10s",
                "lock_dir": str(path.parent / "locks"), **worker}
    worker_yaml = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in settings.items())
    path.write_text(f'database:\n  url: "{url}"\nworker:\n{worker_yaml}\n'
                    "retry:\n  attempts: 3\n  wait_initial: 50ms\n  wait_max: 200ms\n"
                    "jobs:\n" + textwrap.indent(textwrap.dedent(jobs), "  "))
    return path


def run_worker(config: Path, *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    done.seconds = time.monotonic() - started
    return done


SELECT_JOB = "- {name: probe, call: 'tests.jobfuncs:select_one'}\n"


def test_check_connect_through_each_driver(tds, driver, tmp_path):
    config = write_config(tmp_path / "jobs.yaml", tds.url(driver), SELECT_JOB)
    done = run_worker(config, "--check", "--connect")
    print(f"\n--check --connect [{driver}]: exit {done.returncode}, {done.seconds:.2f}s")
    assert done.returncode == 0, done.stderr
    assert "connected to mssql+" in done.stdout
    assert ":test@" not in done.stdout + done.stderr          # the password never shown


def test_login_failed_18456_is_not_retried(tds, driver, tmp_path):
    config = write_config(tmp_path / "jobs.yaml", tds.url(driver, password="wrong-one"),
                          SELECT_JOB)
    before = tds.stats()["login_failures"]
    once = run_worker(config, "--once")
    tries = tds.stats()["login_failures"] - before
    check = run_worker(config, "--check", "--connect")
    print(f"\nlogin failed [{driver}]: --once exit {once.returncode} after {tries} login "
          f"attempts ({once.seconds:.2f}s); --check --connect exit {check.returncode}: "
          f"{check.stderr.strip()}")
    assert once.returncode == 1
    # Never retried: the job's login once, and the run history's (its own engine on
    # the same database) once, which then gives up instead of trying again.
    assert tries == 2
    assert "run history: " in once.stderr and "waiting cannot fix" in once.stderr
    assert check.returncode == 69
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 1 and "Login failed for user 'sa'" in lines[0], check.stderr
    assert "wrong-one" not in once.stderr + check.stderr + check.stdout


def test_check_connect_with_a_driver_that_is_not_installed(tds, tmp_path):
    url = tds.url("msodbc", odbc_driver="ODBC Driver 99 for SQL Server")
    config = write_config(tmp_path / "jobs.yaml", url, SELECT_JOB)
    done = run_worker(config, "--check", "--connect")
    print(f"\n--check --connect, driver not installed: exit {done.returncode}: "
          f"{done.stderr.strip()}")
    assert done.returncode == 69
    assert "installed ODBC drivers:" in done.stderr
    for name in ("'ODBC Driver 18 for SQL Server'", "'FreeTDS'"):
        assert name in done.stderr


# --- cluster: two nodes, the run table on the test server --------------------------------

def test_cluster_two_nodes_run_each_occurrence_once(tds, driver, tmp_path, daemons):
    tds.set_faults("[]\n")
    for table in ("worker_runs", "worker_schema", "worker_test_runs"):
        tds.execute(f"DROP TABLE IF EXISTS {table}")
    tds.execute("CREATE TABLE worker_test_runs (name VARCHAR(64) NOT NULL, at FLOAT NOT NULL)")
    url = tds.url(driver)
    config = tmp_path / "cluster.yaml"
    config.write_text(f"""\
database:
  url: "{url}"
worker:
  max_workers: 4
  shutdown_timeout: 10s
  lock_dir: "{tmp_path}/locks-${{NODE}}"
cluster:
  node: ${{NODE}}
  lease: 3s
  heartbeat: 500ms
retry: {{attempts: 3, wait_initial: 50ms, wait_max: 200ms}}
jobs:
  - {{name: tick, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {{name: tick}}}}
""")
    before = tds.stats()["duplicate_keys"]
    nodes = [daemons(config, env={"NODE": f"node-{n}"}) for n in range(2)]
    for node in nodes:
        node.wait_for("daemon started", timeout=30)
    time.sleep(6)
    for node in nodes:
        node.signal(15)
    codes = [node.wait() for node in nodes]
    lost_claims = tds.stats()["duplicate_keys"] - before
    rows = tds.execute("SELECT slot_ms, node, outcome FROM worker_runs WHERE job = 'tick' "
                       "ORDER BY slot_ms")
    recorded = tds.execute("SELECT COUNT(*) FROM worker_test_runs WHERE name = 'tick'")[0][0]
    slots = [row[0] for row in rows]
    by_node = {row[1] for row in rows}
    print(f"\ncluster [{driver}]: {len(slots)} occurrences, {recorded} runs recorded, "
          f"{lost_claims} claims lost on a duplicate key, nodes {sorted(by_node)}, "
          f"exits {codes}")
    assert codes == [0, 0], [node.log[-2000:] for node in nodes]
    assert len(slots) >= 5
    assert len(slots) == len(set(slots))                 # every occurrence once
    assert recorded == len([r for r in rows if r[2] == "success"])
    assert all(r[2] == "success" for r in rows[:-1])
    assert lost_claims > 0                  # the nodes really raced for the same rows
    # SQL Server's duplicate-key errors as the drivers print them, "(2627)": not any
    # "2627" (a pid=12627 or a port in a log line matched as well).
    assert not any(re.search(r"\((?:2627|2601)\)", node.log) for node in nodes)


# --- every SQL Server row of the classifier, through Microsoft's driver --------------------

def _server_numbers():
    from worker.errors import NATIVE_RULES
    return sorted(number for number, rule in NATIVE_RULES["mssql"].items()
                  if number >= 100 and rule.min_wait == 0)      # 40501 has its own test


@pytest.mark.parametrize("number", _server_numbers())
def test_each_server_error_number_gets_the_classifiers_verdict(tds, number):
    """The server sends the error (class 16, on a statement); the worker retries it
    exactly when its table says so."""
    from worker.errors import NATIVE_RULES, Verdict
    rule = NATIVE_RULES["mssql"][number]
    database = Database(DatabaseSettings(url=tds.url("msodbc"), pool_size=1))
    try:
        tds.set_faults(f'- match: "as classified"\n  times: 1\n  error: {{number: {number}, '
                       f'state: 1, class: 16, message: "Error {number} from the test server."}}\n')
        result = run_job(job(f"error-{number}", "tests.jobfuncs:select_classified",
                             attempts=2, wait=0.01),
                         resolve("tests.jobfuncs:select_classified"), database)
        if rule.verdict is Verdict.RETRY:
            assert result.outcome is Outcome.SUCCESS and result.attempts == 2, result
        else:
            assert result.outcome is Outcome.FAILED and result.attempts == 1, result
        assert f"({number})" in (result.error or f"({number})")
        assert database.checked_out() == 0
    finally:
        tds.set_faults("[]\n")
        database.dispose()


def test_login_that_stalls_is_a_login_timeout_and_retried(tds):
    """The server accepts the TCP connection but holds its answer to LOGIN7: Microsoft's
    driver gives up after the login timeout (HYT00 'Login timeout expired')."""
    database = Database(DatabaseSettings(url=tds.url("msodbc"), pool_size=1,
                                         connect_args={"timeout": 1}))
    try:
        tds.set_faults("- login: true\n  times: 1\n  delay: 3s\n")
        result = run_job(job("login-stall", "tests.jobfuncs:select_one", attempts=3, wait=0.01),
                         resolve("tests.jobfuncs:select_one"), database)
        print(f"\nlogin stalled [msodbc]: {result.outcome.value}, {result.attempts} attempts, "
              f"{result.duration:.2f}s")
        assert result.outcome is Outcome.SUCCESS and result.attempts == 2
    finally:
        tds.set_faults("[]\n")
        database.dispose()
