"""The work loop: start due runs, collect finished ones, stop. One loop for every
way of running, as in rq.

It is given a run source (a batch, or the schedule: worker.sources) and a runtime
whose ledger claims and finishes runs (host locks, or the cluster's run table:
worker.ledger); it never asks which. The loop thread only decides and watches;
the pool's threads run the jobs, and a finished run is handed back through a
queue (as dramatiq splits fetching work from running it). Shape: run / loop /
shutdown with cleanup in `finally` (as in huey). It always logs why it stopped.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .config import format_duration
from .deadlines import RunWatch
from .errors import describe
from .ledger import Refusal, Ticket
from .monitoring.observe import NO_OBSERVER, RunObserver
from .runner import FailureStreaks, JobResult, Outcome, run_job
from .scheduler import DueRun
from .sources import RunSource
from .systemd import Notifier

log = logging.getLogger("worker.loop")

STUCK_GRACE = 5.0     # seconds past a deadline before a job ignoring it is given up on
CANCEL_GRACE = 5.0    # seconds a cancelled job gets to roll back before exit
MAX_SLEEP = 1.0       # the loop wakes at least this often (signals, watchdog, stuck jobs)
STUCK_CHECK_EVERY = 0.25  # seconds between looks for runs stuck past their deadline
QUEUED_PER_THREAD = 1     # batch runs claimed ahead of a free thread, per thread


@dataclass
class _Running:
    run: DueRun
    future: Future
    watch: RunWatch
    runtime: object                 # the worker.app.Runtime it started on
    ticket: Ticket
    reported: bool = False          # already reported as stuck past its deadline
    # The job's locks in lock files a reload moved to while it ran: (locks, lock).
    held: list = field(default_factory=list)


@dataclass(frozen=True)
class LoopReport:
    results: tuple[JobResult, ...]  # burst: in job order; daemon: the runs that failed
    reason: str                     # why the loop stopped
    runs: int = 0                   # runs finished
    cancelled: int = 0              # runs cancelled by the stop
    abandoned: int = 0              # threads still stuck in a job at exit
    abandoned_jobs: tuple[str, ...] = ()  # the jobs those threads are in
    lateness: tuple[float, ...] = ()  # daemon: how late the last 10,000 runs started (s)
    stop_signal: int | None = None  # the signal that stopped the loop, if one did
    unwritten: tuple[str, ...] = ()  # cluster: jobs whose run's end could not be written
    unavailable: str | None = None  # cluster --once: why the run table could not be used

    @property
    def ok(self) -> bool:
        return all(r.ok or r.outcome is Outcome.SKIPPED for r in self.results) \
            and not self.cancelled and not self.unwritten and self.unavailable is None


class Waker:
    """How the loop thread is woken: a pipe it waits on. Job threads write a byte
    when a run ends; the interpreter writes the number of a signal to it (the
    signal wakeup fd). A write takes no lock, so a signal handler could do it too.

    One byte per wait is enough: a wake while an earlier one has not yet been
    taken by `wait` writes nothing (`_pending`). A write per finished run cost the
    job threads a system call each, which hands the GIL over, and woke the loop
    thread to fight for it once per run: about 160 µs of CPU per run in a
    30,000-job SQLite batch (16.0 against 11.2 CPU s). `wait` clears the flag only
    after draining the pipe, so a wake that found it set came before the drain and
    its caller's news (queued before it calls wake) is seen by the turn that
    follows; a wake after the clear writes again."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Closed only once nothing can write to it any more: a job thread's callback
        # and an installed signal handler both keep the loop, hence this, alive.
        weakref.finalize(self, _close_pipe, self.read_fd, self.write_fd)
        self._poll = select.poll()
        self._poll.register(self.read_fd, select.POLLIN)
        self._pending = False       # a byte was written that no wait has taken yet

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        try:
            os.write(self.write_fd, b"\0")
        except OSError:     # full (the loop wakes anyway), or closed: nobody waits
            pass

    def wait(self, timeout: float) -> None:
        """Until a wake, or `timeout` seconds; what woke it is drained."""
        # poll, not select: select cannot watch an fd numbered above 1023.
        if self._poll.poll(max(0.0, timeout) * 1000):
            try:
                while os.read(self.read_fd, 4096):
                    pass
            except BlockingIOError:
                pass
        # After the drain, never before: see the class's docstring.
        self._pending = False


