"""Commands to a cluster through its database (worker.control_cluster), through the
CLI against running daemons, from a "host" where no node runs (a lock directory
of its own, no socket); and a reload that moves the local control socket and the
paused-jobs file (worker.control)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ROOT
from tests.processes import history_rows
from tests.test_cluster import cluster_config, run_table_url, wait_for  # noqa: F401
from tests.test_control import cli, control_runs, interrupted, runs, token  # noqa: F401
from tests.test_daemon import write_config

CONTROL_TABLES = ("worker_paused", "worker_nodes", "worker_requests")


def drop_control_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for table in CONTROL_TABLES:
                connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        engine.dispose()


@pytest.fixture
def cluster_tables(run_table_url):
    """The run table's URL, without control tables (pauses, nodes, requests) before
    and after: a pause left in a shared database would hold in other tests."""
    drop_control_tables(run_table_url)
    yield run_table_url
    drop_control_tables(run_table_url)


def on(node: str, config, *args: str) -> subprocess.CompletedProcess:
    """The command line as on the host of `node` (its lock directory)."""
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NODE": node})


def query(url: str, sql: str, **params) -> list:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return result.all() if result.returns_rows else []
    finally:
        engine.dispose()


def test_cluster_commands_go_through_the_database_from_a_host_without_a_node(
        control_runs, cluster_tables, tmp_path, daemons):
    db_url, runs_url = control_runs, cluster_tables
    tick, tock, yearly = token(), token(), token()
    release = tmp_path / "release-yearly"     # holds yearly's run until the test makes it
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs=f"""\
  - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
      kwargs: {{name: {tick}}}}}
  - {{name: tock, call: 'tests.jobfuncs:record_control_run', every: 1s,
      kwargs: {{name: {tock}}}}}
  - {{name: yearly, call: 'tests.jobfuncs:wait_then_record_control_run',
      cron: '0 0 1 1 *', kwargs: {{name: {yearly}, path: "{release}"}}}}
