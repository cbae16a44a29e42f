"""Monitoring (issue 13): /metrics parsed with prometheus-client's own parser after
known runs, the textfile of --once, /healthz and /readyz through a database
outage, the status page in a real headless browser, failure hooks, and reloads of
the metrics section. Worker processes are real (run_worker.py), databases too."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import MARIADB_URL, ROOT

prometheus_parser = pytest.importorskip("prometheus_client.parser")

PREFIX = "run_worker_"


# --- helpers ---------------------------------------------------------------------

def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


def listening_port(daemon, count: int = 1) -> int:
    """The port from the daemon's 'monitoring on http://host:PORT/' line."""
    daemon.wait_for("monitoring on http://", count=count)
    line = [l for l in daemon.log.splitlines() if "monitoring on http://" in l][count - 1]
    return int(line.split("monitoring on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict:
    """{(family, sample name, frozen labels): value} from /metrics, parsed by
    prometheus-client's own parser; also the family names under key 'families'."""
    status, body = get(port, "/metrics")
    assert status == 200
    return samples_of(body)


def samples_of(body: str) -> dict:
    samples: dict = {"families": set()}
    for family in prometheus_parser.text_string_to_metric_families(body):
        samples["families"].add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(config: Path, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_conventions(samples: dict) -> None:
    families = samples["families"]
    assert families and all(f.startswith(PREFIX) for f in families), families
    assert "up" not in families
    # `job` and `instance` are the labels Prometheus attaches to every target.
    labels = {name for key in samples if key != "families" for name, _ in key[1]}
    assert not labels & {"job", "instance"}, labels


# --- metrics after known runs (MariaDB: a real deadlock) ---------------------------

@pytest.fixture
def deadlock_table():
    engine = create_engine(MARIADB_URL)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_deadlock"))
        connection.execute(text("CREATE TABLE worker_test_deadlock (id INT PRIMARY KEY, "
                                "value INT NOT NULL) ENGINE=InnoDB"))
        for row in range(1, 11):
            connection.execute(text("INSERT INTO worker_test_deadlock VALUES (:i, 0)"),
                               {"i": row})
    yield
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_deadlock"))
    engine.dispose()


def test_metrics_count_exactly_after_known_runs(tmp_path, daemons, deadlock_table):
    release = tmp_path / "release"
    config = write_config(tmp_path / "jobs.yaml", f"""
database:
  url: "{MARIADB_URL}"
  pool_size: 8
metrics:
  port: 0
jobs:
  - name: ok
    call: tests.jobfuncs:select_one
    every: 1h
  - name: deadlocked
    call: tests.jobfuncs:deadlock_first_attempt
    kwargs: {{marker: "{tmp_path / 'marker'}"}}
    every: 1h
    retry: {{attempts: 3, wait_initial: 10ms, wait_max: 10ms}}
  - name: slow
    call: tests.jobfuncs:long_query
    kwargs: {{seconds: 30}}
    timeout: 1s
    every: 1h
    retry: {{attempts: 1}}
  - name: blocked
    call: tests.jobfuncs:select_then_wait_for_file
    kwargs: {{path: "{release}"}}
    every: 5s
  - name: never
    call: tests.jobfuncs:select_one
    cron: "0 0 1 1 *"
""")
    daemon = daemons(config)
    port = listening_port(daemon)
    daemon.wait_for("job=ok attempt=1/5 succeeded")
    daemon.wait_for("job=deadlocked attempt=2/3 succeeded")
    daemon.wait_for("job=slow attempt=1/1 timed out")
    daemon.wait_for("job=blocked run due at")           # the first overlap skip
    samples = scrape(port)

    assert_conventions(samples)
    runs = "run_worker_runs_total"
    assert value(samples, runs, job_name="ok", outcome="success") == 1
    assert value(samples, runs, job_name="deadlocked", outcome="success") == 1
    assert value(samples, runs, job_name="deadlocked", outcome="failed") == 0
    assert value(samples, runs, job_name="slow", outcome="timeout") == 1
    assert value(samples, runs, job_name="slow", outcome="success") == 0
    for outcome in ("success", "failed", "timeout", "cancelled"):   # series at 0
        assert value(samples, runs, job_name="never", outcome=outcome) == 0
        assert value(samples, runs, job_name="blocked", outcome=outcome) == 0   # still going
    assert value(samples, "run_worker_attempts_total", job_name="deadlocked") == 2
    assert value(samples, "run_worker_retries_total", job_name="deadlocked", reason="deadlock") == 1
    assert ("run_worker_retries_total", (("job_name", "ok"),)) not in samples
    skipped = "run_worker_runs_skipped_total"
    assert value(samples, skipped, job_name="blocked", reason="overlap") == 1
    assert value(samples, skipped, job_name="ok", reason="overlap") == 0
    assert value(samples, "run_worker_last_success_timestamp_seconds", job_name="ok") > \
        time.time() - 120
    assert value(samples, "run_worker_last_success_timestamp_seconds", job_name="never") == 0
    assert value(samples, "run_worker_last_failure_timestamp_seconds", job_name="slow") > 0
    assert value(samples, "run_worker_run_duration_seconds_count", job_name="slow") == 1
    assert value(samples, "run_worker_run_duration_seconds_sum", job_name="slow") >= 1.0
    assert value(samples, "run_worker_start_lateness_seconds_count", job_name="ok") == 1
    assert value(samples, "run_worker_db_pool_size") == 8
    assert value(samples, "run_worker_job_interval_seconds", job_name="blocked") == 5
    assert value(samples, "run_worker_job_interval_seconds", job_name="never") in \
        (365 * 86400, 366 * 86400)
    assert 1 <= value(samples, "run_worker_db_connections_checked_out") <= 2  # blocked's
    # (and, for a moment, the readiness ping's)
    assert value(samples, "run_worker_config_reloads_total", result="applied") == 0
    build = [k for k in samples if k != "families" and k[0] == "run_worker_build_info"]
    assert build and dict(build[0][1])["version"]

    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz")[0] == 200
    # Stopping while `blocked` still runs: /readyz turns 503 at once; /healthz stays
    # 200 while the daemon drains (a failing liveness probe would kill it mid-stop).
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stopping: no new runs")
    status, body = get(port, "/readyz")
    assert (status, body.strip()) == (503, "stopping")
    status, body = get(port, "/healthz")
    assert (status, body.strip()) == (200, "ok")
    release.touch()
    assert daemon.wait() == 0


# --- --once: the textfile, and no listener ----------------------------------------------

def test_once_writes_the_textfile_atomically_and_never_listens(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))     # the daemon's port, in use
    port = taken.getsockname()[1]
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    prom = textdir / "run_worker.prom"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics:
  port: {port}
  textfile: "{prom}"
jobs:
  - name: ok
    call: tests.jobfuncs:select_one
  - name: bad
    call: tests.jobfuncs:fail_with_value_error
  - name: disabled-job
    call: tests.jobfuncs:select_one
    enabled: false
""")
    try:
        done = run_cli(config, "--once")
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr        # bad failed; the port did not matter
    assert "monitoring on" not in done.stderr
    assert sorted(os.listdir(textdir)) == ["run_worker.prom"]   # no temporary file left
    samples = samples_of(prom.read_text())
    assert_conventions(samples)
    runs = "run_worker_runs_total"
    assert value(samples, runs, job_name="ok", outcome="success") == 1
    assert value(samples, runs, job_name="bad", outcome="failed") == 1
    assert value(samples, runs, job_name="disabled-job", outcome="success") == 0
    assert value(samples, "run_worker_last_failure_timestamp_seconds", job_name="bad") > 0
    assert value(samples, "run_worker_last_success_timestamp_seconds", job_name="bad") == 0


def test_daemon_port_in_use_is_one_line_and_exit_69(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: {port}}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1h}}]
""")
    try:
        done = run_cli(config, timeout=30)
    finally:
        taken.close()
    assert done.returncode == 69
    assert done.stderr.strip() == \
        f"run-worker: cannot listen on 127.0.0.1:{port} for metrics: Address already in use"


def test_metrics_section_without_the_extra_is_a_config_error(tmp_path):
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one"}}]
""")
    done = run_cli(config, "--check", env={"PYTHONPATH": str(shadow.parent)})
    assert done.returncode == 78
    assert "key 'metrics'" in done.stderr
    assert "pip install 'db-job-worker[metrics]'" in done.stderr


def test_without_the_sections_nothing_is_imported_and_nothing_listens(tmp_path):
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one"}}]
""")
    probe = f"""
import sys
from worker.app import load_config, run_once
config, functions = load_config({str(config)!r})
report = run_once(config, functions, list(config.jobs))
assert report.ok
watched = ["prometheus_client", "http.server", "worker.monitoring.monitor", "worker.monitoring.metrics",
           "worker.monitoring.hooks", "worker.monitoring.statuspage",
           "worker.monitoring.listener"]
print(sorted(m for m in watched if m in sys.modules))
print(sorted(t.name for t in __import__("threading").enumerate()))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported, threads = done.stdout.splitlines()
    assert imported == "[]"
    assert "monitor" not in threads
    # The same with a metrics section: imported (the probe above would have seen it).
    with_metrics = config.read_text() + "metrics: {port: 0}\n"
    config.write_text(with_metrics)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert "'prometheus_client'" in done.stdout.splitlines()[0]


# --- health through a database outage ------------------------------------------------------

def test_readyz_follows_the_database_through_an_outage(tmp_path, daemons):
    from tests.tcpproxy import TcpProxy
    proxy = TcpProxy(3306)
    try:
        url = MARIADB_URL.replace("Port=3306", f"Port={proxy.port}")
        assert f"Port={proxy.port}" in url
        config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{url}"}}
metrics: {{port: 0}}
jobs:
  - name: ping
    call: tests.jobfuncs:select_one
    every: 1s
    retry: {{attempts: 1}}
""")
        daemon = daemons(config)
        port = listening_port(daemon)
        wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "/readyz 200 at start")
        proxy.cut()
        status = wait_until(lambda: get(port, "/readyz")[0] == 503 and 503, 10,
                            "/readyz 503 while the database is cut off")
        assert status == 503
        assert get(port, "/healthz")[0] == 200     # the loop still turns
        samples = scrape(port)
        assert value(samples, "run_worker_database_ready") == 0
        proxy.restore()
        wait_until(lambda: get(port, "/readyz")[0] == 200, 15, "/readyz 200 once back")
        assert value(scrape(port), "run_worker_database_ready") == 1
        assert daemon.stop() == 0
    finally:
        proxy.close()


