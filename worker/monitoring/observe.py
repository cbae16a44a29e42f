"""How the rest of the process watches the work loop: one small observer interface.

The loop (worker.loop), the run sources (worker.sources), the runner
(worker.runner) and the app (worker.app) report what happens through a
`RunObserver`; they never know who listens. Metrics, health, the status page
and the failure hooks are observers (monitoring.monitor puts them together when the
config asks for them). With none configured, `NO_OBSERVER` listens to nothing and
nothing else is imported.

Observers are called from the loop thread (and `attempt_retried` from a job's
thread): each call must be quick and must not raise; `Observers` logs and drops
an exception rather than let it reach the loop.
"""
from __future__ import annotations

import logging
from typing import Protocol, Sequence

log = logging.getLogger("worker.observe")

# Why a run due was not started (the `reason` of run_skipped).
SKIP_OVERLAP = "overlap"                        # the job's previous run is still going
SKIP_MISFIRE = "misfire"                        # later than misfire_grace_time
SKIP_LOCK_HELD = "lock_held"                    # another process holds its host lock
SKIP_CLAIMED_ELSEWHERE = "claimed_elsewhere"    # cluster: another node has the run
SKIP_CLUSTER_UNREACHABLE = "cluster_unreachable"  # cluster: the run table is out of reach
SKIP_REASONS = (SKIP_OVERLAP, SKIP_MISFIRE, SKIP_LOCK_HELD, SKIP_CLAIMED_ELSEWHERE)


class ListenError(Exception):
    """The monitoring listener cannot bind its address (the daemon exits 69)."""


class RunObserver(Protocol):
    def runtime_changed(self, runtime) -> None:
        """A runtime (worker.app.Runtime) is now the one new runs start on: at start
        and after each reload that was applied."""

    def run_started(self, run, runtime) -> None:
        """`run` (a DueRun) was claimed and handed to a worker thread."""

    def run_finished(self, run, result) -> None:
        """A run ended (JobResult; never SKIPPED). Its Session is gone by now, except
        for a run reported stuck (run_stuck came first): its thread may still be in
        the job."""

    def run_stuck(self, run) -> None:
        """`run` is past its deadline and its thread has not returned: the loop gave
        up waiting (run_finished with a timeout follows at once)."""

    def run_returned(self, run, result) -> None:
        """The thread of a started run has returned (or the run was withdrawn before
        it began): `run` no longer holds a thread. `result` is what the thread
        returned, its duration the real one (a stuck run's included)."""

    def run_skipped(self, job, reason: str) -> None:
        """A run due for `job` (a JobSpec) was not started; reason: SKIP_*."""

    def attempt_retried(self, job, attempt: int, reason: str) -> None:
        """Attempt `attempt` failed and will be retried; reason: retry_label()."""

    def reload(self, result: str) -> None:
        """A SIGHUP was handled: "applied" or "rejected"."""

    def tick(self) -> None:
        """The loop turned (at least once a second while it runs)."""

    def stopping(self) -> None:
        """The process is stopping: no new runs."""

    def database_ready(self, ready: bool) -> None:
        """The job database answered (True), or could not be reached (False)."""


class NoObserver:
    """Listens to nothing: the default, when no monitoring is configured."""

    def runtime_changed(self, runtime) -> None:
        pass

    def run_started(self, run, runtime) -> None:
        pass

    def run_finished(self, run, result) -> None:
        pass

    def run_stuck(self, run) -> None:
        pass

    def run_returned(self, run, result) -> None:
        pass

    def run_skipped(self, job, reason: str) -> None:
        pass

    def attempt_retried(self, job, attempt: int, reason: str) -> None:
        pass

    def reload(self, result: str) -> None:
        pass

    def tick(self) -> None:
        pass

    def stopping(self) -> None:
        pass

    def database_ready(self, ready: bool) -> None:
        pass


NO_OBSERVER = NoObserver()


class Observers:
    """Fan-out to several observers; one that raises is logged and the others still
    hear. The list can be swapped whole (a reload that adds or drops metrics)."""

    def __init__(self, observers: Sequence[RunObserver] = ()) -> None:
        self.observers: tuple = tuple(observers)

    def replace(self, observers: Sequence[RunObserver]) -> None:
        self.observers = tuple(observers)   # one assignment: readers see old or new

    def _each(self, method: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:  # watching must never break the work
                log.exception("observer %s.%s failed", type(observer).__name__, method)

    def runtime_changed(self, runtime) -> None:
        self._each("runtime_changed", runtime)

    def run_started(self, run, runtime) -> None:
        self._each("run_started", run, runtime)

    def run_finished(self, run, result) -> None:
        self._each("run_finished", run, result)

    def run_stuck(self, run) -> None:
        self._each("run_stuck", run)

    def run_returned(self, run, result) -> None:
        self._each("run_returned", run, result)

    def run_skipped(self, job, reason: str) -> None:
        self._each("run_skipped", job, reason)

    def attempt_retried(self, job, attempt: int, reason: str) -> None:
        self._each("attempt_retried", job, attempt, reason)

    def reload(self, result: str) -> None:
        self._each("reload", result)

    def tick(self) -> None:
        self._each("tick")

    def stopping(self) -> None:
        self._each("stopping")

    def database_ready(self, ready: bool) -> None:
        self._each("database_ready", ready)


def retry_label(reason: str, disconnect: bool = False, timed_out: bool = False) -> str:
    """The classifier's reason (worker.errors Diagnosis.reason) as a short, bounded
    metric label: deadlock, lock_timeout, throttled, disconnect, timeout, conflict
    or other."""
    text = reason.lower()
    if timed_out:
        return "timeout"
    if "deadlock" in text or "serialization" in text:
        return "deadlock"
    if "lock" in text and not disconnect:
        return "lock_timeout"
    if "throttl" in text or "busy" in text or "too many" in text:
        return "throttled"
    if disconnect or "connect" in text or "shutting down" in text:
        return "disconnect"
    if "timeout" in text:
        return "timeout"
    if "conflict" in text:
        return "conflict"
    return "other"


def wants_hooks(config) -> bool:
    """The config has a hook, at the top level or on a job."""
    return config.hooks is not None or any(job.hooks is not None for job in config.jobs)


def wants_monitoring(config) -> bool:
    """Anything to watch the loop with (else nothing is imported for it)."""
    return config.metrics is not None or wants_hooks(config)
