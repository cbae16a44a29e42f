"""Prometheus metrics: an observer of the work loop (imported only when the config
has a `metrics` section; needs the `metrics` extra, prometheus-client).

Conventions: every family is prefixed `run_worker_`, in base units (seconds),
counters end in `_total`, each family has one label set. Every configured job
has its series from the start (at 0), so that "never succeeded" can be alerted
on. What is read rather than counted (pool, connections, the cluster) is read at
scrape time from the runtime now in use.
"""
from __future__ import annotations

import logging
import os
import platform
import stat
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .observe import SKIP_CLAIMED_ELSEWHERE, SKIP_REASONS

log = logging.getLogger("worker.metrics")

PREFIX = "run_worker"
RUN_OUTCOMES = ("success", "failed", "timeout", "cancelled")
FAILED_OUTCOMES = ("failed", "timeout")
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
# Kept from an earlier textfile for a job this invocation ran without that outcome.
CARRIED_TIMES = (f"{PREFIX}_last_success_timestamp_seconds",
                 f"{PREFIX}_last_failure_timestamp_seconds")
# Not in the textfile: a cron run has no loop that could stall, and its schedule is
# cron's, not the job's `every`.
DAEMON_ONLY = (f"{PREFIX}_loop_last_tick_timestamp_seconds",
               f"{PREFIX}_job_interval_seconds")
LATENESS_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