def test_healthz_is_503_when_the_loop_stops_turning():
    from worker.monitoring.monitor import Health
    health = Health(stall_after=0.2)
    assert health.live()[0] is False          # not started yet
    health.tick()
    assert health.live() == (True, "ok")
    time.sleep(0.3)
    live, why = health.live()
    assert not live and "has not turned" in why


# --- the status page in a real browser -------------------------------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup-monitoring-tests.sh)")
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)


def test_status_page_renders_in_headless_chromium(tmp_path, daemons):
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs:
  - name: nightly-report
    call: tests.jobfuncs:select_one
    every: 2s
  - name: sync-orders
    call: tests.jobfuncs:raise_secret_error
    every: 1h
    retry: {{attempts: 1}}
  - name: purge-sessions
    call: tests.jobfuncs:select_one
    cron: "0 3 * * *"
""")
    daemon = daemons(config)
    port = listening_port(daemon)
    daemon.wait_for("job=nightly-report attempt=1/5 succeeded", count=2)
    daemon.wait_for("job=sync-orders attempt=1/1 failed")
    dom = chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{port}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for fragment in ("run-worker status", "nightly-report", "sync-orders", "purge-sessions",
                     "every 2s", "cron '0 3 * * *'", "never ran", "success", "failed",
                     "mysql://app:***@db.example/prod", "recent runs",
                     "3 jobs: 1 failing", "last success", " ago)", "(in "):
        assert fragment in page, fragment
    assert "s3cr3t" not in page
    assert "<script" not in page.lower()
    # Failures first, whatever the config's order.
    assert page.index('id="job-sync-orders"') < page.index('id="job-nightly-report"')
    status, body = get(port, "/status.json")
    import json
    data = json.loads(body)
    assert [job["name"] for job in data["jobs"]] == \
        ["nightly-report", "sync-orders", "purge-sessions"]
    assert data["jobs"][1]["last"]["outcome"] == "failed"
    assert "s3cr3t" not in body
    # Read-only: nothing but GET is served.
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405

    shot = tmp_path / "status-page.png"
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,900",
                    f"http://127.0.0.1:{port}/?open=sync-orders")
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size < 200_000
    if os.environ.get("WORKER_SAVE_SCREENSHOT"):      # refreshes the one docs/ shows
        shutil.copy(shot, ROOT / "docs" / "status-page.png")
    assert daemon.stop() == 0


# --- hooks -------------------------------------------------------------------------------------

def test_hooks_run_after_the_run_and_never_change_its_outcome(tmp_path):
    out = tmp_path / "hooks.out"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
hooks:
  on_success: tests.jobfuncs:write_result_hook
  on_failure: tests.jobfuncs:raising_hook
jobs:
  - name: ok
    call: tests.jobfuncs:select_one
  - name: own
    call: tests.jobfuncs:select_one
    hooks: {{on_success: tests.jobfuncs:own_result_hook}}
  - name: bad
    call: tests.jobfuncs:fail_with_value_error
""")
    done = run_cli(config, "--once", env={"HOOK_OUT": str(out)})
    assert done.returncode == 1                     # bad failed; the raising hook changed nothing
    assert sorted(out.read_text().splitlines()) == ["global ok success 1", "own own success 1"]
    assert "job=bad hook on_failure tests.jobfuncs:raising_hook raised RuntimeError: " \
           "hook failed for bad" in done.stderr
    assert "bad  " in done.stdout and "failed" in done.stdout