""")

    def elsewhere(*args: str) -> subprocess.CompletedProcess:
        return on("elsewhere", config, *args)   # lock_dir locks-elsewhere: no node

    none = elsewhere("--run-now", "yearly")
    assert none.returncode == 69 and "no node" in none.stderr, none.stderr
    nodes = {name: daemons(config, env={"NODE": name}) for name in ("node-a", "node-b")}
    for node in nodes.values():
        node.wait_for("daemon started")
    assert wait_for(lambda: "2 live node(s)" in elsewhere("--status").stdout)
    assert not (tmp_path / "locks-elsewhere").exists() or \
        not any(p.name.endswith(".control") for p in (tmp_path / "locks-elsewhere").iterdir())

    # Run-now: started on one node, once; a second one while it runs is 75.
    started = elsewhere("--run-now", "yearly")
    assert started.returncode == 0, started.stderr
    assert "run started on node node-" in started.stdout
    again = elsewhere("--run-now", "yearly")
    assert again.returncode == 75 and "in progress on node node-" in again.stderr, \
        again.stderr
    status = elsewhere("--status")
    assert status.returncode == 0, status.stderr
    assert any(line.startswith("yearly") and "running on node-" in line
               for line in status.stdout.splitlines()), status.stdout
    release.touch()
    assert wait_for(lambda: query(runs_url, "SELECT outcome FROM worker_runs WHERE job = "
                                            "'yearly'") == [("success",)])
    assert len(runs(db_url, yearly)) == 1              # once across the cluster
    assert wait_for(lambda: [row.kind for row in history_rows(db_url, "yearly")] ==
                    ["run_now"])                       # and in the run history
    assert query(runs_url, "SELECT COUNT(*) FROM worker_requests") == [(0,)]   # none left

    # Pause: every node within a heartbeat, across a reload and a restart.
    paused = elsewhere("--pause", "tick")
    assert paused.returncode == 0, paused.stderr
    for node in nodes.values():
        node.wait_for("job=tick paused (through the cluster)")
    since = time.time()
    # A reload with a new cluster section: a new membership, which takes over the
    # node's row and the pauses.
    config.write_text(config.read_text().replace("heartbeat: 0.5s", "heartbeat: 0.4s"))
    nodes["node-a"].signal(signal.SIGHUP)
    nodes["node-a"].wait_for("reloaded")
    assert nodes["node-b"].stop() == 0
    nodes["node-b"] = daemons(config, env={"NODE": "node-b"})
    nodes["node-b"].wait_for("paused jobs (until --resume): tick")
    restarted = time.time()
    assert wait_for(lambda: len(runs(db_url, tock, after=restarted)) >= 3)   # time passed
    assert runs(db_url, tick, after=since) == []
    listed = elsewhere("--list")
    assert "from the cluster's live nodes (node-" in listed.stderr, listed.stderr
    assert "node-a" in listed.stderr and "node-b" in listed.stderr, listed.stderr
    assert "paused" in [line for line in listed.stdout.splitlines()
                        if line.startswith("tick")][0]

    resumed = elsewhere("--resume", "tick")
    assert resumed.returncode == 0, resumed.stderr
    back = time.time()
    assert wait_for(lambda: runs(db_url, tick, after=back))

    # A clean stop removes the nodes' rows: no node, 69.
    for node in nodes.values():
        assert node.stop() == 0
    assert query(runs_url, "SELECT COUNT(*) FROM worker_nodes") == [(0,)]
    for args in (["--status"], ["--pause", "tick"], ["--run-now", "tick"]):
        done = elsewhere(*args)
        assert done.returncode == 69, (args, done.stderr)
        assert "no cluster node has heartbeated within its lease" in done.stderr

    # A node whose heartbeat is stale is no node; one that never takes the request
    # (a row without a daemon) lets it expire: withdrawn, 69, and it never runs.
    now_ms = int(time.time() * 1000)
    insert = ("INSERT INTO worker_nodes (node, token, host, pid, heartbeat_ms, lease_ms, "
              "interval_ms, jobs) VALUES (:node, 't', 'h', 1, :beat, 3000, 100, :jobs)")
    query(runs_url, insert, node="stale", beat=now_ms - 60_000, jobs='{"yearly": null}')
    stale = elsewhere("--status")
    assert stale.returncode == 69 and "last heard: stale (" in stale.stderr, stale.stderr
    query(runs_url, insert, node="mute", beat=now_ms + 60_000, jobs='{"yearly": null}')
    untaken = elsewhere("--run-now", "yearly")
    assert untaken.returncode == 69, untaken.stderr
    assert "no node took the run-now of yearly" in untaken.stderr
    assert query(runs_url, "SELECT COUNT(*) FROM worker_requests") == [(0,)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_reload_that_moves_lock_dir_moves_the_socket_and_keeps_the_pauses(
        db_url, tmp_path, daemons):
    jobs = """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """
    old, new = tmp_path / "locks-old", tmp_path / "locks-new"
    config = write_config(tmp_path / "jobs.yaml", db_url, jobs, lock_dir=str(old))
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--pause", "tick").returncode == 0
    write_config(config, db_url, jobs, lock_dir=str(new))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("control socket and paused jobs moved to")
    assert sorted(p.suffix for p in new.iterdir()) == [".control", ".locks", ".sqlite"]
    # The old socket is closed off the loop thread, soon after.
    assert wait_for(lambda: not [p for p in old.iterdir()
                                 if p.suffix in (".control", ".sqlite")])
    status = cli(config, "--status")
    assert status.returncode == 0, status.stderr
    assert "tick  paused" in status.stdout
    assert daemon.stop() == 0
    daemon = daemons(config)                # the moved file holds the pause
    daemon.wait_for("paused jobs (until --resume): tick")
    assert cli(config, "--resume", "tick").returncode == 0
    assert "tick  idle" in cli(config, "--status").stdout
    assert daemon.stop() == 0


def test_a_version_1_control_schema_is_raised_to_2_keeping_its_pauses(tmp_path):
    from sqlalchemy import inspect

    from worker.cluster import metadata
    from worker.control_cluster import ensure_control_schema
    engine = create_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO worker_schema VALUES ('control', 1)"))
            connection.execute(text("CREATE TABLE worker_paused (job VARCHAR(200) PRIMARY "
                                    "KEY, since_ms BIGINT NOT NULL, node VARCHAR(200) "
                                    "NOT NULL)"))
            connection.execute(text("INSERT INTO worker_paused VALUES ('tick', 1, 'n')"))
        ensure_control_schema(engine)
        ensure_control_schema(engine)       # a second node: nothing more to do
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version FROM worker_schema WHERE "
                                           "component = 'control'")).scalar() == 2
            assert connection.execute(text("SELECT job FROM worker_paused")).all() == \
                [("tick",)]
            assert {"worker_nodes", "worker_requests"} <= set(inspect(connection)
                                                               .get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_locked_control_tables_do_not_hold_up_the_scheduled_runs(
        control_runs, cluster_tables, tmp_path, daemons):
    """Another session holds the control tables (LOCK TABLES ... WRITE) for 8 s:
    the node's every-1s job runs on meanwhile; its commands wait. Before: the loop
    thread read the pauses and requests itself and stood still until the lock went
    (its statements wait up to their timeout, 1 s, again and again: 3 runs in 6 s)."""
    db_url, runs_url = control_runs, cluster_tables
    tick = token()
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs=f"""\
  - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
      kwargs: {{name: {tick}}}}}
