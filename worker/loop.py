"""The work loop: one loop for both ways of running, as in rq.

- burst (`--once`): every selected job is due once, now; the loop ends when all
  have finished;
- daemon: the scheduler says what is due; the loop runs until a stop signal.

The loop thread only decides and watches; the pool's threads run the jobs (as
dramatiq splits fetching work from running it). Shape: initialize / loop /
shutdown, with cleanup in `finally` (as in huey). It always logs why it stopped.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

from .callables import JobFunction
from .config import Config, JobSpec, format_duration
from .db import Database
from .cluster import Claim, Cluster, nearest_slot
from .locks import HostLocks, JobLock
from .pool import WorkerPool
from .runner import JobResult, Outcome, RunWatch, run_job
from .scheduler import DueRun, Scheduler, zone_named
from .systemd import Notifier

log = logging.getLogger("worker.loop")

STUCK_GRACE = 5.0     # seconds past a deadline before a job ignoring it is given up on
CANCEL_GRACE = 5.0    # seconds a cancelled job gets to roll back before exit
MAX_SLEEP = 1.0       # the loop wakes at least this often (signals, watchdog, stuck jobs)
KEPT_RESULTS = 10_000  # daemon: the recent failures and lateness figures kept
OVERLAP_LOG_EVERY = 60.0  # seconds between "runs skipped: still going" lines for a job


@dataclass(frozen=True)
class Runtime:
    """What a (re)loaded configuration gives the loop."""
    config: Config | None
    functions: Mapping[str, JobFunction]
    database: Database


@dataclass
class _Running:
    job: JobSpec
    future: Future
    watch: RunWatch
    database: Database
    lock: JobLock | None
    claim: Claim | None = None      # cluster mode: this run's row in the run table
    reported: bool = False          # already reported as stuck past its deadline


@dataclass(frozen=True)
class LoopReport:
    results: tuple[JobResult, ...]  # burst: in job order; daemon: the runs that failed
    reason: str                     # why the loop stopped
    runs: int = 0                   # runs finished
    cancelled: int = 0              # runs cancelled by the stop
    abandoned: int = 0              # threads still stuck in a job at exit
    lateness: tuple[float, ...] = ()  # daemon: how late the last 10,000 runs started (s)

    @property
    def ok(self) -> bool:
        return all(r.ok or r.outcome is Outcome.SKIPPED for r in self.results) \
            and not self.cancelled


@dataclass
class _StopState:
    requested: bool = False
    forced: bool = False
    since: float | None = None
    cancelled_at: float | None = None


class WorkLoop:
    def __init__(self, runtime: Runtime, pool: WorkerPool, *,
                 burst: Sequence[JobSpec] | None = None,
                 scheduler: Scheduler | None = None,
                 locks: HostLocks | None = None,
                 notifier: Notifier | None = None,
                 reload: Callable[[], Runtime] | None = None,
                 stuck_grace: float = STUCK_GRACE,
                 cancel_grace: float = CANCEL_GRACE,
                 shutdown_timeout: float = 30.0,
                 cluster: Cluster | None = None) -> None:
        if (burst is None) == (scheduler is None):
            raise ValueError("a WorkLoop is either a burst or scheduled")
        self.runtime = runtime
        self.pool = pool
        self.scheduler = scheduler
        self.locks = locks
        self.notifier = notifier or Notifier({})
        self._reload = reload
        self.stuck_grace = stuck_grace
        self.cancel_grace = cancel_grace
        self.shutdown_timeout = shutdown_timeout
        self.cluster = cluster
        self._cluster_was_healthy = True
        self._last_recovery = 0.0
        self._pending: list[JobSpec] = list(burst or [])
        self._order = [job.name for job in burst or []]
        self._running: dict[str, _Running] = {}
        self._results: dict[str, JobResult] = {}
        # Bounded, so that a daemon running for months does not grow.
        self._failures: deque[JobResult] = deque(maxlen=KEPT_RESULTS)
        self._retired: list[tuple[Database, WorkerPool | None]] = []
        self._wake = threading.Event()
        self._stop = _StopState()
        self._reload_requested = False
        self._runs = self._cancelled = 0
        self._overlaps: dict[str, list] = {}   # job -> [skips not yet logged, last log]
        self._lateness: deque[float] = deque(maxlen=KEPT_RESULTS)
        self._worst_lateness = 0.0
        self._last_watchdog = 0.0

    # --- called from signal handlers (main thread) or other threads -----------------

    def request_stop(self) -> None:
        if self._stop.requested:
            self._stop.forced = True      # a second signal skips the wait
        self._stop.requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def pause(self, seconds: float) -> None:
        """Wait, but wake up at once for a signal."""
        self._wake.wait(seconds)
        self._wake.clear()

    # --- the loop ----------------------------------------------------------------

    def run(self) -> LoopReport:
        reason = "?"
        try:
            reason = self._loop()
        finally:
            abandoned = self._shutdown()
        log.info("work loop stopped: %s (%d run(s) finished, %d cancelled, %d abandoned)",
                 reason, self._runs, self._cancelled, abandoned)
        if self._lateness:
            import statistics  # only in daemon mode, at stop
            log.info("scheduled runs started late by median %.3fs, worst %.3fs",
                     statistics.median(self._lateness), self._worst_lateness)
        if self.scheduler is None:
            results = tuple(self._results[name] for name in self._order
                            if name in self._results)
        else:
            results = tuple(self._failures)
        return LoopReport(results, reason, self._runs, self._cancelled, abandoned,
                          tuple(self._lateness))

    def _loop(self) -> str:
        while True:
            self._collect()
            if self._stop.requested:
                if self._stop.since is None:
                    self._begin_stop()
                if not self._active():
                    return "stop requested; every job finished" if not self._cancelled \
                        else "stop requested; running jobs were cancelled"
                if self._stop.cancelled_at is None and (
                        self._stop.forced or time.monotonic() - self._stop.since
                        > self.shutdown_timeout):
                    self._cancel_running()
                if self._stop.cancelled_at is not None and \
                        time.monotonic() - self._stop.cancelled_at > self.cancel_grace:
                    return "stop requested; some jobs did not end after being cancelled"
            elif self.scheduler is None:
                self._start_pending()
                if not self._pending and not self._active():
                    return "every job ran once"
            else:
                if self._reload_requested:
                    self._do_reload()
                for run in self.scheduler.due():
                    self._start_scheduled(run)
                if self.cluster is not None:
                    self._recover_abandoned()
            self._ping_watchdog()
            self._sleep()

    def _sleep(self) -> None:
        timeout = MAX_SLEEP
        if self.scheduler is not None and not self._stop.requested:
            until = self.scheduler.seconds_until_next()
            if until is not None:
                timeout = min(timeout, until)
        if self.notifier.watchdog_interval:
            timeout = min(timeout, self.notifier.watchdog_interval)
        self._wake.wait(timeout)
        self._wake.clear()

    # --- starting runs -----------------------------------------------------------------

    def _start_pending(self) -> None:
        while self._pending:
            job = self._pending.pop(0)
            claim_run = None
            if self.cluster is not None:
                slot_ms = round(nearest_slot(self.scheduler_for_slots(job),
                                             self.cluster.clock.now(),
                                             self.cluster.settings.batch_slot) * 1000)
                claim_run = partial(self._claim_batch_slot, job, slot_ms)
            self._start(job, claim_run=claim_run)

    def _claim_batch_slot(self, job: JobSpec, slot_ms: int) -> Claim | None:
        claim = self.cluster.claim(job.name, slot_ms)
        if claim is None:
            self._skip(job, f"its run for the slot at {_wall(slot_ms / 1000)} was claimed "
                            f"by node {self.cluster.holder(job.name, slot_ms)}")
        return claim

    def _skip(self, job: JobSpec, why: str) -> None:
        log.warning("job=%s skipped: %s", job.name, why)
        self._record(JobResult(job.name, Outcome.SKIPPED, 0, 0.0, why))

    def scheduler_for_slots(self, job: JobSpec):
        from .scheduler import schedule_for
        zone = zone_named(self.runtime.config.worker.timezone if self.runtime.config
                          else None)
        return schedule_for(job, zone, self.cluster.clock.now)

    def _start_scheduled(self, run: DueRun) -> None:
        running = self._running.get(run.job.name)
        if running is not None:
            self._overlapped(run, running)
            return
        claim_run = None
        if self.cluster is not None:
            if not self._cluster_ready():
                return
            claim_run = partial(self._claim_scheduled, run)
        if self._start(run.job, run, claim_run):
            self._lateness.append(run.lateness)
            self._worst_lateness = max(self._worst_lateness, run.lateness)

    def _overlapped(self, run: DueRun, running: _Running) -> None:
        """A run came due while the previous one is still going: skip it. The first
        skip of a job is logged at once, later ones as a count at most once a
        minute (and at stop), so that a job with a tiny interval cannot flood."""
        counter = self._overlaps.setdefault(run.job.name, [0, float("-inf")])
        counter[0] += 1
        now = time.monotonic()
        if now - counter[1] < OVERLAP_LOG_EVERY:
            return
        if counter[1] == float("-inf"):
            log.warning("job=%s run due at %s skipped: the previous run is still going "
                        "(%s, started %.1fs ago)", run.job.name, run.scheduled,
                        f"attempt {running.watch.attempt}" if running.watch.attempt
                        else "queued for a free worker", now - running.watch.started)
        else:
            log.warning("job=%s %d run(s) skipped in the last %.0fs: the previous run "
                        "was still going", run.job.name, counter[0], now - counter[1])
        counter[:] = [0, now]

    def _report_overlaps(self) -> None:
        for name, (count, _) in self._overlaps.items():
            if count:
                log.warning("job=%s %d more run(s) were skipped because the previous "
                            "run was still going", name, count)
        self._overlaps.clear()

    def _claim_scheduled(self, run: DueRun) -> Claim | None:
        claim = self.cluster.claim(run.job.name, round(run.slot * 1000))
        if claim is None:
            log.debug("job=%s run due at %s: claimed by another node", run.job.name,
                      run.scheduled)
        return claim

    def _cluster_ready(self) -> bool:
        healthy = self.cluster.healthy
        if healthy != self._cluster_was_healthy:
            self._cluster_was_healthy = healthy
            if not healthy:
                log.warning("cluster: the run table is out of reach; claiming no runs "
                            "until a heartbeat succeeds")
        return healthy

    def _recover_abandoned(self) -> None:
        if time.monotonic() - self._last_recovery < self.cluster.settings.heartbeat:
            return
        self._last_recovery = time.monotonic()
        if not self._cluster_ready():
            return
        jobs = {job.name: job for job in self.scheduler.jobs
                if job.idempotent and job.name not in self._running}
        for candidate in self.cluster.abandoned_runs(jobs):
            if candidate.job not in self._running:   # one run of a job at a time here
                self._start(jobs[candidate.job], claim_run=partial(self._reclaim, candidate))

    def _reclaim(self, candidate: Claim) -> Claim | None:
        claim = self.cluster.reclaim(candidate)
        if claim is not None:
            log.warning("job=%s recovering the abandoned run for the slot at %s "
                        "(idempotent: running it again here)", candidate.job,
                        _wall(candidate.slot_ms / 1000))
        return claim

    def _start(self, job: JobSpec, run: DueRun | None = None,
               claim_run: Callable[[], Claim | None] | None = None) -> bool:
        """Host lock first, then the cluster claim (so a run claimed is a run started),
        then the pool."""
        lock = None
        if self.locks is not None:
            lock = self.locks.try_acquire(job.name)
            if lock is None:
                self._skip(job, f"another run of this job holds its host lock (pid "
                                f"{self.locks.holder(job.name)})")
                return False
        claim = None
        if claim_run is not None:
            claim = claim_run()
            if claim is None:
                if lock is not None:
                    lock.release()
                return False
        runtime = self.runtime
        function = runtime.functions[job.name]
        watch = RunWatch()
        if run is not None:
            log.info("job=%s starting the run due at %s (%.3fs late%s)", job.name,
                     run.scheduled, run.lateness,
                     f", {run.coalesced} missed runs coalesced" if run.coalesced > 1 else "")
        future = self.pool.submit(lambda: run_job(job, function, runtime.database,
                                                  watch=watch))
        self._running[job.name] = _Running(job, future, watch, runtime.database, lock, claim)
        future.add_done_callback(lambda _: self._wake.set())
        return True

    # --- watching runs ------------------------------------------------------------

    def _active(self) -> bool:
        return any(not r.reported for r in self._running.values())

    def _collect(self) -> None:
        now = time.monotonic()
        for name, running in list(self._running.items()):
            if running.future.done():
                del self._running[name]
                if running.lock is not None:
                    running.lock.release()
                if running.future.cancelled():
                    result = JobResult(name, Outcome.CANCELLED, 0, 0.0,
                                       "not started: the worker was stopping")
                else:
                    result = running.future.result()
                if running.claim is not None:
                    self.cluster.finish(running.claim, result.outcome.value,
                                        result.attempts, result.error)
                if not running.reported:
                    self._record(result)
                continue
            overdue = running.watch.overdue_since
            if not running.reported and overdue is not None and \
                    now - overdue > self.stuck_grace:
                running.reported = True     # stays in _running: no overlapping run
                message = (f"still running {now - overdue:.1f}s past its deadline of "
                           f"{format_duration(running.job.timeout)}, outside any database "
                           f"call; its thread is left to finish")
                log.error("job=%s attempt=%d/%d timed out: %s", name, running.watch.attempt,
                          running.job.retry.attempts, message)
                self._record(JobResult(name, Outcome.TIMEOUT, running.watch.attempt,
                                       now - running.watch.started, message))
        self._dispose_retired()

    def _record(self, result: JobResult) -> None:
        self._runs += result.outcome is not Outcome.SKIPPED
        self._cancelled += result.outcome is Outcome.CANCELLED
        self._results[result.job] = result
        if not result.ok and self.scheduler is not None:
            self._failures.append(result)

    # --- stopping ------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self._stop.since = time.monotonic()
        self._pending.clear()
        running = [name for name, r in self._running.items() if not r.reported]
        timeout = self.shutdown_timeout
        log.info("stopping: no new runs; waiting up to %s for %d running job(s)%s",
                 format_duration(timeout), len(running),
                 f": {', '.join(running)}" if running else "")
        self.notifier.stopping(f"stopping: waiting for {len(running)} job(s)")

    def _cancel_running(self) -> None:
        self._stop.cancelled_at = time.monotonic()
        why = "a second stop signal" if self._stop.forced else \
            f"shutdown_timeout {format_duration(self.shutdown_timeout)}"
        for name, running in self._running.items():
            if running.future.cancel():      # queued, never started
                continue
            statement = running.watch.cancel(running.database)
            log.warning("job=%s attempt=%d/%d cancelled after %s: %s", name,
                        running.watch.attempt, running.job.retry.attempts, why,
                        "its statement is being cancelled" if statement
                        else "it stops at its next statement")
        self._wake.set()

    def _shutdown(self) -> int:
        self._report_overlaps()
        abandoned = sum(1 for r in self._running.values() if not r.future.done())
        for running in self._running.values():
            if running.future.done() and running.lock is not None:
                running.lock.release()
        self._dispose_retired(force=True)
        if self.locks is not None:
            self.locks.close()
        return abandoned

    # --- reloading (daemon) -----------------------------------------------------------

    def _do_reload(self) -> None:
        from .config import ConfigError
        self._reload_requested = False
        if self._reload is None:
            return
        self.notifier.reloading()
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays: %s", exc)
            self.notifier.ready("running; the last reload was rejected")
            return
        old = self.runtime
        before = {job.name: job for job in old.config.jobs}
        after = {job.name: job for job in new.config.jobs}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(n for n in after.keys() & before.keys() if after[n] != before[n])
        old_pool = None
        if new.config.worker.max_workers != old.config.worker.max_workers:
            old_pool, self.pool = self.pool, WorkerPool(new.config.worker.max_workers)
        if new.database is not old.database:
            self._retired.append((old.database, old_pool))
        elif old_pool is not None:
            old_pool.shutdown(wait=False)
        self.runtime = new
        self.shutdown_timeout = new.config.worker.shutdown_timeout
        if new.config.worker.timezone != old.config.worker.timezone:
            self.scheduler = Scheduler(new.config.jobs, zone_named(new.config.worker.timezone),
                                       new.config.worker.misfire_grace_time)
        else:
            self.scheduler.misfire_grace_time = new.config.worker.misfire_grace_time
            self.scheduler.update(new.config.jobs)
        log.info("reloaded %s: added %s, removed %s, changed %s", new.config.path,
                 added or "none", removed or "none", changed or "none")
        self.notifier.ready("running; configuration reloaded")

    def _dispose_retired(self, force: bool = False) -> None:
        """An old engine is disposed once none of its jobs is still running."""
        keep = []
        for database, pool in self._retired:
            busy = any(r.database is database and not r.future.done()
                       for r in self._running.values())
            if busy and not force:
                keep.append((database, pool))
                continue
            if pool is not None:
                pool.shutdown(wait=False)
            database.dispose()
            log.info("disposed the previous engine for %s", database.display_url)
        self._retired = keep

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval and time.monotonic() - self._last_watchdog >= interval:
            self._last_watchdog = time.monotonic()
            self.notifier.watchdog()


def _wall(seconds: float) -> str:
    from datetime import datetime
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def run_batch(jobs: Sequence[JobSpec], functions: Mapping[str, JobFunction],
              database: Database, pool: WorkerPool, *, locks: HostLocks | None = None,
              stuck_grace: float = STUCK_GRACE, config: Config | None = None) -> LoopReport:
    """Run each job once on the pool (the burst loop) and report."""
    loop = WorkLoop(Runtime(config, functions, database), pool, burst=jobs, locks=locks,
                    stuck_grace=stuck_grace,
                    shutdown_timeout=config.worker.shutdown_timeout if config else 30.0)
    return loop.run()
