"""Several nodes, one schedule: real worker processes sharing one run table, on
SQLite, on MariaDB through pyodbc and on PostgreSQL through psycopg (issue: runs
coordinated through the database). The first two are scenarios of the suite over
every backend (tests/backends.py)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.backends import scenario
from tests.conftest import MARIADB_URL
from tests.tcpproxy import TcpProxy
from tests.processes import runs

LEASE, HEARTBEAT = 3.0, 0.5


def cluster_config(path: Path, url: str, jobs: str, run_table_url: str | None = None,
                   misfire_grace_time: str = "1m") -> Path:
    path.write_text(f"""\
database:
  url: "{url}"
worker:
  max_workers: 4
  shutdown_timeout: 10s
  misfire_grace_time: {misfire_grace_time}
  lock_dir: "{path.parent}/locks-${{NODE}}"   # each node plays another host
cluster:
  node: ${{NODE}}
  lease: {LEASE}s
  heartbeat: {HEARTBEAT}s
  batch_slot: 1h   # --once runs a few ms apart must agree on their slot
{f'  url: "{run_table_url}"' if run_table_url else ''}
retry: {{attempts: 3, wait_initial: 50ms, wait_max: 200ms}}
jobs:
{jobs}""")
    return path


def run_rows(url: str, job: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(
                "SELECT slot_ms, node, outcome, recovered, started_ms, ended_ms "
                "FROM worker_runs WHERE job = :j ORDER BY slot_ms"), {"j": job}).all()
    finally:
        engine.dispose()


@pytest.fixture
def run_table_url(db_url, backend, tmp_path, request):
    """A server: the run table sits beside the jobs' tables. SQLite: in a file of its
    own, since a job holding SQLite's write lock would block every claim. SQL Server:
    on a TDS test server of its own (tds_run_table_server), where the nodes' claims
    meet each other's row and key locks."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    elif backend == "sqlserver":
        url = request.getfixturevalue("tds_run_table_server").url("msodbc")
    else:
        url = db_url

    def drop():
        engine = create_engine(url)
        with engine.begin() as connection:
            for table in ("worker_runs", "worker_schema"):
                connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()
    drop()
    yield url
    drop()


@scenario("three_nodes_run_each_occurrence_exactly_once")
def test_three_nodes_run_each_occurrence_exactly_once(db_url, run_table_url, tmp_path,
                                                      daemons, backend, request):
    url = db_url
    before = run_table_lock_counters(backend, request)
    config = cluster_config(tmp_path / "jobs.yaml", url, run_table_url=run_table_url,
                            jobs="""\
  - {name: alpha, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: alpha}}
  - {name: beta, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: beta}}
""")
    nodes = [daemons(config, env={"NODE": f"node-{n}"}) for n in range(3)]
    for node in nodes:
        node.wait_for("daemon started")
    time.sleep(20)
    for node in nodes:
        node.signal(signal.SIGTERM)
    assert [node.wait() for node in nodes] == [0, 0, 0]
    for job in ("alpha", "beta"):
        rows = run_rows(run_table_url, job)
        slots = [row.slot_ms for row in rows]
        assert len(slots) == len(set(slots))                    # at most once per slot
        assert all(row.outcome == "success" for row in rows), rows
        # no lost occurrence: one run per second from the first to the last
        assert slots == list(range(slots[0], slots[-1] + 1000, 1000))
        assert len(runs(url, job)) == len(rows)                 # the job body ran once each
        assert abs(len(rows) - 20) <= 2                         # what one node would run
        assert len({row.node for row in rows}) >= 2             # the work is shared
    print(f"\n[three nodes / {db_url.split(':')[0]}] 20 s: alpha "
          f"{len(run_rows(run_table_url, 'alpha'))} runs, beta "
          f"{len(run_rows(run_table_url, 'beta'))} runs, 0 duplicates, 0 lost"
          + (f"; run table's server: {_delta(before, run_table_lock_counters(backend, request))}"
             if before else ""))


