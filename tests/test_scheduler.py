"""worker.scheduler: next run times, DST, misfires, reloads (fake clocks, no threads)."""
from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

from worker.config import JobSpec
from worker.scheduler import CronSchedule, DueRun, EverySchedule, Scheduler

BERLIN = ZoneInfo("Europe/Berlin")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cron_fires(expression: str, start: datetime, count: int) -> list[str]:
    schedule = CronSchedule(expression, BERLIN)
    instant = start.timestamp()
    fires = []
    for _ in range(count):
        instant = schedule.next_after(instant, instant)
        fires.append(datetime.fromtimestamp(instant, BERLIN).isoformat())
    return fires


def test_daily_cron_in_the_hour_that_does_not_exist_runs_once_at_3():
    # 2026-03-29: clocks jump from 02:00 to 03:00 in Berlin
    assert cron_fires("30 2 * * *", datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3) == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00"]


def test_daily_cron_in_the_repeated_hour_runs_once():
    # 2026-10-25: clocks go back from 03:00 to 02:00; 02:30 happens twice
    assert cron_fires("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3) == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00"]


def test_hourly_cron_runs_every_real_hour_across_the_change():
    assert cron_fires("0 * * * *", datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN), 4) == [
        "2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"]


def test_cron_in_utc_is_plain():
    schedule = CronSchedule("*/15 * * * *", ZoneInfo("UTC"))
    start = datetime(2026, 1, 1, 0, 7, tzinfo=ZoneInfo("UTC")).timestamp()
    assert schedule.next_after(start, start) - start == 8 * 60


def job(name: str, every: float | None = None, cron: str | None = None,
        enabled: bool = True) -> JobSpec:
    return JobSpec(name=name, call="m:f", every=every, cron=cron, enabled=enabled)


def every_factory(clock):
    return lambda spec, zone: EverySchedule(spec.every, clock) if spec.every else None


def test_every_runs_at_start_then_on_its_grid():
    clock = Clock()
    scheduler = Scheduler([job("a", every=10)], BERLIN, 60, every_factory(clock))
    assert [r.job.name for r in scheduler.due()] == ["a"]
    assert scheduler.due() == []
    assert scheduler.seconds_until_next() == 10
    clock.now += 10.004
    (run,) = scheduler.due()
    assert abs(run.late_when_found - 0.004) < 1e-9 and run.coalesced == 1
    assert abs(scheduler.seconds_until_next() - 9.996) < 1e-9  # stays on the grid


def test_missed_runs_within_the_grace_are_coalesced_into_one():
    clock = Clock()
    scheduler = Scheduler([job("a", every=10)], BERLIN, 60, every_factory(clock))
    scheduler.due()
    clock.now += 35                      # a stall: runs at +10, +20, +30 missed
    (run,) = scheduler.due()
    assert run.coalesced == 3 and abs(run.late_when_found - 5) < 1e-9
    assert scheduler.due() == []
    assert abs(scheduler.seconds_until_next() - 5) < 1e-9


def test_runs_missed_beyond_the_grace_are_skipped(caplog):
    clock = Clock()
    scheduler = Scheduler([job("a", every=100)], BERLIN, 30, every_factory(clock))
    scheduler.due()
    clock.now += 150                     # the +100 run is 50 s late: over the grace
    assert scheduler.due() == []
    assert "missed 1 run(s)" in caplog.text and "skipped" in caplog.text
    clock.now += 50
    assert [r.job.name for r in scheduler.due()] == ["a"]


def test_disabled_and_unscheduled_jobs_are_not_scheduled():
    scheduler = Scheduler([job("a", every=1), job("b"), job("c", every=1, enabled=False)],
                          BERLIN, 60, every_factory(Clock()))
    assert [j.name for j in scheduler.jobs] == ["a"]
    assert scheduler.unscheduled == ["b"]


