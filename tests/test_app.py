"""worker.app: one builder for start-up and reload. A reload builds a complete new
runtime, any failure to build it leaves the old one running, and runs in flight
finish on the runtime they started on. Real daemons, real signals."""
from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.processes import runs
from tests.test_cluster import cluster_config, run_rows
from tests.test_daemon import write_config

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@sqlite_only
def test_a_cluster_node_reloaded_with_a_new_timezone_keeps_every_occurrence_single(
        db_url, tmp_path, daemons):
    runs_url = f"sqlite:///{tmp_path / 'runs.db'}"
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs="""\
  - {name: tick, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: tick}}
""")
    nodes = [daemons(config, env={"NODE": f"node-{n}"}) for n in range(2)]
    for node in nodes:
        node.wait_for("daemon started")
    config.write_text(config.read_text().replace("worker:\n", "worker:\n  timezone: UTC\n"))
    for node in nodes:
        node.signal(signal.SIGHUP)
    for node in nodes:
        node.wait_for("reloaded")
    time.sleep(10)
    for node in nodes:
        node.signal(signal.SIGTERM)
    assert [node.wait() for node in nodes] == [0, 0]
    rows = run_rows(runs_url, "tick")
    slots = [row.slot_ms for row in rows]
    assert len(slots) == len(set(slots))                  # each occurrence claimed once
    assert all(slot % 1000 == 0 for slot in slots)        # still on the epoch grid
    assert len(runs(db_url, "tick")) == len(rows)         # and its body ran once
    assert 9 <= len(rows) <= 14


@sqlite_only
def test_a_reload_that_cannot_be_built_leaves_the_old_jobs_running(db_url, tmp_path,
                                                                   daemons):
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: keeps, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: keeps}}
        """)
    daemon = daemons(config)
    daemon.wait_for("job=keeps starting")
    good = config.read_text()
    for count, url in enumerate(["nosuchdialect://host/db",                 # no dialect
                                 "postgresql+psycopg2://u@127.0.0.1/db"],   # no driver
                                start=1):
        config.write_text(good.replace(db_url, url))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload rejected", count=count)
    rejected_at = time.time()
    time.sleep(2.5)
    assert daemon.process.poll() is None                  # still running
    assert daemon.stop() == 0
    assert len(runs(db_url, "keeps", after=rejected_at)) >= 2
    assert "Traceback" not in daemon.log


@sqlite_only
def test_a_deadline_holds_for_a_run_queued_behind_a_database_reload(db_url, tmp_path,
                                                                    daemons):
    """max_workers 1: `slow` waits behind `blocker` in the pool while a reload
    changes the database section (max_workers, hence pool_size). It then runs on
    the runtime it was started on, whose statement tracker cuts it at 1 s."""
    jobs = """\
        - {name: blocker, call: 'tests.jobfuncs:python_sleep', every: 1h,
           kwargs: {seconds: 3}}
        - {name: slow, call: 'tests.jobfuncs:sqlite_long_query', every: 1h, timeout: 1s,
           retry: {attempts: 1}}
        """
    config = write_config(tmp_path / "jobs.yaml", db_url, jobs, max_workers=1)
    daemon = daemons(config)
    daemon.wait_for("job=slow starting")
    write_config(config, db_url, jobs, max_workers=2)
    reloaded = daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded")
    timed_out = daemon.wait_for("job=slow attempt=1/1 timed out", timeout=30)
    assert timed_out - reloaded < 3 + 1 + 3               # blocker, deadline, margin
    assert daemon.stop() == 0


TWO_RELOADS_V1 = """\
- {name: A, call: 'tests.jobfuncs:python_sleep', every: 1h, kwargs: {seconds: 3}}
- {name: C, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: C}}
"""
TWO_RELOADS_V2 = TWO_RELOADS_V1 + """\
- {name: B, call: 'tests.jobfuncs:touch_then_python_sleep', every: 1h,
   kwargs: {path: '%s', seconds: 8}}
