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
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from .callables import JobFunction
from .config import JobSpec, format_duration
from .db import Database, Session, failed_before_first_statement
from .deadlines import Deadline, DeadlineExceeded, RunWatch
from .errors import Diagnosis, Verdict, describe
from .logs import flush_logs, job_fields
from .monitoring.observe import NO_OBSERVER, RunObserver, retry_label

if TYPE_CHECKING:
    from tenacity import RetryCallState

log = logging.getLogger("worker.runner")


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"   # stopped by a shutdown
    SKIPPED = "skipped"       # not run: another run of the job held its lock


@dataclass(frozen=True)
class JobResult:
    job: str
    outcome: Outcome
    attempts: int
    duration: float              # seconds, all attempts and waits included
    error: str | None = None     # one line: the error of the last attempt
    run_id: str | None = None    # the run's id: the same for its on_start and end hooks
    # A failure's exception object (for a hook: Sentry wants the stack trace); not
    # kept beyond the hooks (worker.sources drops it).
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS


class AttemptFailed(Exception):
    """One attempt's error, with the classifier's verdict on it."""

    def __init__(self, error: BaseException, diagnosis: Diagnosis, during_commit: bool,
                 timed_out: bool = False):
        super().__init__(describe(error))
        self.error = error
        self.diagnosis = diagnosis
        self.during_commit = during_commit
        self.timed_out = timed_out

    def should_retry(self, job: JobSpec) -> bool:
        if self.timed_out:
            return job.retry.on_timeout
        return self.diagnosis.should_retry(job.idempotent)


class AttemptTimedOut(Exception):
    """The attempt's deadline passed."""


class Cancelled(Exception):
    """The worker is stopping: no new attempt, no new statement."""


def _tag(job: JobSpec, attempt: int) -> str:
    return f"job={job.name} attempt={attempt}/{job.retry.attempts}"


def _fields(job: JobSpec, attempt: int) -> dict:
    return job_fields(job.name, attempt, job.retry.attempts)


def run_attempt(job: JobSpec, function: JobFunction, database: Database,
                attempt: int = 1, watch: RunWatch | None = None) -> None:
    """One attempt in one Session scope; raises AttemptFailed on any error."""
    if job.timeout is None:
        _run_in_session(job, function, database, attempt, None, watch)
        return
    with Deadline(job.timeout, database.statements, watch or RunWatch(),
                  _tag(job, attempt), _fields(job, attempt)) as deadline:
        _run_in_session(job, function, database, attempt, deadline, watch)


def _run_in_session(job: JobSpec, function: JobFunction, database: Database,
                    attempt: int, deadline: Deadline | None,
                    watch: RunWatch | None) -> None:
    registry = database.registry
    session = registry()
    during_commit = False
    try:
        _call(function, session, job, attempt)
        if deadline is not None and deadline.expired.is_set():
            # Too late: what the job did is rolled back, not committed.
            raise AttemptTimedOut(f"returned after its deadline of "
                                  f"{format_duration(job.timeout)}")
        if watch is not None and watch.cancelled.is_set():
            # A stop cancelled it while it was busy in Python: nothing is committed.
            raise Cancelled("the worker is stopping; returned after being cancelled")
        session.flush()        # a failure here cannot have committed anything
        database.refuse_aborted_commit(session)
        during_commit = True
        session.commit()
    except BaseException as exc:
        # BaseException too: a job's SystemExit or KeyboardInterrupt is that job's
        # failure, never the worker's exit (signals reach the main thread only, so
        # in a job thread these come from the job's own code).
        # Whose deadline: read before the rollback's round trip, so an error that
        # arrived before our timer fired (PostgreSQL's own statement_timeout, also
        # 57014) is not ours; DeadlineExceeded is ours even before the timer's
        # thread has set its flag.
        deadline_passed = deadline is not None and (
            deadline.expired.is_set() or isinstance(exc, DeadlineExceeded))
        _rollback(session, job, attempt)
        if deadline_passed and not during_commit:
            timeout = Diagnosis(Verdict.NEVER, f"deadline of {format_duration(job.timeout)} "
                                               f"passed")
            raise AttemptFailed(exc, timeout, during_commit, timed_out=True) from exc
        diagnosis = database.classify(exc)
        if diagnosis.verdict is not Verdict.RETRY and not diagnosis.permanent and \
                failed_before_first_statement(session, exc) and not isinstance(
                    exc, (Cancelled, AttemptTimedOut, DeadlineExceeded)):
            # Nothing of the job ran: whatever broke the connection on its way in
            # (ResourceClosedError in first-connect initialisation through
            # Microsoft's driver) is a connect failure, retried like one.
            diagnosis = replace(diagnosis, verdict=Verdict.RETRY, disconnect=True,
                                reason="failed while connecting, before the job's first "
                                       f"statement ({diagnosis.reason})")
        if during_commit and diagnosis.disconnect and diagnosis.verdict is Verdict.RETRY:
            # The COMMIT may or may not have reached the server.
            diagnosis = replace(diagnosis, verdict=Verdict.RETRY_IF_IDEMPOTENT,
                                reason=diagnosis.reason + " during COMMIT, outcome unknown")
        raise AttemptFailed(exc, diagnosis, during_commit) from exc
    finally:
        if getattr(session, "was_closed", False):
            _closed_by_job(job, attempt)
        _remove(registry, session, job, attempt)


