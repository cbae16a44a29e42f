"""Putting a running worker together: one builder for start-up and reload alike.

`build_runtime(config, ...)` builds everything a configuration needs: the engine
and its Session registry, the pool, the host locks and the run ledger (local, or
the cluster's run table), and for the daemon the scheduler with the right clock
and alignment. A reload calls it again with the runtime it replaces: parts whose
settings did not change are taken over, the rest is new; runs in flight finish on
the runtime they started on. A replaced runtime lets go of its parts when its
last run ends; their one owner (worker.parts) closes each part nobody uses any
more, on its own thread.

`run_once` and `run_daemon` compose the two modes from it; `worker.cli` maps what
they return to exit codes.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Container, Mapping, Sequence

from .callables import JobFunction, resolve_jobs
from .config import Config, ConfigError, JobSpec, load
from .errors import describe
from .logs import WRITE_AT_ONCE
from .monitoring.observe import Observers, wants_hooks, wants_monitoring
from .parts import CLOSE_TIMEOUT, PartOwner

log = logging.getLogger("worker")

CONNECT_ATTEMPT_ALLOWANCE = 60.0   # seconds one connection attempt at start-up may take
RELOAD_CHECK_WAIT = 10.0   # seconds a reload waits for its new database to answer


class DatabaseUnusable(Exception):
    """At start-up, the database refused us in a way waiting cannot fix (a login
    refused, an ODBC driver not installed, a database file that cannot be opened)."""


def load_config(path: str) -> tuple[Config, dict[str, JobFunction]]:
    """The validated config and every job's function; ConfigError on a problem."""
    config = load(path)
    if config.cluster is not None:
        from .cluster import cluster_name_problems
        problems = cluster_name_problems(config.job_names(), config.cluster.node)
        if problems:
            raise ConfigError(problems[0], path=config.path, key="jobs")
    functions = resolve_jobs(config)
    if wants_hooks(config):
        from .monitoring.hooks import resolve_hooks
        resolve_hooks(config)      # a hook's typo fails here, as a job's does
    return config, functions


def open_cluster(config: Config, lost_outcomes: list[str] | None = None):
    """The cluster's run table for this config (not joined yet); None without one.
    `lost_outcomes`: the process's list of jobs whose run's end could not be written."""
    if config.cluster is None:
        return None
    from .cluster import Cluster
    return Cluster(config.cluster, config.database.url, config.extra_codes,
                   lost_outcomes)


@dataclass(eq=False)
class Runtime:
    """Everything one configuration runs on. Its parts belong to `owner` (a
    worker.parts.PartOwner), which closes each once no runtime uses it."""
    config: Config
    functions: Mapping[str, JobFunction]
    jobs: tuple[JobSpec, ...]          # the jobs this process runs (--job selects)
    database: object                   # worker.db.Database
    pool: object                       # worker.pool.WorkerPool
    locks: object                      # worker.locks.HostLocks
    cluster: object | None             # worker.cluster.Cluster
    ledger: object                     # worker.ledger.HostLedger or ClusterLedger
    scheduler: object | None = None    # worker.scheduler.Scheduler (daemon)
    _parts: tuple = field(default=(), repr=False)
    owner: object | None = field(default=None, repr=False)
    # The daemon's paused jobs (a worker.control.PausedJobs), carried over by a reload.
    paused: Container[str] = frozenset()

    def start(self, previous: "Runtime | None" = None) -> None:
        """Make sure the database answers and the cluster (if new) has joined; raise
        if not. A new cluster's clock is synced, so the schedule starts afresh on it."""
        if previous is None or self.database is not previous.database:
            self.database.ping()
        if self.cluster is not None and (previous is None or
                                         self.cluster is not previous.cluster):
            self.cluster.start()
            if self.scheduler is not None:
                self.scheduler.reset(self.jobs)

    def release(self, replaced: bool = False) -> None:
        """This runtime has no run left and is not current: it lets go of its parts,
        and the owner closes those no other runtime uses, on its own thread (with
        `replaced`, saying so: a reload replaced them). Once."""
        parts, self._parts = self._parts, ()
        for part in reversed(parts):    # the engine last: the others were built on it
            self.owner.release(part, announce=replaced)


