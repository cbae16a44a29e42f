"""The hand-written fix as a whole process: what a user of the usual fix writes
to run a batch of jobs once (the contender of `--once` in benchmarks/batch.py).

    python -m benchmarks.fixbatch URL JOBS WORKERS

Its job list is written in Python, one entry per job, as such a user writes it
(here built in a loop, since there are thousands): the same job function as the
worker's config names (`benchmarks.jobs:select_one`). Each job runs on a
ThreadPoolExecutor in the thread's `scoped_session`: the job, `commit()`, a
`rollback()` on error, and `Session.remove()` in `finally`. Exit code 1 if any
job failed, like `run-worker --once`. No logging and no summary: the leanest
honest version, so that the worker's own logging and summary count against it.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

from .jobs import select_one


def main(argv: list[str]) -> int:
    url, count, workers = argv[0], int(argv[1]), int(argv[2])
    if url.startswith("mysql+pyodbc"):
        import pyodbc
        pyodbc.pooling = False   # as worker.db does, so both run under one setting
    engine = create_engine(url, pool_size=workers, max_overflow=0)
    Session = scoped_session(sessionmaker(bind=engine))
    jobs = [(f"job-{number:05d}", select_one) for number in range(count)]

    def run(job) -> bool:
        _name, function = job
        try:
            function(Session)
            Session.commit()
            return True
        except Exception:
            Session.rollback()
            return False
        finally:
            Session.remove()

    with ThreadPoolExecutor(workers) as executor:
        failed = sum(not ok for ok in executor.map(run, jobs))
    engine.dispose()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
