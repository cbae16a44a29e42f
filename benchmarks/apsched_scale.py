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

import logging
import signal
import sys
import threading
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

from . import jobs as bench_jobs


def main(argv: list[str]) -> int:
    url, jobs, burst, threads, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), \
        argv[4]
    minutes = [int(m) for m in argv[5].split(",")]
    ready = argv[6]
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = create_engine(url, pool_size=threads, max_overflow=0)
    Session = scoped_session(sessionmaker(bind=engine))

    def run(job, **kwargs) -> None:
        try:
            job(Session, **kwargs)
            Session.commit()
        except Exception:
            Session.rollback()
            raise
        finally:
            Session.remove()

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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scheduler.start()
    with open(ready, "w"):
        pass
    stop.wait()
    scheduler.shutdown(wait=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
