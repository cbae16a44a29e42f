"""worker.pool, and the story this project exists for: many jobs at once, written
in the old global `Session` style, each with its own Session and connection."""
from __future__ import annotations

import threading

from tests.batch import run_all
from worker.callables import resolve
from worker.db import Session
from worker.pool import WorkerPool
from worker.runner import run_job
from tests.conftest import spec

JOBS = 16


def test_story_sixteen_jobs_at_once_each_with_its_own_connection(make_database):
    database = make_database(pool_size=JOBS)
    barrier = threading.Barrier(JOBS)     # all 16 hold their Session at the same time
    seen: list = []
    job = spec("reader", "tests.jobfuncs:global_style_reader", barrier=barrier, seen=seen)
    function = resolve(job.call)
    with WorkerPool(JOBS) as pool:
        results = run_all(pool, [lambda: run_job(job, function, database)] * JOBS)
    assert [r.error for r in results if not r.ok] == []           # zero errors
    assert all(r.attempts == 1 for r in results)
    assert len(seen) == JOBS
    assert all(same for same, _ in seen)              # Session() is the job's session
    assert len({ident for _, ident in seen}) == JOBS  # 16 distinct server connections
    assert database.checked_out() == 0                # every Session was removed


def test_run_all_returns_results_in_task_order_and_bounds_concurrency():
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def task(n):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            release.wait(0.05)
            with lock:
                running[0] -= 1
            return n
        return run

    with WorkerPool(3) as pool:
        assert run_all(pool, [task(n) for n in range(10)]) == list(range(10))
    assert peak[0] == 3


def test_pool_threads_do_not_keep_sessions_between_jobs(database):
    job = spec("noop", "tests.jobfuncs:select_one")
    function = resolve(job.call)
    leftovers = []

    def run_and_look():
        result = run_job(job, function, database)
        leftovers.append(Session.registry.has())
        return result

    with WorkerPool(2) as pool:
        results = run_all(pool, [run_and_look] * 6)
    assert all(r.ok for r in results)
    assert leftovers == [False] * 6
