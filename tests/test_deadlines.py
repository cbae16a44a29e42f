"""Deadlines (a job's `timeout`, per attempt): the statement in flight is cancelled
through the driver, the Session rolled back, and the run ends as `timeout`."""
from __future__ import annotations

import threading
import time

from sqlalchemy import text

from tests.batch import run_batch
from worker.callables import resolve
from worker.config import JobSpec, RetryPolicy
from worker.deadlines import Deadline, RunWatch
from worker.pool import WorkerPool
from worker.runner import Outcome, run_job
from tests.conftest import spec


def timed(name, call, timeout, attempts=3, on_timeout=False, **kwargs) -> JobSpec:
    return JobSpec(name=name, call=call, kwargs=kwargs, timeout=timeout,
                   retry=RetryPolicy(attempts=attempts, wait_initial=0.01, wait_max=0.01,
                                     on_timeout=on_timeout))


def rows(database) -> int:
    with database.engine.connect() as connection:
        return connection.execute(text("SELECT COUNT(*) FROM worker_test_counters")).scalar()


# The long statement cut at its deadline on every backend: tests/test_scenarios.py
# (deadline_cancels_the_statement).


def test_work_done_before_the_deadline_is_rolled_back(database):
    run_job(spec("setup"), resolve("tests.jobfuncs:create_counters"), database)
    job = timed("late", "tests.jobfuncs:insert_then_sleep", 0.3, seconds=0.6, value=1)
    result = run_job(job, resolve(job.call), database)
    assert result.outcome is Outcome.TIMEOUT
    assert "deadline" in result.error
    assert rows(database) == 0


def test_no_statement_starts_after_the_deadline(database):
    run_job(spec("setup"), resolve("tests.jobfuncs:create_counters"), database)
    job = timed("sleepy", "tests.jobfuncs:sleep_then_insert", 0.2, seconds=0.5, value=1)
    result = run_job(job, resolve(job.call), database)
    assert result.outcome is Outcome.TIMEOUT
    assert "DeadlineExceeded" in result.error
    assert rows(database) == 0


def test_timeout_is_retried_when_the_job_asks(database):
    calls: list = []
    job = timed("retried", "tests.jobfuncs:slow_first_attempt", 1.0, on_timeout=True,
                calls=calls, seconds=30)
    result = run_job(job, resolve(job.call), database)
    assert result.outcome is Outcome.SUCCESS
    assert result.attempts == 2 and len(calls) == 2


def test_job_stuck_in_python_is_reported_and_not_run_twice(database):
    stuck = timed("stuck", "tests.jobfuncs:python_sleep", 0.2, seconds=3)
    quick = spec("quick", "tests.jobfuncs:select_one")
    functions = {job.name: resolve(job.call) for job in (stuck, quick)}
    pool = WorkerPool(2)
    started = time.monotonic()
    batch = run_batch([stuck, quick], functions, database, pool, stuck_grace=0.5)
    reported_after = time.monotonic() - started
    stuck_result, quick_result = batch.results
    assert stuck_result.outcome is Outcome.TIMEOUT
    assert "left to finish" in stuck_result.error
    assert reported_after < 2.5                      # reported before the job returned
    assert batch.abandoned == 1
    assert quick_result.ok
    pool.shutdown(wait=True)                         # the stuck thread finishes on its own
    assert time.monotonic() - started >= 3


def test_a_long_backoff_after_a_timed_out_attempt_is_not_stuck(database):
    """Issue 10 item 5: the first attempt times out (its statement cancelled), the
    retry waits 1.5 s, far past the loop's stuck grace: the run is neither reported
    stuck nor abandoned (so `--once` would not os._exit), and attempt 2 succeeds."""
    calls: list = []
    job = JobSpec(name="backoff", call="tests.jobfuncs:slow_first_attempt",
                  kwargs={"calls": calls, "seconds": 30}, timeout=0.5,
                  retry=RetryPolicy(attempts=2, wait_initial=1.5, wait_max=1.5,
                                    on_timeout=True))
    with WorkerPool(1) as pool:
        batch = run_batch([job], {job.name: resolve(job.call)}, database, pool,
                          stuck_grace=0.3)
    (result,) = batch.results
    assert result.outcome is Outcome.SUCCESS, result
    assert result.attempts == 2 and len(calls) == 2
    assert result.duration >= 1.5                    # it did wait out the backoff
    assert batch.abandoned == 0


def _busy_statement(dialect: str):
    """A statement that runs about a second and returns 1 unless it is interrupted."""
    if dialect == "sqlite":
        return text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                    "WHERE x < 3000000) SELECT min(1, count(*)) FROM c")
    return text("SELECT 1 + SLEEP(1)")


def test_a_late_deadline_timer_cannot_touch_the_next_attempt(database):
    """Issue 10 item 5: a deadline's timer that fires after its attempt ended (the
    thread was busy when the timer was due) must not cancel the statement of the next
    attempt on the same thread; sqlite3's interrupt() would hit the whole connection,
    and the ODBC cancel the next statement on it."""
    tracker = database.statements
    thread = threading.get_ident()
    old = Deadline(0.05, tracker, RunWatch(), "job=old attempt=1/2")
    with old:
        pass
    # The timer's callback, running late: what the timer thread does when it wakes
    # after __exit__ (cancel() cannot stop a Timer already past its wait).
    late_timer = threading.Timer(0.3, old._timer.function)
    watch = RunWatch()
    with Deadline(30, tracker, watch, "job=new attempt=2/2"):
        with database.engine.connect() as connection:
            late_timer.start()
            started = time.monotonic()
            value = connection.execute(_busy_statement(database.dialect)).scalar()
            took = time.monotonic() - started
    late_timer.join()
    print(f"\n{database.dialect}: the next attempt's statement took {took:.2f}s")
    assert value == 1
    assert took > 0.3                                # the late timer fired meanwhile
    assert not old.expired.is_set()
    assert watch.overdue_since is None
    assert tracker.cancel(thread) is False           # nothing left in flight
