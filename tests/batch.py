"""Running jobs in-process the way the product does, for tests that hand it their
own Database and pool: a batch through the real work loop, and a list of tasks."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from worker.app import Runtime
from worker.config import Config, DatabaseSettings, JobSpec, RetryPolicy, WorkerSettings
from worker.ledger import HostLedger
from worker.locks import HostLocks
from worker.loop import STUCK_GRACE, LoopReport, WorkLoop
from worker.sources import BatchSource


def run_batch(jobs: Sequence[JobSpec], functions: Mapping[str, Callable], database,
              pool, *, stuck_grace: float = STUCK_GRACE, lock_dir=None) -> LoopReport:
    """Each job once on `pool` through WorkLoop + BatchSource + HostLedger, as
    `--once` runs them."""
    config = Config(path="<test>", database=DatabaseSettings(url=str(database.url),
                                                             pool_size=pool.max_workers),
                    worker=WorkerSettings(max_workers=pool.max_workers),
                    retry=RetryPolicy(), jobs=tuple(jobs))
    locks = HostLocks(lock_dir, database.settings.url)
    runtime = Runtime(config, functions, tuple(jobs), database, pool, locks, None,
                      HostLedger(locks))
    try:
        return WorkLoop(runtime, BatchSource(list(jobs)), stuck_grace=stuck_grace).run()
    finally:
        locks.close()


def run_all(pool, tasks: Sequence[Callable]) -> list:
    """Run every task on the pool, wait for all, return their results in task order."""
    futures = [pool.submit(task) for task in tasks]
    return [future.result() for future in futures]
