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
    # Stopping while `blocked` still runs: /healthz turns 503 at once.
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stopping: no new runs")
    status, body = get(port, "/healthz")
    assert (status, body.strip()) == (503, "stopping")
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
           "worker.monitoring.hooks", "worker.monitoring.statuspage"]
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
                     "mysql://app:***@db.example/prod", "recent runs"):
        assert fragment in page, fragment
    assert "s3cr3t" not in page
    assert "<script" not in page.lower()
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
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,760",
                    f"http://127.0.0.1:{port}/")
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
    runtime = SimpleNamespace(scheduler=scheduler, paused=frozenset())
    assert [r.job.name for r in source.due(runtime, set(), 4)] == ["report"]
    now[0] += 150                        # the +100 run is 50 s late: over the grace
    assert source.due(runtime, set(), 4) == []
    now[0] += 50                         # +200 is due while the job still runs
    assert source.due(runtime, {"report"}, 4) == []
    samples = samples_of(metrics.exposition().decode())
    skipped = "run_worker_runs_skipped_total"
    assert value(samples, skipped, job_name="report", reason="misfire") == 1
    assert value(samples, skipped, job_name="report", reason="overlap") == 1