def _call(function: JobFunction, session, job: JobSpec, attempt: int) -> None:
    """The job's function. A process it forked that comes back here (returned or
    raised) ends at once: it must not commit, roll back or close the parent's
    connection, nor go on as a second worker."""
    pid = os.getpid()
    try:
        function(session, **job.kwargs)
    except BaseException as exc:
        if os.getpid() != pid:
            _end_forked_child(job, attempt, exc)
        raise
    if os.getpid() != pid:
        _end_forked_child(job, attempt, None)


def _end_forked_child(job: JobSpec, attempt: int, error: BaseException | None) -> None:
    if error is None:
        status = 0
    elif isinstance(error, SystemExit):
        status = error.code if isinstance(error.code, int) else 1
    else:
        status = 1
    log.warning("%s: a process the job forked (pid %d) returned into the worker; it "
                "exits here with status %d (end a forked child with os._exit())",
                _tag(job, attempt), os.getpid(), status, extra=_fields(job, attempt))
    flush_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _closed_by_job(job: JobSpec, attempt: int) -> None:
    # close() rolls back: whatever the job had not committed is gone. Its choice,
    # but never a silent one.
    log.warning("%s closed its Session itself: whatever it had not committed before "
                "that was rolled back and is lost (let the worker commit when the job "
                "returns, or commit before closing)", _tag(job, attempt),
                extra=_fields(job, attempt))


def _rollback(session, job: JobSpec, attempt: int) -> None:
    try:
        session.rollback()
    except Exception as exc:  # the job's own error matters more: log this one
        log.warning("%s rollback failed, invalidating the connection: %s",
                    _tag(job, attempt), describe(exc), extra=_fields(job, attempt))
        _invalidate(session, job, attempt)


def _remove(registry, session, job: JobSpec, attempt: int) -> None:
    try:
        registry.remove()
    except Exception as exc:
        log.warning("%s closing the Session failed, invalidating its connection: %s",
                    _tag(job, attempt), describe(exc), extra=_fields(job, attempt))
        _invalidate(session, job, attempt)
        registry.registry.clear()  # remove() raised before it could clear


def _invalidate(session, job: JobSpec, attempt: int) -> None:
    try:
        session.invalidate()
    except Exception as exc:
        log.warning("%s invalidating the connection failed too: %s",
                    _tag(job, attempt), describe(exc), extra=_fields(job, attempt))