def _close_pipe(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


@dataclass
class _StopState:
    requested: bool = False
    signal: int | None = None
    forced: bool = False
    since: float | None = None
    cancelled_at: float | None = None


class WorkLoop:
    def __init__(self, runtime, source: RunSource, *,
                 notifier: Notifier | None = None,
                 reload: Callable[[object], object] | None = None,
                 observer: RunObserver = NO_OBSERVER,
                 stuck_grace: float = STUCK_GRACE,
                 cancel_grace: float = CANCEL_GRACE) -> None:
        """`runtime`: a worker.app.Runtime. `reload(current)`: builds the runtime
        that replaces `current` (any exception rejects the reload). `observer`
        hears what happens (monitoring.observe); the loop never asks who listens."""
        self.runtime = runtime
        self.source = source
        self.notifier = notifier or Notifier({})
        self.observer = observer
        self._reload = reload
        self.stuck_grace = stuck_grace
        self.cancel_grace = cancel_grace
        self._running: dict[str, _Running] = {}
        self._finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._retired: list = []          # replaced runtimes with runs still going
        self._waker = Waker()
        self._signals: list[int] = []     # received, not yet acted on (signal_received)
        self._streaks = FailureStreaks()    # kept across reloads, like the job names
        self._stop = _StopState()
        self._reload_requested = False
        self._runs = self._cancelled = 0
        self._run_ids = RunIds()
        self._last_watchdog = float("-inf")    # not 0: monotonic starts near 0 at boot
        self._last_stuck_check = float("-inf")
        # Called with the loop on each turn, on the loop thread (daemon: the control
        # socket's answers, the cluster commands: worker.control, control_cluster).
        self.on_turn: list[Callable[["WorkLoop"], None]] = []

    # --- signals, and requests from other threads ---------------------------------

    @property
    def wakeup_fd(self) -> int:
        """The fd the interpreter writes a signal's number to (signal.set_wakeup_fd)."""
        return self._waker.write_fd

    def signal_received(self, signum: int, _frame=None) -> None:
        """The signal handler: records the signal and nothing else (a list append
        takes no lock); the wakeup fd has already woken the loop, which acts on it
        (`_take_signals`)."""
        self._signals.append(signum)

    def _take_signals(self) -> None:
        """On the loop thread: log and act on the signals received since last time."""
        if not self._signals:
            return
        received, self._signals = self._signals, []
        for signum in received:
            if signum == signal.SIGHUP and self._reload is None:
                log.info("received SIGHUP: ignored (a batch does not reload its "
                         "configuration)")
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading the configuration")
                self._reload_requested = True
            else:
                log.info("received %s", signal.Signals(signum).name)
                self.request_stop(signum)

    def request_stop(self, signum: int | None = None) -> None:
        if self._stop.requested:
            self._stop.forced = True      # a second signal skips the wait
        else:
            self._stop.signal = signum
        self._stop.requested = True
        self._waker.wake()

    def wake(self) -> None:
        """From another thread: the loop turns now (a control command waits)."""
        self._waker.wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._waker.wake()

    @property
    def stop_requested(self) -> bool:
        self._take_signals()
        return self._stop.requested

    @property
    def stopping(self) -> bool:
        """From any thread: a stop was acted on (signals are the loop thread's to take)."""
        return self._stop.requested

    def pause(self, seconds: float) -> None:
        """Wait, but wake up at once for a signal (the watchdog pinged meanwhile)."""
        self._waker.wait(seconds)
        self._take_signals()
        self._ping_watchdog()

    # --- the loop ----------------------------------------------------------------

    def run(self) -> LoopReport:
        reason = "?"
        try:
            reason = self._loop()
        finally:
            abandoned = self._abandon_unfinished()
        log.info("work loop stopped: %s (%d run(s) finished, %d cancelled, %d abandoned)",
                 reason, self._runs, self._cancelled, len(abandoned))
        return LoopReport(self.source.results(), reason, self._runs, self._cancelled,
                          len(abandoned), tuple(abandoned), self.source.lateness(),
                          self._stop.signal)

    def _abandon_unfinished(self) -> list[str]:
        """The jobs whose thread is still in the job at exit: reported as cancelled
        (if not already reported as stuck), so that a summary lists every job."""
        self._collect()
        abandoned = []
        for running in self._running.values():
            if running.future.done():
                continue
            abandoned.append(running.run.job.name)
            if not running.reported:
                running.reported = True
                self._record(running.run, JobResult(
                    running.run.job.name, Outcome.CANCELLED, running.watch.attempt,
                    time.monotonic() - running.watch.started,
                    "still running when the worker stopped; its thread was abandoned"))
        return abandoned

    def _loop(self) -> str:
        self.observer.runtime_changed(self.runtime)
        while True:
            self.observer.tick()
            self._take_signals()
            self._collect()
            for duty in self.on_turn:
                duty(self)
            if self._stop.requested:
                reason = self._stopping()
                if reason is not None:
                    return reason
            else:
                if self._reload_requested:
                    self._do_reload()
                self._start_due()
                if self.source.exhausted and not self._active():
                    return "every job ran once"
            self._ping_watchdog()
            self._sleep()

    def _sleep(self) -> None:
        timeout = MAX_SLEEP
        if not self._stop.requested:
            until = self.source.seconds_until_next(self.runtime)
            if until is not None:
                timeout = min(timeout, until)
        if self.notifier.watchdog_interval:
            timeout = min(timeout, self.notifier.watchdog_interval)
        if any(r.watch.overdue_since is not None for r in self._overdue_candidates()):
            timeout = min(timeout, STUCK_CHECK_EVERY)
        self._waker.wait(timeout)

    # --- starting runs -----------------------------------------------------------------

    def _start_due(self) -> None:
        runtime = self.runtime
        # Runs a source may hand out: one queued behind each usable thread, so that a
        # thread coming free starts the next run at once instead of waiting for this
        # thread to wake up and claim it (3,000-job batch, 4 workers: the job threads
        # sat idle 32% of the time, 1% with one run queued). A run stuck past its
        # deadline does not count: the pool put a new thread in its place.
        stuck = sum(r.reported for r in self._running.values()) if self._running else 0
        ahead = QUEUED_PER_THREAD if self.source.claims_ahead else 0
        free = (1 + ahead) * runtime.pool.max_workers - (len(self._running) - stuck)
        for run in self.source.due(runtime, self._running, max(0, free)):
            self._start(run)
        paused = runtime.paused
        if not getattr(paused, "known", True):
            return      # which jobs are paused is not known yet (worker.control)
        # A paused job's abandoned runs are not taken over either (a recovery is a
        # run started): they wait for the resume, in the run table.
        jobs = [job for job in runtime.jobs if job.name not in paused] if paused \
            else runtime.jobs
        for run in runtime.ledger.recoverable(jobs, self._running):
            self._start(run)

    def _start(self, run: DueRun) -> None:
        runtime = self.runtime
        ticket = runtime.ledger.claim(run)
        if isinstance(ticket, Refusal):
            if not ticket.failed:
                self.observer.run_skipped(run.job, ticket.kind)
            if ticket.record:
                outcome = Outcome.FAILED if ticket.failed else Outcome.SKIPPED
                log.warning("job=%s %s: %s", run.job.name, outcome.value, ticket.reason,
                            extra={"job": run.job.name})
                self._record(run, JobResult(run.job.name, outcome, 0, 0.0, ticket.reason))
            return
        run = with_changes(run, run_id=self._run_ids())  # its hooks' shared run_id
        self.source.started(run)
        self.observer.run_started(run, runtime)
        name = run.job.name
        watch = RunWatch()
        future = runtime.pool.submit(run_job, run.job, runtime.functions[name],
                                     runtime.database, watch=watch,
                                     observer=self.observer, streaks=self._streaks)
        self._running[name] = _Running(run, future, watch, runtime, ticket)
        future.add_done_callback(lambda _, name=name: self._finish_signal(name))

    def start_now(self, job, slot: float | None = None) -> bool:
        """A run of `job` now, off its schedule (--run-now; in cluster mode with the
        run table `slot` of its request): False when it has a run in progress, its
        lock or slot is held elsewhere, or the loop is stopping."""
        if job.name in self._running or self._stop.requested:
            return False
        self._start(DueRun(job, "now", 0.0, 1, slot, kind="run_now"))
        return job.name in self._running

    def running_jobs(self) -> set[str]:
        return set(self._running)

    def _finish_signal(self, name: str) -> None:
        self._finished.put(name)
        self._waker.wake()

    # --- watching runs ------------------------------------------------------------

    def _active(self) -> bool:
        return any(not r.reported for r in self._running.values())

    def _collect(self) -> None:
        while True:
            try:
                name = self._finished.get_nowait()
            except queue.Empty:
                break
            running = self._running.get(name)
            if running is None or not running.future.done():
                continue
            del self._running[name]
            result = _result_of(running)
            self.observer.run_returned(running.run, result)
            try:
                if running.future.cancelled():   # claimed ahead, never started
                    running.runtime.ledger.release(running.ticket)
                    self._not_started(running.run)
                else:
                    running.runtime.ledger.finish(running.ticket, result)
            except Exception as exc:  # recording must never stop the loop
                log.error("job=%s could not record the end of its run: %s", name,
                          describe(exc), extra={"job": name})
            for locks, lock in running.held:
                lock.release()
                self.runtime.owner.release(locks)
            if not running.reported:
                self._record(running.run, result)
            self._retire_unused()
        self._report_stuck()

    @staticmethod
    def _not_started(run: DueRun) -> None:
        """A scheduled occurrence whose run was waiting for a thread when the stop
        cancelled it: said by name, with its occurrence. It was claimed here, so no
        other node ran it: only the count in "work loop stopped" told of it (a
        2-node chaos run, seed 9403: four occurrences lost without a line)."""
        if run.slot is None:
            return      # a batch run: the summary lists it as not started
        log.warning("job=%s run due at %s not started: the worker was stopping (it was "
                    "waiting for a free thread); that occurrence does not run",
                    run.job.name, run.scheduled, extra={"job": run.job.name})

    def _overdue_candidates(self):
        return (r for r in self._running.values() if not r.reported)

    def _report_stuck(self) -> None:
        now = time.monotonic()
        if now - self._last_stuck_check < STUCK_CHECK_EVERY:
            return
        self._last_stuck_check = now
        for running in self._overdue_candidates():
            stuck = running.watch.stuck_for(now)
            if stuck is None or stuck <= self.stuck_grace:
                continue
            running.reported = True     # stays in _running: no overlapping run
            running.runtime.pool.abandon(running.future)  # a new thread in its place
            running.watch.given_up = True   # its thread's own end is no news then
            self.observer.run_stuck(running.run)
            job = running.run.job
            message = (f"still running {stuck:.1f}s past its deadline of "
                       f"{format_duration(job.timeout)}, outside any database "
                       f"call; its thread is left to finish")
            log.error("job=%s attempt=%d/%d timed out: %s", job.name, running.watch.attempt,
                      job.retry.attempts, message,
                      extra={"job": job.name, "attempt": running.watch.attempt,
                             "attempts": job.retry.attempts})
            self._record(running.run, JobResult(job.name, Outcome.TIMEOUT,
                                                running.watch.attempt,
                                                now - running.watch.started, message))

    def _record(self, run: DueRun, result: JobResult) -> None:
        if run.run_id is not None:
            result = with_changes(result, run_id=run.run_id)
        self._runs += result.outcome is not Outcome.SKIPPED
        self._cancelled += result.outcome is Outcome.CANCELLED
        self.source.record(run, result)
        if result.outcome is not Outcome.SKIPPED:   # skips went to run_skipped
            self.observer.run_finished(run, result)

    # --- stopping ------------------------------------------------------------------

    def _stopping(self) -> str | None:
        """One pass of a stop: None while it goes on, else why the loop ends."""
        stop = self._stop
        if stop.since is None:
            self._begin_stop()
        if not self._active():
            return "stop requested; every job finished" if not self._cancelled \
                else "stop requested; running jobs were cancelled"
        now = time.monotonic()
        if stop.cancelled_at is None and (
                stop.forced or now - stop.since > self._shutdown_timeout()):
            self._cancel_running()
        if stop.cancelled_at is not None and now - stop.cancelled_at > self.cancel_grace:
            return "stop requested; some jobs did not end after being cancelled"
        return None

    def _shutdown_timeout(self) -> float:
        return self.runtime.config.worker.shutdown_timeout

    def _begin_stop(self) -> None:
        self._stop.since = time.monotonic()
        self.observer.stopping()
        self.source.stop()
        if self.source.claims_ahead:
            self._withdraw_queued()
        running = [name for name, r in self._running.items()
                   if not r.reported and not r.future.cancelled()]
        log.info("stopping: no new runs; waiting up to %s for %d running job(s)%s",
                 format_duration(self._shutdown_timeout()), len(running),
                 f": {', '.join(running)}" if running else "")
        self.notifier.stopping(f"stopping: waiting for {len(running)} job(s)")

    def _withdraw_queued(self) -> None:
        """A stop starts nothing new: runs claimed ahead of a free thread that have
        not begun are cancelled at once (collected as "not started: the worker was
        stopping", like the runs never handed out; their claims released: host lock
        given back, run-table row deleted), as they would have been had they not
        been claimed ahead."""
        for running in self._running.values():
            running.future.cancel()

    def _cancel_running(self) -> None:
        self._stop.cancelled_at = time.monotonic()
        why = "a second stop signal" if self._stop.forced else \
            f"shutdown_timeout {format_duration(self._shutdown_timeout())}"
        for name, running in self._running.items():
            if running.future.cancel():      # queued, never started
                continue
            statement = running.watch.cancel()
            job = running.run.job
            log.warning("job=%s attempt=%d/%d cancelled after %s: %s", name,
                        running.watch.attempt, job.retry.attempts, why,
                        "its statement is being cancelled" if statement
                        else "it stops at its next statement",
                        extra={"job": name, "attempt": running.watch.attempt,
                               "attempts": job.retry.attempts})
        self._waker.wake()

    def running_runtimes(self) -> list:
        """Every runtime still in use: the current one and replaced ones with runs."""
        return [self.runtime] + self._retired

    # --- reloading ----------------------------------------------------------------------

    def _do_reload(self) -> None:
        self._reload_requested = False
        if self._reload is None:
            return
        self.notifier.reloading()
        old = self.runtime
        try:
            new = self._reload(old)
        except Exception as exc:  # of any kind: the running configuration stays
            log.error("reload rejected, the running configuration stays: %s",
                      describe(exc) if not _is_config_error(exc) else exc)
            self.observer.reload("rejected")
            self.notifier.ready("running; the last reload was rejected")
            return
        before = {job.name: job for job in old.jobs}
        after = {job.name: job for job in new.jobs}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(n for n in after.keys() & before.keys() if after[n] != before[n])
        self.runtime = new
        self._hold_in_new_lock_file(new)
        self.observer.reload("applied")
        self.observer.runtime_changed(new)
        self._retired.append(old)
        self._retire_unused()
        log.info("reloaded %s: added %s, removed %s, changed %s", new.config.path,
                 added or "none", removed or "none", changed or "none")
        self.notifier.ready("running; configuration reloaded")

    def _hold_in_new_lock_file(self, new) -> None:
        """A reload that moved the lock file: each run in flight keeps its lock in
        the old one and takes its job's lock in the new one too, so that a --once
        started with the new configuration sees the run (and the new file stays
        open while the run holds a lock in it)."""
        for name, running in self._running.items():
            if running.runtime.locks.path == new.locks.path or \
                    any(locks is new.locks for locks, _ in running.held):
                continue            # the same file: the run's own lock is in it
            lock = new.ledger.hold(name)
            if lock is None:
                log.warning("job=%s another process holds its host lock in the new lock "
                            "file %s while this run goes on", name, new.locks.path,
                            extra={"job": name})
                continue
            new.owner.share(new.locks)
            running.held.append((new.locks, lock))

    def _retire_unused(self) -> None:
        """A replaced runtime lets go of its parts once none of its runs is still
        going; their owner closes those no other runtime uses, off this thread."""
        if not self._retired:
            return
        keep = []
        for old in self._retired:
            if any(r.runtime is old for r in self._running.values()):
                keep.append(old)
            else:
                old.release(replaced=True)
        self._retired = keep

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval and time.monotonic() - self._last_watchdog >= interval:
            self._last_watchdog = time.monotonic()
            self.notifier.watchdog()


def with_changes(instance, **changes):
    """dataclasses.replace for the loop's frozen dataclasses (DueRun, JobResult: no
    __post_init__, no InitVar, no init=False field): a copy of the instance's
    attributes with `changes`. replace() cost 2.4-3.0 us a call (it reads the
    fields and calls __init__, which sets each through object.__setattr__), this
    0.65 us; the loop makes two a run."""
    new = object.__new__(type(instance))
    attributes = new.__dict__
    attributes.update(instance.__dict__)
    attributes.update(changes)
    return new


class RunIds:
    """Random (version 4) UUIDs as strings, as str(uuid.uuid4()) makes them, from
    random bytes read BATCH ids at a time: uuid4() read 16 bytes per run with a
    getrandom() call (which releases the GIL) and built a UUID object, 2.8 us;
    this takes 0.8 us a run."""

    BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._next = 0
        self._pid = os.getpid()

    def __call__(self) -> str:
        with self._lock:
            if self._next >= len(self._pool) or os.getpid() != self._pid:
                # Anew in a forked child too: it must not repeat its parent's ids.
                self._pool, self._next, self._pid = os.urandom(16 * self.BATCH), 0, \
                    os.getpid()
            start = self._next
            self._next = start + 16
            raw = bytearray(self._pool[start:start + 16])
        raw[6] = (raw[6] & 0x0F) | 0x40     # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80     # the RFC 4122 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"



def _result_of(running: _Running) -> JobResult:
    name = running.run.job.name
    if running.future.cancelled():
        return JobResult(name, Outcome.CANCELLED, 0, 0.0,
                         "not started: the worker was stopping")
    error = running.future.exception()
    if error is not None:   # run_job returns a result for a job's failure; this is ours
        log.error("job=%s the worker failed running it: %s", name, describe(error),
                  exc_info=error, extra={"job": name})
        return JobResult(name, Outcome.FAILED, running.watch.attempt,
                         time.monotonic() - running.watch.started, describe(error),
                         exception=error)
    return running.future.result()


def _is_config_error(exc: BaseException) -> bool:
    from .config import ConfigError
    return isinstance(exc, ConfigError)