def run_table_lock_counters(backend: str, request) -> dict:
    """SQL Server: what the run table's TDS server's lock manager counted."""
    if backend != "sqlserver":
        return {}
    stats = request.getfixturevalue("tds_run_table_server").stats()
    return {name: stats[name] for name in ("lock_waits", "lock_timeouts", "deadlocks",
                                           "deadlock_victims")}


def _delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


@scenario("a_killed_nodes_idempotent_run_is_recovered")
def test_a_killed_nodes_idempotent_run_is_recovered(db_url, run_table_url, tmp_path,
                                                     daemons):
    url = db_url
    config = cluster_config(tmp_path / "jobs.yaml", url, run_table_url=run_table_url,
                            jobs="""\
  - {name: long, call: 'tests.jobfuncs:slow_record', every: 1h, idempotent: true,
     kwargs: {name: long, seconds: 4}}
  - {name: fragile, call: 'tests.jobfuncs:slow_record', every: 1h,
     kwargs: {name: fragile, seconds: 4}}
""", misfire_grace_time="2h")   # the current hour's slot is due at once
    first = daemons(config, env={"NODE": "doomed"})
    first.wait_for("job=long starting")
    first.wait_for("job=fragile starting")
    survivors = [daemons(config, env={"NODE": f"survivor-{n}"}) for n in range(2)]
    for node in survivors:
        node.wait_for("daemon started")
    time.sleep(0.5)
    first.process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    first.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = run_rows(run_table_url, "long")
        if rows and rows[0].outcome == "success":
            break
        time.sleep(0.2)
    for node in survivors:
        node.signal(signal.SIGTERM)
    assert [node.wait() for node in survivors] == [0, 0]
    (long_run,) = run_rows(run_table_url, "long")
    assert long_run.outcome == "success" and long_run.recovered == 1
    assert long_run.node.startswith("survivor-")
    recovered_after = long_run.ended_ms / 1000 - killed_at
    (fragile_run,) = run_rows(run_table_url, "fragile")
    assert fragile_run.outcome == "abandoned"             # not idempotent: reported only
    logs = "".join(node.log for node in survivors)
    assert "job=fragile run on node doomed marked abandoned" in logs
    assert "job=long recovering the abandoned run" in logs
    assert len(runs(url, "long")) == 1                     # the killed run left nothing
    assert runs(url, "fragile") == []
    print(f"\n[killed node / {db_url.split(':')[0]}] run completed by {long_run.node} "
          f"{recovered_after:.1f}s after the kill (lease {LEASE}s, job 4 s)")


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_node_cut_off_stops_claiming_and_rejoins(db_url, run_table_url, tmp_path,
                                                   daemons):
    url = db_url
    proxy = TcpProxy(3306)
    try:
        cut_url = MARIADB_URL.replace("Port=3306", f"Port={proxy.port}")
        jobs = """\
  - {name: tick, call: 'tests.jobfuncs:record_run', every: 1s, kwargs: {name: tick}}
"""
        direct = daemons(cluster_config(tmp_path / "direct.yaml", url, jobs),
                         env={"NODE": "direct"})
        cut = daemons(cluster_config(tmp_path / "cut.yaml", cut_url, jobs,
                                     run_table_url=cut_url), env={"NODE": "cut"})
        direct.wait_for("daemon started")
        cut.wait_for("daemon started")
        time.sleep(3)
        proxy.cut()
        cut_at = time.time()
        cut.wait_for("stops claiming runs", timeout=15)
        time.sleep(4)
        proxy.restore()
        restored_at = time.time()
        cut.wait_for("claims runs again", timeout=15)
        direct.signal(signal.SIGTERM)             # from now on only `cut` can run ticks
        assert direct.wait() == 0
        direct_stopped = time.time()
        time.sleep(3)
        cut.signal(signal.SIGTERM)
        assert cut.wait() in (0, 1)
    finally:
        proxy.close()
    rows = run_rows(run_table_url, "tick")
    slots = [row.slot_ms for row in rows]
    assert len(slots) == len(set(slots))
    assert slots == list(range(slots[0], slots[-1] + 1000, 1000))   # nothing lost
    during = [r for r in rows if cut_at + LEASE < r.slot_ms / 1000 < restored_at]
    assert during and all(r.node == "direct" for r in during)
    after = [r for r in rows if r.slot_ms / 1000 > direct_stopped + 0.5]
    assert len(after) >= 2 and all(r.node == "cut" for r in after)  # it rejoined
    print(f"\ncut off for {restored_at - cut_at:.1f}s: "
          f"{sum(1 for r in rows if r.node == 'direct')} runs by the connected node, "
          f"{sum(1 for r in rows if r.node == 'cut')} by the one cut off, none lost")


