"""The work loop over a large batch: what it holds at once, and what it takes per run.

A batch of 3,000 jobs through the real loop (WorkLoop + BatchSource + HostLedger,
as `--once` runs them) on a real database: the pool's own events count the
connections, and the host locks are counted where the ledger takes and gives them
back (the real flock still happens underneath)."""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter

from sqlalchemy import event

from tests.batch import run_batch
from tests.jobfuncs import note_run, select_one, started_then_wait
from worker.app import Runtime
from worker.config import Config, DatabaseSettings, JobSpec, RetryPolicy, WorkerSettings
from worker.db import Database
from worker.ledger import HostLedger
from worker.locks import HostLocks, JobLock
from worker.loop import RunIds, Waker, WorkLoop, with_changes
from worker.pool import WorkerPool
from worker.runner import Outcome
from worker.sources import BatchSource

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


def test_a_stop_starts_none_of_the_batch_runs_claimed_ahead(tmp_path):
    """One worker thread: `first` runs and `second` is claimed behind it. A stop
    while `first` runs cancels `second` before it begins, as if it had never been
    claimed: it does not run, its host lock is free again, and the summary lists it
    as not started."""
    database = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'w.db'}",
                                         pool_size=1))
    started, release, ran = threading.Event(), threading.Event(), []
    jobs = [JobSpec(name="first", call="tests.jobfuncs:started_then_wait",
                    kwargs={"started": started, "release": release})]
    jobs += [JobSpec(name=name, call="tests.jobfuncs:note_run",
                     kwargs={"ran": ran, "name": name}) for name in ("second", "third")]
    functions = {"first": started_then_wait, "second": note_run, "third": note_run}
    config = Config(path="<test>", database=database.settings,
                    worker=WorkerSettings(max_workers=1), retry=RetryPolicy(),
                    jobs=tuple(jobs))
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    locks = HostLocks(lock_dir, database.settings.url)
    reports = []
    with WorkerPool(1) as pool:
        runtime = Runtime(config, functions, tuple(jobs), database, pool, locks, None,
                          HostLedger(locks))
        loop = WorkLoop(runtime, BatchSource(list(jobs)))
        thread = threading.Thread(target=lambda: reports.append(loop.run()))
        thread.start()
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while "second" not in loop._running and time.monotonic() < deadline:
            time.sleep(0.01)                            # claimed behind `first`
        assert "second" in loop._running
        queued = loop._running["second"].future
        loop.request_stop()
        deadline = time.monotonic() + 30
        while not queued.done() and time.monotonic() < deadline:
            time.sleep(0.01)        # the loop thread takes the stop on its next pass
        release.set()
        thread.join(60)
    locks.close()
    database.dispose()

    assert not thread.is_alive() and ran == []
    results = {result.job: result for result in reports[0].results}
    assert results["first"].outcome is Outcome.SUCCESS
    for name in ("second", "third"):
        assert results[name].outcome is Outcome.CANCELLED
        assert results[name].error == "not started: the worker was stopping"
    again = HostLocks(lock_dir, database.settings.url)
    try:
        assert again.try_acquire("second") is not None  # given back
    finally:
        again.close()


def _bytes_waiting(waker: Waker) -> int:
    try:
        return len(os.read(waker.read_fd, 65536))
    except BlockingIOError:
        return 0


def test_wakes_before_the_loop_waits_write_one_byte_not_one_per_wake():
    """A finished run wakes the loop; 1,000 runs ending before the loop thread
    next waits need one byte in the pipe, not 1,000 writes (each a system call
    that hands the GIL over)."""
    waker = Waker()
    for _ in range(1000):
        waker.wake()
    assert _bytes_waiting(waker) == 1


def test_a_wake_after_a_wait_always_wakes_the_next_wait():
    """The flag that saves the writes never loses a wake: after a wait returns
    (woken, or timed out with nothing written), the next wake writes again."""
    waker = Waker()
    waker.wake()
    waker.wait(5)                   # woken: drained
    waker.wake()
    assert _bytes_waiting(waker) == 1
    waker.wait(0)                   # nothing to drain (read above): times out
    waker.wake()
    assert _bytes_waiting(waker) == 1
    # A byte written by someone else (the signal wakeup fd) changes nothing.
    os.write(waker.write_fd, b"\x02")
    waker.wait(5)
    waker.wake()
    assert _bytes_waiting(waker) == 1


def test_no_news_is_lost_between_threads_that_wake_and_the_loop_that_waits():
    """8 threads each queue 2,000 items, waking after each; one waiting thread
    takes them as the loop takes finished runs (wait, then drain the queue).
    Every wait is bounded by 20 s: a lost wake would leave an item queued through
    a whole wait."""
    waker, items = Waker(), queue.SimpleQueue()
    senders, per_sender = 8, 2000

    def send():
        for number in range(per_sender):
            items.put(number)
            waker.wake()

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    taken, slow_waits = 0, 0
    while taken < senders * per_sender:
        before = time.monotonic()
        waker.wait(20)
        if time.monotonic() - before >= 19:
            slow_waits += 1
            break
        while True:
            try:
                items.get_nowait()
            except queue.Empty:
                break
            taken += 1
    for thread in threads:
        thread.join()
    assert slow_waits == 0 and taken == senders * per_sender


def test_a_batchs_runs_get_distinct_uuid4_run_ids_without_a_random_read_per_run(
        tmp_path, monkeypatch):
    """Each run has its own run_id (a UUID, docs/monitoring.md), but the random
    bytes are read in batches: uuid4() read them (a getrandom() call that gives up
    the GIL) once per run."""
    import uuid

    reads = []      # (each loop has its own pool of random bytes)
    real_urandom = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real_urandom(n))
    database = Database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'w.db'}",
                                         pool_size=2))
    jobs = [JobSpec(name=f"job-{n:04d}", call="tests.jobfuncs:select_one",
                    retry=RetryPolicy(attempts=1)) for n in range(1000)]
    with WorkerPool(2) as pool:
        report = run_batch(jobs, {job.name: select_one for job in jobs}, database, pool,
                           lock_dir=tmp_path)
    ids = [result.run_id for result in report.results]
    assert report.ok and len(set(ids)) == 1000
    for run_id in ids:
        parsed = uuid.UUID(run_id)
        assert str(parsed) == run_id and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert len(reads) <= 10


def test_run_ids_stay_unique_across_threads_and_a_fork():
    new_run_id = RunIds()
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.extend(new_run_id() for _ in range(5000)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 20000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child's next id must not be the parent's next one
        os.write(write, new_run_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child != new_run_id()


def test_with_changes_makes_what_dataclasses_replace_makes():
    from dataclasses import fields, replace

    from worker.runner import JobResult
    from worker.scheduler import DueRun
    job = JobSpec(name="a", call="tests.jobfuncs:select_one")
    error = ValueError("x")
    for instance, changes in [
            (DueRun(job, "12:00", 0.5, 3, 1.5, "claim", None, "run_now"), {"run_id": "r"}),
            (JobResult("a", Outcome.FAILED, 2, 1.0, "boom", None, error), {"run_id": "r"})]:
        made, expected = with_changes(instance, **changes), replace(instance, **changes)
        assert type(made) is type(expected) and made == expected
        for item in fields(expected):   # compare=False ones (found_at, exception) too
            assert getattr(made, item.name) is getattr(expected, item.name)
        assert instance.run_id is None      # the original is left as it was