class FailureStreaks:
    """How many runs of each job have failed in a row, so that a job failing every
    few seconds logs its traceback once per streak, not once per run (a job
    failing every 8 s logged 1,271 lines in 2 minutes); and which error the
    streak's traceback showed, so that a different one is shown too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._shown: dict[str, tuple] = {}   # job -> the error whose traceback was logged

    def failed(self, job: str, error: tuple = ()) -> int:
        """This failure's place in the job's streak (1: the first), or 1 again when
        `error` (its type and where it was raised) is not the one last shown."""
        with self._lock:
            count = self._counts.get(job, 0) + 1
            if self._shown.get(job, error) != error:
                count = 1
            self._counts[job] = count
            self._shown[job] = error
            return count

    def succeeded(self, job: str) -> None:
        if job not in self._counts:
            # No streak (the common case): nothing to clear, and no lock to take.
            # Only a run of this job adds one, and this run is its only one here.
            return
        with self._lock:
            self._counts.pop(job, None)
            self._shown.pop(job, None)


def run_job(job: JobSpec, function: JobFunction, database: Database, *,
            sleep: Callable[[float], None] = time.sleep,
            watch: RunWatch | None = None,
            observer: RunObserver = NO_OBSERVER,
            streaks: FailureStreaks | None = None) -> JobResult:
    """Run a job with its retry policy; never raises for the job's own errors.
    `observer` hears of each retry (attempt_retried); `streaks` (the daemon's, kept
    across runs) decides whether a failure's traceback is logged again."""
    watch = watch or RunWatch()
    watch.thread = threading.get_ident()
    watch.tracker = database.statements
    previous = Session.enter_job(database.registry)
    try:
        result = _run_job(job, function, database, sleep, watch, observer,
                          streaks or FailureStreaks())
        if result.outcome is Outcome.SUCCESS and streaks is not None:
            streaks.succeeded(job.name)
        return result
    finally:
        Session.leave_job(previous)
        database.statements.forget(watch.thread)


def _run_job(job: JobSpec, function: JobFunction, database: Database,
             sleep: Callable[[float], None], watch: RunWatch,
             observer: RunObserver, streaks: FailureStreaks) -> JobResult:
    started = watch.started = time.monotonic()
    # The first attempt runs straight away; the retry machinery (tenacity) is only
    # built when it fails with something worth retrying: most jobs never need it.
    watch.attempt = attempt = 1
    try:
        if watch.cancelled.is_set():
            raise AttemptFailed(Cancelled("the worker is stopping"),
                                Diagnosis(Verdict.NEVER, "cancelled"), False)
        run_attempt(job, function, database, 1, watch)
    except AttemptFailed as failure:
        if job.retry.attempts == 1 or not failure.should_retry(job) or \
                watch.cancelled.is_set():
            return _failed(job, 1, failure, started, watch, streaks)
        try:
            attempt = _retry(job, function, database, sleep, watch, failure, observer)
        except AttemptFailed as last:
            return _failed(job, watch.attempt, last, started, watch, streaks)
    duration = time.monotonic() - started
    if log.isEnabledFor(logging.INFO):   # its fields built only for a line written
        log.info("job=%s attempt=%d/%d succeeded in %.3fs", job.name, attempt,
                 job.retry.attempts, duration, extra=_fields(job, attempt))
    return JobResult(job.name, Outcome.SUCCESS, attempt, duration)


