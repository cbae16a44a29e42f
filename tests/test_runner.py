"""worker.runner: one Session scope per attempt, commit/rollback/remove, retries."""
from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time

import pytest
from sqlalchemy import text

from worker.callables import resolve
from worker.config import DatabaseSettings
from worker.db import Database, Session
from worker.runner import Outcome, run_job
from tests.conftest import spec, sqlite_url


def run(job, database, **kwargs):
    return run_job(job, resolve(job.call), database, **kwargs)


def count_rows(database) -> int:
    with database.engine.connect() as connection:
        return connection.execute(text("SELECT COUNT(*) FROM worker_test_counters")).scalar()


def locked_sqlite(tmp_path, busy_timeout: float):
    """A Database on a SQLite file whose write lock another connection holds, as a
    second process would: every write gets SQLITE_BUSY after `busy_timeout`."""
    database = Database(DatabaseSettings(url=sqlite_url(tmp_path), pool_size=1,
                                         connect_args={"timeout": busy_timeout}))
    holder = sqlite3.connect(tmp_path / "test.db", isolation_level=None,
                             check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS worker_test_counters "
                   "(id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
    holder.execute("BEGIN EXCLUSIVE")
    return database, holder


def test_success_commits_and_removes_the_session(database):
    result = run(spec("insert", "tests.jobfuncs:insert_row", value=1), database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 1 and result.ok
    assert count_rows(database) == 1
    assert not Session.registry.has()          # registry cleared in this thread
    assert database.checked_out() == 0         # nothing left out of the pool


def test_failure_rolls_back_removes_and_is_not_retried(database):
    run(spec("setup", "tests.jobfuncs:create_counters"), database)
    result = run(spec("bad", "tests.jobfuncs:insert_then_fail", attempts=5, value=7),
                 database)
    assert result.outcome is Outcome.FAILED
    assert result.attempts == 1                # a bug in the job is never retried
    assert "bug" in result.error or "failing after the insert" in result.error
    assert count_rows(database) == 0           # the insert was rolled back
    assert not Session.registry.has()
    assert database.checked_out() == 0


def test_permanent_database_error_is_not_retried(database):
    result = run(spec("syntax", "tests.jobfuncs:syntax_error", attempts=5), database)
    assert result.outcome is Outcome.FAILED and result.attempts == 1
    assert database.checked_out() == 0


def test_each_attempt_gets_a_fresh_session(tmp_path):
    database, holder = locked_sqlite(tmp_path, 0.05)   # writers get SQLITE_BUSY
    sessions = []

    def job(session, value):
        sessions.append(session)
        if len(sessions) == 3:
            holder.execute("COMMIT")             # the lock goes away before attempt 3
        session.execute(text("INSERT INTO worker_test_counters VALUES (:v, :v)"),
                        {"v": value})

    try:
        result = run_job(spec("busy", attempts=5, value=1), job, database)
    finally:
        holder.close()
        database.dispose()
    assert result.outcome is Outcome.SUCCESS
    assert result.attempts == 3                  # two 'database is locked', then success
    assert len({id(s) for s in sessions}) == 3   # a new Session for every attempt


def test_transient_sqlite_lock_is_retried_and_logged(tmp_path, caplog):
    """A real SQLITE_BUSY from another connection holding the write lock."""
    database, holder = locked_sqlite(tmp_path, 0.1)
    threading.Timer(0.5, holder.execute, args=("COMMIT",)).start()
    try:
        with caplog.at_level("WARNING", logger="worker.runner"):
            result = run(spec("locked", "tests.jobfuncs:sqlite_write", attempts=10,
                              wait=0.2, value=3), database)
        assert result.outcome is Outcome.SUCCESS and result.attempts >= 2
        assert count_rows(database) == 1         # applied exactly once
        retry_lines = [r.getMessage() for r in caplog.records if "retrying in" in r.message]
        assert retry_lines, "each retry is logged"
        assert "job=locked attempt=1/10" in retry_lines[0]
        assert "native 5" in retry_lines[0] and "database is locked" in retry_lines[0]
    finally:
        time.sleep(0.6)
        holder.close()
        database.dispose()


def test_retries_stop_after_the_configured_attempts(tmp_path):
    database, holder = locked_sqlite(tmp_path, 0.01)
    waits = []
    try:
        result = run(spec("locked", "tests.jobfuncs:sqlite_write", attempts=3, value=1),
                     database, sleep=waits.append)
    finally:
        holder.close()
        database.dispose()
    assert result.outcome is Outcome.FAILED and result.attempts == 3
    assert len(waits) == 2                       # waits between attempts, none after
    assert "database is locked" in result.error


def test_backoff_is_exponential_with_jitter_and_capped(tmp_path):
    from worker.config import JobSpec, RetryPolicy
    database, holder = locked_sqlite(tmp_path, 0.001)
    waits = []
    job = JobSpec(name="backoff", call="tests.jobfuncs:sqlite_write", kwargs={"value": 1},
                  retry=RetryPolicy(attempts=6, wait_initial=1.0, wait_max=5.0))
    try:
        result = run(job, database, sleep=waits.append)
    finally:
        holder.close()
        database.dispose()
    assert result.attempts == 6 and len(waits) == 5
    # initial * 2**n plus up to `initial` of jitter, never above wait_max
    assert 1.0 <= waits[0] <= 2.0
    assert 2.0 <= waits[1] <= 3.0
    assert 4.0 <= waits[2] <= 5.0
    assert waits[3] == waits[4] == 5.0


def test_global_style_session_is_the_jobs_session(database):
    seen = []
    barrier = threading.Barrier(1)
    result = run(spec("global", "tests.jobfuncs:global_style_reader",
                      barrier=barrier, seen=seen), database)
    assert result.ok
    assert seen[0][0] is True                    # Session() is session inside the job


def values(database) -> list[int]:
    with database.engine.connect() as connection:
        return [row[0] for row in connection.execute(
            text("SELECT value FROM worker_test_counters ORDER BY value"))]


@pytest.mark.parametrize("style", ["argument", "global"])
def test_a_job_that_closes_its_session_is_warned_about_by_name(database, style, caplog):
    """Issue 10 item 3: close() throws away what the job had not committed. The run
    still succeeds (the job returned), what it did after close() is committed, and
    the loss is logged as a warning naming the job."""
    job = spec("closer", "tests.jobfuncs:insert_close_insert", value=1, style=style)
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        result = run(job, database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 1
    assert values(database) == [2]                   # the insert before close() is lost
    warnings = [r for r in caplog.records if "closed its Session" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("job=closer attempt=1/3 ")
    assert warnings[0].job == "closer"
    assert database.checked_out() == 0


def test_a_job_that_commits_itself_succeeds_and_is_not_warned_about(database, caplog):
    """Issue 10 item 3: a job's own commit() is its choice; returning after it is a
    success, and its rows are there once."""
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        result = run(spec("committer", "tests.jobfuncs:insert_and_commit", value=7),
                     database)
    assert result.outcome is Outcome.SUCCESS and result.attempts == 1
    assert values(database) == [7]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert database.checked_out() == 0


def test_a_job_failing_run_after_run_logs_its_traceback_once_per_streak(tmp_path):
    """The daemon, a job failing every 0.2 s: one traceback, then one line per
    failure with the streak's count (it logged a traceback per run before)."""
    from tests.processes import Daemon
    config = tmp_path / "jobs.yaml"
    config.write_text(f'database: {{url: "sqlite:///{tmp_path / "w.db"}"}}\n'
                      f'worker: {{lock_dir: "{tmp_path / "locks"}"}}\n'
                      "jobs:\n  - {name: bad, call: 'tests.jobfuncs:fail_with_value_error', "
                      "every: 0.2s, retry: {attempts: 1}}\n")
    daemon = Daemon(config, "--log-level", "INFO")
    try:
        daemon.wait_for("failed 4 runs in a row")
    finally:
        daemon.stop()
    log = daemon.log
    assert log.count("Traceback (most recent call last)") == 1, log
    assert log.count("job=bad attempt=1/1 failed: ") >= 4
    for count in (2, 3, 4):
        assert f"job=bad attempt=1/1 failed {count} runs in a row; traceback as logged " \
               "at the first of them, not repeated" in log


def test_a_success_ends_the_streak():
    from worker.runner import FailureStreaks
    streaks = FailureStreaks()
    assert [streaks.failed("a"), streaks.failed("a"), streaks.failed("b")] == [1, 2, 1]
    streaks.succeeded("a")
    assert streaks.failed("a") == 1 and streaks.failed("b") == 2


@pytest.mark.timeout(120)
def test_a_connection_cut_in_first_connect_initialisation_is_retried(tds_server, tmp_path):
    """Through Microsoft's driver, the server goes away while SQLAlchemy initialises
    the dialect on the first connection (after login, before the job's first
    statement): a connect failure, retried. It was `ResourceClosedError: This
    Connection is closed` or a driver error, 'not a database error; not retried'."""
    import subprocess
    import sys
    from tests.conftest import ROOT
    # the version query of the dialect's initialize(), on the pool's first connection
    tds_server.set_faults('- match: "serverproperty(\'productversion\')"\n  times: 1\n'
                          '  disconnect: true\n')
    config = tmp_path / "jobs.yaml"
    config.write_text(f'database: {{url: "{tds_server.url("msodbc")}"}}\n'
                      f'worker: {{lock_dir: "{tmp_path / "locks"}"}}\n'
                      "retry: {attempts: 3, wait_initial: 0.05s, wait_max: 0.05s}\n"
                      "jobs:\n  - {name: sel, call: 'tests.jobfuncs:select_one'}\n")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "--once", "-c",
                               str(config)], cwd=ROOT, capture_output=True, text=True,
                              timeout=90)
    finally:
        tds_server.set_faults("[]\n")
    assert done.returncode == 0, done.stderr
    assert "failed while connecting, before the job's first statement" in done.stderr, \
        done.stderr
    assert "ResourceClosedError" in done.stderr and "attempt=2/3 succeeded" in done.stderr


def test_an_answer_refusing_the_connection_is_not_retried_as_a_connect_failure(
        backend, tmp_path):
    """A failure before the job's first statement is retried as a connect failure
    only when nothing answered: MariaDB refusing the database (1044, 42000, the
    server's definitive answer) and a TypeError from a bad connect_args keyword (a
    bug in the config) were retried `attempts` times as 'failed while connecting'."""
    from tests.conftest import MARIADB_URL
    if backend == "mariadb":
        url = re.sub(r"/\w+\?", "/no_such_db?", MARIADB_URL)   # any test database
        assert url != MARIADB_URL
        settings = DatabaseSettings(url=url, pool_size=1)
    else:
        settings = DatabaseSettings(url=sqlite_url(tmp_path),
                                    connect_args={"no_such_keyword": 1}, pool_size=1)
    database = Database(settings)
    try:
        result = run(spec("refused", attempts=3), database, sleep=lambda seconds: None)
    finally:
        Session.remove()
        database.dispose()
    assert result.outcome is Outcome.FAILED
    assert result.attempts == 1, result.error


def test_a_different_error_in_a_failure_streak_logs_its_traceback(tmp_path, caplog):
    """A job failing with one error, then (a reload changed its code, the data
    changed) with another: the second error's traceback was 'as logged at the
    first of them, not repeated', although that traceback was of another error."""
    from worker.runner import FailureStreaks
    database = Database(DatabaseSettings(url=sqlite_url(tmp_path), pool_size=1))
    streaks = FailureStreaks()
    calls = ["tests.jobfuncs:fail_with_value_error"] * 2 + ["tests.jobfuncs:syntax_error"] * 2
    try:
        with caplog.at_level(logging.INFO, logger="worker.runner"):
            for call in calls:
                run(spec("flaky", call, attempts=1), database, streaks=streaks)
    finally:
        database.dispose()
    shown = [r.exc_info[0].__name__ for r in caplog.records
             if "traceback of the last attempt" in r.getMessage()]
    assert shown == ["ValueError", "OperationalError"]   # SQLite: a syntax error
    assert sum("runs in a row" in r.getMessage() for r in caplog.records) == 2


def test_a_success_without_a_streak_takes_no_lock():
    """FailureStreaks.succeeded runs after every successful run: with no streak to
    end (almost always) it must not take the lock the job threads share."""
    from worker.runner import FailureStreaks

    class NoLock:
        def __enter__(self):
            raise AssertionError("the lock was taken")

        def __exit__(self, *exc_info):
            return False

    streaks = FailureStreaks()
    streaks._lock = NoLock()
    streaks.succeeded("a")          # no streak: nothing to do
    with pytest.raises(AssertionError, match="lock was taken"):
        streaks.failed("a")         # a failure does take it


def test_a_success_line_builds_its_log_fields_only_when_the_line_is_written(
        tmp_path, monkeypatch, caplog):
    import worker.runner as runner
    built = []
    real_fields = runner._fields
    monkeypatch.setattr(runner, "_fields", lambda *a: built.append(a) or real_fields(*a))
    database = Database(DatabaseSettings(url=sqlite_url(tmp_path), pool_size=1))
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        assert run_job(spec("quiet"), resolve("tests.jobfuncs:select_one"), database).ok
    assert built == []
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        assert run_job(spec("loud"), resolve("tests.jobfuncs:select_one"), database).ok
    assert [(job.name, attempt) for job, attempt in built] == [("loud", 1)]
    line = [r for r in caplog.records if "succeeded" in r.getMessage()][-1]
    assert line.job == "loud" and line.attempt == 1 and line.attempts == 3