def test_update_keeps_the_next_run_of_unchanged_jobs():
    clock = Clock()
    scheduler = Scheduler([job("a", every=10), job("b", every=10)], BERLIN, 60,
                          every_factory(clock))
    scheduler.due()
    clock.now += 4
    scheduler.update([job("a", every=10), job("b", every=3), job("c", every=10)])
    due = {r.job.name for r in scheduler.due()}
    assert due == {"b", "c"}             # changed and added jobs start now; a waits
    assert abs(scheduler.seconds_until_next() - 3) < 1e-9


def test_a_new_zone_moves_the_cron_jobs_and_keeps_every_jobs_next_run():
    """Issue 19 item 4: a reload that changes only the zone keeps each `every`
    job's next run and recomputes the cron jobs' in the new zone."""
    wall = Clock(datetime(2026, 6, 1, 12, tzinfo=ZoneInfo("UTC")).timestamp())
    ticks = Clock(5000.0)

    def factory(job, zone):
        if job.every is not None:
            return EverySchedule(job.every, ticks)
        return CronSchedule(job.cron, zone, wall)

    jobs = [JobSpec(name="daily", call="m:f", every=86400.0),
            JobSpec(name="nightly", call="m:f", cron="0 3 * * *")]
    utc = Scheduler(jobs, ZoneInfo("UTC"), 60.0, factory)
    assert [run.job.name for run in utc.due()] == ["daily"]     # due at start
    ticks.now += 10
    berlin = Scheduler(jobs, BERLIN, 60.0, factory, carry_over=utc)
    assert berlin.due() == []                                   # daily not again
    assert berlin.next_run("daily") == utc.next_run("daily")
    assert utc.next_run("nightly") == "2026-06-02T03:00:00+00:00"
    assert berlin.next_run("nightly") == "2026-06-02T03:00:00+02:00"


def test_jobs_with_the_same_cron_expression_share_one_parsed_schedule():
    made = []

    def factory(spec, zone):
        made.append(spec.name)
        return CronSchedule(spec.cron, zone)
    scheduler = Scheduler([job(f"j{n}", cron="0 3 * * *") for n in range(50)] +
                          [job("other", cron="*/5 * * * *")], BERLIN, 60.0,
                          schedule_factory=factory)
    assert made == ["j0", "other"]
    assert len({id(entry.schedule) for entry in scheduler._entries.values()}) == 2


def test_a_run_started_after_it_was_found_due_is_as_late_as_when_it_starts():
    """The lateness logged at a run's start, observed in metrics and used by the
    history for its scheduled time is the start's, not the moment it was found
    due (a process stopped in between reported 0.014 s for 6 s)."""
    run = DueRun(JobSpec(name="j", call="m:f", every=5.0), "t", 0.5, 1)
    time.sleep(0.3)
    assert run.lateness >= 0.8


class CountingClock(Clock):
    def __init__(self, now: float = 1000.0) -> None:
        super().__init__(now)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_a_pass_with_nothing_due_reads_each_clock_once_whatever_the_job_count():
    """Issue 27: the loop asks due() and seconds_until_next() at every pass (once per
    finished run in a burst); with 100,000 jobs a look at every job cost ~40 ms."""
    clock = CountingClock()
    scheduler = Scheduler([job(f"j{n}", every=10 + n % 7) for n in range(1000)], BERLIN,
                          60, every_factory(clock))
    assert len(scheduler.due()) == 1000
    clock.now += 5
    clock.calls = 0
    assert scheduler.due() == []
    assert abs(scheduler.seconds_until_next() - 5) < 1e-9
    assert clock.calls == 2