def build_runtime(config: Config, functions: Mapping[str, JobFunction], *,
                  jobs: Sequence[JobSpec], scheduled: bool, owner,
                  previous: Runtime | None = None,
                  lost_outcomes: list[str] | None = None) -> Runtime:
    """The runtime for `config`, its parts used through `owner` (a PartOwner).
    With `previous` (a reload), unchanged parts are taken over from it (one more
    user each). Raises whatever building fails with; what it had taken by then is
    let go of again (and what it had built, closed). `lost_outcomes`: the
    process's list of jobs whose run's end could not be written (cluster)."""
    from .db import Database
    from .ledger import ClusterLedger, HostLedger
    from .locks import HostLocks
    from .pool import WorkerPool
    from .scheduler import Scheduler, schedule_for, zone_named

    def same(*getters) -> bool:
        return previous is not None and all(
            getter(previous.config) == getter(config) for getter in getters)

    taken: list = []

    def use(part, close, what: str):
        taken.append(owner.use(part, close, what))
        return part

    def keep(name: str, *getters):
        """The previous runtime's part if the settings it depends on are equal."""
        return getattr(previous, name) if same(*getters) else None

    try:
        database = keep("database", lambda c: c.database, lambda c: c.extra_codes) \
            or Database(config.database, config.extra_codes)
        use(database, database.dispose, f"engine for {database.display_url}")
        pool = keep("pool", lambda c: c.worker.max_workers) \
            or WorkerPool(config.worker.max_workers)
        use(pool, partial(pool.shutdown, wait=False), "job pool")
        locks = keep("locks", lambda c: c.worker.lock_dir, lambda c: c.database.url) \
            or HostLocks(config.worker.lock_dir, config.database.url)
        use(locks, locks.close, f"host lock file {locks.path}")
        cluster = keep("cluster", lambda c: c.cluster, lambda c: c.database.url,
                       lambda c: c.extra_codes) or open_cluster(config, lost_outcomes)
        if cluster is not None:
            use(cluster, cluster.stop, "cluster membership and heartbeat")
        # The zone matters to schedules and the cluster's slots, not to a plain batch.
        zone = zone_named(config.worker.timezone) \
            if scheduled or cluster is not None else None
        ledger = ClusterLedger(locks, cluster, zone) if cluster is not None \
            else HostLedger(locks)
        scheduler = None
        if scheduled:
            # Cluster: every schedule reads the database's clock and `every` sits on
            # the epoch grid, so that all nodes agree on the occurrences.
            factory = partial(_schedule, schedule_for,
                              cluster.clock.now if cluster is not None else None)
            # On the same clock the schedule carries over (a new zone reaches only
            # the cron jobs: worker.scheduler); a new cluster starts it afresh.
            same_clock = previous is not None and previous.scheduler is not None and \
                previous.cluster is cluster
            scheduler = Scheduler(jobs, zone, config.worker.misfire_grace_time, factory,
                                  carry_over=previous.scheduler if same_clock else None)
    except BaseException:
        for part in reversed(taken):
            owner.release(part)
        raise
    return Runtime(config, functions, tuple(jobs), database, pool, locks, cluster,
                   ledger, scheduler, tuple(taken), owner)


def _schedule(schedule_for, wall_clock, job, zone):
    return schedule_for(job, zone, wall_clock)


def only_jobs(config: Config, names: Sequence[str] | None) -> tuple[JobSpec, ...]:
    """The daemon's jobs: the --job names, else all (disabled ones are not scheduled)."""
    if not names:
        return config.jobs
    return tuple(job for job in config.jobs if job.name in names)


