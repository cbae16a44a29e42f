"""APScheduler 3.11 with the scale section's jobs (benchmarks/scale.py): JOBS jobs on a
BackgroundScheduler with a ThreadPoolExecutor of THREADS. The first BURST are
IntervalTrigger(1 h) jobs whose first run is due at start (the worker's `every: 1h`),
each running `benchmarks.jobs:stamp_select`; the others are CronTrigger jobs at the
minutes MINUTES (one a job, in turn), each running `select_one`. Every run is in the
thread's scoped_session (commit, rollback on error, remove). Logs at INFO to stderr, as
the worker does; creates the file READY once the scheduler has started. Runs until SIGTERM.

    python -m benchmarks.apsched_scale URL JOBS BURST THREADS OUT MINUTES READY
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from . import jobs as bench_jobs
from .apsched import run_until_signalled, session_runner


def main(argv: list[str]) -> int:
    url, jobs, burst, threads, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), \
        argv[4]
    minutes = [int(m) for m in argv[5].split(",")]
    ready = argv[6]
    engine, run = session_runner(url, threads)

    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(threads)})
    start = datetime.now().astimezone()
    for number in range(jobs):
        name = f"job-{number:06d}"
        if number < burst:
            scheduler.add_job(run, IntervalTrigger(hours=1, start_date=start),
                              args=(bench_jobs.stamp_select,),
                              kwargs={"out": out, "tag": name}, id=name,
                              next_run_time=start, misfire_grace_time=3600)
        else:
            scheduler.add_job(run, CronTrigger(minute=minutes[number % len(minutes)],
                                                   timezone="UTC"),
                              args=(bench_jobs.select_one,), id=name,
                              misfire_grace_time=3600)
    run_until_signalled(scheduler, engine, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