def test_a_slow_hook_is_waited_for_up_to_its_bound_then_abandoned(tmp_path):
    out = tmp_path / "hooks.out"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
hooks:
  on_success: tests.jobfuncs:slow_hook
  timeout: 1s
jobs:
  - name: ok
    call: tests.jobfuncs:select_one
""")
    # A hook that finishes within the bound: --once waits for it.
    done = run_cli(config, "--once", env={"HOOK_OUT": str(out), "HOOK_SLEEP": "0.3"})
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "slow ok\n"
    # One that sleeps past it: logged and abandoned; the run's outcome stands.
    started = time.monotonic()
    done = run_cli(config, "--once", env={"HOOK_OUT": str(out), "HOOK_SLEEP": "30"})
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15          # nowhere near the hook's 30 s
    assert "job=ok hook on_success tests.jobfuncs:slow_hook still running after 1s " \
           "(hooks.timeout): abandoned" in done.stderr
    assert out.read_text() == "slow ok\n"           # the second never finished


@pytest.mark.parametrize("hooks, message", [
    ("hooks: {on_failure: tests.jobfuncs:no_such_hook}",
     "key 'hooks.on_failure': tests.jobfuncs:no_such_hook: module 'tests.jobfuncs' has no "
     "attribute 'no_such_hook'"),
    ("hooks: {on_success: tests.jobfuncs:hook_with_two_args}",
     "a hook is called as fn(result)"),
    ("hooks: {on_failure: not-a-call}", "must be 'package.module:function'"),
    ("hooks: {on_sucess: tests.jobfuncs:noop_hook}", "did you mean 'on_success'?"),
])
def test_check_finds_bad_hooks(tmp_path, hooks, message):
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
{hooks}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one"}}]
""")
    done = run_cli(config, "--check")
    assert done.returncode == 78
    assert message in done.stderr


# --- reloading the metrics section ------------------------------------------------------------

def test_sighup_moves_the_listener_or_keeps_the_old_one(tmp_path, daemons):
    first, second = free_port(), free_port()
    body = f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1h}}]