""")
    node = daemons(config, env={"NODE": "node-a"})
    node.wait_for("daemon started")
    assert wait_for(lambda: runs(db_url, tick))
    engine = create_engine(runs_url)
    try:
        with engine.connect() as locker:
            locker.exec_driver_sql("LOCK TABLES worker_paused WRITE, worker_nodes WRITE, "
                                   "worker_requests WRITE")
            since = time.time()
            time.sleep(8)
            until = time.time()
            locker.exec_driver_sql("UNLOCK TABLES")
    finally:
        engine.dispose()
    during = [at for at in runs(db_url, tick, after=since) if at < until]
    assert len(during) >= 6, (during, node.log)     # 8 on time
    # The commands work again once the lock is gone.
    assert wait_for(lambda: on("elsewhere", config, "--status").returncode == 0)
    assert node.stop() == 0


def yearly_node(tmp_path, db_url: str, runs_url: str, daemons):
    """One node (long lease) with a job `yearly`, not due for months, recording its
    runs under a name of its own, started and answering --status: (config, node,
    that name)."""
    yearly = token()
    config = long_lease(cluster_config(
        tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs=f"""\
  - {{name: yearly, call: 'tests.jobfuncs:record_control_run', cron: '0 0 1 1 *',
      kwargs: {{name: {yearly}}}}}