def test_runs_due_on_two_clocks_come_in_config_order_and_the_nearest_wins():
    wall, ticks = Clock(datetime(2026, 6, 1, 11, 59, 30, tzinfo=ZoneInfo("UTC"))
                        .timestamp()), Clock(5000.0)

    def factory(spec, zone):
        if spec.every is not None:
            return EverySchedule(spec.every, ticks)
        return CronSchedule(spec.cron, zone, wall)

    jobs = [JobSpec(name="c1", call="m:f", cron="0 12 * * *"),
            JobSpec(name="e1", call="m:f", every=60.0),
            JobSpec(name="c2", call="m:f", cron="0 12 * * *"),
            JobSpec(name="e2", call="m:f", every=45.0)]
    scheduler = Scheduler(jobs, ZoneInfo("UTC"), 60.0, factory)
    assert [run.job.name for run in scheduler.due()] == ["e1", "e2"]   # due at start
    assert abs(scheduler.seconds_until_next() - 30) < 1e-9             # the cron jobs
    wall.now += 30
    ticks.now += 30
    assert [run.job.name for run in scheduler.due()] == ["c1", "c2"]
    assert abs(scheduler.seconds_until_next() - 15) < 1e-9             # e2's next
    wall.now += 30
    ticks.now += 30
    assert [run.job.name for run in scheduler.due()] == ["e1", "e2"]


class CountingCron(CronSchedule):
    """A cron schedule that counts the fire times it computes (the work a count of
    missed runs costs)."""

    def __init__(self, expression, zone, clock) -> None:
        super().__init__(expression, zone, clock)
        self.fires_computed = 0
        next_after = self._times.next_after

        def counting(instant: float) -> float:
            self.fires_computed += 1
            return next_after(instant)
        self._times.next_after = counting


def test_a_wall_clock_a_week_ahead_counts_the_missed_runs_once_per_schedule_not_per_job():
    """A wall clock stepped a week ahead (a resumed VM, an RTC set by NTP) left
    each of 1,000 `* * * * *` jobs counting its 10,000 missed runs one fire time at
    a time: one due() call held the loop for 64 s (10,000 jobs: 10 min) with no
    signal answered and no watchdog ping. Jobs sharing a schedule and a next run
    share the count."""
    wall = Clock(datetime(2026, 6, 1, 11, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp())
    made: list[CountingCron] = []

    def factory(spec, zone):
        made.append(CountingCron(spec.cron, zone, wall))
        return made[-1]
    jobs = [job(f"j{n}", cron="* * * * *") for n in range(20)]
    scheduler = Scheduler(jobs, BERLIN, 60.0, factory)
    wall.now += 30                                   # 11:01 passes: a run each
    assert len(scheduler.due()) == 20
    wall.now += 7 * 86400 + 30                       # a week ahead, mid-minute
    (schedule,) = made
    schedule.fires_computed = 0
    runs = scheduler.due()
    assert [run.job.name for run in runs] == [job.name for job in jobs]
    assert {run.coalesced for run in runs} == {10_000}   # counted up to the cap
    assert {run.slot for run in runs} == {wall.now - 30}  # 11:01 a week later
    assert schedule.fires_computed <= 10_100         # was 20 times that
    assert scheduler.due() == []
    assert abs(scheduler.seconds_until_next() - 30) < 1e-9


class SlowToDescribe(EverySchedule):
    """An `every` schedule whose readable time takes 0.2 s (a pass over many due
    jobs, or a SIGSTOP, between the clock reading and the run's DueRun)."""

    def describe(self, instant: float) -> str:
        time.sleep(0.2)
        return super().describe(instant)


def test_a_run_is_late_from_the_clock_reading_that_found_it_due():
    """late_when_found is measured at the pass's clock reading: the time the pass
    took after that reading (64 s over 1,000 jobs after a clock jump) belongs to
    the run's lateness too, or the start line, metrics and the history's
    scheduled time are short by it."""
    clock = Clock()
    scheduler = Scheduler([job("a", every=10)], BERLIN, 60,
                          lambda spec, zone: SlowToDescribe(spec.every, clock))
    scheduler.due()
    clock.now += 10.5
    (run,) = scheduler.due()
    assert abs(run.late_when_found - 0.5) < 1e-9
    assert run.lateness >= 0.5 + 0.2
