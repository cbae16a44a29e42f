"""Several nodes, one schedule: real worker processes sharing one run table, on
SQLite, on MariaDB through pyodbc and on PostgreSQL through psycopg (issue: runs
coordinated through the database). The first two are scenarios of the suite over
every backend (tests/backends.py)."""
from __future__ import annotations

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
def run_table_url(db_url, backend, tmp_path):
    """A server: the run table sits beside the jobs' tables. SQLite: in a file of its
    own, since a job holding SQLite's write lock would block every claim."""
    url = db_url if backend != "sqlite" else f"sqlite:///{tmp_path / 'runs.db'}"

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
                                                      daemons):
    url = db_url
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
          f"{len(run_rows(run_table_url, 'beta'))} runs, 0 duplicates, 0 lost")


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