"""))
    node = daemons(config, env={"NODE": "node-a"})
    node.wait_for("daemon started")
    assert wait_for(lambda: on("elsewhere", config, "--status").returncode == 0)
    return config, node, yearly


def long_lease(config):
    """A lease of 30 s (statement timeout 5 s): a node stopped for 15 s stays live."""
    config.write_text(config.read_text().replace("lease: 3.0s", "lease: 30s"))
    return config


def insert_request(url: str, job: str, within: float = 3.5) -> None:
    """A run-now request as the command line leaves it (waiting, expiring after
    `within` seconds); the command line then waits `within` + ANSWER_SLACK."""
    now_ms = int(time.time() * 1000)
    query(url, "INSERT INTO worker_requests (job, state, requested_ms, expires_ms, "
               "requested_by) VALUES (:job, 'waiting', :now, :expires, 'test')",
          job=job, now=now_ms, expires=now_ms + int(within * 1000))


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_run_now_taken_by_a_node_stopped_past_its_callers_wait_never_runs(
        control_runs, cluster_tables, tmp_path, daemons):
    """A node takes a run-now and is stopped (SIGSTOP) before it hands the start to
    its loop (held there by a lock on the run table), for longer than the command
    line waits for an answer. Before: at SIGCONT it handed the start over with a
    fresh 5 s and the run started, 15 s after its caller gave up (69)."""
    from worker.control_cluster import ANSWER_SLACK
    db_url, runs_url = control_runs, cluster_tables
    config, node, yearly = yearly_node(tmp_path, db_url, runs_url, daemons)
    engine = create_engine(runs_url)
    try:
        with engine.connect() as locker:
            # The node's check for a run in progress waits on this lock (up to its 5 s
            # statement timeout), between its take and its hand-over.
            locker.exec_driver_sql("LOCK TABLES worker_runs WRITE")
            insert_request(runs_url, "yearly")
            gave_up = time.monotonic() + 3.5 + ANSWER_SLACK
            assert wait_for(lambda: query(runs_url, "SELECT state FROM worker_requests")
                            == [("taken",)], timeout=5)
            node.signal(signal.SIGSTOP)
            locker.exec_driver_sql("UNLOCK TABLES")
    finally:
        engine.dispose()
    try:
        time.sleep(max(0.0, gave_up - time.monotonic()) + 1)
    finally:
        node.signal(signal.SIGCONT)
    node.wait_for("job=yearly run-now (through the cluster) not started")
    assert wait_for(lambda: query(runs_url, "SELECT state, code FROM worker_requests")
                    == [("refused", 69)])
    time.sleep(1)
    assert runs(db_url, yearly) == []
    assert "run-now (through the cluster): started" not in node.log
    assert node.stop() == 0


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_run_now_interrupted_while_it_waits_is_withdrawn_and_never_runs(
        control_runs, cluster_tables, tmp_path, daemons):
    """Ctrl-C on a --run-now waiting for a node (stopped here, so that it cannot take
    the request first). Before: a traceback, exit 1, and the request left waiting:
    the node took it at SIGCONT and the run started, after the operator had given
    up on it."""
    db_url, runs_url = control_runs, cluster_tables
    config, node, yearly = yearly_node(tmp_path, db_url, runs_url, daemons)
    node.signal(signal.SIGSTOP)
    try:
        code, err = interrupted(
            config, ["--run-now", "yearly"],
            lambda: wait_for(lambda: query(runs_url, "SELECT state FROM worker_requests")
                             == [("waiting",)], timeout=20),
            env={**os.environ, "NODE": "elsewhere"})
    finally:
        node.signal(signal.SIGCONT)
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err, err
    assert query(runs_url, "SELECT COUNT(*) FROM worker_requests") == [(0,)]
    time.sleep(3)       # six heartbeats of the node
    assert runs(db_url, yearly) == []
    assert "run-now (through the cluster): started" not in node.log
    assert node.stop() == 0


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_pause_holds_at_start_up_while_the_paused_jobs_cannot_be_read(
        control_runs, cluster_tables, tmp_path, daemons):
    """A node starts while another session holds worker_paused (LOCK TABLES ...
    WRITE): it cannot read the pauses. Before: it took that for "none paused" and
    ran the paused job every second until the lock went."""
    from worker.cluster import metadata
    from worker.control_cluster import ensure_control_schema
    db_url, runs_url = control_runs, cluster_tables
    tick = token()
    config = long_lease(cluster_config(
        tmp_path / "jobs.yaml", db_url, run_table_url=runs_url, jobs=f"""\
  - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
      kwargs: {{name: {tick}}}}}