def install_signal_handlers(loop) -> None:
    """A handler only records the signal (a list append: no lock, no log line) and
    the interpreter wakes the loop through its wakeup fd; the loop thread does the
    rest (log, stop, reload). A handler that logged could stop for ever on the log
    handler's lock, held by the code it interrupted on the same thread. SIGHUP is
    handled by `--once` too: its default action killed the batch without a summary
    (a `systemctl reload` of the wrong unit, a closed terminal); it is ignored there."""
    signal.set_wakeup_fd(loop.wakeup_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, loop.signal_received)
    signal.signal(signal.SIGINT, loop.signal_received)
    # A process a job forks must not run these (a SIGTERM would only ask a loop the
    # child does not run to stop, so the child would never end).
    os.register_at_fork(after_in_child=default_signal_handlers)
    signal.signal(signal.SIGHUP, loop.signal_received)


def default_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.set_wakeup_fd(-1)    # the parent's loop is not this process's
    except ValueError:              # not the main thread: nothing was set here
        pass


def finish(loop) -> None:
    """After the loop: every runtime lets go of its parts; their owner closes them
    on its own thread, waited for a bounded time (a thread stuck in a job is never
    waited for: the caller exits the process without it)."""
    current, *retired = loop.running_runtimes()
    runtimes = retired + [current]
    for runtime in runtimes:
        runtime.release()
    # A cluster's stop retries the ends of runs not written yet until their lease
    # runs out (an outcome is never dropped silently): wait for that too.
    lease = max((r.config.cluster.lease for r in runtimes if r.cluster is not None),
                default=0.0)
    current.owner.wait_closed(CLOSE_TIMEOUT + lease)


def run_once(config: Config, functions: Mapping[str, JobFunction],
             selected: Sequence[JobSpec]):
    """Every selected job once; the LoopReport."""
    from .loop import WorkLoop
    from .history import History
    from .sources import BatchSource

    observers, monitoring, history = Observers(), None, History()
    if wants_monitoring(config):
        from .monitoring.monitor import Monitoring
        monitoring = Monitoring(observers, listen=False,   # --once never listens
                                history=history)
        monitoring.apply(config)
    lost_outcomes: list[str] = []
    runtime = build_runtime(config, functions, jobs=selected, scheduled=False,
                            owner=PartOwner(), lost_outcomes=lost_outcomes)
    log.info("running %d job(s) once from %s on %s, max_workers %d", len(selected),
             config.path, runtime.database.display_url, config.worker.max_workers,
             extra=WRITE_AT_ONCE)
    if runtime.cluster is not None:
        try:
            runtime.cluster.start()
        except Exception as exc:  # of any kind: no job can be claimed
            return _run_table_unusable(runtime, selected, observers, monitoring, exc)
    loop = WorkLoop(runtime, BatchSource(list(selected)),
                    observer=Observers((history, observers)))
    install_signal_handlers(loop)
    try:
        report = loop.run()
    finally:
        # The last rows are written while the hooks and the parts end, not after:
        # the stop's bound (docs/operations.md) has no room for a wait of its own.
        history.begin_close(CLOSE_TIMEOUT)
        try:
            finish(loop)
        finally:
            history.close()            # what is left of its time, if any
            if monitoring is not None:  # hooks waited for (bounded), then the textfile
                monitoring.finish(textfile=True)   # with the history's final counts
    return _with_lost(report, lost_outcomes)


def _with_lost(report, lost_outcomes: list[str]):
    """The report, with the jobs whose run's end could not be written (known once
    every runtime is closed: the last writes are retried at close)."""
    from dataclasses import replace
    return replace(report, unwritten=tuple(lost_outcomes)) if lost_outcomes else report


def _run_table_unusable(runtime: Runtime, selected: Sequence[JobSpec], observers,
                        monitoring, exc: BaseException):
    """Cluster `--once` whose run table cannot be used at start: one error line,
    every job failed (summary, metrics), exit 69 (worker.cli)."""
    from .loop import LoopReport
    from .runner import JobResult, Outcome
    from .scheduler import DueRun
    why = f"cannot use the cluster's run table at {runtime.cluster.database.display_url}: " \
          f"{describe(exc)}"
    log.error("%s; no job ran", why)
    results = tuple(JobResult(job.name, Outcome.FAILED, 0, 0.0,
                              "not run: the cluster's run table cannot be used")
                    for job in selected)
    observers.runtime_changed(runtime)
    for job, result in zip(selected, results):
        observers.run_finished(DueRun(job, "now", 0.0, 1), result)
    runtime.release()
    runtime.owner.wait_closed()
    if monitoring is not None:
        monitoring.finish(textfile=True)
    return LoopReport(results, "the cluster's run table cannot be used", unavailable=why)


