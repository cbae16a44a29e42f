"""Prometheus metrics: an observer of the work loop (imported only when the config
has a `metrics` section; needs the `metrics` extra, prometheus-client).

Conventions: every family is prefixed `run_worker_`, in base units (seconds),
counters end in `_total`, each family has one label set. Every configured job
has its series from the start (at 0), so that "never succeeded" can be alerted
on. What is read rather than counted (pool, connections, the cluster) is read at
scrape time from the runtime now in use.
"""
from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .observe import SKIP_REASONS

PREFIX = "run_worker"
RUN_OUTCOMES = ("success", "failed", "timeout", "cancelled")
FAILED_OUTCOMES = ("failed", "timeout")
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
LATENESS_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


class MetricsObserver:
    """Counts what the loop reports, into a registry of its own (not the
    process-wide default one, which would add unprefixed process_* families)."""

    def __init__(self) -> None:
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
        self._runtime = None
        r.register(_RuntimeCollector(self))

    # --- the observer -----------------------------------------------------------

    def runtime_changed(self, runtime) -> None:
        self._runtime = runtime
        for job in runtime.config.jobs:    # every job has its series, at 0
            name = job.name
            for outcome in RUN_OUTCOMES:
                self.runs.labels(name, outcome)
            for reason in SKIP_REASONS:
                self.skipped.labels(name, reason)
            self.attempts.labels(name)
            self.duration.labels(name)
            self.lateness.labels(name)
            self.last_success.labels(name)
            self.last_failure.labels(name)
            interval = _interval(job)
            if interval is not None:
                self.interval.labels(name).set(interval)

    def run_started(self, run, runtime) -> None:
        if run.slot is not None:            # a scheduled occurrence (not a batch run)
            self.lateness.labels(run.job.name).observe(max(0.0, run.lateness))
        if runtime.cluster is not None:
            self.claims.labels("won").inc()
            if run.recovering is not None:
                self.recovered.inc()

    def run_finished(self, run, result) -> None:
        name, outcome = result.job, result.outcome.value
        self.runs.labels(name, outcome).inc()
        self.attempts.labels(name).inc(result.attempts)
        if result.attempts:                 # 0: never started (cancelled, refused)
            self.duration.labels(name).observe(result.duration)
        if outcome == "success":
            self.last_success.labels(name).set(time.time())
        elif outcome in FAILED_OUTCOMES:
            self.last_failure.labels(name).set(time.time())

    def run_skipped(self, job, reason: str) -> None:
        if reason == "claimed_elsewhere":
            self.claims.labels("lost").inc()
        if reason in SKIP_REASONS:          # the cluster being out of reach is no skip
            self.skipped.labels(job.name, reason).inc()

    def attempt_retried(self, job, attempt: int, reason: str) -> None:
        self.retries.labels(job.name, reason).inc()

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

    def write_textfile(self, path: str) -> None:
        """For node-exporter's textfile collector: written to a temporary file in the
        same directory, then renamed over `path`, so that a scrape never reads half."""
        from prometheus_client import write_to_textfile
        write_to_textfile(path, self.registry)


class _RuntimeCollector:
    """What is read at scrape time from the runtime in use."""

    def __init__(self, metrics: MetricsObserver) -> None:
        self.metrics = metrics

    def describe(self):
        return []     # unchecked collector: its families depend on the runtime

    def collect(self):
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
        from croniter import croniter
        times = croniter(job.cron, time.time())
        first = times.get_next(float)
        return times.get_next(float) - first
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("db-job-worker")
    except PackageNotFoundError:
        return "unknown"
