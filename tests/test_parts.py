"""worker.parts: a part is closed once, when its last user lets go, on the owner's
thread and never on the caller's; the end of the process waits for closes, bounded.
The parts are real (a pool, a lock file, an engine) as build_runtime makes them."""
from __future__ import annotations

import threading
import time

from worker.app import build_runtime
from worker.config import Config, DatabaseSettings, JobSpec, RetryPolicy, WorkerSettings
from worker.parts import PartOwner


def config_for(tmp_path, **worker) -> Config:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    jobs = (JobSpec(name="tick", call="tests.jobfuncs:noop", every=1.0),)
    return Config(path="<test>", database=DatabaseSettings(url=f"sqlite:///{tmp_path}/w.db",
                                                             pool_size=3),
                  worker=WorkerSettings(**{"lock_dir": str(lock_dir), **worker}),
                  retry=RetryPolicy(), jobs=jobs)


def build(config: Config, owner: PartOwner, previous=None):
    return build_runtime(config, {"tick": lambda session: None}, jobs=config.jobs,
                         scheduled=True, owner=owner, previous=previous)


def test_a_part_shared_by_three_runtimes_closes_only_when_the_last_lets_go(tmp_path):
    owner = PartOwner()
    first = build(config_for(tmp_path, max_workers=2), owner)
    second = build(config_for(tmp_path, max_workers=2), owner, previous=first)
    third = build(config_for(tmp_path, max_workers=3), owner, previous=second)
    assert second.pool is first.pool and third.pool is not first.pool
    assert third.locks is first.locks and owner.users(first.locks) == 3
    first.release(replaced=True)
    assert owner.wait_closed()
    # The pool and lock file the second runtime still runs on stay open.
    assert owner.users(first.pool) == 1 and first.locks.open_files() == 1
    assert first.pool.submit(lambda: 42).result(5) == 42
    second.release(replaced=True)
    assert owner.wait_closed()
    assert owner.users(first.pool) == 0
    assert first.locks.open_files() == 1              # the third still uses it
    third.release()
    assert owner.wait_closed()
    assert first.locks.open_files() == 0


def test_closing_runs_on_the_owners_thread_and_the_end_waits_for_it_bounded():
    owner = PartOwner()
    closed_on, release = [], threading.Event()

    class SlowPart:
        def close(self) -> None:
            closed_on.append(threading.current_thread().name)
            release.wait(30)

    part = SlowPart()
    owner.use(part, part.close, "slow part")
    began = time.monotonic()
    owner.release(part)                                  # returns at once
    assert time.monotonic() - began < 0.5
    assert owner.wait_closed(timeout=0.2) is False       # still closing: bounded
    release.set()
    assert owner.wait_closed(timeout=10) is True
    assert closed_on == ["part-closer"]
