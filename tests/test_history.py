"""The run history (worker/history.py): every run one row, in every mode, on every
backend; retention; --history and the status page after a restart; a history
database that is down fails no job. The recovered run of a dead cluster node is
checked in tests/test_cluster.py (test_a_killed_nodes_idempotent_run_is_recovered)."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.backends import ALL_BACKENDS
from tests.processes import history_rows
from tests.tcpproxy import TcpProxy
from tests.test_daemon import write_config as write_daemon_config

every_backend = pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)


def write_config(path: Path, url: str, jobs: str, extra: str = "") -> Path:
    """tests/test_daemon.py's config, with `extra` top-level sections."""
    write_daemon_config(path, url, jobs)
    with path.open("a") as file:
        file.write(extra + "\n")
    return path


@every_backend
def test_a_scheduled_run_is_one_row(db_url, tmp_path, daemons):
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: tick}}
        - {name: leaky, call: 'tests.jobfuncs:raise_secret_error', every: 1s}
        """)
    daemon = daemons(config)
    daemon.wait_for("job=tick starting", count=3)
    assert daemon.stop() == 0
    ticks = history_rows(db_url, "tick")
    # Every run, once. (Counted from this process's log: worker_test_runs is shared
    # with other test sessions on the servers.)
    assert len(ticks) == daemon.log.count("job=tick starting") >= 3
    for row in ticks:
        assert (row.kind, row.outcome, row.attempts) == ("scheduled", "success", 1)
        assert row.node == socket.gethostname() and row.pid == daemon.process.pid
        assert row.scheduled_ms <= row.started_ms + 50 <= row.ended_ms + 50
        assert row.error is None
    scheduled = [row.scheduled_ms for row in ticks]
    assert all(900 <= b - a <= 1100 for a, b in zip(scheduled, scheduled[1:])), scheduled
    leaks = history_rows(db_url, "leaky")
    assert leaks and all(row.outcome == "failed" for row in leaks)
    assert "mysql://app:***@db.example/prod" in leaks[0].error
    assert "s3cr3t-pw" not in "".join(row.error for row in leaks)


@every_backend
def test_a_once_run_is_one_row_and_history_shows_it_after_a_restart(db_url, tmp_path,
                                                                     daemons):
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: report, call: 'tests.jobfuncs:select_one'}
        - {name: broken, call: 'tests.jobfuncs:syntax_error'}
        """)
    assert daemons(config, "--once").wait() == 1          # `broken` failed
    (report,) = history_rows(db_url, "report")
    assert (report.kind, report.scheduled_ms, report.outcome) == ("once", None, "success")
    (broken,) = history_rows(db_url, "broken")
    assert broken.outcome == "failed" and broken.attempts == 1   # not transient
    shown = daemons(config, "--history", "broken")                # a new process
    assert shown.wait() == 0
    lines = shown.process.stdout.read().splitlines()
    assert lines[0].split()[:4] == ["started", "node", "outcome", "attempts"]
    assert len(lines) == 2 and "failed" in lines[1] and " once " in lines[1]
    assert socket.gethostname() in lines[1] and "syntax" in lines[1].lower()


@every_backend
def test_retention_drops_old_rows_and_rows_beyond_the_cap_per_job(db_url):
    from worker.history import HistoryStore
    store = HistoryStore(db_url)
    now = int(time.time() * 1000)
    day = 86_400_000

    def row(job: str, ended_ms: int) -> tuple:
        return (job, "once", None, ended_ms - 5, ended_ms, "success", 1, "host", 1, None)

    try:
        store.write([row("old", now - 10 * day), row("old", now - 8 * day),
                     row("old", now - day)] +
                    [row("busy", now - n) for n in (5, 4, 3, 2, 1)])
        assert store.prune(keep=7 * 86400.0, per_job=3) == 2 + 2
        assert [r.ended_ms for r in store.runs_of("old")] == [now - day]
        assert [r.ended_ms for r in store.runs_of("busy")] == [now - 1, now - 2, now - 3]
        assert store.prune(keep=7 * 86400.0, per_job=3) == 0
    finally:
        store.dispose()