def run_daemon(path: str, config: Config, functions: Mapping[str, JobFunction],
               only: Sequence[str] | None):
    """The daemon until a stop signal; the LoopReport, or None when it was stopped
    before the database ever answered."""
    from .history import History
    from .systemd import Notifier

    notifier = Notifier()
    observers, monitoring, history = Observers(), None, History()
    if wants_monitoring(config):
        from .monitoring.monitor import Monitoring
        monitoring = Monitoring(observers, listen=True, history=history)
        monitoring.apply(config)       # ListenError: the port is taken (exit 69)
    held = [monitoring]                # a reload may start monitoring later
    try:
        return _run_daemon(path, config, functions, only, notifier, observers, held,
                           history)
    finally:
        history.close(CLOSE_TIMEOUT)   # begun at the loop's end (_run_daemon), if it ran
        if held[0] is not None:
            held[0].finish(textfile=False)


def _run_daemon(path: str, config: Config, functions: Mapping[str, JobFunction],
                only: Sequence[str] | None, notifier, observers: Observers, held: list,
                history):
    from .loop import WorkLoop
    from .sources import ScheduleSource

    lost_outcomes: list[str] = []
    runtime = build_runtime(config, functions, jobs=only_jobs(config, only), scheduled=True,
                            owner=PartOwner(), lost_outcomes=lost_outcomes)
    if runtime.scheduler.unscheduled:
        log.info("batch-only jobs (no every/cron; they run only with --once): %s",
                 ", ".join(runtime.scheduler.unscheduled))
    if not runtime.scheduler.jobs:
        log.warning("no enabled job has a schedule: the daemon has nothing to run")

    def reload(current: Runtime) -> Runtime:
        new_config, new_functions = load_config(path)
        change = None
        monitoring = held[0]
        if monitoring is not None or wants_monitoring(new_config):
            if monitoring is None:
                from .monitoring.monitor import Monitoring
                monitoring = held[0] = Monitoring(observers, listen=True,
                                                  history=history)
            # A new listener is bound before anything else changes: if it cannot
            # be, the reload is rejected and the old listener stays.
            change = monitoring.prepare(new_config)
        try:
            new = build_runtime(new_config, new_functions,
                                jobs=only_jobs(new_config, only), scheduled=True,
                                owner=current.owner, previous=current,
                                lost_outcomes=lost_outcomes)
            try:
                _start_aside(new, current, loop, RELOAD_CHECK_WAIT)
            except StartGivenUp:
                raise               # the check's thread lets go of `new` when it ends
            except BaseException:
                new.release()       # what it shares with `current` stays open
                raise
        except BaseException:
            if change is not None:
                change.abort()
            raise
        if change is not None:
            change.commit()
            monitoring.probe_readiness(lambda: loop.runtime)
        new.paused = current.paused
        if control[0] is not None:     # a new lock_dir: the socket and pauses move
            control[0].follow(loop, new)
        return new

    control: list = [None]     # the control socket (worker.control), moved by a reload
    loop = WorkLoop(runtime, ScheduleSource(observers), notifier=notifier, reload=reload,
                    observer=Observers((history, observers)))
    if held[0] is not None:
        held[0].probe_readiness(lambda: loop.runtime)
    install_signal_handlers(loop)
    try:
        if not _wait_for_database(loop, runtime, notifier, observers):
            log.info("stopped while waiting for the database: no job ran")
            return None
        # Before "started" and READY: a caller right after start-up finds the socket
        # (and the pauses hold from the first run).
        control[0] = _open_control(loop, config)
        try:
            log.info("daemon started: %d scheduled job(s) from %s on %s, max_workers %d",
                     len(runtime.scheduler.jobs), config.path,
                     runtime.database.display_url, config.worker.max_workers,
                     extra=WRITE_AT_ONCE)
            notifier.ready(f"running {len(runtime.scheduler.jobs)} scheduled job(s)")
            report = loop.run()
        finally:
            if control[0] is not None:
                control[0].close()
        if not report.abandoned:
            log.info("daemon stopped: %d connection(s) still checked out of the pool",
                     loop.runtime.database.checked_out())
    finally:
        history.begin_close(CLOSE_TIMEOUT)    # its last rows, while the parts close
        finish(loop)
        notifier.close()
    return _with_lost(report, lost_outcomes)


