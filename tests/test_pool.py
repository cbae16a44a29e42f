"""worker.pool: bounded concurrency, results in order, no Session kept between jobs."""
from __future__ import annotations

import threading
import time

from tests.batch import run_all
from worker.callables import resolve
from worker.db import Session
from worker.pool import WorkerPool
from worker.runner import run_job
from tests.conftest import spec

# The story itself (sixteen global-style jobs at once, sixteen server connections)
# runs on every backend in tests/test_scenarios.py (story_sixteen_jobs).


class Concurrency:
    """Tasks that count how many of them run at once."""

    def __init__(self) -> None:
        self.running = self.peak = 0
        self._lock = threading.Lock()

    def task(self, result=None, seconds: float = 0.05):
        def run():
            with self._lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            time.sleep(seconds)
            with self._lock:
                self.running -= 1
            return result
        return run


def test_run_all_returns_results_in_task_order_and_bounds_concurrency():
    concurrency = Concurrency()
    with WorkerPool(3) as pool:
        assert run_all(pool, [concurrency.task(n) for n in range(10)]) == list(range(10))
    assert concurrency.peak == 3


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


def test_a_thread_given_up_on_is_replaced_and_ends_when_it_comes_back():
    """Issue 19 item 10: one thread, stuck; a task queued behind it runs once the
    stuck one is abandoned, and the stuck thread, when it returns at last, ends
    instead of making the pool bigger than max_workers."""
    release, ran = threading.Event(), threading.Event()
    with WorkerPool(1, thread_name_prefix="given-up") as pool:
        stuck = pool.submit(release.wait, 30)
        queued = pool.submit(ran.set)
        assert not ran.wait(0.3)                      # behind the stuck thread
        pool.abandon(stuck)
        assert ran.wait(10) and queued.done()
        release.set()
        assert stuck.result(10) is True
        deadline = time.monotonic() + 10
        while len([t for t in threading.enumerate() if t.name.startswith("given-up_")]) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        concurrency = Concurrency()
        run_all(pool, [concurrency.task(seconds=0.02) for _ in range(5)])
    assert concurrency.peak == 1
