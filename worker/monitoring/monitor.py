"""The process's watchers, put together from the config: metrics, health, the status
page (one HTTP listener) and the hooks. Imported only when the config has a
`metrics` or `hooks` section.

They belong to the process, not to a runtime: a reload swaps the runtime they
report on (`runtime_changed`), and a reload that changes the `metrics` section
either restarts the listener or is rejected with the old one kept
(`Monitoring.prepare` / `Change.commit` / `Change.abort`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from ..config import Config, mask_secrets
from .observe import ListenError, NoObserver, Observers, wants_hooks
from .settings import MetricsSettings

log = logging.getLogger("worker.monitor")

RECENT_RUNS = 20           # runs kept per job for the status page (outside a cluster)
READY_PROBE_EVERY = 2.0    # seconds between readiness pings of the job database
ERROR_SHOWN = 200          # characters of a run's error shown on the page


# --- health ---------------------------------------------------------------------

class Health(NoObserver):
    """/healthz: the loop turns (draining after a stop signal included). /readyz:
    the job database answered last time it was asked, the process is not stopping,
    and the runtime has no reason of its own not to be ready (a cluster node whose
    heartbeat failed; a daemon that has not read its paused jobs yet, and so starts
    no scheduled run: worker.control)."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self.last_tick: float | None = None
        self.is_stopping = False
        self.ready = False
        self.runtime = None

    def runtime_changed(self, runtime) -> None:
        self.runtime = runtime

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def stopping(self) -> None:
        self.is_stopping = True

    def database_ready(self, ready: bool) -> None:
        self.ready = ready

    def not_ready(self) -> str | None:
        """Why /readyz is 503, or None."""
        if self.is_stopping:
            return "stopping"
        if not self.ready:
            return "the job database is not answering"
        # A failing cluster heartbeat first: it is also why a node's pauses may
        # not be read yet.
        cluster = getattr(self.runtime, "cluster", None)
        problem = cluster.readiness_problem() if cluster is not None else None
        if problem is None and not getattr(getattr(self.runtime, "paused", None),
                                           "known", True):
            problem = "the paused jobs are not read yet: no scheduled run starts"
        return problem

    def live(self) -> tuple[bool, str]:
        # Draining after SIGTERM is alive: a liveness probe failing then would have
        # the process killed in the middle of its graceful stop. Only readiness fails.
        if self.last_tick is None:
            return False, "the work loop has not started"
        since = time.monotonic() - self.last_tick
        if since > self.stall_after:
            return False, f"the work loop has not turned for {since:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        why = self.not_ready()
        return why is None, why or "ok"


# --- the status page's data -----------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    finished: float        # Unix time
    outcome: str
    duration: float
    attempts: int
    error: str | None
    node: str | None = None


def one_line(error: str | None) -> str | None:
    if not error:
        return None
    text = mask_secrets(" ".join(error.split()))
    return text if len(text) <= ERROR_SHOWN else text[:ERROR_SHOWN - 1] + "…"


