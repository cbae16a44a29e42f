"""One-shot batch: run the selected jobs once on the pool and collect their results.

A job stuck in pure Python past its deadline cannot be stopped from outside (a
thread cannot be killed). It is reported as timed out once it has been overdue for
STUCK_GRACE seconds, and its thread is left to finish: the pool does not reuse it
meanwhile, and the batch does not start that job again.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Mapping, Sequence

from .callables import JobFunction
from .config import JobSpec, format_duration
from .db import Database
from .pool import WorkerPool
from .runner import JobResult, Outcome, RunWatch, run_job

log = logging.getLogger("worker.batch")

STUCK_GRACE = 5.0  # seconds past a deadline before a job that ignores it is given up on


@dataclass(frozen=True)
class BatchResult:
    results: tuple[JobResult, ...]   # in the order the jobs were given
    abandoned: int                   # job threads still running, stuck past a deadline

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)


def run_batch(jobs: Sequence[JobSpec], functions: Mapping[str, JobFunction],
              database: Database, pool: WorkerPool, *, poll: float = 0.1,
              stuck_grace: float = STUCK_GRACE) -> BatchResult:
    watches = {job.name: RunWatch() for job in jobs}
    futures: dict[Future, JobSpec] = {
        pool.submit(lambda job=job: run_job(job, functions[job.name], database,
                                            watch=watches[job.name])): job
        for job in jobs}
    results: dict[str, JobResult] = {}
    abandoned = 0
    while futures:
        done, _ = wait(futures, timeout=poll, return_when=FIRST_COMPLETED)
        for future in done:
            results[futures.pop(future).name] = future.result()
        now = time.monotonic()
        for future, job in list(futures.items()):
            watch = watches[job.name]
            if watch.overdue_since is not None and now - watch.overdue_since > stuck_grace:
                del futures[future]
                abandoned += 1
                message = (f"still running {now - watch.overdue_since:.1f}s past its "
                           f"deadline of {format_duration(job.timeout)}, outside any "
                           f"database call; its thread is left to finish")
                log.error("job=%s attempt=%d/%d timed out: %s", job.name, watch.attempt,
                          job.retry.attempts, message)
                results[job.name] = JobResult(job.name, Outcome.TIMEOUT, watch.attempt,
                                              now - watch.started, message)
    return BatchResult(tuple(results[job.name] for job in jobs), abandoned)