def test_once_on_several_hosts_runs_a_job_once_per_slot(db_url, run_table_url, tmp_path,
                                                        daemons):
    """The same `--once` from cron on two hosts at the same moment: one runs the job,
    the other finds the slot claimed and exits 75."""
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            jobs="""\
  - {name: report, call: 'tests.jobfuncs:slow_record', kwargs: {name: report, seconds: 1}}
""")
    hosts = [daemons(config, "--once", env={"NODE": f"host-{n}"}) for n in range(2)]
    codes = sorted(host.wait() for host in hosts)
    assert codes == [0, 75]
    (row,) = run_rows(run_table_url, "report")
    assert row.outcome == "success"
    assert len(runs(db_url, "report")) == 1
    loser = next(host for host in hosts if host.process.returncode == 75)
    assert "was claimed by node host-" in loser.log


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_list_and_history_show_the_runs(db_url, run_table_url, tmp_path, daemons):
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            jobs="""\
  - {name: report, call: 'tests.jobfuncs:record_run', kwargs: {name: report}}
  - {name: broken, call: 'tests.jobfuncs:syntax_error'}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert once.wait() == 1                                 # `broken` failed
    listed = daemons(config, "--list", env={"NODE": "host-a"})
    assert listed.wait() == 0
    lines = {line.split()[0]: line for line in listed.process.stdout.read().splitlines()}
    assert "success at" in lines["report"] and "on host-a" in lines["report"]
    assert "failed at" in lines["broken"]
    history = daemons(config, "--history", "broken", env={"NODE": "host-a"})
    assert history.wait() == 0
    rows = history.process.stdout.read().splitlines()
    assert rows[0].split()[:4] == ["slot", "node", "outcome", "attempts"]
    assert "host-a" in rows[1] and "failed" in rows[1] and "syntax error" in rows[1]


# --- in-process nodes: Cluster objects on the real run table ------------------------

def node(url: str, name: str, lease: float, heartbeat: float):
    from worker.cluster import Cluster
    from worker.config import ClusterSettings
    cluster = Cluster(ClusterSettings(url=url, node=name, lease=lease, heartbeat=heartbeat),
                      url)
    cluster.ensure_schema()
    return cluster


def test_each_row_is_judged_by_its_own_lease(run_table_url):
    """Issue 10 item 11: a node with a short lease must not mark abandoned the healthy
    run of a node with a long lease (which heartbeats less often), and a node with a
    long lease still marks a short-lease node's silent run abandoned in time."""
    patient = node(run_table_url, "patient", lease=60, heartbeat=20)
    hasty = node(run_table_url, "hasty", lease=1, heartbeat=0.2)
    try:
        slow_beating = patient.claim("report", 1000)
        silent = hasty.claim("tick", 1000)
        assert slow_beating and silent
        time.sleep(1.5)              # past hasty's lease, well within patient's
        hasty.beat()                 # hasty's housekeeping; hasty heartbeats itself too
        patient.beat()
        rows = {job: run_rows(run_table_url, job)[0] for job in ("report", "tick")}
        assert rows["report"].outcome == "running"
        assert rows["tick"].outcome == "running"           # hasty just heartbeated it
        hasty.finish(silent, "success", 1, None)
        silent = hasty.claim("tick", 2000)
        time.sleep(1.5)
        patient.beat()               # hasty went silent for longer than its own lease
        assert run_rows(run_table_url, "tick")[-1].outcome == "abandoned"
        assert run_rows(run_table_url, "report")[0].outcome == "running"
    finally:
        patient.stop()
        hasty.stop()