"""))
    engine = create_engine(runs_url)
    try:
        metadata.create_all(engine)       # the run table and worker_schema
        ensure_control_schema(engine)
        query(runs_url, "INSERT INTO worker_paused (job, since_ms, node) VALUES "
                        "('tick', 1, 'test')")
        with engine.connect() as locker:
            locker.exec_driver_sql("LOCK TABLES worker_paused WRITE")
            since = time.time()
            node = daemons(config, env={"NODE": "node-a"})
            node.wait_for("daemon started", timeout=40)
            time.sleep(4)
            until = time.time()
            locker.exec_driver_sql("UNLOCK TABLES")
    finally:
        engine.dispose()
    assert [at for at in runs(db_url, tick, after=since) if at < until] == [], node.log
    node.wait_for("paused jobs (until --resume): tick")
    assert on("elsewhere", config, "--resume", "tick").returncode == 0
    back = time.time()
    assert wait_for(lambda: runs(db_url, tick, after=back))
    assert node.stop() == 0


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_paused_jobs_abandoned_run_is_not_recovered_until_resumed(
        control_runs, cluster_tables, tmp_path, daemons):
    """An idempotent job's run is abandoned (its node killed) and the job paused:
    the other node leaves the run alone until --resume. Before: it took the run over
    and ran it again at once, paused or not."""
    db_url, runs_url = control_runs, cluster_tables
    slow = token()
    release = tmp_path / "release-slow"
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=runs_url,
                            jobs=f"""\
  - {{name: slow, call: 'tests.jobfuncs:wait_then_record_control_run',
      cron: '0 0 1 1 *', idempotent: true, kwargs: {{name: {slow}, path: "{release}"}}}}
""")
    nodes = {name: daemons(config, env={"NODE": name}) for name in ("node-a", "node-b")}
    for node in nodes.values():
        node.wait_for("daemon started")
    assert wait_for(lambda: "2 live node(s)" in on("elsewhere", config, "--status").stdout)
    started = on("elsewhere", config, "--run-now", "slow")
    assert started.returncode == 0, started.stderr
    taker = started.stdout.split("on node ")[1].split()[0]
    other = nodes["node-b" if taker == "node-a" else "node-a"]
    nodes[taker].process.kill()
    nodes[taker].wait()
    assert on("elsewhere", config, "--pause", "slow").returncode == 0
    other.wait_for("job=slow paused (through the cluster)")
    # The dead node's run is marked abandoned after its lease (3 s).
    assert wait_for(lambda: query(runs_url, "SELECT outcome, recovered FROM worker_runs "
                                            "WHERE job = 'slow'") == [("abandoned", 0)])
    time.sleep(3)       # six heartbeats of the other node
    assert query(runs_url, "SELECT outcome, recovered FROM worker_runs WHERE job = 'slow'") \
        == [("abandoned", 0)], other.log
    assert "job=slow starting" not in other.log
    assert on("elsewhere", config, "--resume", "slow").returncode == 0
    release.touch()
    assert wait_for(lambda: query(runs_url, "SELECT outcome, recovered FROM worker_runs "
                                            "WHERE job = 'slow'") == [("success", 1)])
    assert len(runs(db_url, slow)) == 1
    assert other.stop() == 0


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
@pytest.mark.parametrize("answer", ["started", "refused"])
def test_ctrl_c_after_a_node_took_the_run_now_says_whether_its_run_started(
        cluster_tables, tmp_path, monkeypatch, capsys, answer):
    """Ctrl-C on a --run-now while a node has taken the request (taken, its run
    about to start). Before: the request was left to the node, which started the
    run after the command had exited 130 saying 'run-now yearly is not carried out
    unless it was already': a run started after its caller gave up, the caller never
    told. Now the command waits for the node's answer (it comes within
    HAND_OVER_WITHIN of the take) and says whether the run started."""
    import threading

    from worker import control_cluster
    from worker.config import load
    from worker.control import command
    from worker.exitcodes import EXIT_INTERRUPTED
    runs_url = cluster_tables
    config = load(cluster_config(tmp_path / "jobs.yaml", runs_url, run_table_url=runs_url,
                                 jobs="""\
  - {name: yearly, call: 'tests.jobfuncs:select_one', cron: '0 0 1 1 *'}