metrics: {{port: PORT}}
"""
    config = write_config(tmp_path / "jobs.yaml", body.replace("PORT", str(first)))
    daemon = daemons(config)
    assert listening_port(daemon) == first
    wait_until(lambda: get(first, "/healthz")[0] == 200, 10, "listening")

    config.write_text(body.replace("PORT", str(second)))
    daemon.signal(signal.SIGHUP)
    assert listening_port(daemon, count=2) == second
    daemon.wait_for("reloaded")
    assert get(second, "/healthz")[0] == 200
    with pytest.raises(urllib.error.URLError):
        get(first, "/healthz", timeout=2)
    assert value(scrape(second), "run_worker_config_reloads_total", result="applied") == 1

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        config.write_text(body.replace("PORT", str(taken.getsockname()[1])))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload rejected")
        assert "Address already in use" in daemon.log
        assert get(second, "/healthz")[0] == 200       # the old listener stays
        samples = scrape(second)
        assert value(samples, "run_worker_config_reloads_total", result="rejected") == 1
    finally:
        taken.close()
    assert daemon.stop() == 0


# --- retry reasons as labels -----------------------------------------------------------------

def test_every_classifier_reason_has_a_known_label():
    from worker.errors import MESSAGE_RULES, NATIVE_RULES, SQLSTATE_RULES, Verdict
    from worker.monitoring.observe import retry_label
    rules = [rule for table in (NATIVE_RULES, SQLSTATE_RULES) for codes in table.values()
             for rule in codes.values()]
    rules += [rule for pairs in MESSAGE_RULES.values() for _, rule in pairs]
    retried = [rule for rule in rules if rule.verdict is not Verdict.NEVER]
    labels = {rule.reason: retry_label(rule.reason, rule.disconnect) for rule in retried}
    assert set(labels.values()) <= {"deadlock", "lock_timeout", "throttled", "disconnect",
                                     "timeout", "conflict"}, labels
    assert labels["deadlock"] == "deadlock"
    assert labels["lock wait timeout"] == "lock_timeout"
    assert labels["lost connection"] == "disconnect"
    assert retry_label("deadline of 1s passed", timed_out=True) == "timeout"


# --- cluster mode ---------------------------------------------------------------------------

def test_cluster_claims_in_metrics_and_run_history_on_the_page(tmp_path, daemons):
    """Two cron `--once` runs for one slot: host-a wins the claim, host-b loses it
    (each writes its own textfile); then a daemon's page shows the run table's
    history with the node that ran each run."""
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
worker: {{lock_dir: "{tmp_path}/locks-${{NODE}}"}}
cluster:
  url: "sqlite:///{tmp_path / 'runs.db'}"
  node: ${{NODE}}
  batch_slot: 1h
metrics:
  port: 0
  textfile: "{tmp_path}/${{NODE}}.prom"
jobs:
  - name: report
    call: tests.jobfuncs:select_one
""")
    assert run_cli(config, "--once", env={"NODE": "host-a"}).returncode == 0
    assert run_cli(config, "--once", env={"NODE": "host-b"}).returncode == 75
    won = samples_of((tmp_path / "host-a.prom").read_text())
    lost = samples_of((tmp_path / "host-b.prom").read_text())
    claims = "run_worker_cluster_claims_total"
    assert (value(won, claims, result="won"), value(won, claims, result="lost")) == (1, 0)
    assert (value(lost, claims, result="won"), value(lost, claims, result="lost")) == (0, 1)
    assert value(lost, "run_worker_runs_skipped_total", job_name="report",
                 reason="claimed_elsewhere") == 1
    assert value(lost, "run_worker_runs_total", job_name="report", outcome="success") == 0

    daemon = daemons(config, env={"NODE": "host-c"})
    port = listening_port(daemon)
    daemon.wait_for("cluster node host-c joined")
    import json
    data = json.loads(get(port, "/status.json")[1])
    assert data["cluster"]["node"] == "host-c"
    assert "host-a" in data["cluster"]["nodes"]
    assert {"node": "host-a", "outcome": "success"}.items() <= \
        data["jobs"][0]["recent"][-1].items()
    assert daemon.stop() == 0


def test_misfires_and_overlaps_are_counted_by_the_schedule_source():
    """The schedule's own skips (fake clock, no threads): a run later than
    misfire_grace_time is a misfire, one due while the job still runs an overlap."""
    from types import SimpleNamespace

    from worker.config import JobSpec
    from worker.monitoring.metrics import MetricsObserver
    from worker.scheduler import EverySchedule, Scheduler, zone_named
    from worker.sources import ScheduleSource

    now = [1000.0]
    report = JobSpec(name="report", call="m:f", every=100)
    scheduler = Scheduler([report], zone_named("UTC"), 30,
                          lambda spec, zone: EverySchedule(spec.every, lambda: now[0]))
    metrics = MetricsObserver()
    source = ScheduleSource(metrics)
    runtime = SimpleNamespace(
        scheduler=scheduler, jobs=(report,), cluster=None, paused=frozenset(),
        config=SimpleNamespace(jobs=(report,), database=SimpleNamespace(
            pool_size=1, max_overflow=0)),
        database=SimpleNamespace(checked_out=lambda: 0),
        pool=SimpleNamespace(max_workers=1))
    metrics.runtime_changed(runtime)     # the job's series exist from here on
    assert [r.job.name for r in source.due(runtime, set(), 4)] == ["report"]
    now[0] += 150                        # the +100 run is 50 s late: over the grace
    assert source.due(runtime, set(), 4) == []
    now[0] += 50                         # +200 is due while the job still runs
    assert source.due(runtime, {"report"}, 4) == []
    samples = samples_of(metrics.exposition().decode())
    skipped = "run_worker_runs_skipped_total"
    assert value(samples, skipped, job_name="report", reason="misfire") == 1
    assert value(samples, skipped, job_name="report", reason="overlap") == 1


