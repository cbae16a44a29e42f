"""When each job is next due (daemon mode), and what to do about missed runs.

`every` schedules count on the monotonic clock, so a wall-clock jump does not
stall or rush them. `cron` schedules follow the wall clock in the configured
time zone, with cron(8)'s syntax and day rule and the DST rules in worker.cron.

After a stall (a suspended machine, a clock jump, a busy pool) the runs missed
are coalesced into one when the latest of them is within misfire_grace_time, and
skipped with a log line otherwise.
"""
from __future__ import annotations

import heapq
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable, Iterable

from .config import JobSpec, format_duration

log = logging.getLogger("worker.scheduler")

MAX_MISSED_COUNTED = 10_000  # beyond this, missed cron runs are not counted one by one
COALESCE_LOG_EVERY = 60.0    # seconds between "runs coalesced" lines for one job


class EverySchedule:
    """Every N seconds, on the monotonic clock by default; the first run is due at
    start. With `aligned`, occurrences sit on a grid from the epoch, so that nodes
    sharing a clock (the database's, in cluster mode) compute the same ones."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic,
                 aligned: bool = False):
        self.seconds = seconds
        self.now = clock
        self.aligned = aligned

    def first(self, now: float) -> float:
        if self.aligned:
            return (now // self.seconds) * self.seconds
        return now

    def next_after(self, instant: float, previous: float) -> float:
        """The first occurrence after `instant`, on the grid that `previous` is on."""
        if instant < previous:
            return previous + self.seconds
        steps = int((instant - previous) // self.seconds) + 1
        return previous + steps * self.seconds

    def previous_at_or_before(self, instant: float) -> float:
        return (instant // self.seconds) * self.seconds   # the epoch grid

    def latest_at_or_before(self, instant: float, due: float) -> tuple[float, int]:
        """(the latest occurrence <= instant, how many occurrences from `due` on)."""
        count = int((instant - due) // self.seconds) + 1
        return due + (count - 1) * self.seconds, count

    def describe(self, instant: float) -> str:
        wall = instant if self.aligned else time.time() + (instant - self.now())
        return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds"
                                                                   if self.seconds < 1
                                                                   else "seconds")


class CronSchedule:
    """A cron expression in a time zone, on the wall clock (epoch seconds); the
    syntax, day rule and DST rules are worker.cron's. The expression is parsed
    once, here."""

    def __init__(self, expression: str, zone: tzinfo, clock: Callable[[], float] = time.time):
        from .cron import CronTimes, parse
        self.expression = expression
        self.zone = zone
        self.now = clock
        self._times = CronTimes(parse(expression), zone)

    def first(self, now: float) -> float:
        return self.next_after(now, now)

    def next_after(self, instant: float, previous: float) -> float:
        return self._times.next_after(instant)

    def previous_at_or_before(self, instant: float) -> float:
        return self._times.previous_at_or_before(instant)

    def latest_at_or_before(self, instant: float, due: float) -> tuple[float, int]:
        latest, count = due, 1
        while count < MAX_MISSED_COUNTED:
            fire = self._times.next_after(latest)
            if fire > instant:
                return latest, count
            latest, count = fire, count + 1
        return self.previous_at_or_before(instant), count   # too many to count

    def describe(self, instant: float) -> str:
        return datetime.fromtimestamp(instant, self.zone).isoformat(timespec="seconds")


Schedule = EverySchedule | CronSchedule


def schedule_for(job: JobSpec, zone: tzinfo,
                 wall_clock: Callable[[], float] | None = None) -> Schedule | None:
    """The job's schedule; with `wall_clock` (cluster mode) every schedule reads that
    clock and `every` occurrences are aligned to the epoch."""
    if job.every is not None:
        if wall_clock is not None:
            return EverySchedule(job.every, wall_clock, aligned=True)
        return EverySchedule(job.every)
    if job.cron is not None:
        return CronSchedule(job.cron, zone, wall_clock or time.time)
    return None


@dataclass(frozen=True)
class DueRun:
    job: JobSpec
    scheduled: str          # the occurrence this run is for, as a readable time
    late_when_found: float  # seconds between that occurrence and when it was found due
    coalesced: int          # missed occurrences folded into this run (1 = none missed)
    slot: float | None = None   # that occurrence on the schedule's clock (cluster key);
                                # None: a batch run, due now
    recovering: Any = None  # cluster: the abandoned run (a Claim) this run takes over
    run_id: str | None = None   # set when the run starts (worker.loop): its hooks share it
    kind: str | None = None     # what started it when not its source: "run_now"
    found_at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    @property
    def lateness(self) -> float:
        """Seconds between the occurrence and now. Not frozen when it was found due:
        a run started later (a busy loop, a SIGSTOP in between) logged and measured
        the lateness of that moment (0.014 s for a run started 6 s late, seen by the
        chaos run), and the history wrote its scheduled time 6 s off."""
        return self.late_when_found + (time.monotonic() - self.found_at)


@dataclass
class _Entry:
    job: JobSpec
    schedule: Schedule
    next_due: float
    coalesced: int = 0                       # missed runs not yet reported
    coalesced_logged: float = float("-inf")  # when they were last reported
    position: int = 0                        # in the config's job list (due() order)


def _keeps_next_run(old: _Entry, job: JobSpec, zone: tzinfo) -> bool:
    """A reloaded job keeps its next run when its schedule is the same; the zone
    matters to cron jobs only (an `every` job's next run stays where it was)."""
    if (old.job.every, old.job.cron) != (job.every, job.cron):
        return False
    return job.cron is None or getattr(old.schedule, "zone", zone) == zone


class Scheduler:
    """Next-run bookkeeping for the scheduled jobs; knows nothing of threads or SQL."""

    def __init__(self, jobs: Iterable[JobSpec], zone: tzinfo, misfire_grace_time: float,
                 schedule_factory: Callable[[JobSpec, tzinfo], Schedule | None] = schedule_for,
                 carry_over: "Scheduler | None" = None):
        """`carry_over`: the scheduler this one replaces (a reload); its jobs whose
        schedule is unchanged keep their next run (a cron job's only in the same
        zone). Only valid when both read the same clock, which the caller
        (worker.app) decides."""
        self.zone = zone
        self.misfire_grace_time = misfire_grace_time
        self._factory = schedule_factory
        self._entries: dict[str, _Entry] = dict(carry_over._entries) if carry_over else {}
        # Per clock, a heap of (next_due, position in the config, entry): a pass of
        # the loop looks at the jobs that are due, not at all of them (100,000 jobs:
        # a scan of every entry cost ~40 ms, once per finished run in a burst).
        self._heaps: dict[Callable[[], float], list[tuple[float, int, _Entry]]] = {}
        self.unscheduled: list[str] = []
        self._misfired: list[JobSpec] = []    # skipped runs not yet taken (take_misfired)
        self.update(jobs)

    def update(self, jobs: Iterable[JobSpec]) -> None:
        """Take a new job list (reload): unchanged schedules keep their next run."""
        entries: dict[str, _Entry] = {}
        self.unscheduled = []
        # Schedules hold no per-job state: jobs with the same `every`/`cron` share
        # one, so that each cron expression is parsed once (10,000 jobs, one parse).
        shared: dict[tuple, Schedule | None] = {}
        for job in jobs:
            if not job.enabled:
                continue
            old = self._entries.get(job.name)
            if old is not None and _keeps_next_run(old, job, self.zone):
                entries[job.name] = _Entry(job, old.schedule, old.next_due)
                continue
            key = (job.every, job.cron)
            if key not in shared:
                shared[key] = self._factory(job, self.zone)
            schedule = shared[key]
            if schedule is None:
                self.unscheduled.append(job.name)
                continue
            entries[job.name] = _Entry(job, schedule, schedule.first(schedule.now()))
        self._entries = entries
        self._heaps = {}
        for position, entry in enumerate(entries.values()):
            entry.position = position
            self._heaps.setdefault(entry.schedule.now, []).append(
                (entry.next_due, position, entry))
        for heap in self._heaps.values():
            heapq.heapify(heap)

    def reset(self, jobs: Iterable[JobSpec]) -> None:
        """Forget every next-run time and start afresh (e.g. once a clock is synced)."""
        self._entries = {}
        self.update(jobs)

    @property
    def jobs(self) -> list[JobSpec]:
        return [entry.job for entry in self._entries.values()]

    def seconds_until_next(self) -> float | None:
        if not self._entries:
            return None
        return max(0.0, min(heap[0][0] - clock() for clock, heap in self._heaps.items()))

    def next_run(self, name: str) -> str | None:
        entry = self._entries.get(name)
        return entry.schedule.describe(entry.next_due) if entry else None

    def due(self) -> list[DueRun]:
        """The runs due now; each job's next occurrence moves past now."""
        runs: list[DueRun] = []
        popped = self._pop_due()
        try:
            self._take_due(popped, runs)
        finally:
            for entry, _, _ in popped:
                heapq.heappush(self._heaps[entry.schedule.now],
                               (entry.next_due, entry.position, entry))
        return runs

    def _pop_due(self) -> list[tuple[_Entry, float, float]]:
        """The entries due now, each with the time its clock said and the monotonic
        time of that reading, in config order, off their heaps (due() puts each
        back under its next occurrence)."""
        popped: list[tuple[_Entry, float, float]] = []
        for clock, heap in self._heaps.items():
            now = clock()
            # A run's lateness goes on from this reading, not from when its DueRun
            # is made: the rest of the pass (a minute over 1,000 jobs after a clock
            # jump, before the counts were shared) or a SIGSTOP in between was lost.
            found_at = time.monotonic()
            while heap and heap[0][0] <= now:
                popped.append((heapq.heappop(heap)[2], now, found_at))
        popped.sort(key=lambda item: item[0].position)
        return popped

    def _take_due(self, popped: list[tuple[_Entry, float, float]],
                  runs: list[DueRun]) -> None:
        # Jobs with one schedule (shared: update) and one next run have the same
        # missed runs: counted once a pass. A cron count walks fire time by fire
        # time (up to MAX_MISSED_COUNTED): a wall clock a week ahead held the loop
        # 64 s for 1,000 `* * * * *` jobs counting the same 10,000 fires each.
        counted: dict[tuple[Schedule, float], tuple[float, int, float, str]] = {}
        for entry, now, found_at in popped:
            key = (entry.schedule, entry.next_due)
            if key not in counted:
                latest, count = entry.schedule.latest_at_or_before(now, entry.next_due)
                counted[key] = (latest, count, entry.schedule.next_after(now, latest),
                                entry.schedule.describe(latest))
            latest, count, entry.next_due, scheduled = counted[key]
            lateness = now - latest
            if lateness > self.misfire_grace_time:
                log.warning("job=%s missed %d run(s), the latest at %s, %s ago (more than "
                            "misfire_grace_time %s): skipped; next run at %s",
                            entry.job.name, count, scheduled,
                            format_duration(round(lateness, 3)),
                            format_duration(self.misfire_grace_time),
                            entry.schedule.describe(entry.next_due),
                            extra={"job": entry.job.name})
                self._misfired.append(entry.job)
                continue
            if count > 1:
                self._log_coalesced(entry, count)
            runs.append(DueRun(entry.job, scheduled, lateness, count, latest,
                               found_at=found_at))

    def take_misfired(self) -> list[JobSpec]:
        """The jobs whose due run was skipped as too late since the last call (one
        entry per skipped run)."""
        taken, self._misfired = self._misfired, []
        return taken

    def _log_coalesced(self, entry: _Entry, count: int) -> None:
        """At most one line per job a minute: a job whose interval is shorter than
        the loop can keep up with would otherwise log on every run."""
        entry.coalesced += count - 1
        now = time.monotonic()
        if now - entry.coalesced_logged >= COALESCE_LOG_EVERY:
            log.warning("job=%s missed %d run(s) since the last report (the worker was "
                        "busy or stalled); each time the missed runs were coalesced into "
                        "one", entry.job.name, entry.coalesced, extra={"job": entry.job.name})
            entry.coalesced, entry.coalesced_logged = 0, now


def local_zone() -> tzinfo:
    """The machine's zone with its DST rules ($TZ, else /etc/localtime), not just
    today's offset, so that cron times stay right across a DST change."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, OSError):   # OSError: TZ=Europe
                continue
    return datetime.now().astimezone().tzinfo or timezone.utc


def zone_named(name: str | None) -> tzinfo:
    if not name:
        return local_zone()
    from zoneinfo import ZoneInfo
    return ZoneInfo(name)
