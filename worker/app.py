"""Putting a running worker together: one builder for start-up and reload alike.

`build_runtime(config, ...)` builds everything a configuration needs: the engine
and its Session registry, the pool, the host locks and the run ledger (local, or
the cluster's run table), and for the daemon the scheduler with the right clock
and alignment. A reload calls it again with the runtime it replaces: parts whose
settings did not change are taken over, the rest is new; runs in flight finish on
the runtime they started on, and the loop closes a replaced runtime's own parts
when its last run ends.

`run_once` and `run_daemon` compose the two modes from it; `worker.cli` maps what
they return to exit codes.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import Mapping, Sequence

from .callables import JobFunction, resolve_jobs
from .config import Config, ConfigError, JobSpec, load
from .errors import describe
from .monitoring.observe import Observers, wants_hooks, wants_monitoring

log = logging.getLogger("worker")


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


def open_cluster(config: Config):
    """The cluster's run table for this config (not joined yet); None without one."""
    if config.cluster is None:
        return None
    from .cluster import Cluster
    return Cluster(config.cluster, config.database.url, config.extra_codes)


@dataclass(eq=False)
class Runtime:
    """Everything one configuration runs on."""
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

    def close(self, keep: "Runtime | None" = None, wait: bool = True) -> None:
        """Close the parts that `keep` (the runtime now in use) does not share."""
        shared = set(map(id, keep._parts)) if keep is not None else set()
        if id(self.pool) not in shared:
            self.pool.shutdown(wait=wait)
        if self.cluster is not None and id(self.cluster) not in shared:
            self.cluster.stop()
        if id(self.locks) not in shared:
            self.locks.close()
        if id(self.database) not in shared:
            self.database.dispose()
            if keep is not None:
                log.info("disposed the previous engine for %s", self.database.display_url)


def build_runtime(config: Config, functions: Mapping[str, JobFunction], *,
                  jobs: Sequence[JobSpec], scheduled: bool,
                  previous: Runtime | None = None) -> Runtime:
    """The runtime for `config`. With `previous` (a reload), unchanged parts are
    taken over from it. Raises whatever building fails with; what it had built by
    then is closed again."""
    from .db import Database
    from .ledger import ClusterLedger, HostLedger
    from .locks import HostLocks
    from .pool import WorkerPool
    from .scheduler import Scheduler, schedule_for, zone_named

    def same(*getters) -> bool:
        return previous is not None and all(
            getter(previous.config) == getter(config) for getter in getters)

    built: list = []

    def new(part):
        built.append(part)
        return part

    try:
        database = previous.database if same(lambda c: c.database,
                                             lambda c: c.extra_codes) \
            else new(Database(config.database, config.extra_codes))
        pool = previous.pool if same(lambda c: c.worker.max_workers) \
            else new(WorkerPool(config.worker.max_workers))
        locks = previous.locks if same(lambda c: c.worker.lock_dir,
                                       lambda c: c.database.url) \
            else new(HostLocks(config.worker.lock_dir, config.database.url))
        cluster = previous.cluster if same(lambda c: c.cluster, lambda c: c.database.url,
                                           lambda c: c.extra_codes) \
            else (new(open_cluster(config)) if config.cluster is not None else None)
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
            same_clock = previous is not None and previous.scheduler is not None and \
                previous.cluster is cluster and same(lambda c: c.worker.timezone)
            scheduler = Scheduler(jobs, zone, config.worker.misfire_grace_time, factory,
                                  carry_over=previous.scheduler if same_clock else None)
    except BaseException:
        _close_parts(built)
        raise
    parts = (database, pool, locks) + ((cluster,) if cluster is not None else ())
    return Runtime(config, functions, tuple(jobs), database, pool, locks, cluster,
                   ledger, scheduler, parts)


def _schedule(schedule_for, wall_clock, job, zone):
    return schedule_for(job, zone, wall_clock)


def _close_parts(parts: list) -> None:
    for part in reversed(parts):
        try:
            if hasattr(part, "shutdown"):
                part.shutdown(wait=False)
            elif hasattr(part, "dispose"):
                part.dispose()
            elif hasattr(part, "stop"):
                part.stop()
            else:
                part.close()
        except Exception as exc:  # the build's own error matters more
            log.debug("closing a part of a failed build: %s", describe(exc))


def only_jobs(config: Config, names: Sequence[str] | None) -> tuple[JobSpec, ...]:
    """The daemon's jobs: the --job names, else all (disabled ones are not scheduled)."""
    if not names:
        return config.jobs
    return tuple(job for job in config.jobs if job.name in names)