def _open_control(loop, config: Config):
    """The paused jobs (on the runtime), the cluster's commands (cluster mode) and
    the control socket (a worker.control.Control), or None when the pauses cannot
    be had (the daemon runs on, without commands)."""
    import sqlite3

    from sqlalchemy.exc import DBAPIError

    from .control import Control
    try:
        return Control(loop, config)
    except (OSError, sqlite3.Error, DBAPIError) as exc:
        log.error("no control socket or paused jobs for %s: %s; --run-now, --pause, "
                  "--resume and --status cannot reach this daemon", config.path,
                  describe(exc))
        return None


class StartGivenUp(Exception):
    """A runtime's database did not answer in time, or a stop came first."""


def _start_aside(new: Runtime, current: Runtime | None, loop,
                 within: float | None) -> None:
    """`new.start(previous=current)` on a thread of its own, waited for (at most
    `within` seconds) while the loop takes signals: on the loop thread, a database
    that accepts connections and never answers froze the daemon (SIGTERM
    unanswered, no run started) for as long as it did, at start-up and at a
    reload alike. Given up at a stop or after that wait (StartGivenUp); for a
    reload (`current`), the thread then lets go of the new runtime's parts once
    its check ends (at start-up, the process's end does)."""
    state = {"done": False, "given_up": False, "error": None}
    guard = threading.Lock()

    def check() -> None:
        try:
            new.start(previous=current)
        except BaseException as exc:  # handed to the loop thread (or dropped: given up)
            state["error"] = exc
        with guard:
            state["done"] = True
            given_up = state["given_up"]
        if given_up and current is not None:
            new.release()
        loop.wake()

    threading.Thread(target=check, name="database-check", daemon=True).start()
    deadline = time.monotonic() + (within if within is not None else float("inf"))
    while True:
        with guard:
            if state["done"]:
                break
            stop = loop.stop_requested
            if stop or time.monotonic() >= deadline:
                state["given_up"] = True
                raise StartGivenUp("a stop was requested while the new configuration's "
                                   "database was being checked" if stop else
                                   f"the new configuration's database did not answer "
                                   f"within {within:g}s")
        loop.pause(min(0.25, max(0.0, deadline - time.monotonic())))
    if state["error"] is not None:
        raise state["error"]


def _wait_for_database(loop, runtime: Runtime, notifier, observers: Observers) -> bool:
    """READY only once the database answers; until then say why we wait. False when
    a stop came first; DatabaseUnusable when waiting cannot help."""
    delay = 0.5
    observers.runtime_changed(runtime)
    while not loop.stop_requested:
        observers.tick()            # alive while waiting: /healthz 200, /readyz 503
        # Time for this attempt and the wait after it: "a database that is down at
        # start is not a failure", so systemd's start timeout must not fire either.
        notifier.extend_start(CONNECT_ATTEMPT_ALLOWANCE + delay)
        try:
            _start_aside(runtime, None, loop, None)   # a stop is answered meanwhile
            observers.database_ready(True)
            return True
        except StartGivenUp:
            return False
        except Exception as exc:  # any failure to connect: wait and try again...
            observers.database_ready(False)
            diagnosis = runtime.database.classify(exc)
            if diagnosis.permanent:   # ...unless no wait can ever fix it
                raise DatabaseUnusable(
                    f"cannot start: database {runtime.database.display_url}: "
                    f"{diagnosis.reason}: {describe(exc)}") from exc
            notifier.status(f"waiting for the database: {describe(exc)}")
            log.warning("database %s not answering (%s); retrying in %.1fs",
                        runtime.database.display_url, describe(exc), delay)
            loop.pause(delay)
            delay = min(delay * 2, 30.0)
    return False