def _retry(job: JobSpec, function: JobFunction, database: Database,
           sleep: Callable[[float], None], watch: RunWatch,
           first_failure: AttemptFailed, observer: RunObserver = NO_OBSERVER) -> int:
    """Attempts 2..n under tenacity; attempt 1 replays the failure already seen, so
    that tenacity decides, waits and logs for every retry alike. Returns the
    attempt that succeeded; raises the last AttemptFailed."""
    # Imported here: only a run whose first attempt failed needs tenacity.
    from tenacity import (Retrying, retry_if_exception, stop_after_attempt,
                          stop_when_event_set, wait_exponential_jitter)
    policy = job.retry

    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, AttemptFailed) and exc.should_retry(job)

    def log_retry(state: RetryCallState) -> None:
        failure = state.outcome.exception()
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed: %s (%s): %s; retrying in %.2fs",
                    _tag(job, state.attempt_number), failure.diagnosis.reason,
                    failure.diagnosis.codes, failure, wait,
                    extra=_fields(job, state.attempt_number))
        diagnosis = failure.diagnosis
        observer.attempt_retried(job, state.attempt_number, retry_label(
            diagnosis.reason, diagnosis.disconnect, failure.timed_out))

    def wait_or_stop(seconds: float) -> None:
        watch.cancelled.wait(seconds)        # a shutdown cuts the wait short

    backoff = wait_exponential_jitter(multiplier=policy.wait_initial, max=policy.wait_max,
                                      jitter=policy.wait_initial)

    def wait(state: RetryCallState) -> float:
        failure = state.outcome.exception()
        floor = failure.diagnosis.min_wait if isinstance(failure, AttemptFailed) else 0.0
        return max(backoff(state), floor)

    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts) | stop_when_event_set(watch.cancelled),
        wait=wait,
        retry=retry_if_exception(should_retry),
        before_sleep=log_retry,
        sleep=wait_or_stop if sleep is time.sleep else sleep,
        reraise=True,
    )
    attempt = 1
    for attempt_context in retrying:
        with attempt_context:
            attempt = watch.attempt = attempt_context.retry_state.attempt_number
            if attempt == 1:
                raise first_failure
            if watch.cancelled.is_set():
                raise AttemptFailed(Cancelled("the worker is stopping"),
                                    Diagnosis(Verdict.NEVER, "cancelled"), False)
            log.debug("%s starting", _tag(job, attempt), extra=_fields(job, attempt))
            run_attempt(job, function, database, attempt, watch)
    return attempt


def _failed(job: JobSpec, attempt: int, failure: AttemptFailed, started: float,
            watch: RunWatch, streaks: FailureStreaks) -> JobResult:
    """The result, and the log line, for a run whose last attempt failed."""
    duration = time.monotonic() - started
    diagnosis = failure.diagnosis
    if watch.cancelled.is_set():
        log.error("%s cancelled: the worker is stopping (%s)", _tag(job, attempt), failure,
                  extra=_fields(job, attempt))
        return JobResult(job.name, Outcome.CANCELLED, attempt, duration, str(failure))
    if failure.timed_out:
        # Reported at ERROR once: by the loop when it gave up on a stuck run, else here.
        log.log(logging.WARNING if watch.given_up else logging.ERROR,
                "%s timed out: %s: %s; %s%s", _tag(job, attempt), diagnosis.reason,
                failure, "no attempts left" if failure.should_retry(job)
                else "not retried (set retry.on_timeout to retry)",
                f"; its thread returned {duration:.1f}s after the run started (reported "
                f"stuck before)" if watch.given_up else "", extra=_fields(job, attempt))
        return JobResult(job.name, Outcome.TIMEOUT, attempt, duration, str(failure),
                         exception=failure.error)
    if failure.should_retry(job):
        why = "no attempts left"
    elif diagnosis.verdict is Verdict.RETRY_IF_IDEMPOTENT:
        why = "not retried: the job is not marked idempotent"
    else:
        why = "not retried"
    log.error("%s failed: %s (%s): %s; %s", _tag(job, attempt), diagnosis.reason,
              diagnosis.codes, failure, why, extra=_fields(job, attempt))
    # At INFO, once per streak of failed runs: where in the job's code it failed.
    streak = streaks.failed(job.name, _error_kind(failure.error))
    if streak == 1:
        log.info("%s traceback of the last attempt", _tag(job, attempt),
                 exc_info=failure.error, extra=_fields(job, attempt))
    else:
        log.info("%s failed %d runs in a row; traceback as logged at the first of "
                 "them, not repeated", _tag(job, attempt), streak,
                 extra=_fields(job, attempt))
    return JobResult(job.name, Outcome.FAILED, attempt, duration, str(failure),
                     exception=failure.error)


def _error_kind(error: BaseException) -> tuple:
    """An error's type and the place it was raised: another kind in a streak of
    failures is another bug, whose traceback is logged too."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = (frame.tb_frame.f_code.co_filename, frame.tb_lineno) if frame else None
    return type(error), where
