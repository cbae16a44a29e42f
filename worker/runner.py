"""Run one job: a retry loop around one Session scope per attempt.

Each attempt takes a new Session from the registry, calls fn(session, **kwargs),
commits when it returns, rolls back when it raises, and clears the registry in
`finally`, whatever happened. Only errors the classifier calls transient are
retried, and always by re-running the whole job in a fresh Session: the server
has already rolled back part or all of the failed transaction.

`run_job` never raises for a job's failure: it returns a JobResult.
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable

from tenacity import (RetryCallState, Retrying, retry_if_exception,
                      stop_after_attempt, wait_exponential_jitter)

from .callables import JobFunction
from .config import JobSpec
from .db import Database
from .errors import Diagnosis, Verdict, describe

log = logging.getLogger("worker.runner")


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class JobResult:
    job: str
    outcome: Outcome
    attempts: int
    duration: float              # seconds, all attempts and waits included
    error: str | None = None     # one line: the error of the last attempt

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS


class AttemptFailed(Exception):
    """One attempt's error, with the classifier's verdict on it."""

    def __init__(self, error: BaseException, diagnosis: Diagnosis, during_commit: bool):
        super().__init__(describe(error))
        self.error = error
        self.diagnosis = diagnosis
        self.during_commit = during_commit


def _tag(job: JobSpec, attempt: int) -> str:
    return f"job={job.name} attempt={attempt}/{job.retry.attempts}"


def run_attempt(job: JobSpec, function: JobFunction, database: Database,
                attempt: int = 1) -> None:
    """One attempt in one Session scope; raises AttemptFailed on any error."""
    registry = database.registry
    session = registry()
    during_commit = False
    try:
        function(session, **job.kwargs)
        during_commit = True
        session.commit()
    except Exception as exc:
        _rollback(session, job, attempt)
        diagnosis = database.classify(exc)
        if during_commit and diagnosis.disconnect and diagnosis.verdict is Verdict.RETRY:
            # The COMMIT may or may not have reached the server.
            diagnosis = Diagnosis(Verdict.RETRY_IF_IDEMPOTENT,
                                  diagnosis.reason + " during COMMIT, outcome unknown",
                                  True, diagnosis.sqlstate, diagnosis.native)
        raise AttemptFailed(exc, diagnosis, during_commit) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, then let it go
        _rollback(session, job, attempt)
        raise
    finally:
        _remove(registry, session, job, attempt)


def _rollback(session, job: JobSpec, attempt: int) -> None:
    try:
        session.rollback()
    except Exception as exc:  # the job's own error matters more: log this one
        log.warning("%s rollback failed, invalidating the connection: %s",
                    _tag(job, attempt), describe(exc))
        _invalidate(session, job, attempt)


def _remove(registry, session, job: JobSpec, attempt: int) -> None:
    try:
        registry.remove()
    except Exception as exc:
        log.warning("%s closing the Session failed, invalidating its connection: %s",
                    _tag(job, attempt), describe(exc))
        _invalidate(session, job, attempt)
        registry.registry.clear()  # remove() raised before it could clear


def _invalidate(session, job: JobSpec, attempt: int) -> None:
    try:
        session.invalidate()
    except Exception as exc:
        log.warning("%s invalidating the connection failed too: %s",
                    _tag(job, attempt), describe(exc))


def run_job(job: JobSpec, function: JobFunction, database: Database, *,
            sleep: Callable[[float], None] = time.sleep) -> JobResult:
    """Run a job with its retry policy; never raises for the job's own errors."""
    policy = job.retry
    started = time.monotonic()

    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, AttemptFailed) and exc.diagnosis.should_retry(job.idempotent)

    def log_retry(state: RetryCallState) -> None:
        failure = state.outcome.exception()
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed: %s (%s): %s; retrying in %.2fs",
                    _tag(job, state.attempt_number), failure.diagnosis.reason,
                    failure.diagnosis.codes, failure, wait)

    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.wait_initial, max=policy.wait_max,
                                     jitter=policy.wait_initial),
        retry=retry_if_exception(should_retry),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )
    attempt = 0
    try:
        for attempt_context in retrying:
            with attempt_context:
                attempt = attempt_context.retry_state.attempt_number
                log.debug("%s starting", _tag(job, attempt))
                run_attempt(job, function, database, attempt)
    except AttemptFailed as failure:
        duration = time.monotonic() - started
        diagnosis = failure.diagnosis
        if diagnosis.should_retry(job.idempotent):
            why = "no attempts left"
        elif diagnosis.verdict is Verdict.RETRY_IF_IDEMPOTENT:
            why = "not retried: the job is not marked idempotent"
        else:
            why = "not retried"
        log.error("%s failed: %s (%s): %s; %s", _tag(job, attempt), diagnosis.reason,
                  diagnosis.codes, failure, why)
        log.debug("%s traceback", _tag(job, attempt), exc_info=failure.error)
        return JobResult(job.name, Outcome.FAILED, attempt, duration, str(failure))
    duration = time.monotonic() - started
    log.info("%s succeeded in %.3fs", _tag(job, attempt), duration)
    return JobResult(job.name, Outcome.SUCCESS, attempt, duration)
