"""deploy/: the systemd units and the cron wrapper, checked with the real tools.

The units are verified with `systemd-analyze` (offline: no running systemd needed);
the cron wrapper runs the real `run-worker --once` as cron would.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker.locks import FLOCK, lock_offset

SYSTEMD_DIR = ROOT / "deploy" / "systemd"
UNITS = ["run-worker.service", "run-worker-batch.service", "run-worker-batch.timer"]
SERVICES = [unit for unit in UNITS if unit.endswith(".service")]
CRON_WRAPPER = ROOT / "deploy" / "cron" / "run-worker-cron"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package `systemd`; "
           "scripts/setup-deploy-tests.sh installs it)")


def directives(unit: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in a unit file, in order (keys may repeat)."""
    pairs = []
    for line in (SYSTEMD_DIR / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(unit: str, key: str) -> list[str]:
    return [value for k, value in directives(unit) if k == key]


# --- systemd --------------------------------------------------------------------------

def test_the_daemon_has_no_exec_start_pre():
    """RestartPreventExitStatus= only sees the main process: an ExecStartPre= --check
    that exits 78 was restarted every RestartSec= (measured: 8 restarts in 45 s under
    systemd 252, never stopping). The daemon checks its config itself."""
    assert values("run-worker.service", "ExecStartPre") == []
    assert len(values("run-worker.service", "ExecStart")) == 1


def test_the_daemon_is_not_restarted_on_78_or_69():
    prevented = " ".join(values("run-worker.service", "RestartPreventExitStatus")).split()
    assert {"78", "69"} <= set(prevented)
    assert values("run-worker.service", "Restart") == ["on-failure"]


@pytest.mark.parametrize("unit", SERVICES)
def test_locks_go_to_a_runtime_directory_of_our_own(unit):
    assert values(unit, "RuntimeDirectory") == ["run-worker"]
    assert values(unit, "RuntimeDirectoryMode") == ["0700"]
    # shared by both services: neither may delete it while the other runs
    assert values(unit, "RuntimeDirectoryPreserve") == ["yes"]
    assert "XDG_RUNTIME_DIR=%t/run-worker" in values(unit, "Environment")
    assert values(unit, "StateDirectory") == ["run-worker"]


def make_root(tmp_path: Path) -> Path:
    """A file-system root for `systemd-analyze verify --root`: the distribution's units
    (sysinit.target & co.), ours, and a stand-in for every program our units run, so
    that verify checks our files and not what happens to be installed here."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system",
                    symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD_DIR / unit, root / "etc/systemd/system" / unit)
        for key, value in directives(unit):
            if key.startswith("Exec") and value:
                program = root / value.lstrip("-@:+!").split()[0].lstrip("/")
                program.parent.mkdir(parents=True, exist_ok=True)
                program.write_text("#!/bin/sh\n")
                program.chmod(0o755)
    return root


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    """verify exits 0 even for unknown keys and unparsable values; it only prints
    them. So: no output at all."""
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={make_root(tmp_path)}",
                           "--man=no", "--generators=no", *UNITS],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_would_notice_a_bad_line(tmp_path):
    """The control for the test above: a typo in a key is reported."""
    root = make_root(tmp_path)
    unit = root / "etc/systemd/system/run-worker.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no",
                           "--generators=no", "run-worker.service"],
                          capture_output=True, text=True, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_is_low(unit):
    """Measured: 9.2 UNSAFE before the hardening, 1.3 OK after. --threshold is in
    tenths: fail above 2.0."""
    done = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true",
                           "--threshold=20", str(SYSTEMD_DIR / unit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, done.stdout[-500:]


# --- cron -----------------------------------------------------------------------------

def write_config(tmp_path: Path, jobs: str) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(f"""\
        database:
          url: "sqlite:///{tmp_path / 'cron.db'}"
        worker:
          lock_dir: "{tmp_path / 'locks'}"
        retry:
          attempts: 1
        jobs:
        """) + textwrap.indent(textwrap.dedent(jobs), "  "))
    return path


def cron_command(log: Path, config: Path, *extra: str) -> list[str]:
    return [str(CRON_WRAPPER), str(log), sys.executable, str(ROOT / "run_worker.py"),
            "-c", str(config), "--once", *extra]


def run_as_cron(log: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cron_command(log, config, *extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


MARKER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pid=(\d+) "
                    r"run-worker-cron: (started: .*|exited \d+)$")


def markers(log: Path) -> list[tuple[int, str]]:
    found = []
    for line in log.read_text().splitlines():
        match = MARKER.match(line)
        if match:
            found.append((int(match.group(1)), match.group(2)))
    return found


def test_cron_success_prints_nothing_and_logs_everything(tmp_path):
    config = write_config(tmp_path, """\
        - {name: fine, call: "tests.jobfuncs:noop"}
        """)
    log = tmp_path / "var-log" / "run-worker" / "batch.log"   # directory not there yet
    done = run_as_cron(log, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "" and done.stderr == ""            # cron mails nothing
    text = log.read_text()
    assert "1 job(s): 1 succeeded, 0 failed" in text          # the summary (stdout)
    assert "job=fine attempt=1/1 succeeded" in text           # the log (stderr)
    (pid, started), (same_pid, exited) = markers(log)
    assert started.startswith("started: ") and exited == "exited 0"
    assert pid == same_pid


@pytest.mark.parametrize("jobs, status, meaning", [
    ('- {name: broken, call: "tests.jobfuncs:fail_with_value_error"}\n', 1,
     "a job failed or timed out"),
    ('- {name: typo, call: "tests.jobfuncs:does_not_exist"}\n', 78,
     "invalid configuration: nothing ran"),
])
def test_cron_failure_prints_the_output_for_cron_to_mail(jobs, status, meaning, tmp_path):
    config = write_config(tmp_path, jobs)
    log = tmp_path / "logs" / "batch.log"
    done = run_as_cron(log, config)
    assert done.returncode == status
    first, *rest = done.stdout.splitlines()
    assert first == f"run-worker exited {status} ({meaning}); its output (also in {log}):"
    assert rest, "the run's own output must follow"
    logged = log.read_text().splitlines()
    assert all(line in logged for line in rest)               # the same lines, logged too
    if status == 1:
        # The summary first, before the log and its traceback (issue 22).
        assert rest[0].startswith("job ") and "outcome" in rest[0], rest[:3]
        assert rest[2] == "1 job(s): 0 succeeded, 1 failed"
        assert any("Traceback" in line for line in rest[3:])
    assert markers(log)[-1][1] == f"exited {status}"


def job_lock_held(lock_dir: Path, job: str) -> bool:
    """Whether some process holds `job`'s host lock: F_OFD_GETLK asks without
    taking it (the lock file itself exists from the worker's start)."""
    for path in lock_dir.glob("*.locks"):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(
                fcntl.F_WRLCK, os.SEEK_SET, lock_offset(job), 1, 0))
        finally:
            os.close(fd)
        if FLOCK.unpack(answer)[0] != fcntl.F_UNLCK:
            return True
    return False


def test_overlapping_cron_runs_in_one_log_are_told_apart(tmp_path):
    """A run still holding its job when the next cron run starts: the second exits 75,
    mails nothing, and both runs' lines in the shared log carry their own pid."""
    release = tmp_path / "release"
    config = write_config(tmp_path, f"""\
        - name: slow
          call: tests.jobfuncs:wait_for_file
          kwargs: {{path: "{release}"}}
        """)
    log = tmp_path / "batch.log"
    first = subprocess.Popen(cron_command(log, config), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60   # until the first run holds the job's lock
        while not job_lock_held(tmp_path / "locks", "slow"):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        second = run_as_cron(log, config)
        assert second.returncode == 75, second.stdout + second.stderr
        assert second.stdout == "" and second.stderr == ""    # 75 is not mailed
    finally:
        release.touch()
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert out == "" and err == ""
    runs: dict[int, list[str]] = {}
    for pid, event in markers(log):
        runs.setdefault(pid, []).append(event)
    assert len(runs) == 2, log.read_text()
    assert sorted(events[-1] for events in runs.values()) == ["exited 0", "exited 75"]


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def test_every_log_line_of_a_cron_run_carries_its_pid(tmp_path):
    config = write_config(tmp_path, """\
        - {name: fine, call: "tests.jobfuncs:noop"}
        """)
    log = tmp_path / "batch.log"
    run_as_cron(log, config)
    run_as_cron(log, config)
    pids = {pid for pid, _ in markers(log)}
    assert len(pids) == 2
    log_lines = [line for line in log.read_text().splitlines() if LOG_LINE.match(line)]
    assert len(log_lines) > 4
    for line in log_lines:
        match = re.match(LOG_LINE.pattern + r"pid=(\d+) ", line)
        assert match and int(match.group(1)) in pids, line


# --- Prometheus alert rules -----------------------------------------------------------

RULES_DIR = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; "
                             "scripts/setup-monitoring-tests.sh installs it)")


@needs_promtool
def test_alert_rules_pass_their_promtool_tests():
    """Each false page of issue 22 (a removed job, a disabled job, a fresh restart, a
    cron textfile read as a stalled loop, a daemon's old failure read as a cron
    failure) is a case in run-worker.rules.test.yml, beside the true pages."""
    checked = subprocess.run([PROMTOOL, "check", "rules", "run-worker.rules.yml"],
                             cwd=RULES_DIR, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", "run-worker.rules.test.yml"],
                            cwd=RULES_DIR, capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_promtool_rule_tests_would_notice_a_false_page(tmp_path):
    """The documented rule of before (no job_enabled, interval on disabled jobs) fails
    the test file: the cases really tell a false page from none."""
    rules = (RULES_DIR / "run-worker.rules.yml").read_text()
    old = rules.replace("> 3 * run_worker_job_interval_seconds",
                        "> 3 * run_worker_job_interval_seconds or on (instance, job, "
                        "job_name) (run_worker_job_enabled == 0)")
    assert old != rules
    (tmp_path / "run-worker.rules.yml").write_text(old)
    shutil.copy(RULES_DIR / "run-worker.rules.test.yml", tmp_path)
    tested = subprocess.run([PROMTOOL, "test", "rules", "run-worker.rules.test.yml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert tested.returncode == 1
    assert "nightly-export" in tested.stdout + tested.stderr


# --- Kubernetes -------------------------------------------------------------------------

KUBE_DIR = ROOT / "deploy" / "kubernetes"


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("kubernetes_validate", reason="the test extra installs it")
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict",
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def manifest(name: str) -> dict:
    import yaml
    return yaml.safe_load((KUBE_DIR / name).read_text())


def test_kubernetes_manifests_validate_strictly():
    files = sorted(KUBE_DIR.glob("*.yaml"))
    assert {f.name for f in files} >= {"deployment.yaml", "cronjob.yaml", "configmap.yaml"}
    done = kubernetes_validate(*files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(files)


def test_kubernetes_validate_would_notice_a_misspelt_field(tmp_path):
    bad = tmp_path / "deployment.yaml"
    bad.write_text((KUBE_DIR / "deployment.yaml").read_text()
                   .replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    assert kubernetes_validate(bad).returncode != 0


def test_the_deployment_probes_the_listener_and_runs_locked_down():
    deployment = manifest("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] > 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
    assert not {"--once", "--check"} & set(container["args"])          # the daemon
    env = {e["name"]: e for e in container["env"]}
    assert env["WORKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == \
        manifest("secret.example.yaml")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The grace period covers the worker's own shutdown_timeout.
    import yaml
    jobs = yaml.safe_load(manifest("configmap.yaml")["data"]["jobs.yaml"])
    assert pod["terminationGracePeriodSeconds"] > 30
    assert jobs["worker"]["shutdown_timeout"] == "30s"
    assert jobs["metrics"]["address"] == "0.0.0.0" and "cluster" in jobs


def test_the_cronjob_forbids_overlap_and_counts_skipped_as_success():
    cronjob = manifest("cronjob.yaml")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"--once", "--skipped-ok"} <= set(container["args"])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_configmaps_job_list_passes_check(tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text(manifest("configmap.yaml")["data"]["jobs.yaml"])
    done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                           "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ,
                               "WORKER_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 3 jobs" in done.stdout


# --- the image's health check, run as the image runs it ------------------------------------

def dockerfile_healthcheck() -> list[str]:
    import json
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("HEALTHCHECK "))
    return json.loads(line.split(" CMD ", 1)[1])


def test_the_image_exposes_the_listener_and_installs_the_metrics_extra():
    text = (ROOT / "Dockerfile").read_text()
    assert "\nEXPOSE 9464\n" in text
    assert 'c["options.extras_require"]["metrics"]' in text
    command = dockerfile_healthcheck()
    assert command[:2] == ["python3", "-c"]                # no curl in the image


def test_the_dockerfile_health_check_follows_healthz(tmp_path, daemons):
    """The HEALTHCHECK's own command (python3 -c ...), against a real daemon: 0 while
    /healthz is 200, non-zero when nothing answers; a no-op when turned off."""
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'h.db'}"}}
worker: {{lock_dir: "{tmp_path / 'locks'}"}}
metrics: {{port: 0}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1h}}]
""")
    daemon = daemons(config)
    daemon.wait_for("monitoring on http://")
    port = re.search(r"monitoring on http://[\d.]+:(\d+)/", daemon.log).group(1)
    command = [sys.executable] + dockerfile_healthcheck()[1:]

    def check(url: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "WORKER_HEALTHCHECK_URL"}
        if url is not None:
            env["WORKER_HEALTHCHECK_URL"] = url
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    deadline = time.monotonic() + 10
    while check(f"http://127.0.0.1:{port}/healthz") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert check(f"http://127.0.0.1:{port}/healthz") == 0
    assert daemon.stop() == 0
    assert check(f"http://127.0.0.1:{port}/healthz") != 0   # nothing answers
    assert check("") == 0                                      # turned off


# --- the Grafana dashboard ----------------------------------------------------------------

DASHBOARD = ROOT / "deploy" / "grafana" / "run-worker.json"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def dashboard_exprs() -> list[str]:
    import json
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all(exprs)
    return exprs


def exported_names(tmp_path: Path, daemons) -> set[str]:
    """Every sample name a daemon in cluster mode can export, from its /metrics."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'g.db'}"}}
worker: {{lock_dir: "{tmp_path / 'locks'}"}}
cluster: {{url: "sqlite:///{tmp_path / 'runs.db'}", node: g}}
metrics: {{port: 0}}
jobs: [{{name: ok, call: "tests.jobfuncs:select_one", every: 1s}}]
""")
    daemon = daemons(config)
    daemon.wait_for("job=ok attempt=1/5 succeeded")
    port = re.search(r"monitoring on http://[\d.]+:(\d+)/", daemon.log).group(1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert daemon.stop() == 0
    return {family.name + suffix
            for family in text_string_to_metric_families(body.decode())
            for suffix in SUFFIXES[family.type]}


def test_the_grafana_dashboard_uses_only_exported_metrics(tmp_path, daemons):
    used = {name for expr in dashboard_exprs()
            for name in re.findall(r"\brun_worker_\w+", expr)}
    exported = exported_names(tmp_path, daemons)
    assert used and used <= exported, used - exported
    for wanted in ("run_worker_runs_total", "run_worker_run_duration_seconds_bucket",
                   "run_worker_start_lateness_seconds_bucket", "run_worker_job_stuck",
                   "run_worker_db_connections_checked_out"):
        assert wanted in used, wanted


@needs_promtool
def test_the_grafana_dashboards_queries_are_promql(tmp_path):
    """promtool parses each query (Grafana's variables replaced), as a recording rule."""
    import json
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}",
         "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
             .replace("$job_name", ".*")}
        for index, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps(rules))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