"""


def _second_runtime_running_b(daemons, config, db_url, tmp_path):
    """v1 runs A (3 s) and C (every second); a SIGHUP adds B (8 s), which starts
    on the second runtime while A still runs on the first. Returns the daemon."""
    write_config(config, db_url, TWO_RELOADS_V1)
    daemon = daemons(config)
    daemon.wait_for("job=A starting")
    write_config(config, db_url, TWO_RELOADS_V2 % (tmp_path / "b-started"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("job=B starting")
    return daemon


def _move_lock_dir(daemon, config, db_url, tmp_path) -> None:
    """The second SIGHUP: the same jobs, lock_dir moved to a new directory."""
    moved = tmp_path / "moved-locks"
    moved.mkdir(mode=0o700)
    write_config(config, db_url, TWO_RELOADS_V2 % (tmp_path / "b-started"),
                 lock_dir=str(moved))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded", count=2)


@sqlite_only
def test_a_pool_still_used_by_a_retired_runtime_never_freezes_the_loop(db_url, tmp_path,
                                                                       daemons):
    """Issue 19 item 1: a second SIGHUP (max_workers 4 -> 5) while B runs on the
    second runtime. When A ends, the first runtime is retired: its pool, which B
    still runs on, must not be shut down (let alone waited for) by the loop. On
    main the loop froze until B ended (C missed about 5 runs)."""
    config = tmp_path / "jobs.yaml"
    daemon = _second_runtime_running_b(daemons, config, db_url, tmp_path)
    time.sleep(0.5)
    write_config(config, db_url, TWO_RELOADS_V2 % (tmp_path / "b-started"), max_workers=5)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded", count=2)
    since = time.time()
    daemon.wait_for("job=B attempt=1/3 succeeded", timeout=20)
    time.sleep(1.5)
    assert daemon.stop() == 0
    ticks = runs(db_url, "C", after=since)
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert len(ticks) >= 6 and max(gaps) < 2.5, (gaps, daemon.log)
    assert "Traceback" not in daemon.log


@sqlite_only
def test_a_host_lock_file_still_used_by_a_retired_runtime_keeps_its_locks(db_url, tmp_path,
                                                                          daemons):
    """Issue 19 item 1: a second SIGHUP moves lock_dir while B runs on the second
    runtime, which holds B's lock in the old directory. When A ends and the first
    runtime is retired, that lock file stays open until B ends: a --once of B from
    another process with the old configuration is refused (75). On main the file
    was closed, the lock dropped, and B ran a second time (exit 0)."""
    config = tmp_path / "jobs.yaml"
    daemon = _second_runtime_running_b(daemons, config, db_url, tmp_path)
    old = tmp_path / "old.yaml"
    old.write_text(config.read_text())
    _move_lock_dir(daemon, config, db_url, tmp_path)
    daemon.wait_for("job=A attempt=1/3 succeeded")     # the first runtime is retired
    time.sleep(0.5)
    once = daemons(old, "--once", "--job", "B")
    assert once.wait() == 75, once.log
    assert "skipped: another run of this job holds its host lock" in once.log
    daemon.wait_for("job=B attempt=1/3 succeeded", timeout=20)
    assert daemon.stop() == 0


@sqlite_only
def test_a_reload_that_changes_only_the_timezone_keeps_every_jobs_next_run(db_url, tmp_path,
                                                                           daemons):
    """Issue 19 item 4: the zone matters to cron jobs only. Two reloads that change
    only worker.timezone: a daily `every` job keeps its next run (one run, at
    start; on main it ran again at each reload), and the cron job is still there."""
    jobs = """\
        - {name: daily, call: 'tests.jobfuncs:record_run', every: 24h, kwargs: {name: daily}}
        - {name: nightly, call: 'tests.jobfuncs:noop', cron: '0 3 * * *'}
        """
    config = write_config(tmp_path / "jobs.yaml", db_url, jobs, timezone="UTC")
    daemon = daemons(config)
    daemon.wait_for("job=daily attempt=1/3 succeeded")
    for count, zone in enumerate(["Europe/Berlin", "America/New_York"], start=1):
        write_config(config, db_url, jobs, timezone=zone)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reloaded", count=count)
        time.sleep(1.5)
    assert daemon.stop() == 0
    assert len(runs(db_url, "daily")) == 1, daemon.log
    assert daemon.log.count("job=daily starting") == 1
    assert "changed ['nightly']" not in daemon.log and "removed none" in daemon.log


@sqlite_only
def test_a_cluster_membership_still_used_by_a_retired_runtime_keeps_its_heartbeat(
        db_url, tmp_path, daemons):
    """Issue 19 item 1: B (idempotent, 8 s, lease 3 s) runs on the second runtime
    when a second SIGHUP changes the cluster section. When A ends and the first
    runtime is retired, the membership B's claim needs keeps heartbeating until B
    ends: B runs once and succeeds, never marked abandoned and run again."""
    runs_url = f"sqlite:///{tmp_path / 'runs.db'}"
    v1 = """\
  - {name: A, call: 'tests.jobfuncs:python_sleep', every: 1h, kwargs: {seconds: 3}}
"""
    v2 = v1 + f"""\
  - {{name: B, call: 'tests.jobfuncs:touch_then_python_sleep', every: 1h, idempotent: true,
     kwargs: {{path: '{tmp_path / "b-started"}', seconds: 8}}}}
