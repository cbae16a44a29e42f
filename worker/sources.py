"""Where runs come from, and what is kept of them: the two run sources of the loop.

- `BatchSource` (`--once`): every selected job is due once, now, handed out as
  workers come free (one queued ahead per worker); it keeps every result, in job order, for the summary.
- `ScheduleSource` (daemon): the runtime's scheduler says what is due; a run due
  while the job's previous run still goes is skipped (logged once, then as a
  count a minute); it keeps the recent failures and how late runs started,
  bounded so that a daemon running for months does not grow.

The loop asks both the same questions and never which one it has.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace
from typing import Container, Protocol

from .config import JobSpec
from .monitoring.observe import NO_OBSERVER, SKIP_MISFIRE, SKIP_OVERLAP, RunObserver
from .runner import JobResult, Outcome
from .scheduler import DueRun

log = logging.getLogger("worker.sources")

KEPT_RESULTS = 10_000     # daemon: the recent failures and lateness figures kept
OVERLAP_LOG_EVERY = 60.0  # seconds between "runs skipped: still going" lines for a job
HELD_POLL = 1.0          # seconds between looks at due runs held while the pauses are unknown


class RunSource(Protocol):
    exhausted: bool         # nothing more will come: the loop ends when idle
    # The loop may claim runs ahead of a free thread (one queued per thread); a
    # stop gives back those that have not begun.
    claims_ahead: bool

    def due(self, runtime, running: Container[str], free_workers: int) -> list[DueRun]: ...

    def seconds_until_next(self, runtime) -> float | None: ...

    def started(self, run: DueRun) -> None: ...

    def record(self, run: DueRun | None, result: JobResult) -> None: ...

    def stop(self) -> None: ...

    def results(self) -> tuple[JobResult, ...]: ...

    def lateness(self) -> tuple[float, ...]: ...


class BatchSource:
    claims_ahead = True

    def __init__(self, jobs: list[JobSpec]) -> None:
        self._pending = deque(jobs)
        self._order = [job.name for job in jobs]
        self._results: dict[str, JobResult] = {}

    @property
    def exhausted(self) -> bool:
        return not self._pending

    def due(self, runtime, running: Container[str], free_workers: int) -> list[DueRun]:
        # Only as many as the loop asks for (one per free thread and one queued
        # behind each): a run holds its host lock from its claim on.
        count = min(free_workers, len(self._pending))
        return [DueRun(self._pending.popleft(), "now", 0.0, 1) for _ in range(count)]

    def seconds_until_next(self, runtime) -> float | None:
        return None

    def started(self, run: DueRun) -> None:
        pass

    def record(self, run: DueRun | None, result: JobResult) -> None:
        self._results[result.job] = result

    def stop(self) -> None:
        self._pending.clear()

    def results(self) -> tuple[JobResult, ...]:
        """Every selected job, in job order; those a stop kept from starting too."""
        return tuple(self._results.get(name) or JobResult(
            name, Outcome.CANCELLED, 0, 0.0, "not started: the worker was stopping")
            for name in self._order)

    def lateness(self) -> tuple[float, ...]:
        return ()


class ScheduleSource:
    exhausted = False
    claims_ahead = False    # due runs are all handed out at once, as they come due

    def __init__(self, observer: RunObserver = NO_OBSERVER) -> None:
        """`observer` hears of the runs skipped here (overlap, misfire)."""
        self._observer = observer
        self._failures: deque[JobResult] = deque(maxlen=KEPT_RESULTS)
        self._lateness: deque[float] = deque(maxlen=KEPT_RESULTS)
        self._worst_lateness = 0.0
        self._overlaps: dict[str, list] = {}   # job -> [skips not yet logged, last log]
        self.last: dict[str, tuple[str, float]] = {}  # job -> (last outcome, when: epoch s)

    def due(self, runtime, running: Container[str], free_workers: int) -> list[DueRun]:
        if not getattr(runtime.paused, "known", True):
            # Cluster start-up: which jobs are paused is not known yet. The due runs
            # stay with the scheduler, as if the loop were busy: they start once the
            # pauses are read (late, coalesced; missed past misfire_grace_time).
            return []
        runs = []
        for run in runtime.scheduler.due():
            if run.job.name in runtime.paused:    # worker.control: skipped, not kept
                continue
            if run.job.name in running:
                self._overlapped(run)
            else:
                runs.append(run)
        for job in runtime.scheduler.take_misfired():
            self._observer.run_skipped(job, SKIP_MISFIRE)
        return runs

    def seconds_until_next(self, runtime) -> float | None:
        if not getattr(runtime.paused, "known", True):
            # Held (see `due`): not a busy loop over runs already due, and a turn
            # of the loop at least this often, in which the pauses are read again
            # (one host: worker.control); in a cluster their first read wakes it.
            return HELD_POLL
        return runtime.scheduler.seconds_until_next()

    def started(self, run: DueRun) -> None:
        self._lateness.append(run.lateness)
        self._worst_lateness = max(self._worst_lateness, run.lateness)
        log.info("job=%s starting the run due at %s (%.3fs late%s)", run.job.name,
                 run.scheduled, run.lateness,
                 f", {run.coalesced} missed runs coalesced" if run.coalesced > 1 else "",
                 extra={"job": run.job.name})

    def record(self, run: DueRun | None, result: JobResult) -> None:
        self.last[result.job] = (result.outcome.value, time.time())
        if not result.ok:   # without its exception: its traceback holds the run's frames
            self._failures.append(replace(result, exception=None))

    def _overlapped(self, run: DueRun) -> None:
        """A run came due while the previous one is still going: skip it. The first
        skip of a job is logged at once, later ones as a count at most once a
        minute (and at stop), so that a job with a tiny interval cannot flood."""
        self._observer.run_skipped(run.job, SKIP_OVERLAP)
        counter = self._overlaps.setdefault(run.job.name, [0, float("-inf")])
        counter[0] += 1
        now = time.monotonic()
        if now - counter[1] < OVERLAP_LOG_EVERY:
            return
        if counter[1] == float("-inf"):
            log.warning("job=%s run due at %s skipped: the previous run is still going",
                        run.job.name, run.scheduled, extra={"job": run.job.name})
        else:
            log.warning("job=%s %d run(s) skipped in the last %.0fs: the previous run "
                        "was still going", run.job.name, counter[0], now - counter[1],
                        extra={"job": run.job.name})
        counter[:] = [0, now]

    def stop(self) -> None:
        for name, (count, _) in self._overlaps.items():
            if count:
                log.warning("job=%s %d more run(s) were skipped because the previous "
                            "run was still going", name, count, extra={"job": name})
        self._overlaps.clear()
        if self._lateness:
            import statistics  # only here, at stop
            log.info("scheduled runs started late by median %.3fs, worst %.3fs",
                     statistics.median(self._lateness), self._worst_lateness)

    def results(self) -> tuple[JobResult, ...]:
        return tuple(self._failures)

    def lateness(self) -> tuple[float, ...]:
        return tuple(self._lateness)
