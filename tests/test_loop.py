"""The work loop over a large batch: what it holds at once, and what it takes per run.

A batch of 3,000 jobs through the real loop (WorkLoop + BatchSource + HostLedger,
as `--once` runs them) on a real database: the pool's own events count the
connections, and the host locks are counted where the ledger takes and gives them
back (the real flock still happens underneath)."""
from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import event

from tests.batch import run_batch
from tests.jobfuncs import select_one
from worker.config import JobSpec, RetryPolicy
from worker.locks import HostLocks, JobLock
from worker.pool import WorkerPool

JOBS = 3000
MAX_WORKERS = 4


class LockCounter:
    """How often each job's host lock was taken and given back, and the most held
    at once."""

    def __init__(self, monkeypatch) -> None:
        self.taken: Counter[str] = Counter()
        self.released: Counter[str] = Counter()
        self.held = self.peak = 0
        guard = threading.Lock()
        acquire, release = HostLocks.try_acquire, JobLock.release

        def counting_acquire(locks, job_name):
            lock = acquire(locks, job_name)
            if lock is not None:
                with guard:
                    self.taken[job_name] += 1
                    self.held += 1
                    self.peak = max(self.peak, self.held)
            return lock

        def counting_release(lock):
            if lock._fd is not None:
                with guard:
                    self.released[lock._job_name] += 1
                    self.held -= 1
            release(lock)

        monkeypatch.setattr(HostLocks, "try_acquire", counting_acquire)
        monkeypatch.setattr(JobLock, "release", counting_release)


class ConnectionCounter:
    """Connections the pool opened, and the most checked out at once."""

    def __init__(self, pool) -> None:
        self.opened = self.out = self.peak_out = 0
        guard = threading.Lock()

        def connect(dbapi_connection, record):
            with guard:
                self.opened += 1

        def checkout(dbapi_connection, record, proxy):
            with guard:
                self.out += 1
                self.peak_out = max(self.peak_out, self.out)

        def checkin(dbapi_connection, record):
            with guard:
                self.out -= 1

        event.listen(pool, "connect", connect)
        event.listen(pool, "checkout", checkout)
        event.listen(pool, "checkin", checkin)


def test_a_batch_of_3000_jobs_opens_at_most_max_workers_connections_and_takes_each_lock_once(
        make_database, tmp_path, monkeypatch):
    database = make_database(pool_size=MAX_WORKERS)
    connections = ConnectionCounter(database.engine.pool)
    locks = LockCounter(monkeypatch)
    jobs = [JobSpec(name=f"job-{n:05d}", call="tests.jobfuncs:select_one",
                    retry=RetryPolicy(attempts=1)) for n in range(JOBS)]
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    with WorkerPool(MAX_WORKERS) as pool:
        report = run_batch(jobs, {job.name: select_one for job in jobs}, database, pool,
                           lock_dir=lock_dir)

    assert report.ok and len(report.results) == JOBS
    assert all(result.ok for result in report.results)
    # Every job ran in a Session of its own, on one of max_workers pooled connections.
    assert 1 <= connections.opened <= MAX_WORKERS
    assert connections.peak_out <= MAX_WORKERS
    assert connections.out == 0 and database.checked_out() == 0
    # Each run took its job's host lock once and gave it back once.
    assert set(locks.taken) == {job.name for job in jobs}
    assert set(locks.taken.values()) == {1}
    assert locks.released == locks.taken and locks.held == 0
    # Claimed ahead of a free thread by at most one run per thread: the locks held
    # at once stay bounded whatever the batch's size.
    assert locks.peak <= 2 * MAX_WORKERS
