"""Several nodes, one schedule: real worker processes sharing one run table, on
SQLite, on MariaDB through pyodbc and on PostgreSQL through psycopg (issue: runs
coordinated through the database). The first two are scenarios of the suite over
every backend (tests/backends.py)."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.backends import scenario
from tests.conftest import MARIADB_URL
from tests.tcpproxy import TcpProxy
from tests.processes import history_rows, runs

LEASE, HEARTBEAT = 3.0, 0.5


def cluster_config(path: Path, url: str, jobs: str, run_table_url: str | None = None,
                   misfire_grace_time: str = "1m", max_workers: int = 4,
                   extra: str = "") -> Path:
    path.write_text(f"""\
{extra}database:
  url: "{url}"
worker:
  max_workers: {max_workers}
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


def wait_for(condition, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


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
    # The runs hold until the test creates `release`: still going when the node is
    # killed however long the survivors take to start (seconds on a loaded machine).
    release = tmp_path / "release"
    config = cluster_config(tmp_path / "jobs.yaml", url, run_table_url=run_table_url,
                            jobs=f"""\
  - {{name: long, call: 'tests.jobfuncs:record_then_wait_for_file', every: 1h,
     idempotent: true, kwargs: {{name: long, path: "{release}"}}}}
  - {{name: fragile, call: 'tests.jobfuncs:wait_for_file', every: 1h,
     kwargs: {{path: "{release}"}}}}
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
    release.touch()
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
    # The run history (in the job database): the recovered run is one row, by the
    # node that ran it; the killed node's run never ended, so it has none.
    (recovered,) = history_rows(url, "long")
    assert (recovered.kind, recovered.outcome, recovered.node) == \
        ("recovered", "success", long_run.node)
    assert recovered.scheduled_ms == long_run.slot_ms
    assert history_rows(url, "fragile") == []
    print(f"\n[killed node / {db_url.split(':')[0]}] run completed by {long_run.node} "
          f"{recovered_after:.1f}s after the kill (lease {LEASE}s)")


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
    assert rows[0].split()[:4] == ["started", "node", "outcome", "attempts"]
    assert "host-a" in rows[1] and "failed" in rows[1] and "syntax error" in rows[1]
    # Without the run history, --history reads the run table.
    config.write_text(config.read_text().replace("jobs:\n", "history: {enabled: false}\n"
                                                 "jobs:\n", 1))
    table = daemons(config, "--history", "broken", env={"NODE": "host-a"})
    assert table.wait() == 0
    rows = table.process.stdout.read().splitlines()
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
    job's claim (an error, not another node's run); the node stays healthy and
    other jobs' claims go on."""
    from worker.cluster import JOB_NAME_MAX, ClaimError
    cluster = node(run_table_url, "n1", lease=60, heartbeat=20)
    cluster.start()
    try:
        assert cluster.healthy is True
        with pytest.raises(ClaimError, match="Data too long"):
            cluster.claim("x" * (JOB_NAME_MAX + 50), 1000)
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


# --- lifecycle: outcomes never dropped, claims that fail, a heartbeat that survives ------

def batch_slot_ms(now: float | None = None) -> int:
    """The slot a `--once` run of a job without schedule claims (batch_slot: 1h)."""
    return round((now or time.time()) / 3600) * 3600 * 1000


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_once_whose_outcome_cannot_be_written_says_so_and_exits_1(db_url, run_table_url,
                                                                  tmp_path, daemons):
    """Issue 19 item 2: a program holds the run table's SQLite file for 6 s (twice the
    lease) while `second` ends: its outcome cannot be written within its lease. The
    process says so on stderr and in the summary, exits 1, and leaves the row
    'running' and no longer heartbeated, so that it is marked abandoned."""
    runs_file = run_table_url.removeprefix("sqlite:///")
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            jobs=f"""\
  - {{name: holder, call: 'tests.jobfuncs:lock_sqlite_file',
     kwargs: {{path: "{runs_file}", seconds: 6, after: 0.3}}}}
  - {{name: second, call: 'tests.jobfuncs:slow_record', kwargs: {{name: second, seconds: 1}}}}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert once.wait(60) == 1
    summary = once.process.stdout.read()
    assert "not written to the run table: second" in summary, summary
    assert "job=second could not record its outcome (success) within its lease" in once.log
    assert "the end of 1 run(s) could not be written" in once.log
    assert run_rows(run_table_url, "holder")[0].outcome == "success"
    # Not heartbeated any more: abandoned by the rules (by this node's own
    # housekeeping once the lock went, or by the next peer's).
    peer = node(run_table_url, "peer", lease=LEASE, heartbeat=HEARTBEAT)
    try:
        peer.beat()
        (second,) = run_rows(run_table_url, "second")
        assert second.outcome == "abandoned" and second.node == "host-a"
    finally:
        peer.stop()


def test_once_stopped_by_sigterm_releases_runs_claimed_ahead(db_url, run_table_url,
                                                             tmp_path, daemons):
    """Issue 19 item 3: one thread, `first` running and `second` claimed ahead of it;
    SIGTERM. `second` never started: its row is deleted (not written 'cancelled'), so
    another host's `--once` runs it."""
    marker = tmp_path / "first-runs"
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            max_workers=1, jobs=f"""\
  - {{name: first, call: 'tests.jobfuncs:touch_then_python_sleep',
     kwargs: {{path: "{marker}", seconds: 2}}}}
  - {{name: second, call: 'tests.jobfuncs:record_run', kwargs: {{name: second}}}}
  - {{name: third, call: 'tests.jobfuncs:record_run', kwargs: {{name: third}}}}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert wait_for(marker.exists, timeout=20)
    assert run_rows(run_table_url, "second")[0].outcome == "running"   # claimed ahead
    once.signal(signal.SIGTERM)
    assert once.wait() == 1                          # runs were not started
    assert run_rows(run_table_url, "first")[0].outcome == "success"
    assert run_rows(run_table_url, "second") == []   # released, as if never claimed
    assert run_rows(run_table_url, "third") == []
    other = daemons(config, "--once", "--job", "second", env={"NODE": "host-b"})
    assert other.wait() == 0
    assert [row.node for row in run_rows(run_table_url, "second")] == ["host-b"]
    assert len(runs(db_url, "second")) == 1


def refuse_claims_of(url: str, job: str) -> None:
    """A trigger that makes the database refuse every claim of `job` with an error
    of its own (neither a duplicate key nor anything retryable)."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text(
                    "CREATE OR REPLACE FUNCTION worker_test_refuse() RETURNS trigger AS $$ "
                    f"BEGIN IF NEW.job = '{job}' THEN RAISE EXCEPTION 'claims of {job} "
                    "refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
                connection.execute(text(
                    "CREATE TRIGGER worker_test_refuse BEFORE INSERT ON worker_runs "
                    "FOR EACH ROW EXECUTE FUNCTION worker_test_refuse()"))
            else:
                connection.execute(text(
                    "CREATE TRIGGER worker_test_refuse BEFORE INSERT ON worker_runs FOR "
                    f"EACH ROW BEGIN IF NEW.job = '{job}' THEN SIGNAL SQLSTATE '45000' "
                    f"SET MESSAGE_TEXT = 'claims of {job} refused'; END IF; END"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mariadb", "postgresql"], indirect=True)
def test_once_claim_failing_on_a_database_error_is_that_jobs_failure(db_url, run_table_url,
                                                                    tmp_path, daemons):
    """Issue 19 item 7: the run table refuses `refused`'s claim with an error. That
    is the job's failure (log, summary, exit 1), not "claimed by node ?"; the other
    job runs."""
    node(run_table_url, "setup", lease=LEASE, heartbeat=HEARTBEAT).database.dispose()
    refuse_claims_of(run_table_url, "refused")
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            jobs="""\
  - {name: refused, call: 'tests.jobfuncs:record_run', kwargs: {name: refused}}
  - {name: fine, call: 'tests.jobfuncs:record_run', kwargs: {name: fine}}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert once.wait() == 1
    lines = {line.split()[0]: line for line in once.process.stdout.read().splitlines()}
    assert lines["refused"].split()[1] == "failed"
    assert "its run could not be claimed" in lines["refused"]
    assert "claims of refused refused" in lines["refused"]
    assert lines["fine"].split()[1] == "success"
    assert "job=refused failed: its run could not be claimed" in once.log
    assert "claimed by node" not in once.log
    assert lines["refused"].split()[2] == "0"                # never started: 0 attempts
    assert "job=refused attempt" not in once.log
    assert "job=fine attempt=1/3 succeeded" in once.log


def test_once_with_the_run_table_out_of_reach_exits_69_with_a_summary(db_url, tmp_path,
                                                                    daemons):
    """Issue 19 item 8: one error line, every job failed in the summary, exit 69, no
    traceback."""
    prom = tmp_path / "run_worker.prom"
    config = cluster_config(tmp_path / "jobs.yaml", db_url,
                            run_table_url=f"sqlite:///{tmp_path}/no-such-dir/runs.db",
                            extra=f'metrics: {{textfile: "{prom}"}}\n', jobs="""\
  - {name: a, call: 'tests.jobfuncs:record_run', kwargs: {name: a}}
  - {name: b, call: 'tests.jobfuncs:record_run', kwargs: {name: b}}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert once.wait() == 69
    summary = once.process.stdout.read().splitlines()
    assert [line.split()[:2] for line in summary[1:3]] == [["a", "failed"], ["b", "failed"]]
    assert summary[-1] == "2 job(s): 0 succeeded, 2 failed"
    assert len([line for line in once.log.splitlines()
                if "cannot use the cluster's run table" in line]) == 1, once.log
    assert "Traceback" not in once.log
    assert runs(db_url, "a") == []
    from tests.test_monitoring import samples_of, value
    samples = samples_of(prom.read_text())          # the textfile says it too
    assert value(samples, "run_worker_runs_total", job_name="b", outcome="failed") == 1


def hold_claim_lock(url: str, job: str, slot_ms: int):
    """Another node's transaction, left open, holding the lock of the occurrence's
    row (SQLite: of the whole file). Returns a function that ends it."""
    engine = create_engine(url)
    connection = engine.connect()
    if engine.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        connection.begin()
    connection.execute(text(
        "INSERT INTO worker_runs (job, slot_ms, node, started_ms, heartbeat_ms, outcome, "
        "attempts, recovered) VALUES (:job, :slot, 'other', 0, 0, 'running', 0, 0)"),
        {"job": job, "slot": slot_ms})

    def release():
        connection.rollback()
        connection.close()
        engine.dispose()
    return release


@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql"], indirect=True)
def test_a_claim_behind_another_nodes_lock_fails_within_the_lease(run_table_url):
    """Issue 19 (what 3): statements on the run table carry their own lock timeouts:
    a claim waiting for another node's uncommitted claim of the same occurrence
    fails (ClaimError) well within the lease instead of waiting (for ever on
    PostgreSQL, 50 s x 3 attempts on MariaDB, 5 s on SQLite)."""
    import threading
    lease = 2 * LEASE                # its statement timeout: 1 s
    cluster = node(run_table_url, "n1", lease=lease, heartbeat=HEARTBEAT)
    release = hold_claim_lock(run_table_url, "report", 1000)
    outcome: list = []

    def claim():
        started = time.monotonic()
        try:
            outcome.append(cluster.claim("report", 1000))
        except Exception as exc:  # collected: ClaimError expected
            outcome.append(exc)
        outcome.append(time.monotonic() - started)
    thread = threading.Thread(target=claim, daemon=True)
    try:
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the claim still waits after 20 s"
    finally:
        release()
        thread.join(60)
        cluster.stop()
    from worker.cluster import ClaimError
    error, waited = outcome
    assert isinstance(error, ClaimError), error
    assert waited < lease, waited
    print(f"\n[claim behind a lock / {run_table_url.split(':')[0]}] ClaimError after "
          f"{waited:.2f}s (statement timeout {cluster.statement_timeout:g}s, lease "
          f"{lease:g}s)")


@pytest.mark.parametrize("backend", ["sqlserver"], indirect=True)
def test_a_claim_on_sql_server_never_waits_unbounded(run_table_url, request):
    """SQL Server waits for ever by default: the run table's connections set
    LOCK_TIMEOUT and a query timeout, so a claim whose statement the server holds
    (the TDS test server's delay fault) is cut (an ATTENTION) within the lease. (The
    held INSERT may have been applied: the claim then finds its own row.)"""
    server = request.getfixturevalue("tds_run_table_server")
    cluster = node(run_table_url, "n1", lease=2 * LEASE, heartbeat=HEARTBEAT)
    attentions = server.stats()["attentions"]
    server.set_faults('- {match: "insert into worker_runs", delay: 30s, times: 1}\n')
    try:
        started = time.monotonic()
        try:
            cluster.claim("report", 1000)
        except Exception:  # a ClaimError, or the claim went through: both in time
            pass
        waited = time.monotonic() - started
    finally:
        server.set_faults("[]\n")
        cluster.stop()
    assert server.stats()["attentions"] > attentions     # the query timeout fired
    assert waited < 2 * LEASE, waited


def test_the_heartbeat_survives_a_pool_timeout_and_the_node_stops_claiming(run_table_url):
    """Issue 19 item 5: every connection of the cluster's small pool is taken, so
    the heartbeat meets a pool TimeoutError (no DBAPIError): the thread lives on, the
    node says it is not ready and claims nothing (a claim there is an error, not an
    exception out of the loop), then resumes once a heartbeat succeeds again."""
    from types import SimpleNamespace
    from worker.monitoring.monitor import Health
    cluster = node(run_table_url, "n1", lease=2, heartbeat=0.2)
    cluster.start()
    held = []
    try:
        assert cluster.healthy
        held = [cluster.database.engine.connect() for _ in range(4)]   # the whole pool
        deadline = time.monotonic() + 10
        while cluster.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster._thread.is_alive()
        assert not cluster.healthy
        assert "TimeoutError" in cluster.readiness_problem()
        from worker.cluster import ClaimError
        health = Health(stall_after=60)           # what /readyz answers
        health.database_ready(True)
        health.runtime_changed(SimpleNamespace(cluster=cluster))
        assert "cluster heartbeat failed" in health.not_ready()
        with pytest.raises(ClaimError):
            cluster.claim("report", 1000)
        for connection in held:
            connection.close()
        held = []
        deadline = time.monotonic() + 10
        while not cluster.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.healthy and health.not_ready() is None
        assert cluster.claim("report", 1000) is not None
    finally:
        for connection in held:
            connection.close()
        cluster.stop()


def test_a_heartbeat_stuck_past_the_lease_makes_the_node_not_ready(run_table_url):
    """A heartbeat that neither fails nor succeeds (its thread gone, or stuck) is
    seen: after a lease without success the node is not healthy."""
    cluster = node(run_table_url, "n1", lease=1, heartbeat=0.2)
    cluster.start()
    try:
        cluster._stop.set()               # the heartbeat thread ends: no more beats
        cluster._thread.join(5)
        assert cluster.healthy            # within the lease still
        time.sleep(1.3)
        assert not cluster.healthy
        assert "has not succeeded for" in cluster.readiness_problem()
    finally:
        cluster.stop()


@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql", "sqlserver"],
                         indirect=True)
def test_status_page_reads_the_run_table_once_per_request(run_table_url, tmp_path):
    """Issue 19 item 5: one run-table query per status request, whatever the number
    of jobs; each job still shows its own newest runs."""
    from sqlalchemy import event
    from worker.app import build_runtime, load_config
    from worker.monitoring.monitor import StatusBoard
    from worker.parts import PartOwner
    config_path = cluster_config(tmp_path / "jobs.yaml", f"sqlite:///{tmp_path}/jobs.db",
                                 run_table_url=run_table_url, jobs="".join(
        f"  - {{name: job{n}, call: 'tests.jobfuncs:select_one'}}\n" for n in range(5)))
    os.environ["NODE"] = "status"
    try:
        config, functions = load_config(str(config_path))
    finally:
        del os.environ["NODE"]
    runtime = build_runtime(config, functions, jobs=config.jobs, scheduled=False,
                            owner=PartOwner())
    try:
        runtime.cluster.ensure_schema()
        for slot in range(3):
            for n in (1, 3):
                claim = runtime.cluster.claim(f"job{n}", 1000 * (slot + 1))
                runtime.cluster.finish(claim, "success", 1, None)
        statements: list[str] = []
        event.listen(runtime.cluster.database.engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        board = StatusBoard()
        board.runtime_changed(runtime)
        jobs = {job["name"]: job for job in board.snapshot()["jobs"]}
        assert len([s for s in statements if "worker_runs" in s]) == 1, statements
        assert [len(jobs[f"job{n}"]["recent"]) for n in range(5)] == [0, 3, 0, 3, 0]
    finally:
        runtime.release()
        runtime.owner.wait_closed()


def proxied_node(proxy, name: str, lease: float, heartbeat: float):
    url = MARIADB_URL.replace("Port=3306", f"Port={proxy.port}")
    return node(url, name, lease=lease, heartbeat=heartbeat)


@contextmanager
def a_run_ending_while_cut_off(lease: float, heartbeat: float):
    """A node reaching MariaDB through a proxy: its run of `report` ends while the
    proxy has cut every connection. Yields (proxy, cluster)."""
    proxy = TcpProxy(3306)
    cluster = proxied_node(proxy, "n1", lease=lease, heartbeat=heartbeat)
    try:
        cluster.start()
        claim = cluster.claim("report", 1000)
        proxy.cut()
        cluster.finish(claim, "success", 1, None)
        yield proxy, cluster
    finally:
        cluster.stop()
        proxy.close()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_an_outcome_cut_off_mid_finish_is_written_when_the_database_returns(run_table_url):
    """The database drops every connection as the run ends, and comes back within
    the lease: the outcome is written then, and nothing is reported lost."""
    with a_run_ending_while_cut_off(lease=6, heartbeat=0.3) as (proxy, cluster):
        assert run_rows(run_table_url, "report")[0].outcome == "running"
        time.sleep(1)
        proxy.restore()
        assert wait_for(lambda: run_rows(run_table_url, "report")[0].outcome == "success")
        assert cluster.lost_outcomes == []


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_an_outcome_not_written_within_its_lease_is_reported_while_the_database_is_down(
        run_table_url, caplog):
    """The database stays away past the lease: the outcome is given up when the lease
    runs out (said at once, not when the database returns), never written late, and
    the row is left to be marked abandoned."""
    with a_run_ending_while_cut_off(lease=2, heartbeat=0.2) as (proxy, cluster):
        assert wait_for(lambda: cluster.lost_outcomes == ["report"], timeout=10)
        assert "job=report could not record its outcome (success) within its lease" \
            in caplog.text
        proxy.restore()
        assert wait_for(lambda: cluster.healthy)
        cluster.beat()          # its housekeeping judges its own row like any other
        (row,) = run_rows(run_table_url, "report")
        assert row.outcome == "abandoned" and row.node == "n1"
        assert cluster.lost_outcomes == ["report"]


def test_releasing_a_recovered_run_leaves_it_abandoned(run_table_url):
    """A recovered run that is given back unstarted goes back to `abandoned` (to be
    offered again), not deleted: deleting it would forget the run that was lost."""
    dead = node(run_table_url, "dead", lease=1, heartbeat=0.2)
    survivor = node(run_table_url, "survivor", lease=1, heartbeat=0.2)
    try:
        assert dead.claim("report", 1000) is not None
        time.sleep(1.3)
        survivor.beat()
        (candidate,) = survivor.abandoned_runs(["report"])
        claim = survivor.reclaim(candidate)
        assert claim is not None and run_rows(run_table_url, "report")[0].outcome == "running"
        survivor.release(claim)
        (row,) = run_rows(run_table_url, "report")
        assert row.outcome == "abandoned"
        assert survivor.abandoned_runs(["report"])
    finally:
        dead.stop()
        survivor.stop()


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_readyz_is_503_while_the_cluster_heartbeat_fails(db_url, run_table_url, tmp_path,
                                                         daemons):
    """Issue 19 item 5: the jobs' database answers, the run table does not (cut by a
    proxy): /readyz says why with 503, and 200 again once a heartbeat succeeds; the
    log says it once each way."""
    from tests.test_monitoring import get, listening_port, wait_until
    proxy = TcpProxy(3306)
    try:
        cut_url = MARIADB_URL.replace("Port=3306", f"Port={proxy.port}")
        config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=cut_url,
                                extra="metrics: {port: 0}\n", jobs="""\
  - {name: tick, call: 'tests.jobfuncs:select_one', every: 1s}
""")
        daemon = daemons(config, env={"NODE": "cut"})
        port = listening_port(daemon)
        # Once started: the listener answers earlier, before the node's first read
        # of the paused jobs, which the cut would then hold up as well.
        daemon.wait_for("daemon started", timeout=30)
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "/readyz 200 at start")
        proxy.cut()
        status, body = wait_until(lambda: (lambda answer: answer[0] == 503 and answer)(
            get(port, "/readyz")), 15, "/readyz 503 while the run table is cut off")
        assert "cluster heartbeat" in body
        time.sleep(2)
        proxy.restore()
        wait_until(lambda: get(port, "/readyz")[0] == 200, 15, "/readyz 200 once back")
        assert daemon.stop() in (0, 1)
    finally:
        proxy.close()
    assert daemon.log.count("this node stops claiming runs and is not ready") == 1
    assert daemon.log.count("cluster heartbeat works again") == 1


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_an_outcome_whose_commit_answer_was_lost_is_known_as_written(run_table_url,
                                                                     caplog):
    """The outcome's COMMIT is applied and its answer lost: the retry changes
    nothing, and the worker recognises its own write instead of reporting a run
    "already marked abandoned"."""
    caplog.set_level("INFO", logger="worker.cluster")
    proxy = TcpProxy(3306)
    cluster = proxied_node(proxy, "n1", lease=6, heartbeat=0.3)
    try:
        cluster.start()
        claim = cluster.claim("report", 1000)
        proxy.lose_answer_to(b"COMMIT")
        cluster.finish(claim, "success", 1, None)
        assert proxy.answers_lost == 1
        assert run_rows(run_table_url, "report")[0].outcome == "success"
        cluster.stop()            # the retry, at the latest
        assert cluster.lost_outcomes == [] and cluster.ends.waiting() == 0
        assert "already marked abandoned" not in caplog.text
        assert "job=report: outcome recorded after 1 failed attempt(s)" in caplog.text
    finally:
        cluster.stop()
        proxy.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_daemon_whose_outcome_could_not_be_written_exits_1_at_its_stop(
        db_url, run_table_url, tmp_path, daemons):
    """Issue 19 item 2, the daemon: an outcome lost to a run table locked past the
    lease makes the daemon exit 1 at its stop (not 0), saying which job."""
    runs_file = run_table_url.removeprefix("sqlite:///")
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            misfire_grace_time="2h", jobs=f"""\
  - {{name: holder, call: 'tests.jobfuncs:lock_sqlite_file', every: 1h,
     kwargs: {{path: "{runs_file}", seconds: 6, after: 0.3}}}}
  - {{name: second, call: 'tests.jobfuncs:slow_record', every: 1h,
     kwargs: {{name: second, seconds: 1}}}}
""")
    daemon = daemons(config, env={"NODE": "host-a"})
    daemon.wait_for("job=second could not record its outcome (success) within its lease",
                    timeout=30)
    daemon.wait_for("job=holder attempt=1/3 succeeded", timeout=30)
    assert daemon.stop() == 1
    assert "the end of 1 run(s) could not be written to the cluster's run table within " \
           "its lease (jobs: second)" in daemon.log


def test_pruning_a_long_backlog_goes_in_batches_and_keeps_recent_rows(run_table_url):
    """Rows older than keep_history are deleted in batches of PRUNE_BATCH (each
    statement stays within the run table's statement timeout); recent rows and
    running rows stay."""
    from worker.cluster import PRUNE_BATCH, Cluster
    from worker.config import ClusterSettings
    cluster = Cluster(ClusterSettings(url=run_table_url, node="n1", lease=60,
                                      heartbeat=20, keep_history=3600), run_table_url)
    cluster.ensure_schema()
    old = [{"job": "report", "slot": slot, "outcome": "success"}
           for slot in range(2 * PRUNE_BATCH + 7)]
    engine = create_engine(run_table_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO worker_runs (job, slot_ms, node, started_ms, heartbeat_ms, "
                "outcome, attempts, recovered) VALUES (:job, :slot, 'gone', 0, 0, "
                ":outcome, 1, 0)"), old)
        recent = cluster.claim("report", 10_000_000)
        cluster.finish(recent, "success", 1, None)
        cluster.beat()
        (row,) = run_rows(run_table_url, "report")
        assert row.slot_ms == 10_000_000
    finally:
        engine.dispose()
        cluster.stop()


FRESH_BOOT_PRUNE = """
import sys
from sqlalchemy import create_engine, text
from worker.cluster import Cluster
from worker.config import ClusterSettings
url = sys.argv[1]
cluster = Cluster(ClusterSettings(url=url, node="n1", lease=60, heartbeat=20,
                                  keep_history=3600), url)
cluster.ensure_schema()
engine = create_engine(url)
with engine.begin() as connection:
    connection.execute(text(
        "INSERT INTO worker_runs (job, slot_ms, node, started_ms, heartbeat_ms, outcome, "
        "attempts, recovered) VALUES ('report', 1, 'gone', 0, 0, 'success', 1, 0)"))
cluster.beat()
with engine.connect() as connection:
    print(connection.execute(text("SELECT COUNT(*) FROM worker_runs")).scalar())
cluster.stop()
"""


def test_a_host_booted_a_minute_ago_prunes_at_its_first_heartbeat(tmp_path):
    """Throttles compared time.monotonic() with a last time of 0: the monotonic clock
    counts from boot, so a daemon started by systemd at boot pruned nothing (and
    recovered no abandoned run, pinged no watchdog early) until the clock passed the
    interval (10 minutes for pruning). Run in a time namespace whose monotonic clock
    reads 5 s; this test's pruning twin failed on a machine up for under 10 minutes."""
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a time namespace needs root and unshare(1)")
    offset = str(-int(time.monotonic() - 5))
    command = ["unshare", "--time", "--monotonic", offset, sys.executable, "-c",
               FRESH_BOOT_PRUNE, f"sqlite:///{tmp_path / 'runs.db'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"no time namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sigterm_while_the_run_table_is_locked_reports_the_release_it_could_not_write(
        db_url, run_table_url, tmp_path, daemons):
    """Hostile: SIGTERM to cluster `--once` while another program holds the run table
    locked past the lease. The run claimed ahead cannot be released: said on stderr
    (exit 1), and its row is left to be marked abandoned, not silently kept."""
    import sqlite3
    marker = tmp_path / "first-runs"
    config = cluster_config(tmp_path / "jobs.yaml", db_url, run_table_url=run_table_url,
                            max_workers=1, jobs=f"""\
  - {{name: first, call: 'tests.jobfuncs:touch_then_python_sleep',
     kwargs: {{path: "{marker}", seconds: 1}}}}
  - {{name: second, call: 'tests.jobfuncs:record_run', kwargs: {{name: second}}}}
""")
    once = daemons(config, "--once", env={"NODE": "host-a"})
    assert wait_for(marker.exists, timeout=20)
    holder = sqlite3.connect(run_table_url.removeprefix("sqlite:///"), timeout=5,
                             isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        once.signal(signal.SIGTERM)
        time.sleep(LEASE + 2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert once.wait() == 1
    assert "job=second could not release its run claimed ahead within its lease" in once.log
    assert "could not be written to the cluster's run table" in once.log
    peer = node(run_table_url, "peer", lease=LEASE, heartbeat=HEARTBEAT)
    try:
        peer.beat()
        assert run_rows(run_table_url, "second")[0].outcome == "abandoned"
    finally:
        peer.stop()


@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql"], indirect=True)
def test_run_table_connections_carry_their_statement_and_lock_timeouts(run_table_url):
    """What each backend's session says its limits are, on a connection of the run
    table's pool: a sixth of the lease (here 12 s: 2 s)."""
    cluster = node(run_table_url, "n1", lease=12, heartbeat=HEARTBEAT)
    try:
        with cluster.database.engine.connect() as connection:
            dialect = connection.dialect.name
            if dialect == "sqlite":
                limits = connection.exec_driver_sql("PRAGMA busy_timeout").one()
                assert tuple(limits) == (2000,)
            elif dialect == "postgresql":
                limits = [connection.exec_driver_sql(f"SHOW {name}").scalar()
                          for name in ("lock_timeout", "statement_timeout")]
                assert limits == ["2s", "2s"]
            else:
                limits = connection.exec_driver_sql(
                    "SELECT @@innodb_lock_wait_timeout, @@max_statement_time").one()
                assert (int(limits[0]), float(limits[1])) == (2, 2.0)
    finally:
        cluster.stop()