# --- metrics follow the job list; running and stuck runs (issue 22) ------------------------

def job_names_in(samples: dict) -> set:
    return {dict(key[1])["job_name"] for key in samples
            if key != "families" and "job_name" in dict(key[1])}


def test_reload_drops_removed_jobs_and_a_disabled_job_has_no_interval(tmp_path, daemons):
    body = f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs:
  - {{name: heartbeat, call: "tests.jobfuncs:select_one", every: 1s}}
  - {{name: orders, call: "tests.jobfuncs:select_one", every: 1h}}
  - {{name: nightly-export, call: "tests.jobfuncs:select_one", every: 1h, enabled: false}}
"""
    config = write_config(tmp_path / "jobs.yaml", body)
    daemon = daemons(config)
    port = listening_port(daemon)
    daemon.wait_for("job=heartbeat attempt=1/5 succeeded")
    samples = scrape(port)
    assert job_names_in(samples) == {"heartbeat", "orders", "nightly-export"}
    assert value(samples, "run_worker_job_enabled", job_name="nightly-export") == 0
    assert value(samples, "run_worker_job_enabled", job_name="orders") == 1
    interval = "run_worker_job_interval_seconds"
    assert (interval, (("job_name", "nightly-export"),)) not in samples
    assert value(samples, interval, job_name="orders") == 3600

    # heartbeat removed, orders renamed, nightly-export enabled, orders2 disabled
    config.write_text(body.replace(
        '  - {name: heartbeat, call: "tests.jobfuncs:select_one", every: 1s}\n', "")
        .replace("name: orders,", "name: orders2, enabled: false,")
        .replace("every: 1h, enabled: false}", "every: 1h}"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded")
    samples = scrape(port)
    assert job_names_in(samples) == {"orders2", "nightly-export"}
    assert value(samples, "run_worker_job_enabled", job_name="orders2") == 0
    assert (interval, (("job_name", "orders2"),)) not in samples
    assert value(samples, interval, job_name="nightly-export") == 3600
    assert value(samples, "run_worker_job_enabled", job_name="nightly-export") == 1
    assert daemon.stop() == 0


def test_a_stuck_run_is_running_and_stuck_until_its_thread_returns(tmp_path, daemons):
    """A job asleep in Python (nothing to cancel) past its 1 s deadline: running 1
    from its start, stuck 1 once the loop gives up on it (deadline + 5 s), both 0
    when its thread returns, and its duration the real one (about 12 s, not 6)."""
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs:
  - {{name: slow, call: "tests.jobfuncs:python_sleep", every: 1h, timeout: 1s,
     retry: {{attempts: 1}}, kwargs: {{seconds: 12}}}}
""")
    daemon = daemons(config)
    port = listening_port(daemon)
    daemon.wait_for("job=slow starting")
    samples = scrape(port)
    assert value(samples, "run_worker_job_running", job_name="slow") == 1
    started = value(samples, "run_worker_job_run_started_timestamp_seconds", job_name="slow")
    assert abs(started - time.time()) < 5
    assert value(samples, "run_worker_job_stuck", job_name="slow") == 0

    daemon.wait_for("its thread is left to finish", timeout=15)
    samples = scrape(port)
    assert value(samples, "run_worker_job_stuck", job_name="slow") == 1
    assert value(samples, "run_worker_job_running", job_name="slow") == 1
    assert value(samples, "run_worker_runs_total", job_name="slow", outcome="timeout") == 1
    assert value(samples, "run_worker_run_duration_seconds_count", job_name="slow") == 0
    status, body = get(port, "/status.json")
    import json
    job = json.loads(body)["jobs"][0]
    assert job["running_since"] and job["stuck"]
    assert json.loads(body)["worker"]["running"] == 1

    samples = wait_until(lambda: (lambda s: s if value(
        s, "run_worker_job_running", job_name="slow") == 0 else None)(scrape(port)),
        20, "the stuck thread returned")
    assert value(samples, "run_worker_job_stuck", job_name="slow") == 0
    assert value(samples, "run_worker_job_run_started_timestamp_seconds", job_name="slow") == 0
    assert value(samples, "run_worker_run_duration_seconds_count", job_name="slow") == 1
    assert value(samples, "run_worker_run_duration_seconds_sum", job_name="slow") >= 11.5
    daemon.wait_for("reported stuck before")
    # One ERROR for one timed-out run: the loop's; the thread's late return is a warning.
    assert [l for l in daemon.log.splitlines() if " ERROR " in l and "job=slow" in l] == \
        [l for l in daemon.log.splitlines() if "its thread is left to finish" in l]
    assert daemon.stop() == 0


# --- the textfile of --once merges (issue 22) --------------------------------------------

def test_once_job_a_keeps_the_other_jobs_series_in_the_textfile(tmp_path):
    prom = tmp_path / "run_worker.prom"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{textfile: "{prom}"}}
