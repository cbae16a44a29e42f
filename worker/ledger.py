"""How a run is claimed before it starts and recorded when it ends.

One small interface (as APScheduler 4 puts its data stores behind one), two
ledgers:
- `HostLedger`: one host. A run is claimed by taking the job's host lock, so a
  job never runs twice at once on this host, even across processes.
- `ClusterLedger`: several hosts. The host lock first, then the occurrence's row
  in the cluster's run table (so a run claimed is a run started); abandoned runs of
  idempotent jobs are offered again.

The work loop only calls `claim`, `finish`, `release` and `recoverable`; it never
asks which ledger it has.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import tzinfo
from typing import TYPE_CHECKING, Container, Iterable, Protocol

from .config import JobSpec
from .locks import HostLocks, JobLock
from .monitoring.observe import SKIP_CLAIMED_ELSEWHERE, SKIP_CLUSTER_UNREACHABLE, SKIP_LOCK_HELD
from .runner import JobResult
from .scheduler import DueRun, schedule_for

if TYPE_CHECKING:   # worker.cluster is imported only by a config with a cluster section
    from .cluster import Claim, Cluster

log = logging.getLogger("worker.ledger")


@dataclass(frozen=True)
class Ticket:
    """A claimed run: what must be given back when it ends."""
    lock: JobLock | None
    claim: Claim | None = None


@dataclass(frozen=True)
class Refusal:
    """A run not to start. `record`: report it as a skipped run (the batch summary
    shows it); otherwise it is someone else's run and only logged. `failed`: it
    could not be claimed at all (a lock file that cannot be opened): the run
    failed. `kind`: why, as a short label for metrics (monitoring.observe SKIP_*)."""
    reason: str
    record: bool = True
    failed: bool = False
    kind: str = SKIP_LOCK_HELD


class Ledger(Protocol):
    def claim(self, run: DueRun) -> Ticket | Refusal: ...

    def finish(self, ticket: Ticket, result: JobResult) -> None: ...

    def release(self, ticket: Ticket) -> None: ...

    def recoverable(self, jobs: Iterable[JobSpec],
                    running: Container[str]) -> list[DueRun]: ...


class HostLedger:
    def __init__(self, locks: HostLocks) -> None:
        self.locks = locks

    def claim(self, run: DueRun) -> Ticket | Refusal:
        try:
            lock = self.locks.try_acquire(run.job.name)
        except OSError as exc:   # the kernel refused the lock call itself (ENOLCK...)
            return Refusal(f"its host lock cannot be taken: {exc}", failed=True)
        if lock is None:
            return Refusal(f"another run of this job holds its host lock (pid "
                           f"{self.locks.holder(run.job.name)})")
        return Ticket(lock)

    def finish(self, ticket: Ticket, result: JobResult | None) -> None:
        if ticket.lock is not None:
            ticket.lock.release()

    def hold(self, job_name: str):
        """The job's host lock in this ledger's lock file for a run that goes on
        under another one (a reload moved lock_dir): the lock, or None when
        another process holds it there."""
        try:
            return self.locks.try_acquire(job_name)
        except OSError:
            return None

    def release(self, ticket: Ticket) -> None:
        """A run claimed and never started (a stop withdrew it): given back."""
        self.finish(ticket, None)

    def recoverable(self, jobs: Iterable[JobSpec],
                    running: Container[str]) -> list[DueRun]:
        return []


class ClusterLedger(HostLedger):
    def __init__(self, locks: HostLocks, cluster: Cluster, zone: tzinfo) -> None:
        super().__init__(locks)
        self.cluster = cluster
        self.zone = zone
        self._last_recovery = float("-inf")   # not 0: monotonic starts near 0 at boot

    def claim(self, run: DueRun) -> Ticket | Refusal:
        if run.slot is not None and not run.recovering and not self._healthy():
            return Refusal("the cluster's run table is out of reach", record=False,
                           kind=SKIP_CLUSTER_UNREACHABLE)
        ticket = super().claim(run)
        if isinstance(ticket, Refusal):
            return ticket
        from .cluster import ClaimError
        try:
            claim, refusal = self._claim_row(run)
        except ClaimError as exc:   # the job's failure, not another node's run
            claim, refusal = None, Refusal(f"its run could not be claimed: the run table "
                                           f"answered with an error: {exc}", failed=True)
        if claim is None:
            super().finish(ticket, None)
            return refusal
        return Ticket(ticket.lock, claim)

    def _claim_row(self, run: DueRun) -> tuple[Claim | None, Refusal | None]:
        cluster = self.cluster
        if run.recovering is not None:
            claim = cluster.reclaim(run.recovering)
            if claim is not None:
                log.warning("job=%s recovering the abandoned run for the slot at %s "
                            "(idempotent: running it again here)", run.job.name,
                            _wall(run.recovering.slot_ms / 1000),
                            extra={"job": run.job.name})
            return claim, Refusal("taken over by another node", record=False,
                                  kind=SKIP_CLAIMED_ELSEWHERE)
        if run.slot is None:   # a batch run: the occurrence nearest to now
            from .cluster import nearest_slot
            schedule = schedule_for(run.job, self.zone, cluster.clock.now)
            slot_ms = round(nearest_slot(schedule, cluster.clock.now(),
                                         cluster.settings.batch_slot) * 1000)
            claim = cluster.claim(run.job.name, slot_ms)
            return claim, Refusal(f"its run for the slot at {_wall(slot_ms / 1000)} was "
                                  f"claimed by node {cluster.holder(run.job.name, slot_ms)}",
                                  kind=SKIP_CLAIMED_ELSEWHERE)
        claim = cluster.claim(run.job.name, round(run.slot * 1000))
        if claim is None:
            log.debug("job=%s run due at %s: claimed by another node", run.job.name,
                      run.scheduled, extra={"job": run.job.name})
        return claim, Refusal("claimed by another node", record=False,
                              kind=SKIP_CLAIMED_ELSEWHERE)

    def finish(self, ticket: Ticket, result: JobResult | None) -> None:
        super().finish(ticket, result)
        if ticket.claim is not None and result is not None:
            self.cluster.finish(ticket.claim, result.outcome.value, result.attempts,
                                result.error)

    def release(self, ticket: Ticket) -> None:
        super().finish(ticket, None)
        if ticket.claim is not None:
            self.cluster.release(ticket.claim)

    def recoverable(self, jobs: Iterable[JobSpec],
                    running: Container[str]) -> list[DueRun]:
        """Abandoned runs of idempotent jobs not running here, at most once a
        heartbeat."""
        if time.monotonic() - self._last_recovery < self.cluster.settings.heartbeat:
            return []
        self._last_recovery = time.monotonic()
        if not self._healthy():
            return []
        jobs = {job.name: job for job in jobs
                if job.idempotent and job.name not in running}
        runs, taken = [], set()
        for candidate in self.cluster.abandoned_runs(jobs):
            if candidate.job not in taken:     # one run of a job at a time here
                taken.add(candidate.job)
                runs.append(DueRun(jobs[candidate.job], _wall(candidate.slot_ms / 1000),
                                   0.0, 1, candidate.slot_ms / 1000, recovering=candidate))
        return runs

    def _healthy(self) -> bool:
        return self.cluster.check_health()


def _wall(seconds: float) -> str:
    from datetime import datetime
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")