@every_backend
def test_the_status_page_reads_the_history_in_one_query_after_a_restart(db_url,
                                                                         tmp_path):
    """A daemon started after a --once run shows that run on its page, read from the
    history with one query per request (the runs are not in its memory)."""
    from sqlalchemy import event

    from worker.app import build_runtime, load_config
    from worker.history import History, HistoryStore
    from worker.monitoring.monitor import StatusBoard
    from worker.parts import PartOwner

    earlier = HistoryStore(db_url)
    now = int(time.time() * 1000)
    earlier.write([("report", "once", None, now - 1_500, now, "failed", 2, "elsewhere", 7,
                    "it broke")])
    earlier.dispose()
    config, functions = load_config(str(write_config(tmp_path / "jobs.yaml", db_url,
                                                     """\
        - {name: report, call: 'tests.jobfuncs:select_one', every: 1h}
        - {name: quiet, call: 'tests.jobfuncs:select_one', every: 1h}
        """)))
    runtime = build_runtime(config, functions, jobs=config.jobs, scheduled=True,
                            owner=PartOwner())
    history = History()
    board = StatusBoard(history)
    try:
        history.runtime_changed(runtime)
        board.runtime_changed(runtime)
        board.snapshot()                   # the first request may create the table
        statements = []
        event.listen(history.store.database.engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        data = board.snapshot()
        assert len(statements) == 1, statements
        jobs = {job["name"]: job for job in data["jobs"]}
        assert jobs["report"]["last"]["outcome"] == "failed"
        assert jobs["report"]["last"]["node"] == "elsewhere"
        assert jobs["report"]["last"]["duration"] == 1.5
        assert jobs["quiet"]["recent"] == []
        assert data["history"]["error"] is None
    finally:
        history.close()
        runtime.release()
        runtime.owner.wait_closed()


@every_backend
def test_a_history_database_that_is_down_fails_no_job(db_url, backend_server,
                                                      tmp_path, daemons):
    """The history's database out of reach: the jobs succeed, the failure is logged
    once and counted; the rows wait and are written once it answers again."""
    proxy = None
    if backend_server.name == "sqlite":
        down_url = f"sqlite:///{tmp_path / 'no-such-directory' / 'history.db'}"
    else:
        proxy = TcpProxy(backend_server.upstream_port, backend_server.upstream_host)
        proxy.cut()
        down_url = backend_server.proxied_url(proxy.port)
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: a, call: 'tests.jobfuncs:select_one'}
        - {name: b, call: 'tests.jobfuncs:record_run', kwargs: {name: b}}
        """, extra=f"""history: {{url: "{down_url}"}}
metrics: {{textfile: "{tmp_path / 'once.prom'}"}}""")
    once = daemons(config, "--once")
    assert once.wait() == 0, once.log
    summary = once.process.stdout.read()
    assert "2 job(s): 2 succeeded, 0 failed" in summary, summary
    if proxy is None:   # no such directory: a refusal no wait can fix, tried once
        assert once.log.count("run history: ") == 1, once.log
        assert "refuses us in a way waiting cannot fix" in once.log
    else:               # the server out of reach: tried again, logged once
        assert once.log.count("run history: cannot write to") == 1, once.log
        assert "2 row(s) could not be written before the stop" in once.log
    metrics = (tmp_path / "once.prom").read_text()
    assert "run_worker_history_write_failures_total" in metrics
    assert "run_worker_history_write_failures_total 0.0" not in metrics
    if proxy is None:
        return
    # A daemon's rows wait while the history is down and arrive when it is back.
    config = write_config(tmp_path / "daemon.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: tick}}
        """, extra=f'history: {{url: "{down_url}"}}')
    daemon = daemons(config)
    daemon.wait_for("run history: cannot write to")
    proxy.restore()
    daemon.wait_for("run history: writing to", timeout=40)
    assert daemon.stop() == 0
    assert daemon.log.count("run history: cannot write to") == 1
    assert len(history_rows(db_url, "tick")) == daemon.log.count("job=tick starting")
    proxy.close()