jobs:
  - {{name: heartbeat2, call: "tests.jobfuncs:select_one", every: 1m}}
  - {{name: broken-sql, call: "tests.jobfuncs:syntax_error", retry: {{attempts: 1}}}}
  - {{name: gone, call: "tests.jobfuncs:select_one"}}
""")
    assert run_cli(config, "--once").returncode == 1
    first = samples_of(prom.read_text())
    runs = "run_worker_runs_total"
    assert value(first, runs, job_name="broken-sql", outcome="failed") == 1
    succeeded = value(first, "run_worker_last_success_timestamp_seconds",
                      job_name="heartbeat2")
    assert succeeded > 0
    # A cron run has no loop and no `every`: nothing a daemon's rule would read.
    assert "run_worker_loop_last_tick_timestamp_seconds" not in first["families"]
    assert "run_worker_job_interval_seconds" not in first["families"]

    # A file of before, where cron runs wrote a job interval: not kept.
    prom.write_text(prom.read_text() + "# TYPE run_worker_job_interval_seconds gauge\n"
                    'run_worker_job_interval_seconds{job_name="broken-sql"} 60.0\n')
    config.write_text(config.read_text().replace(
        '  - {name: gone, call: "tests.jobfuncs:select_one"}\n', ""))
    done = run_cli(config, "--once", "--job", "heartbeat2")
    assert done.returncode == 0, done.stderr
    second = samples_of(prom.read_text())
    assert value(second, runs, job_name="broken-sql", outcome="failed") == 1   # kept
    assert value(second, runs, job_name="heartbeat2", outcome="success") == 1  # replaced
    assert value(second, "run_worker_last_success_timestamp_seconds",
                 job_name="heartbeat2") >= succeeded
    assert job_names_in(second) == {"heartbeat2", "broken-sql"}          # gone is gone
    assert "run_worker_job_interval_seconds" not in second["families"]

    done = run_cli(config, "--once", "--job", "broken-sql")
    assert done.returncode == 1
    third = samples_of(prom.read_text())
    # broken-sql failed again: its last success is still "never", heartbeat2's kept.
    assert value(third, runs, job_name="broken-sql", outcome="failed") == 1
    assert value(third, "run_worker_last_success_timestamp_seconds",
                 job_name="heartbeat2") == value(second, "run_worker_last_success_"
                                                 "timestamp_seconds", job_name="heartbeat2")


def test_a_once_run_that_skipped_everything_leaves_the_textfile_as_it_was(tmp_path):
    prom = tmp_path / "run_worker.prom"
    running = tmp_path / "running"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{textfile: "{prom}"}}
jobs:
  - {{name: holder, call: "tests.jobfuncs:touch_then_python_sleep",
     kwargs: {{path: "{running}", seconds: 8}}}}
""")
    prom.write_text("# an earlier run's file\n")
    os.utime(prom, (1_000_000, 1_000_000))
    first = subprocess.Popen([sys.executable, str(ROOT / "run_worker.py"), "-c",
                              str(config), "--once"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(running.exists, 30, "the first run holds the job")
        assert run_cli(config, "--once").returncode == 75
        assert prom.stat().st_mtime == 1_000_000     # not rewritten: its age tells
        assert prom.read_text() == "# an earlier run's file\n"
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert prom.stat().st_mtime > 1_000_000


@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_once_never_hangs_on_nor_follows_what_another_user_planted_as_the_textfile(
        tmp_path, planted):
    """A shared textfile directory: a FIFO planted as the file blocked --once for ever
    at its end (SIGTERM too); a link to a device (/dev/zero) grew it without bound, a
    link to a file had it read. Only a regular file is read; the new one replaces it."""
    prom = tmp_path / "run_worker.prom"
    victim = tmp_path / "victim.prom"
    victim.write_text('run_worker_runs_total{job_name="ok",outcome="failed"} 7\n')
    if planted == "fifo":
        os.mkfifo(prom)
    else:
        prom.symlink_to(victim)
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{textfile: "{prom}"}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one"}}]
""")
    done = run_cli(config, "--once", timeout=20)
    assert done.returncode == 0, done.stderr
    assert "cannot be read" in done.stderr and "replaced whole" in done.stderr
    assert prom.is_file() and not prom.is_symlink()
    assert (prom.stat().st_mode & 0o777) == 0o644       # node-exporter reads it
    assert value(samples_of(prom.read_text()), "run_worker_runs_total", job_name="ok",
                 outcome="success") == 1
    assert value(samples_of(prom.read_text()), "run_worker_runs_total", job_name="ok",
                 outcome="failed") == 0
    assert victim.read_text().endswith("} 7\n")
    assert sorted(p.name for p in tmp_path.iterdir() if "prom" in p.name) == \
        ["run_worker.prom", "victim.prom"]                # no temporary file left


# --- the listener: HEAD, and no client can starve it (issue 22) --------------------------

def raw_request(port: int, request: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_head_is_answered_like_get_without_a_body(tmp_path, daemons):
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1h}}]
""")
    daemon = daemons(config)
    port = listening_port(daemon)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "ready")
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        head = raw_request(port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head_lines, _, head_body = head.partition(b"\r\n\r\n")
        get_lines, _, get_body = got.partition(b"\r\n\r\n")
        assert head_lines.startswith(b"HTTP/1.1 200 "), (path, head_lines)
        assert head_body == b""
        assert get_body and get_lines.split(b"\r\n")[0] == head_lines.split(b"\r\n")[0]
        length = [l for l in head_lines.split(b"\r\n") if l.startswith(b"Content-Length")]
        assert length and int(length[0].split(b":")[1]) > 0
    refused = raw_request(port, b"DELETE / HTTP/1.1\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in refused
    assert daemon.stop() == 0


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_connections_cannot_starve_the_listener(tmp_path, daemons):
    """300 idle connections held (and 50 reset half-way through a request): /metrics
    is still answered within 2 s, the process keeps fewer than 100 threads and
    descriptors stay bounded, an idle connection is closed after the read timeout,
    and with --log-format json every line on stderr is JSON, a few at most about
    the listener."""
    import json
    import struct
    from worker.monitoring.listener import READ_TIMEOUT
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1s}}]
""")
    daemon = daemons(config, "--log-format", "json")
    daemon.wait_for('monitoring on http://')
    line = [l for l in daemon.log.splitlines() if "monitoring on http://" in l][0]
    port = int(line.split("monitoring on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    wait_until(lambda: get(port, "/healthz")[0] == 200, 10, "listening")
    pid = daemon.process.pid
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")     # never finished
            idle.append(sock)
        for _ in range(50):                               # reset half-way
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /met")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        started = time.monotonic()
        status, body = get(port, "/metrics", timeout=10)
        answered_in = time.monotonic() - started
        assert status == 200 and "run_worker_runs_total" in body
        assert answered_in < 2, answered_in
        assert threads_of(pid) < 100, threads_of(pid)
        assert len(os.listdir(f"/proc/{pid}/fd")) < 150
        # The daemon's jobs still open their database.
        count = daemon.log.count('succeeded in')
        daemon.wait_for('succeeded in', count=count + 1, timeout=10)
        # Idle connections are closed by the server after its read timeout.
        newest = idle[-1]
        newest.settimeout(READ_TIMEOUT + 10)
        assert newest.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    assert daemon.stop() == 0
    lines = daemon.log.splitlines()
    for entry in lines:
        assert entry.startswith("{"), lines      # every line JSON, no raw traceback
        json.loads(entry)
    listener_lines = [l for l in lines if "monitoring listener" in l]
    assert len(listener_lines) <= 3, listener_lines


def series_per_job(body: str) -> dict:
    counts: dict = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            job = line.split('job_name="', 1)[1].split('"', 1)[0] if 'job_name="' in line \
                else None
            counts[job] = counts.get(job, 0) + 1
    return counts


@pytest.mark.parametrize("env, per_job, own", [({}, 56, 19),
                                               ({"PROMETHEUS_DISABLE_CREATED_SERIES":
                                                 "true"}, 45, 14)])
def test_a_job_costs_the_series_docs_monitoring_says(tmp_path, daemons, env, per_job, own):
    """docs/monitoring.md, "What a job costs": 56 series a job and 19 of the process's
    own; 45 and 14 without the `_created` series."""
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{port: 0}}
jobs:
  - {{name: a, call: "tests.jobfuncs:select_one", every: 1h}}
  - {{name: b, call: "tests.jobfuncs:select_one", every: 1h}}
""")
    daemon = daemons(config, env=env)
    port = listening_port(daemon)
    daemon.wait_for("job=b attempt=1/5 succeeded")
    status, body = get(port, "/metrics")
    assert series_per_job(body) == {"a": per_job, "b": per_job, None: own}
    assert ("_created" in body) is not bool(env)
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    assert f"costs {per_job}" in docs or f"has {per_job} series" in docs
    assert daemon.stop() == 0