"""
    # In a cluster `every` sits on the epoch grid: a wide grace runs the last slot.
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs=v1,
                            misfire_grace_time="2h")
    daemon = daemons(config, env={"NODE": "node-1"})
    daemon.wait_for("job=A starting")
    cluster_config(config, db_url, run_table_url=runs_url, jobs=v2, misfire_grace_time="2h")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("job=B starting")
    config.write_text(config.read_text().replace("heartbeat: 0.5s", "heartbeat: 0.4s"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded", count=2)
    daemon.wait_for("job=B attempt=1/3 succeeded", timeout=30)
    time.sleep(1)
    assert daemon.stop() == 0
    rows = run_rows(runs_url, "B")
    assert [(row.outcome, row.recovered) for row in rows] == [("success", False)], rows
    assert daemon.log.count("job=B starting") == 1, daemon.log


@sqlite_only
def test_a_run_in_flight_when_lock_dir_moves_holds_its_lock_in_the_new_directory_too(
        db_url, tmp_path, daemons):
    """A reload moves lock_dir while B runs: B keeps its lock in the old directory
    and takes it in the new one too, so a --once of B started with the new
    configuration is refused (75) while B runs (before: it ran B a second time)."""
    config = tmp_path / "jobs.yaml"
    daemon = _second_runtime_running_b(daemons, config, db_url, tmp_path)
    _move_lock_dir(daemon, config, db_url, tmp_path)
    once = daemons(config, "--once", "--job", "B")
    assert once.wait() == 75, once.log
    assert "skipped: another run of this job holds its host lock" in once.log
    daemon.wait_for("job=B attempt=1/3 succeeded", timeout=20)
    time.sleep(0.5)                     # collected: its lock in the new file given back
    after = daemons(config, "--once", "--job", "B")
    assert after.wait() == 0, after.log
    assert daemon.stop() == 0


def test_once_ignores_sighup_and_finishes_its_batch(tmp_path, daemons):
    """SIGHUP's default action killed a batch mid-run: no summary, no textfile, exit
    -1 (a closed terminal, a reload sent to every worker process)."""
    started = tmp_path / "started"
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""\
database: {{url: "sqlite:///{tmp_path / 'jobs.db'}"}}
worker: {{lock_dir: "{tmp_path / 'locks'}"}}
jobs:
  - {{name: slow, call: 'tests.jobfuncs:touch_then_python_sleep',
     kwargs: {{path: "{started}", seconds: 0.5}}}}
""")
    batch = daemons(config, "--once")
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    batch.signal(signal.SIGHUP)
    assert batch.wait() == 0, batch.log
    assert "received SIGHUP: ignored (a batch does not reload" in batch.log
    assert "1 job(s): 1 succeeded" in batch.process.stdout.read()


def test_a_reload_that_moves_lock_dir_moves_the_control_socket_and_the_pauses(
        tmp_path, daemons):
    """The socket and the paused-jobs file stayed in the old lock directory: with the
    new config --status/--pause/--resume found no daemon (69), and a restart forgot
    every pause (the paused job ran again)."""
    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c",
                               str(config), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)

    first, second = tmp_path / "first", tmp_path / "second"
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""\
database: {{url: "sqlite:///{tmp_path / 'jobs.db'}"}}
worker: {{lock_dir: "{first}"}}
jobs:
  - {{name: held, call: 'tests.jobfuncs:select_one', every: 1h}}
  - {{name: free, call: 'tests.jobfuncs:select_one', every: 1h}}
""")
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli("--pause", "held").returncode == 0
    config.write_text(config.read_text().replace(str(first), str(second)))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded")
    status = cli("--status")
    assert status.returncode == 0, status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()
            if line.startswith(("held", "free"))] == [["held", "paused"], ["free", "idle"]]
    assert daemon.stop() == 0
    # What a restart reads: the pause, in the new directory.
    [paused] = second.glob("*.paused.sqlite")
    with sqlite3.connect(paused) as db:
        assert db.execute("SELECT name FROM paused_jobs").fetchall() == [("held",)]


def write_tick_config(tmp_path, url: str):
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""\
database: {{url: "{url}"}}
worker: {{lock_dir: "{tmp_path / 'locks'}"}}
jobs:
  - {{name: tick, call: 'tests.jobfuncs:noop', every: 1h}}
""")
    return config


@pytest.fixture
def silent_database():
    """(URL, listener) of a MariaDB that accepts connections and never answers."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    silent.settimeout(20)
    yield (f"mysql+pyodbc://u:p@127.0.0.1/x?driver=MariaDB+Unicode&Port="
           f"{silent.getsockname()[1]}", silent)
    silent.close()


def test_a_reload_to_a_database_that_never_answers_keeps_the_daemon_answering_signals(
        tmp_path, daemons, silent_database):
    """The new database accepts connections and never answers (a stuck server or
    proxy): the reload's check froze the loop, SIGTERM unanswered for as long as the
    server stayed so (60 s and more); now the check runs aside and a stop ends it."""
    url, silent = silent_database
    config = write_tick_config(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    write_tick_config(tmp_path, url)
    daemon.signal(signal.SIGHUP)
    connection, _ = silent.accept()       # the reload's check is under way
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=8) == 0, daemon.log
    connection.close()
    rejected = [line for line in daemon.log.splitlines() if "reload rejected" in line]
    assert len(rejected) == 1 and "a stop was requested while the new configuration's " \
        "database was being checked" in rejected[0], daemon.log


def test_a_daemon_started_against_a_database_that_never_answers_stops_on_sigterm(
        tmp_path, daemons, silent_database):
    """At start-up the same: the first connection attempt held the main thread, so
    SIGTERM was not acted on until the server answered or went away."""
    url, silent = silent_database
    daemon = daemons(write_tick_config(tmp_path, url))
    connection, _ = silent.accept()       # its attempt is under way, never answered
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=8) == 0, daemon.log
    connection.close()
    assert "stopped while waiting for the database: no job ran" in daemon.log
