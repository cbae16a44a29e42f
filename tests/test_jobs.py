"""jobs.commands: the example domain does real work on every backend (scenarios of
tests/backends.py)."""
from __future__ import annotations

from sqlalchemy import func, select

from jobs.commands import DONE, PENDING, Command
from tests.batch import run_all
from worker.callables import resolve
from worker.config import JobSpec, RetryPolicy
from worker.pool import WorkerPool
from worker.runner import run_job
from tests.backends import scenario
from tests.conftest import spec


def run(database, name, call, **kwargs):
    job = spec(name, call, **kwargs)
    return run_job(job, resolve(job.call), database)


def counts(database) -> dict[str, int]:
    with database.engine.connect() as connection:
        rows = connection.execute(select(Command.status, func.count()).group_by(Command.status))
        return dict(rows.all())


@scenario("enqueue_process_purge")
def test_enqueue_process_purge(database):
    assert run(database, "enqueue", "jobs.commands:enqueue_commands", count=30).ok
    assert counts(database) == {PENDING: 30}
    assert run(database, "process", "jobs.commands:process_pending", batch_size=20).ok
    assert counts(database) == {PENDING: 10, DONE: 20}
    assert run(database, "process", "jobs.commands:process_pending", batch_size=20).ok
    assert counts(database) == {DONE: 30}
    assert run(database, "purge", "jobs.commands:purge_processed", keep_days=1).ok
    assert counts(database) == {DONE: 30}       # nothing is a day old yet
    assert run(database, "purge", "jobs.commands:purge_processed", keep_days=-1).ok
    assert counts(database) == {}


@scenario("jobs_racing_to_create_the_schema_all_succeed")
def test_jobs_racing_to_create_the_schema_all_succeed(make_database):
    database = make_database(pool_size=6)
    calls = ["jobs.commands:enqueue_commands", "jobs.commands:process_pending",
             "jobs.commands:purge_processed"] * 2
    # On the TDS test server (SQL Server) SQLite behind it lets one job at a time write
    # after reading, and makes the others deadlock victims (1205): retried with a
    # growing, jittered backoff (as a site would configure it), so that the victims
    # do not collide again in lockstep.
    def race(name: str, call: str):
        job = JobSpec(name=name, call=call, retry=RetryPolicy(
            attempts=20, wait_initial=0.02, wait_max=0.5))
        return run_job(job, resolve(call), database)

    with WorkerPool(6) as pool:
        results = run_all(pool, [(lambda c=c, n=n: race(f"job{n}", c))
                                 for n, c in enumerate(calls)])
    assert [r.error for r in results if not r.ok] == []
    total = sum(counts(database).values())
    assert total == 40                           # two enqueues of the default 20