def test_status_page_in_cluster_mode_marks_stuck_and_disabled_jobs(tmp_path, daemons):
    """Cluster mode (history from the run table): the recent-runs table has as many
    cells per row as headers (the node had slid under "error"), a running row says
    "started", a stuck run is marked and comes first, a disabled job is marked
    disabled, and a panel opened by its link stays open (the link is in the URL the
    page refreshes to, no script)."""
    import re
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
worker: {{lock_dir: "{tmp_path}/locks"}}
cluster: {{url: "sqlite:///{tmp_path / 'runs.db'}", node: node-a}}
metrics: {{port: 0}}
jobs:
  - {{name: heartbeat, call: "tests.jobfuncs:select_one", every: 2s}}
  - {{name: slow-report, call: "tests.jobfuncs:python_sleep", every: 4s, timeout: 1s,
     retry: {{attempts: 1}}, kwargs: {{seconds: 30}}}}
  - {{name: nightly-export, call: "tests.jobfuncs:select_one", cron: "0 3 * * *",
     enabled: false}}
""")
    daemon = daemons(config)
    port = listening_port(daemon)
    daemon.wait_for("its thread is left to finish", timeout=20)
    daemon.wait_for("job=heartbeat attempt=1/5 succeeded", count=2)
    dom = chromium(tmp_path, "--dump-dom",
                   f"http://127.0.0.1:{port}/?open=heartbeat,slow-report")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    # heartbeat (every 2 s) may be in the middle of a run when the page is read: seen
    # on a loaded machine ("3 jobs: 1 stuck, 1 running, 1 disabled").
    assert re.search(r"3 jobs: 1 stuck, (1 running, )?1 disabled", page)
    sections = re.findall(r'<section class="job (\w+)" id="job-([\w-]+)"', page)
    assert sections in ([("stuck", "slow-report"), (state, "heartbeat"),
                         ("disabled", "nightly-export")] for state in ("ok", "running")), \
        sections
    assert "past its deadline; its thread has not returned" in page
    assert re.search(r'nightly-export <span class="badge"[^>]*>disabled</span>', page)
    tables = re.findall(r"<table>(.*?)</table>", page, re.S)
    assert len(tables) == 2                                # both opened panels
    for table in tables:
        headers = re.findall(r"<th>(.*?)</th>", table)
        assert headers == ["when", "outcome", "duration", "attempts", "node", "error"]
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
            cells = re.findall(r"<td>(.*?)</td>", row, re.S)
            assert len(cells) == len(headers), row
            assert cells[4] == "node-a"
            assert cells[0].startswith("started " if cells[1] == "running" else "ended ")
    assert re.search(r"<td>started [^<]*<span", tables[0])   # slow-report's running row
    # The links keep the other opened panel and close (or open) their own.
    assert 'href="?open=slow-report#job-heartbeat">hide recent runs' in page
    assert "<script" not in page.lower()
    assert daemon.stop() in (0, 1)


def test_once_with_a_stuck_run_writes_it_stuck_and_timed_out(tmp_path):
    """--once gives up on a run stuck past its deadline (+5 s) and exits without its
    thread: the textfile says timeout and stuck, not a clean state."""
    prom = tmp_path / "run_worker.prom"
    config = write_config(tmp_path / "jobs.yaml", f"""
