"""APScheduler 3.11 running the daemon-lateness load (benchmarks/daemon.py): the
same job function as the worker's config names, on a BackgroundScheduler with a
ThreadPoolExecutor of THREADS, an IntervalTrigger per job, each run in the
thread's scoped_session (commit, rollback on error, remove), as a user of
APScheduler and the hand-written fix would write it. Logs at INFO to stderr, as
the worker does. Runs until SIGTERM.

    python -m benchmarks.apsched URL JOBS EVERY_SECONDS THREADS OUT [JOB]

JOB: the name of a function in benchmarks.jobs, `stamp_select` by default.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from datetime import datetime, timedelta
from typing import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

from . import jobs as bench_jobs


def session_runner(url: str, threads: int) -> tuple[Engine, Callable[..., None]]:
    """INFO logging, an engine, and `run(job, **kwargs)`: the job in the thread's
    scoped_session, committed, rolled back on error, removed whatever happened."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = create_engine(url, pool_size=threads, max_overflow=0)
    Session = scoped_session(sessionmaker(bind=engine))

    def run(job: Callable[..., None], **kwargs) -> None:
        try:
            job(Session, **kwargs)
            Session.commit()
        except Exception:
            Session.rollback()
            raise
        finally:
            Session.remove()

    return engine, run


def main(argv: list[str]) -> int:
    url, jobs, every, threads, out = (argv[0], int(argv[1]), float(argv[2]), int(argv[3]),
                                      argv[4])
    stamp = getattr(bench_jobs, argv[5] if len(argv) > 5 else "stamp_select")
    engine, run = session_runner(url, threads)
    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(threads)})
    # The first run of every job now (as the worker's `every`), then every EVERY.
    start = datetime.now().astimezone() + timedelta(milliseconds=50)
    for number in range(jobs):
        scheduler.add_job(run, IntervalTrigger(seconds=every, start_date=start),
                          args=(stamp,),
                          kwargs={"out": out, "tag": f"job-{number:02d}"},
                          id=f"job-{number:02d}",
                          next_run_time=start)
    run_until_signalled(scheduler, engine)
    return 0


def run_until_signalled(scheduler, engine: Engine, ready: str | None = None) -> None:
    """Start the scheduler (then create the file `ready`, if given), run until
    SIGTERM or SIGINT, shut down waiting for the runs in progress."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scheduler.start()
    if ready is not None:
        with open(ready, "w"):
            pass
    stop.wait()
    scheduler.shutdown(wait=True)
    engine.dispose()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