class StatusBoard(NoObserver):
    """What the status page shows: the runtime in use and each job's recent runs:
    read from the run history (worker.history, one query a request), so that they
    survive a restart; without it, from the cluster's run table, else the last
    RECENT_RUNS in memory."""

    def __init__(self, history=None) -> None:
        self.history = history            # worker.history.History, or None
        self.runtime = None
        self.started = time.time()
        self._recent: dict[str, deque] = {}
        self._running: dict[str, float] = {}     # job -> when its run started
        self._stuck: set[str] = set()            # jobs whose run is stuck past its deadline
        self._last_success: dict[str, float] = {}   # job -> when it last succeeded
        # The loop thread writes, HTTP threads read: a deque must not change while
        # it is being copied.
        self._lock = threading.Lock()

    def runtime_changed(self, runtime) -> None:
        self.runtime = runtime

    def run_started(self, run, runtime) -> None:
        with self._lock:
            self._running[run.job.name] = time.time()

    def run_finished(self, run, result) -> None:
        record = RunRecord(time.time(), result.outcome.value, result.duration,
                           result.attempts, one_line(result.error))
        with self._lock:
            self._recent.setdefault(result.job, deque(maxlen=RECENT_RUNS)).appendleft(record)
            if result.ok:
                self._last_success[result.job] = record.finished

    def run_stuck(self, run) -> None:
        with self._lock:
            self._stuck.add(run.job.name)

    def run_returned(self, run, result) -> None:
        # Running until its thread returns: a stuck run still holds a thread.
        with self._lock:
            self._running.pop(run.job.name, None)
            self._stuck.discard(run.job.name)

    def _own_runs(self) -> tuple[dict[str, list], dict[str, float], set[str],
                                 dict[str, float]]:
        with self._lock:
            return ({name: list(runs) for name, runs in self._recent.items()},
                    dict(self._running), set(self._stuck), dict(self._last_success))

    def snapshot(self, health: Health | None = None) -> dict:
        runtime = self.runtime
        if runtime is None:
            return {"worker": {"state": "starting"}, "jobs": [], "cluster": None}
        config = runtime.config
        history, history_error = self._stored_history()
        stored = history is not None       # finished runs only: add the running ones
        if history is None and history_error is None:     # the run history is off
            history, history_error = self._cluster_history(runtime)
        own, running, stuck, succeeded = self._own_runs()
        node = runtime.cluster.node if runtime.cluster is not None else None
        jobs = []
        scheduled = {job.name for job in runtime.scheduler.jobs} \
            if runtime.scheduler is not None else set()
        for job in config.jobs:
            recent = history.get(job.name, []) if history is not None else \
                own.get(job.name, [])
            running_since = running.get(job.name)
            if stored and running_since:   # the history has a row once the run ends
                recent = [RunRecord(running_since, "running", time.time() - running_since,
                                    0, None, node)] + recent
            success = max([r.finished for r in recent or () if r.outcome == "success"]
                          + [succeeded.get(job.name, 0)])
            jobs.append({
                "name": job.name,
                "schedule": job.schedule,
                "enabled": job.enabled,
                "paused": job.name in runtime.paused,
                "next_run": runtime.scheduler.next_run(job.name)
                if job.name in scheduled else None,
                "running_since": _iso(running_since) if running_since else None,
                "stuck": job.name in stuck,
                "last": _run_json(recent[0]) if recent else None,
                "last_success": _iso(success) if success else None,
                "recent": [_run_json(r) for r in recent or ()],
            })
        settings = config.database
        worker = {
            "pid": os.getpid(),
            "version": _version(),
            "started": _iso(self.started),
            "config": str(config.path),
            "database": _masked(settings.url),
            "max_workers": config.worker.max_workers,
            "pool_size": settings.pool_size + settings.max_overflow,
            "connections_checked_out": runtime.database.checked_out(),
            "running": len(running),
        }
        if health is not None:
            worker["live"], worker["live_reason"] = health.live()
            worker["database_ready"] = health.ready
        cluster = None
        if runtime.cluster is not None:
            nodes = sorted({r["node"] for job in jobs for r in job["recent"] if r["node"]}
                           | {runtime.cluster.node})
            cluster = {"node": runtime.cluster.node, "nodes": nodes,
                       "healthy": runtime.cluster.healthy, "history_error": history_error}
        store = self.history.store if self.history is not None else None
        kept = {"store": _masked(store.url), "error": history_error} \
            if store is not None else None
        return {"worker": worker, "jobs": jobs, "cluster": cluster, "history": kept}

    def _stored_history(self):
        """Each job's recent runs from the run history (None: it is off), and why
        they could not be read."""
        store = self.history.store if self.history is not None else None
        if store is None:
            return None, None
        from ..errors import describe
        try:
            return {job: [RunRecord(row.ended_ms / 1000, row.outcome,
                                    (row.ended_ms - row.started_ms) / 1000, row.attempts,
                                    one_line(row.error), row.node) for row in rows]
                    for job, rows in store.recent(RECENT_RUNS).items()}, None
        except Exception as exc:  # the history out of reach: show this process's own
            return None, one_line(describe(exc))

    def _cluster_history(self, runtime):
        if runtime.cluster is None:
            return None, None
        from ..errors import describe
        try:
            recent = runtime.cluster.recent_runs(runtime.config.job_names(), RECENT_RUNS)
            return {job: [RunRecord(row.ended_ms / 1000 if row.ended_ms
                                    else row.started_ms / 1000,
                                    row.outcome, ((row.ended_ms or row.heartbeat_ms)
                                                  - row.started_ms) / 1000,
                                    row.attempts, one_line(row.error), row.node)
                          for row in rows] for job, rows in recent.items()}, None
        except Exception as exc:  # the run table out of reach: show this node's own
            return None, one_line(describe(exc))