database: {{url: "{sqlite_db(tmp_path)}"}}
metrics: {{textfile: "{prom}"}}
jobs:
  - {{name: slow, call: "tests.jobfuncs:python_sleep", timeout: 1s, retry: {{attempts: 1}},
     kwargs: {{seconds: 60}}}}
  - {{name: ok, call: "tests.jobfuncs:select_one"}}
""")
    done = run_cli(config, "--once", timeout=40)
    assert done.returncode == 1, done.stderr
    samples = samples_of(prom.read_text())
    assert value(samples, "run_worker_runs_total", job_name="slow", outcome="timeout") == 1
    assert value(samples, "run_worker_job_stuck", job_name="slow") == 1
    assert value(samples, "run_worker_job_running", job_name="slow") == 1
    assert value(samples, "run_worker_job_stuck", job_name="ok") == 0
    assert value(samples, "run_worker_runs_total", job_name="ok", outcome="success") == 1


def test_the_readiness_probe_survives_a_reload_that_drops_the_metrics_section(tmp_path):
    """A reload that removes the `metrics` section while the probe pings the database
    used to kill the probe thread (AttributeError on the Health it had just found
    set; a plain-text traceback on a JSON stderr, found by the chaos run, seed 202 on
    PostgreSQL): once the section came back, /readyz was never probed again."""
    from types import SimpleNamespace

    from sqlalchemy import event

    from worker.config import load
    from worker.db import Database
    from worker.monitoring import monitor
    from worker.monitoring.observe import Observers
    jobs = "jobs:\n  - {name: a, call: 'tests.jobfuncs:noop', every: 1s}\n"
    url = sqlite_db(tmp_path)
    with_metrics = load(write_config(tmp_path / "on.yaml", f"database: {{url: '{url}'}}\n"
                                     f"metrics: {{port: 0}}\n{jobs}"))
    without = load(write_config(tmp_path / "off.yaml", f"database: {{url: '{url}'}}\n{jobs}"))
    monitoring = monitor.Monitoring(Observers(), listen=True)
    monitoring.apply(with_metrics)
    database = Database(with_metrics.database)
    reloads = []

    def reload_during_the_ping(*_):
        if not reloads:           # the reload lands between the probe's two looks
            reloads.append(time.monotonic())
            monitoring.apply(without)
    event.listen(database.engine, "before_cursor_execute", reload_during_the_ping)
    try:
        monitoring.probe_readiness(lambda: SimpleNamespace(config=with_metrics,
                                                           database=database))
        deadline = time.monotonic() + 10 * monitor.READY_PROBE_EVERY
        while not reloads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloads and monitoring.health is None
        time.sleep(0.5)       # the probe finishes its turn without the section
        monitoring.apply(with_metrics)          # then the section comes back
        while not monitoring.health.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitoring.health.ready, "the probe thread died in the reload"
    finally:
        monitoring.close()
        database.dispose()


def test_readyz_is_503_while_the_paused_jobs_are_not_read_and_no_scheduled_run_starts(
        tmp_path):
    """A daemon that could not read its paused jobs at start holds every scheduled
    run until it can (worker.control.UnreadPausedJobs; a cluster node's
    ClusterPausedJobs before its first read). Before: /readyz said 200 'ok' all the
    while, so a node held for good (a paused-jobs file that stays unreadable) was
    seen by nothing but one log line at its start."""
    from types import SimpleNamespace

    from worker.control import PausedJobs, UnreadPausedJobs
    from worker.monitoring.monitor import Health
    health = Health(stall_after=60)
    health.database_ready(True)
    runtime = SimpleNamespace(cluster=None,
                              paused=UnreadPausedJobs(tmp_path / "x.paused.sqlite"))
    health.runtime_changed(runtime)
    ready, why = health.readiness()
    assert not ready and "paused jobs" in why and "no scheduled run starts" in why
    runtime.paused = PausedJobs(tmp_path / "x.paused.sqlite")    # read at last
    assert health.readiness() == (True, "ok")