def install_signal_handlers(loop, reload: bool) -> None:
    def stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        loop.request_stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # A process a job forks must not run these (a SIGTERM would only ask a loop the
    # child does not run to stop, so the child would never end).
    os.register_at_fork(after_in_child=default_signal_handlers)
    if reload:
        def hup(signum, _frame):
            log.info("received SIGHUP: reloading the configuration")
            loop.request_reload()
        signal.signal(signal.SIGHUP, hup)


def default_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def finish(loop, report) -> None:
    """After the loop: close every runtime, but never wait for a thread stuck in a
    job (the caller exits the process without it)."""
    current, *retired = loop.running_runtimes()
    for runtime in retired + [current]:
        if report.abandoned:
            runtime.pool.shutdown(wait=False)
        else:
            runtime.close(keep=current if runtime is not current else None)


def run_once(config: Config, functions: Mapping[str, JobFunction],
             selected: Sequence[JobSpec]):
    """Every selected job once; the LoopReport."""
    from .loop import WorkLoop
    from .sources import BatchSource

    from .history import History

    observers, monitoring, history = Observers(), None, History()
    if wants_monitoring(config):
        from .monitoring.monitor import Monitoring
        monitoring = Monitoring(observers, listen=False,   # --once never listens
                                history=history)
        monitoring.apply(config)
    runtime = build_runtime(config, functions, jobs=selected, scheduled=False)
    log.info("running %d job(s) once from %s on %s, max_workers %d", len(selected),
             config.path, runtime.database.display_url, config.worker.max_workers)
    if runtime.cluster is not None:
        runtime.cluster.start()
    loop = WorkLoop(runtime, BatchSource(list(selected)),
                    observer=Observers((history, observers)))
    install_signal_handlers(loop, reload=False)
    report = None
    try:
        report = loop.run()
    finally:
        if report is None:
            runtime.close(wait=False)
        history.close()                # the last rows written (bounded wait)
        if monitoring is not None:     # hooks waited for (bounded), then the textfile
            monitoring.finish(textfile=True)
    finish(loop, report)
    return report


def run_daemon(path: str, config: Config, functions: Mapping[str, JobFunction],
               only: Sequence[str] | None):
    """The daemon until a stop signal; the LoopReport, or None when it was stopped
    before the database ever answered."""
    from .systemd import Notifier

    from .history import History

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
        history.close()                # the last rows written (bounded wait)
        if held[0] is not None:
            held[0].finish(textfile=False)


def _run_daemon(path: str, config: Config, functions: Mapping[str, JobFunction],
                only: Sequence[str] | None, notifier, observers: Observers, held: list,
                history):
    from .loop import WorkLoop
    from .sources import ScheduleSource

    runtime = build_runtime(config, functions, jobs=only_jobs(config, only), scheduled=True)
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
                                previous=current)
            try:
                new.start(previous=current)
            except BaseException:
                new.close(keep=current, wait=False)
                raise
        except BaseException:
            if change is not None:
                change.abort()
            raise
        if change is not None:
            change.commit()
            monitoring.probe_readiness(lambda: loop.runtime)
        return new

    loop = WorkLoop(runtime, ScheduleSource(observers), notifier=notifier, reload=reload,
                    observer=Observers((history, observers)))
    if held[0] is not None:
        held[0].probe_readiness(lambda: loop.runtime)
    install_signal_handlers(loop, reload=True)
    try:
        try:
            ready = _wait_for_database(loop, runtime, notifier, observers)
        except DatabaseUnusable:
            runtime.close()
            raise
        if not ready:
            log.info("stopped while waiting for the database: no job ran")
            runtime.close()
            return None
        log.info("daemon started: %d scheduled job(s) from %s on %s, max_workers %d",
                 len(runtime.scheduler.jobs), config.path, runtime.database.display_url,
                 config.worker.max_workers)
        notifier.ready(f"running {len(runtime.scheduler.jobs)} scheduled job(s)")
        report = None
        try:
            report = loop.run()
        finally:
            if report is None:
                for each in loop.running_runtimes():
                    each.close(wait=False)
        if not report.abandoned:
            log.info("daemon stopped: %d connection(s) still checked out of the pool",
                     loop.runtime.database.checked_out())
        finish(loop, report)
        return report
    finally:
        notifier.close()


def _wait_for_database(loop, runtime: Runtime, notifier, observers: Observers) -> bool:
    """READY only once the database answers; until then say why we wait. False when
    a stop came first; DatabaseUnusable when waiting cannot help."""
    delay = 0.5
    observers.runtime_changed(runtime)
    while not loop.stop_requested:
        observers.tick()            # alive while waiting: /healthz 200, /readyz 503
        try:
            runtime.start()
            observers.database_ready(True)
            return True
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
