"""Deadlines (a job's `timeout`, per attempt): the statement in flight is cancelled
through the driver, the Session rolled back, and the run ends as `timeout`."""
from __future__ import annotations

import time

from sqlalchemy import text

from tests.batch import run_batch
from worker.callables import resolve
from worker.config import JobSpec, RetryPolicy
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