class MetricsObserver:
    """Counts what the loop reports, into a registry of its own (not the
    process-wide default one, which would add unprefixed process_* families)."""

    def __init__(self, history=None) -> None:
        """`history`: the process's worker.history.History (its failed writes are
        read at scrape time)."""
        self.history = history
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter(f"{PREFIX}_runs", "Runs finished, by job and outcome",
                            ["job_name", "outcome"], registry=r)
        self.attempts = Counter(f"{PREFIX}_attempts", "Attempts made, by job",
                                ["job_name"], registry=r)
        self.retries = Counter(f"{PREFIX}_retries", "Failed attempts that were retried, "
                               "by job and reason", ["job_name", "reason"], registry=r)
        self.duration = Histogram(f"{PREFIX}_run_duration_seconds", "Run duration (all "
                                  "attempts and waits), by job", ["job_name"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.last_success = Gauge(f"{PREFIX}_last_success_timestamp_seconds",
                                  "When the job last succeeded (Unix time; 0: never)",
                                  ["job_name"], registry=r)
        self.last_failure = Gauge(f"{PREFIX}_last_failure_timestamp_seconds",
                                  "When the job last failed or timed out (Unix time; "
                                  "0: never)", ["job_name"], registry=r)
        self.lateness = Histogram(f"{PREFIX}_start_lateness_seconds", "How late runs "
                                  "started after their scheduled time, by job", ["job_name"],
                                  buckets=LATENESS_BUCKETS, registry=r)
        self.skipped = Counter(f"{PREFIX}_runs_skipped", "Runs due but not started, by "
                               "job and reason", ["job_name", "reason"], registry=r)
        self.reloads = Counter(f"{PREFIX}_config_reloads", "Configuration reloads "
                               "(SIGHUP), by result", ["result"], registry=r)
        self.claims = Counter(f"{PREFIX}_cluster_claims", "Cluster mode: runs claimed in "
                              "the run table, by result (won, lost)", ["result"], registry=r)
        self.recovered = Counter(f"{PREFIX}_cluster_runs_recovered", "Cluster mode: "
                                 "abandoned runs run again here", registry=r)
        self.database_up = Gauge(f"{PREFIX}_database_ready", "1 when the job database "
                                 "answered last, 0 while it cannot be reached",
                                 registry=r)
        self.interval = Gauge(f"{PREFIX}_job_interval_seconds", "Seconds between a "
                              "scheduled job's runs (every; cron: between its next two)",
                              ["job_name"], registry=r)
        self.start_time = Gauge(f"{PREFIX}_start_time_seconds", "When this worker process "
                                "started (Unix time)", registry=r)
        self.start_time.set_to_current_time()
        self.last_tick = Gauge(f"{PREFIX}_loop_last_tick_timestamp_seconds", "When the "
                               "work loop last turned (Unix time)", registry=r)
        Info(f"{PREFIX}_build", "The worker's version", registry=r).info(
            {"version": _version(), "python": platform.python_version()})
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        for result in ("won", "lost"):
            self.claims.labels(result)
        self.enabled = Gauge(f"{PREFIX}_job_enabled", "1 when the job is enabled (a daemon "
                             "started with --job: and selected), else 0 and no interval",
                             ["job_name"], registry=r)
        self.running = Gauge(f"{PREFIX}_job_running", "1 while a run of the job holds a "
                             "worker thread (a stuck run included)", ["job_name"], registry=r)
        self.started_at = Gauge(f"{PREFIX}_job_run_started_timestamp_seconds", "When the "
                                 "job's running run started (Unix time; 0: none running)",
                                 ["job_name"], registry=r)
        self.stuck = Gauge(f"{PREFIX}_job_stuck", "1 while a run of the job is past its "
                           "deadline and its thread has not returned", ["job_name"],
                           registry=r)
        self._runtime = None
        self._series: dict[str, set] = {}   # job -> (family, label values) it has
        self._stuck: set[str] = set()       # jobs whose run was reported stuck
        # Runs finished here or claimed by another node: a textfile is written only
        # when there is one (not when every run found the previous still going).
        self.settled = 0
        r.register(_RuntimeCollector(self))

    # --- the observer -----------------------------------------------------------

    def _job_series(self, family, name: str, *labels: str):
        """`family`'s child for job `name` (created at 0), remembered so that the job's
        series can all be removed when the job leaves the config."""
        self._series.setdefault(name, set()).add((family, (name,) + labels))
        return family.labels(name, *labels)

    def _drop_series(self, family, name: str, *labels: str) -> None:
        key = (family, (name,) + labels)
        if key in self._series.get(name, ()):
            self._series[name].discard(key)
            family.remove(name, *labels)

    def runtime_changed(self, runtime) -> None:
        self._runtime = runtime
        configured = {job.name for job in runtime.config.jobs}
        for name in sorted(self._series.keys() - configured):   # removed or renamed
            for family, labels in self._series.pop(name):
                family.remove(*labels)
            self._stuck.discard(name)
        runs_here = {job.name for job in runtime.jobs}
        for job in runtime.config.jobs:    # every job has its series, at 0
            name = job.name
            for outcome in RUN_OUTCOMES:
                self._job_series(self.runs, name, outcome)
            for reason in SKIP_REASONS:
                self._job_series(self.skipped, name, reason)
            for family in (self.attempts, self.duration, self.lateness, self.last_success,
                           self.last_failure, self.running, self.started_at, self.stuck):
                self._job_series(family, name)
            # Disabled (or, in a daemon, not selected with --job): no interval, so no
            # rule expects it to succeed.
            enabled = job.enabled and (runtime.scheduler is None or name in runs_here)
            self._job_series(self.enabled, name).set(1 if enabled else 0)
            interval = _interval(job) if enabled else None
            if interval is not None:
                self._job_series(self.interval, name).set(interval)
            else:
                self._drop_series(self.interval, name)

    def _known(self, name: str) -> bool:
        """Still in the config: a run of a job a reload removed ends unrecorded."""
        return name in self._series

    def run_started(self, run, runtime) -> None:
        name = run.job.name
        if self._known(name):
            self._job_series(self.running, name).set(1)
            self._job_series(self.started_at, name).set(time.time())
            if run.slot is not None:        # a scheduled occurrence (not a batch run)
                self._job_series(self.lateness, name).observe(max(0.0, run.lateness))
        if runtime.cluster is not None:
            self.claims.labels("won").inc()
            if run.recovering is not None:
                self.recovered.inc()

    def run_finished(self, run, result) -> None:
        name, outcome = result.job, result.outcome.value
        if not self._known(name):
            return
        self.settled += 1
        self._job_series(self.runs, name, outcome).inc()
        self._job_series(self.attempts, name).inc(result.attempts)
        # A stuck run's duration is observed when its thread returns (run_returned):
        # the time at which the loop gave up on it is not how long it ran.
        if result.attempts and name not in self._stuck:   # 0: never started
            self._job_series(self.duration, name).observe(result.duration)
        if outcome == "success":
            self._job_series(self.last_success, name).set(time.time())
        elif outcome in FAILED_OUTCOMES:
            self._job_series(self.last_failure, name).set(time.time())

    def run_stuck(self, run) -> None:
        name = run.job.name
        if self._known(name):
            self._stuck.add(name)
            self._job_series(self.stuck, name).set(1)

    def run_returned(self, run, result) -> None:
        name = run.job.name
        if not self._known(name):
            return
        self._job_series(self.running, name).set(0)
        self._job_series(self.started_at, name).set(0)
        if name in self._stuck:
            self._stuck.discard(name)
            self._job_series(self.stuck, name).set(0)
            if result.attempts:
                self._job_series(self.duration, name).observe(result.duration)

    def run_skipped(self, job, reason: str) -> None:
        if reason == SKIP_CLAIMED_ELSEWHERE:   # the run happened, on another node
            self.claims.labels("lost").inc()
            self.settled += 1
        if reason in SKIP_REASONS and self._known(job.name):   # out of reach: no skip
            self._job_series(self.skipped, job.name, reason).inc()

    def attempt_retried(self, job, attempt: int, reason: str) -> None:
        if self._known(job.name):
            self._job_series(self.retries, job.name, reason).inc()

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def tick(self) -> None:
        self.last_tick.set(time.time())

    def stopping(self) -> None:
        pass

    def database_ready(self, ready: bool) -> None:
        self.database_up.set(1 if ready else 0)

    # --- output -------------------------------------------------------------------

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def write_textfile(self, path: str) -> bool:
        """For node-exporter's textfile collector: this invocation's jobs get this
        invocation's values, every other configured job keeps its series from the
        file being replaced (`--once --job a` then `--once --job b` keeps a's).
        Written to a temporary file in the same directory, then renamed over `path`,
        so that a scrape never reads half. Nothing is written when no run finished and
        none was another node's (every run found its previous run still going, exit
        75): the file's age then says so. False then."""
        if not self.settled:
            return False
        runtime = self._runtime
        previous = _read_families(path)
        in_file = {s.labels["job_name"] for family in previous for s in family.samples
                   if "job_name" in s.labels}
        configured = {job.name for job in runtime.config.jobs}
        # A job this run did not run keeps its series from the file, if it has any.
        theirs = (configured - {job.name for job in runtime.jobs}) & in_file
        _replace_file(path, _Merged(self.registry, previous, configured - theirs, theirs))
        return True


def _replace_file(path: str, registry) -> None:
    """The families written to a new file beside `path`, then renamed over it. The
    temporary file is made with O_EXCL (never through a link another user planted in
    a shared textfile directory), mode 0644 for node-exporter, whatever the umask."""
    import tempfile

    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import ALLOWUTF8
    data = generate_latest(registry, ALLOWUTF8)
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(data)
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class _Merged:
    """A registry's families, with the samples of the jobs it does not own taken from
    an earlier file instead (the merge of write_textfile). Its own jobs' last success
    and failure times stay those of the earlier file when this invocation has none;
    DAEMON_ONLY families are left out."""

    def __init__(self, registry, previous: list, ours: set, theirs: set) -> None:
        self.registry, self.previous, self.ours, self.theirs = registry, previous, ours, theirs

    def collect(self):
        from prometheus_client.metrics_core import Metric
        kept: dict[str, list] = {}
        earlier: dict[tuple, float] = {}
        for family in self.previous:
            if family.name in DAEMON_ONLY:    # an older version's file may have them
                continue
            for sample in family.samples:
                job = sample.labels.get("job_name")
                if job in self.theirs:
                    kept.setdefault(family.name, []).append(sample)
                elif job in self.ours and family.name in CARRIED_TIMES:
                    earlier[(family.name, job)] = sample.value
        for family in self.registry.collect():
            if family.name in DAEMON_ONLY:
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                job = sample.labels.get("job_name")
                if job is None or job in self.ours:
                    if not sample.value and (family.name, job) in earlier:
                        sample = sample._replace(value=earlier[(family.name, job)])
                    merged.samples.append(sample)
            merged.samples += kept.pop(family.name, [])
            yield merged
        for family in self.previous:          # a family this version no longer has
            if kept.get(family.name):
                family.samples = kept.pop(family.name)
                yield family


def _read_families(path: str) -> list:
    """The families of an earlier textfile; none when there is none or it cannot be
    read (it is then replaced whole)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        # Not through a link, nor a FIFO or device another user put there (a FIFO
        # blocked --once for ever at its end, SIGTERM included; /dev/zero grew it
        # without bound): only a regular file is read, and it is replaced whole.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, encoding="utf-8") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"not a regular file (mode {os.fstat(fd).st_mode:o})")
            return list(text_string_to_metric_families(file.read()))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("the metrics textfile %s cannot be read (%s): replaced whole", path, exc)
        return []


class _RuntimeCollector:
    """What is read at scrape time from the runtime in use."""

    def __init__(self, metrics: MetricsObserver) -> None:
        self.metrics = metrics

    def describe(self):
        return []     # unchecked collector: its families depend on the runtime

    def collect(self):
        history = self.metrics.history
        if history is not None:
            failed = CounterMetricFamily(f"{PREFIX}_history_write_failures",
                                         "Batches of run history rows that could not "
                                         "be written (the rows wait and are tried again)")
            failed.add_metric([], history.writer.failed_writes)
            yield failed
            dropped = CounterMetricFamily(f"{PREFIX}_history_rows_dropped",
                                          "Run history rows given up: too many waiting "
                                          "for an unreachable store, or left at exit")
            dropped.add_metric([], history.writer.dropped_rows)
            yield dropped
        runtime = self.metrics._runtime
        if runtime is None:
            return
        pool_size = GaugeMetricFamily(f"{PREFIX}_db_pool_size", "Connections the job "
                                      "database pool keeps (pool_size + max_overflow)")
        settings = runtime.config.database
        pool_size.add_metric([], settings.pool_size + settings.max_overflow)
        yield pool_size
        checked_out = GaugeMetricFamily(f"{PREFIX}_db_connections_checked_out",
                                        "Connections lent out by the job database pool")
        checked_out.add_metric([], runtime.database.checked_out())
        yield checked_out
        workers = GaugeMetricFamily(f"{PREFIX}_workers", "Worker threads (max_workers)")
        workers.add_metric([], runtime.pool.max_workers)
        yield workers
        paused = GaugeMetricFamily(f"{PREFIX}_job_paused", "1 while the job is paused "
                                   "(--pause, until --resume)", labels=["job_name"])
        for job in runtime.config.jobs:
            paused.add_metric([job.name], float(job.name in runtime.paused))
        yield paused
        if runtime.cluster is not None:
            abandoned = CounterMetricFamily(f"{PREFIX}_cluster_runs_abandoned",
                                            "Cluster mode: runs of silent nodes this node "
                                            "marked abandoned")
            abandoned.add_metric([], getattr(runtime.cluster, "abandoned_marked", 0))
            yield abandoned


def _interval(job) -> float | None:
    if job.every is not None:
        return job.every
    if job.cron is not None:
        from ..cron import CronTimes, parse
        from ..scheduler import local_zone
        times = CronTimes(parse(job.cron), local_zone())
        first = times.next_after(time.time())
        return times.next_after(first) - first
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("db-job-worker")
    except PackageNotFoundError:
        return "unknown"