def test_a_reload_that_moves_the_history_loses_no_queued_row(tmp_path):
    """Rows waiting when a reload switches stores are written to the new store."""
    from types import SimpleNamespace

    from worker.config import HistorySettings
    from worker.history import HistoryStore, HistoryWriter

    first, second = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db"))
    writer = HistoryWriter()
    settings = HistorySettings()
    writer.use(first, lambda: HistoryStore(first), settings)
    now = int(time.time() * 1000)
    row = ("job", "once", None, now - 1, now, "success", 1, "host", 1, None)
    writer.add(row)
    writer.use(second, lambda: HistoryStore(second), settings)   # before the flush
    writer.add(row)
    writer.close()
    counts = {}
    for url in (first, second):
        store = HistoryStore(url)
        counts[url] = len(store.runs_of("job"))
        store.dispose()
    assert counts == {first: 0, second: 2}
    assert SimpleNamespace(failed=writer.failed_writes, dropped=writer.dropped_rows) == \
        SimpleNamespace(failed=0, dropped=0)


def test_a_stop_with_the_history_store_locked_waits_only_its_share_and_counts_the_lost_rows(
        tmp_path, caplog):
    """The writer's last rows, blocked by a lock on the store: a stop waited 10 s for
    them (12 s for a daemon with shutdown_timeout 1 s and nothing running, outside the
    documented stop bound) and then said "0 row(s) lost" while the rows being written
    were lost."""
    import logging
    import sqlite3

    from worker.config import HistorySettings
    from worker.history import HistoryStore, HistoryWriter

    url = f"sqlite:///{tmp_path / 'history.db'}"
    store = HistoryStore(url)
    store.ensure_schema()
    locker = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")      # another process holds the file
    try:
        writer = HistoryWriter()
        writer.use(url, lambda: store, HistorySettings())
        now = int(time.time() * 1000)
        writer.add(("job", "once", None, now - 1, now, "success", 1, "host", 1, None))
        with caplog.at_level(logging.WARNING, logger="worker.history"):
            writer.close(0.3)
        assert writer._thread.is_alive()    # still in its write: not waited for
        assert "1 row(s) lost" in caplog.text
        assert writer.dropped_rows == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        writer._thread.join(30)
        store.dispose()


def test_a_cron_runs_scheduled_time_is_its_fire_time_even_after_a_wall_clock_step(tmp_path):
    """A single host's cron run was written as now - lateness: a wall clock stepped
    between the fire time and the run's start moved the row's scheduled time by the
    step (3 s here) though the fire time is known exactly."""
    from types import SimpleNamespace

    from worker.config import HistorySettings, JobSpec
    from worker.history import History, HistoryStore
    from worker.runner import JobResult, Outcome
    from worker.scheduler import DueRun

    url = f"sqlite:///{tmp_path / 'history.db'}"
    history = History()
    history.enabled = True
    history.writer.use(url, lambda: HistoryStore(url), HistorySettings())
    fire = 1_800_000_000.0      # a minute's start, on the wall clock
    job = JobSpec(name="nightly", call="tests.jobfuncs:select_one", cron="0 * * * *")
    # Found due 3 s late by a wall clock that has since stepped back 3 s.
    run = DueRun(job, "2027-01-15 08:00", late_when_found=3.0, coalesced=1, slot=fire)
    history.run_started(run, SimpleNamespace(cluster=None))
    history.run_finished(run, JobResult("nightly", Outcome.SUCCESS, 1, 0.01))
    history.close()
    [row] = history_rows(url, "nightly")
    assert row.scheduled_ms == fire * 1000