def _run_json(record: RunRecord) -> dict:
    return {"finished": _iso(record.finished), "outcome": record.outcome,
            "duration": round(record.duration, 3), "attempts": record.attempts,
            "error": record.error, "node": record.node}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _masked(url: str) -> str:
    from ..config import masked_url
    return masked_url(url)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("db-job-worker")
    except PackageNotFoundError:
        return "unknown"


# --- the HTTP listener --------------------------------------------------------------

class MonitorServer:
    """/metrics, /healthz, /readyz, / and /status.json on one address; read-only
    (GET and HEAD). Bound at construction (ListenError), served by a Listener
    (monitoring.listener) from threads of its own."""

    def __init__(self, settings: MetricsSettings, monitoring: "Monitoring") -> None:
        from .listener import Listener
        self.settings = settings
        self.monitoring = monitoring
        try:
            self._listener = Listener(settings.address, settings.port, self.respond)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {settings.address}:{settings.port} for "
                              f"metrics: {why}") from None
        self.port = self._listener.port

    def start(self) -> None:
        self._listener.start()
        log.info("monitoring on http://%s:%d/ (/metrics, /healthz, /readyz, /status.json)",
                 self.settings.address, self.port)

    def close(self) -> None:
        self._listener.close()

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET; a HEAD gets the same headers."""
        from urllib.parse import parse_qs, urlsplit
        monitoring = self.monitoring
        path, query = urlsplit(target).path, parse_qs(urlsplit(target).query)
        plain = "text/plain; charset=utf-8"
        if path == "/metrics" and monitoring.metrics is not None:
            from prometheus_client import CONTENT_TYPE_LATEST
            return 200, CONTENT_TYPE_LATEST, monitoring.metrics.exposition()
        if path == "/healthz":
            live, why = monitoring.health.live()
            return 200 if live else 503, plain, (why + "\n").encode()
        if path == "/readyz":
            ready, why = monitoring.health.readiness()
            return 200 if ready else 503, plain, (why + "\n").encode()
        if path == "/status.json":
            data = monitoring.board.snapshot(monitoring.health)
            return 200, "application/json", json.dumps(data, indent=1).encode()
        if path == "/":
            from .statuspage import render
            data = monitoring.board.snapshot(monitoring.health)
            # ?open=a,b: the jobs whose recent runs are shown (a link, not a script,
            # so that the page's refresh keeps them open)
            shown = {name for value in query.get("open", ()) for name in value.split(",")}
            return 200, "text/html; charset=utf-8", render(data, shown).encode()
        return 404, plain, b"not found\n"


# --- putting it together --------------------------------------------------------------

class Monitoring:
    """The watchers one process has, behind `observers` (the fan-out the loop is
    given). `listen`: the daemon serves HTTP; `--once` never listens."""

    def __init__(self, observers: Observers, listen: bool, history=None) -> None:
        """`history`: the process's worker.history.History, which the status page
        and the metrics read."""
        self.observers = observers
        self.listen = listen
        self.history = history
        self.metrics = None                      # monitoring.metrics.MetricsObserver
        self.hooks = None                        # monitoring.hooks.HookRunner
        self.health: Health | None = None
        self.board: StatusBoard | None = None
        self.server: MonitorServer | None = None
        self.settings: MetricsSettings | None = None
        self._probe_stop = threading.Event()
        self._probe: threading.Thread | None = None

    def prepare(self, config: Config) -> "Change":
        """Everything the config needs that can fail, done aside: a new listener is
        bound (ListenError) and the hooks resolved. Nothing changes until commit."""
        settings = config.metrics
        server = None
        if self.listen and settings is not None and (
                self.server is None or _address(settings) != _address(self.settings)):
            server = MonitorServer(settings, self)
        hooks = functions = None
        if wants_hooks(config):
            from .hooks import HookRunner, resolve_hooks
            try:
                functions = resolve_hooks(config)     # ConfigError
            except BaseException:
                if server is not None:
                    server.close()
                raise
            hooks = self.hooks or HookRunner()
        return Change(self, config, server, hooks, functions)

    def apply(self, config: Config) -> None:
        self.prepare(config).commit()

    def _observer_list(self) -> list:
        return [o for o in (self.metrics, self.health, self.board, self.hooks)
                if o is not None]

    def probe_readiness(self, runtime_of) -> None:
        """Ping the job database every READY_PROBE_EVERY seconds (a connection of
        the pool, only when one is free: jobs come first)."""
        if self._probe is not None:
            return

        def probe() -> None:
            while not self._probe_stop.wait(READY_PROBE_EVERY):
                runtime = runtime_of()
                # Read once: a reload may drop the metrics section (health None)
                # while this thread pings; the thread must outlive that.
                health = self.health
                if runtime is None or health is None:
                    continue
                settings = runtime.config.database
                if runtime.database.checked_out() >= settings.pool_size + \
                        settings.max_overflow:
                    continue
                try:
                    runtime.database.ping()
                    ready = True
                except Exception:  # unreachable, whatever the driver says
                    ready = False
                if ready != health.ready:
                    log.warning("the job database %s", "answers again" if ready
                                else "does not answer: /readyz is 503")
                self.observers.database_ready(ready)

        self._probe = threading.Thread(target=probe, name="monitor-probe", daemon=True)
        self._probe.start()

    def finish(self, textfile: bool) -> None:
        """At exit: wait for hooks (bounded), write the textfile (--once), close the
        listener."""
        if self.hooks is not None:
            self.hooks.wait()
        if textfile and self.metrics is not None and self.settings is not None \
                and self.settings.textfile:
            try:
                if self.metrics.write_textfile(self.settings.textfile):
                    log.info("metrics written to %s", self.settings.textfile)
                else:
                    log.info("metrics textfile %s left as it was: no run finished "
                             "(each found its previous run still going)",
                             self.settings.textfile)
            except OSError as exc:
                log.error("cannot write the metrics textfile %s: %s",
                          self.settings.textfile, exc)
        self.close()

    def close(self) -> None:
        self._probe_stop.set()
        if self.server is not None:
            self.server.close()
            self.server = None


def _address(settings: MetricsSettings | None):
    return None if settings is None else (settings.address, settings.port)


@dataclass
class Change:
    """A prepared configuration of the watchers: commit() swaps it in, abort()
    drops what was prepared (the old stays as it was)."""
    monitoring: Monitoring
    config: Config
    server: MonitorServer | None
    hooks: object | None                  # monitoring.hooks.HookRunner
    hook_functions: dict | None

    def commit(self) -> None:
        m, settings = self.monitoring, self.config.metrics
        if settings is not None and m.metrics is None:
            from .metrics import MetricsObserver
            m.metrics = MetricsObserver(m.history)
        elif settings is None:
            m.metrics = None
        if settings is not None and m.listen:
            if m.health is None:
                m.health = Health(settings.stall_after)
                m.board = StatusBoard(m.history)
            m.health.stall_after = settings.stall_after
        else:
            m.health = m.board = None
        if self.server is not None or settings is None:
            old, m.server = m.server, self.server
            if old is not None:
                old.close()
                log.info("monitoring listener on %s:%d closed", old.settings.address,
                         old.port)
            if m.server is not None:
                m.server.start()
        if m.server is not None:
            m.server.settings = settings
        m.settings = settings
        if self.hooks is not None:
            self.hooks.configure(self.config, self.hook_functions)
        m.hooks = self.hooks
        m.observers.replace(m._observer_list())

    def abort(self) -> None:
        if self.server is not None:
            self.server.close()