@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "sqlserver"], indirect=True)
def test_a_version_1_run_table_is_upgraded_by_nodes_starting_together(run_table_url):
    """An existing v1 table (no lease column) gains it once, even when several nodes
    start at the same moment; its old rows stay and are judged by the node's lease."""
    import threading
    from sqlalchemy import (BigInteger, Column, Integer, MetaData, String, Table,
                            inspect)
    from worker.cluster import SCHEMA_VERSION
    v1 = MetaData()
    Table("worker_runs", v1,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("job", String(200), nullable=False),
          Column("slot_ms", BigInteger, nullable=False),
          Column("node", String(200), nullable=False),
          Column("started_ms", BigInteger, nullable=False),
          Column("heartbeat_ms", BigInteger, nullable=False),
          Column("ended_ms", BigInteger, nullable=True),
          Column("outcome", String(16), nullable=False),
          Column("attempts", Integer, nullable=False),
          Column("recovered", Integer, nullable=False),
          Column("error", String(1000), nullable=True))
    Table("worker_schema", v1, Column("component", String(32), primary_key=True),
          Column("version", Integer, nullable=False))
    engine = create_engine(run_table_url)
    with engine.begin() as connection:
        v1.create_all(connection)
        connection.execute(text("INSERT INTO worker_schema VALUES ('runs', 1)"))
        ten_seconds_ago = int(time.time() * 1000) - 10_000
        connection.execute(text(
            "INSERT INTO worker_runs (job, slot_ms, node, started_ms, heartbeat_ms, "
            "outcome, attempts, recovered) VALUES ('old', 1, 'gone', :t, :t, 'running', "
            "0, 0)"), {"t": ten_seconds_ago})
    engine.dispose()
    from worker.cluster import Cluster
    from worker.config import ClusterSettings
    nodes = [Cluster(ClusterSettings(url=run_table_url, node=f"n{n}", lease=2,
                                     heartbeat=1), run_table_url) for n in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))

    def join(cluster):
        start.wait()
        try:
            cluster.ensure_schema()
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)
    threads = [threading.Thread(target=join, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        engine = create_engine(run_table_url)
        with engine.connect() as connection:
            assert connection.execute(text(
                "SELECT version FROM worker_schema")).scalar_one() == SCHEMA_VERSION
            columns = {c["name"] for c in inspect(connection).get_columns("worker_runs")}
            assert "lease_ms" in columns
        engine.dispose()
        claim = nodes[0].claim("new", 5000)
        assert claim is not None
        nodes[1].beat()                 # the old row is judged by n1's lease (2 s)
        (old,) = run_rows(run_table_url, "old")
        assert old.outcome == "abandoned"
        assert run_rows(run_table_url, "new")[0].outcome == "running"
    finally:
        for cluster in nodes:
            cluster.stop()


def test_nodes_with_the_default_name_on_one_host_and_pid_are_told_apart(run_table_url):
    """Issue 10 item 12: two containers, same hostname, both PID 1 (here: two nodes
    in one process). One dies mid-run; the other must find its run abandoned, not
    keep heartbeating it as its own."""
    import socket
    dead = node(run_table_url, None, lease=1, heartbeat=0.2)
    alive = node(run_table_url, None, lease=1, heartbeat=0.2)
    try:
        assert dead.node != alive.node
        assert dead.node.startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert dead.claim("report", 1000) is not None      # then it stops beating
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive.beat()
            if run_rows(run_table_url, "report")[0].outcome != "running":
                break
            time.sleep(0.2)
        (row,) = run_rows(run_table_url, "report")
        assert row.outcome == "abandoned" and row.node == dead.node
    finally:
        dead.stop()
        alive.stop()


def test_names_the_run_table_cannot_tell_apart_or_hold_are_problems():
    """Issue 10 item 13, for validation in cluster mode (exit 78)."""
    from worker.cluster import JOB_NAME_MAX, cluster_name_problems
    assert cluster_name_problems(["report", "tick", "Report-2"]) == []
    (problem,) = cluster_name_problems(["report", "tick", "Report"])
    assert "'report' and 'Report' differ only in case" in problem
    (problem,) = cluster_name_problems(iter(["ok", "x" * (JOB_NAME_MAX + 1)]))
    assert f"is {JOB_NAME_MAX + 1} characters long" in problem
    assert cluster_name_problems(["x" * JOB_NAME_MAX]) == []
    (problem,) = cluster_name_problems([], node="n" * 300)
    assert "cluster.node" in problem


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_claim_error_of_one_job_does_not_stop_the_others(run_table_url, db_url):
    """A name too long for the column (MariaDB refuses it: strict mode) fails that
    job's claim; the node stays healthy and other jobs' claims go on."""
    from worker.cluster import JOB_NAME_MAX
    cluster = node(run_table_url, "n1", lease=60, heartbeat=20)
    cluster.start()
    try:
        assert cluster.healthy is True
        assert cluster.claim("x" * (JOB_NAME_MAX + 50), 1000) is None
        assert cluster.healthy is True
        assert cluster.claim("report", 1000) is not None
        assert cluster.abandoned_runs(["report"]) == []    # still looking, too
        assert [row.node for row in run_rows(run_table_url, "report")] == ["n1"]
    finally:
        cluster.stop()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_a_claim_whose_commit_answer_was_lost_is_recognised_as_ours(run_table_url,
                                                                   db_url):
    """Issue 10 item 14: the claim's COMMIT reaches the server and is applied, the
    answer is lost (the proxy drops it and cuts the connection). The row is ours:
    the occurrence runs here, instead of being taken for another node's."""
    proxy = TcpProxy(3306)
    try:
        url = run_table_url.replace("Port=3306", f"Port={proxy.port}")
        cluster = node(url, "n1", lease=60, heartbeat=20)
        cluster.start()
        try:
            proxy.lose_answer_to(b"COMMIT")
            claim = cluster.claim("report", 1000)
            assert proxy.answers_lost == 1
            (row,) = run_rows(run_table_url, "report")
            assert claim is not None and row.node == "n1" and row.outcome == "running"
            cluster.finish(claim, "success", 1, None)
            assert run_rows(run_table_url, "report")[0].outcome == "success"
            # Another node's row for a slot is still another node's.
            other = node(run_table_url, "n2", lease=60, heartbeat=20)
            try:
                assert other.claim("report", 2000) is not None
            finally:
                other.stop()
            proxy.lose_answer_to(b"COMMIT")
            assert cluster.claim("report", 2000) is None
        finally:
            cluster.stop()
    finally:
        proxy.close()


def test_heartbeats_keep_only_the_runs_this_node_knows_alive(run_table_url):
    """A row of ours that the node does not know it runs (a claim whose outcome it
    never learned) is not heartbeated: it ends abandoned, not running for ever."""
    cluster = node(run_table_url, "n1", lease=1, heartbeat=0.2)
    try:
        known = cluster.claim("known", 1000)
        engine = create_engine(run_table_url)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO worker_runs (job, slot_ms, node, started_ms, heartbeat_ms, "
                "outcome, attempts, recovered, lease_ms) SELECT 'ghost', 1000, node, "
                "started_ms, heartbeat_ms, 'running', 0, 0, lease_ms FROM worker_runs "
                "WHERE job = 'known'"))
        engine.dispose()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cluster.beat()
            if run_rows(run_table_url, "ghost")[0].outcome != "running":
                break
            time.sleep(0.2)
        assert run_rows(run_table_url, "ghost")[0].outcome == "abandoned"
        assert run_rows(run_table_url, "known")[0].outcome == "running"
        cluster.finish(known, "success", 1, None)
    finally:
        cluster.stop()