"""), environ={**os.environ, "NODE": "elsewhere"})
    probe = control_cluster.Caller(config)
    try:
        probe.cluster.ensure_schema()
        control_cluster.ensure_control_schema(probe.cluster.database.engine)
    finally:
        probe.close()
    node = type("Row", (), {"node": "node-a", "interval_ms": 500,
                            "jobs": '{"yearly": null}'})()
    monkeypatch.setattr(control_cluster.Caller, "live_nodes", lambda self: [node])
    answered = []

    def node_answers_later():          # the node: its loop starts the run (or not)
        time.sleep(1.5)
        state, code = ("started", 0) if answer == "started" else ("refused", 69)
        query(runs_url, "UPDATE worker_requests SET state = :state, code = :code, "
                        "message = :message WHERE state = 'taken'", state=state,
              code=code, message="job yearly: run started on node node-a"
              if code == 0 else "node node-a took the run-now of yearly, but could not "
                                "start it within 5s: nothing started")
        answered.append(time.monotonic())

    def interrupted_after_the_take(self, mine, job, within):
        assert wait_for(lambda: query(runs_url, "SELECT state FROM worker_requests")
                        == [("waiting",)], timeout=10)
        query(runs_url, "UPDATE worker_requests SET state = 'taken', node = 'node-a'")
        threading.Thread(target=node_answers_later, daemon=True).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(control_cluster.Caller, "_await", interrupted_after_the_take)
    code = command(config, "run-now", "yearly")
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED, err
    assert answered, "the command did not wait for the node's answer: " + err
    if answer == "started":
        assert "run started on node node-a" in err, err
    else:
        assert "nothing started" in err and "unless" not in err, err
    assert query(runs_url, "SELECT COUNT(*) FROM worker_requests") == [(0,)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_reload_onto_another_cluster_database_holds_its_paused_jobs_at_once(
        control_runs, tmp_path, daemons):
    """A reload pointing the node at another cluster database, where `tick` is
    paused: before, the node kept the old database's pauses until its next
    heartbeat's pass and ran `tick` every second meanwhile (heartbeat 6 s here)."""
    db_url = control_runs
    tick = token()
    first, second = (f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db"))
    jobs = f"""\
  - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
      kwargs: {{name: {tick}}}}}
"""

    def config_on(run_table: str):
        config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table,
                                jobs=jobs)
        config.write_text(config.read_text().replace("lease: 3.0s", "lease: 30s")
                          .replace("heartbeat: 0.5s", "heartbeat: 6s"))
        return config

    from worker.cluster import metadata
    from worker.control_cluster import ensure_control_schema
    engine = create_engine(second)
    try:
        metadata.create_all(engine)       # the run table and worker_schema
        ensure_control_schema(engine)
    finally:
        engine.dispose()
    query(second, "INSERT INTO worker_paused (job, since_ms, node) VALUES ('tick', 1, 'test')")
    config = config_on(first)
    node = daemons(config, env={"NODE": "node-a"})
    node.wait_for("daemon started", timeout=40)
    assert wait_for(lambda: runs(db_url, tick))      # not paused in the first one
    config_on(second)
    node.signal(signal.SIGHUP)
    node.wait_for("reloaded")
    reloaded = time.time()
    time.sleep(3)
    assert runs(db_url, tick, after=reloaded + 0.2) == [], node.log
    node.wait_for("paused jobs (until --resume): tick")
    assert on("elsewhere", config, "--resume", "tick").returncode == 0
    back = time.time()
    assert wait_for(lambda: runs(db_url, tick, after=back))
    assert node.stop() == 0
