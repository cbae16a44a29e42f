"""worker.cli: each exit code, produced by the real command in a real process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import MARIADB_URL, ROOT


def write_config(tmp_path: Path, jobs: str, url: str | None = None) -> Path:
    url = url or f"sqlite:///{tmp_path / 'cli.db'}"
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(f"""\
        database:
          url: "{url}"
        worker:
          max_workers: 2
        retry:
          attempts: 2
          wait_initial: 10ms
          wait_max: 10ms
        jobs:
        """) + textwrap.indent(textwrap.dedent(jobs), "  "))
    return path


def worker(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


GOOD_JOBS = """\
- name: first
  call: tests.jobfuncs:select_one
- name: second
  call: tests.jobfuncs:touch
  kwargs: {path: "%s"}
- name: dormant
  call: tests.jobfuncs:touch
  kwargs: {path: "%s"}
  enabled: false
"""


def test_once_runs_enabled_jobs_and_exits_0(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "second", tmp_path / "dormant"))
    done = worker("-c", str(config), "--once")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "second").exists() and not (tmp_path / "dormant").exists()
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["job", "outcome", "attempts", "duration", "error"]
    assert lines[1].split()[:3] == ["first", "success", "1"]
    assert lines[2].split()[:3] == ["second", "success", "1"]
    assert lines[-1] == "2 job(s): 2 succeeded, 0 failed"
    assert "job=first attempt=1/2 succeeded" in done.stderr


def test_job_flag_runs_only_named_jobs_even_disabled(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "second", tmp_path / "dormant"))
    done = worker("-c", str(config), "--once", "--job", "dormant")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dormant").exists() and not (tmp_path / "second").exists()
    assert "1 job(s): 1 succeeded" in done.stdout


def test_worker_config_env_var_selects_the_file(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "second", tmp_path / "dormant"))
    done = worker("--once", "--job", "second", env={"WORKER_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "second").exists()


def test_a_failed_job_exits_1_after_its_retries(tmp_path):
    config = write_config(tmp_path, """\
        - name: ok
          call: tests.jobfuncs:select_one
        - name: broken
          call: tests.jobfuncs:syntax_error
        """)
    done = worker("-c", str(config), "--once")
    assert done.returncode == 1
    broken = next(line for line in done.stdout.splitlines() if line.startswith("broken"))
    assert broken.split()[:3] == ["broken", "failed", "1"]
    assert "syntax error" in broken
    assert "job=broken attempt=1/2 failed" in done.stderr
    assert "1 failed" in done.stdout.splitlines()[-1]


def test_unknown_job_name_exits_2_and_lists_the_known_ones(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "a", tmp_path / "b"))
    done = worker("-c", str(config), "--once", "--job", "nope")
    assert done.returncode == 2
    assert "unknown job 'nope'" in done.stderr
    assert "first, second, dormant" in done.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--connect"], ["--log-level", "LOUD"]])
def test_command_line_misuse_exits_2(args):
    done = worker(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_invalid_configuration_exits_78_and_runs_nothing(tmp_path):
    config = write_config(tmp_path, """\
        - name: ok
          call: tests.jobfuncs:touch
          kwargs: {path: "%s"}
        - name: typo
          call: tests.jobfuncs:does_not_exist
        """ % (tmp_path / "ran"))
    done = worker("-c", str(config), "--once")
    assert done.returncode == 78
    assert done.stderr.strip().count("\n") == 0
    assert str(config) in done.stderr and "'typo'" in done.stderr and "'call'" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_check_validates_and_runs_nothing(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "a", tmp_path / "b"))
    done = worker("-c", str(config), "--check")
    assert done.returncode == 0, done.stderr
    assert "OK: 3 jobs" in done.stdout
    assert not (tmp_path / "a").exists()


def test_check_connect_reaches_mariadb_through_odbc(tmp_path):
    config = write_config(tmp_path, "- {name: a, call: 'tests.jobfuncs:noop'}\n",
                          url=MARIADB_URL)
    done = worker("-c", str(config), "--check", "--connect")
    assert done.returncode == 0, done.stderr
    assert "connected to mysql+pyodbc://worker_test:***@127.0.0.1" in done.stdout
    assert "worker_test:worker_test" not in done.stdout + done.stderr


def test_check_connect_with_a_missing_odbc_driver_exits_69_and_lists_drivers(tmp_path):
    url = MARIADB_URL.replace("MariaDB+Unicode", "No+Such+Driver")
    config = write_config(tmp_path, "- {name: a, call: 'tests.jobfuncs:noop'}\n", url=url)
    done = worker("-c", str(config), "--check", "--connect")
    assert done.returncode == 69
    assert "cannot connect" in done.stderr
    assert "installed ODBC drivers: " in done.stderr and "'MariaDB Unicode'" in done.stderr
    assert "worker_test:worker_test" not in done.stdout + done.stderr


def test_help_documents_flags_and_exit_codes():
    done = worker("--help")
    assert done.returncode == 0
    for text in ("--once", "--job NAME", "--check", "--connect", "--log-level", "-c PATH",
                 "78", "69"):
        assert text in done.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "run-worker"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "usage: run-worker" in done.stdout


def test_check_with_job_lists_only_that_job(tmp_path):
    config = write_config(tmp_path, GOOD_JOBS % (tmp_path / "a", tmp_path / "b"))
    done = worker("-c", str(config), "--check", "--job", "dormant")
    assert done.returncode == 0, done.stderr
    listed = [line.split(":")[0].strip() for line in done.stdout.splitlines()[1:]]
    assert listed == ["dormant"]


def test_a_job_raising_system_exit_or_worse_is_that_jobs_failure(tmp_path):
    """SystemExit, KeyboardInterrupt and an exception whose str() raises end as the
    job's failure; the other jobs run; the summary lists all; exit 1."""
    config = write_config(tmp_path, """\
        - {name: exits, call: 'tests.jobfuncs:raise_system_exit'}
        - {name: interrupts, call: 'tests.jobfuncs:raise_keyboard_interrupt'}
        - {name: unprintable, call: 'tests.jobfuncs:raise_unprintable'}
        - {name: fine, call: 'tests.jobfuncs:select_one'}
        """)
    result = worker("--once", "-c", str(config))
    assert result.returncode == 1, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert set(lines) == {"exits", "interrupts", "unprintable", "fine"}
    for name in ("exits", "interrupts", "unprintable"):
        assert lines[name].split()[1] == "failed"
    assert lines["fine"].split()[1] == "success"
    assert "SystemExit" in lines["exits"] and "KeyboardInterrupt" in lines["interrupts"]
    assert "4 job(s): 1 succeeded, 3 failed" in result.stdout


def test_version_and_python_m_worker(tmp_path):
    version = worker("--version")
    assert version.returncode == 0 and version.stdout.startswith("run-worker ")
    as_module = subprocess.run([sys.executable, "-m", "worker", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert as_module.returncode == 0 and "--once" in as_module.stdout


def test_cluster_mode_refuses_job_names_that_differ_only_in_case(tmp_path):
    config = write_config(tmp_path, """\
        - {name: Tick, call: 'tests.jobfuncs:noop'}
        - {name: tick, call: 'tests.jobfuncs:noop'}
        """)
    config.write_text(config.read_text().replace("jobs:\n", "cluster: {}\njobs:\n"))
    result = worker("--check", "-c", str(config))
    assert result.returncode == 78, result.stderr
    assert "'Tick' and 'tick' differ only in case" in result.stderr


def _unusable_databases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (URL, the reason the worker must give): start-up errors no wait fixes."""
    return {
        "wrong-password": (MARIADB_URL.replace(":worker_test@", ":Wr0ngPassw0rd@"),
                           "access denied"),
        "odbc-driver-not-installed": (MARIADB_URL.replace("MariaDB+Unicode", "No+Such+Driver"),
                                      "ODBC driver not installed"),
        "sqlite-directory-missing": (f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}",
                                     "unable to open the database file"),
    }


UNUSABLE = ["wrong-password", "odbc-driver-not-installed", "sqlite-directory-missing"]


@pytest.mark.parametrize("case", UNUSABLE)
def test_the_daemon_exits_69_at_once_when_waiting_cannot_help(case, tmp_path):
    """Issue 10 item 8: no endless wait for a login that is refused, a driver that is
    not installed or a file that cannot be opened: exit 69 with one line."""
    url, reason = _unusable_databases(tmp_path)[case]
    config = write_config(tmp_path, "- {name: tick, call: 'tests.jobfuncs:noop', every: 1s}\n",
                          url=url)
    started = time.monotonic()
    done = worker("-c", str(config), env={"NOTIFY_SOCKET": ""})
    took = time.monotonic() - started
    print(f"\n{case}: exit {done.returncode} after {took:.2f}s")
    assert done.returncode == 69, done.stderr
    assert took < 15
    problems = [line for line in done.stderr.splitlines()
                if " ERROR " in line or " WARNING " in line]
    assert len(problems) == 1, done.stderr
    assert "cannot start" in problems[0] and reason in problems[0]
    assert "not answering" not in done.stderr and "connection lost" not in done.stderr
    assert "Wr0ngPassw0rd" not in done.stderr


@pytest.mark.parametrize("case", UNUSABLE)
def test_once_fails_each_job_without_retrying_when_waiting_cannot_help(case, tmp_path):
    url, reason = _unusable_databases(tmp_path)[case]
    config = write_config(tmp_path, "- {name: first, call: 'tests.jobfuncs:select_one'}\n"
                                    "- {name: second, call: 'tests.jobfuncs:select_one'}\n",
                          url=url)
    done = worker("-c", str(config), "--once")
    assert done.returncode == 1, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:-1]]
    assert [row[:3] for row in rows] == [["first", "failed", "1"], ["second", "failed", "1"]]
    assert f"failed: {reason}" in done.stderr and "retrying" not in done.stderr
    assert "connection lost" not in done.stderr
    assert "Wr0ngPassw0rd" not in done.stdout + done.stderr


JSON_CASES = {
    "config error": (["--once"], "- {name: a, call: nope}\n", 78),
    "unknown job": (["--once", "--job", "zz"], "- {name: a, call: 'tests.jobfuncs:noop'}\n", 2),
    "command-line error": (["--bogus"], "- {name: a, call: 'tests.jobfuncs:noop'}\n", 2),
    "failing job with traceback": (["--once"],
                                   "- {name: a, call: 'tests.jobfuncs:fail_with_value_error'}\n",
                                   1),
    "database unusable at start-up": ([], "- {name: a, call: 'tests.jobfuncs:noop', "
                                          "every: 1s}\n", 69),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_with_json_logs_every_stderr_line_is_json(case, tmp_path):
    """Issue 10 item 15: config errors and command-line errors too."""
    args, jobs, code = JSON_CASES[case]
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}" if code == 69 else None
    config = write_config(tmp_path, jobs, url=url)
    done = worker("-c", str(config), "--log-format", "json", *args)
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert lines
    entries = [json.loads(line) for line in lines]   # raises on any line not JSON
    assert all(entry["time"][-6] in "+-" for entry in entries)   # the UTC offset
    assert any(entry["level"] in ("ERROR", "CRITICAL") for entry in entries)


def test_list_columns_are_aligned(tmp_path):
    """Issue 10 item 15: each column starts at the same place on every line."""
    config = write_config(tmp_path, """\
        - {name: a, call: 'tests.jobfuncs:noop', every: 30s}
        - {name: a-much-longer-name, call: 'tests.jobfuncs:noop', cron: '0 3 * * *'}
        - {name: manual, call: 'tests.jobfuncs:noop'}
        """)
    done = worker("-c", str(config), "--list")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    starts = [header.index("schedule"), header.index("next run")]
    assert len(rows) == 3
    for row in rows:
        for start in starts:
            assert row[start - 2:start] == "  " and row[start] != " ", (row, start)


def test_list_says_unknown_not_never_when_the_run_table_cannot_be_read(tmp_path):
    """A cluster whose run table is out of reach: --list said every job's last run
    was "never" (exit 0), as if no run had ever happened."""
    config = write_config(tmp_path, "- {name: tick, call: 'tests.jobfuncs:noop', every: 30s}\n")
    config.write_text(config.read_text() + f'cluster: {{url: "sqlite:///'
                      f'{tmp_path / "missing" / "runs.db"}"}}\n')
    done = worker("-c", str(config), "--list")
    assert done.returncode == 0, done.stderr
    assert "cannot read the run table" in done.stderr
    header, row = done.stdout.splitlines()
    assert row.endswith("unknown (the run table cannot be read)") and "never" not in row


def test_a_failing_jobs_traceback_is_logged_once_at_info(tmp_path):
    """Issue 10 item 15: file and line of the job's failure, at INFO, once."""
    config = write_config(tmp_path, "- {name: bad, call: 'tests.jobfuncs:fail_with_value_error'}\n")
    done = worker("-c", str(config), "--once")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback (most recent call last)") == 1
    assert done.stderr.count('jobfuncs.py", line') == 1
    assert "in fail_with_value_error" in done.stderr
    assert " INFO " in done.stderr.split("Traceback (most recent call last)")[0].splitlines()[-1]


def test_a_jobs_error_quoting_a_password_is_masked_in_the_summary(tmp_path):
    """The run's error goes to the summary, the run table, --history and hooks: it is
    masked where it is made, so none of them can show the password."""
    config = write_config(tmp_path, """\
        - {name: leaky, call: 'tests.jobfuncs:raise_secret_error'}
        """)
    result = worker("--once", "-c", str(config))
    assert result.returncode == 1
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    assert "mysql://app:***@db.example/prod" in result.stdout


def test_skipped_ok_turns_75_into_0_with_a_log_line(tmp_path):
    """Kubernetes cannot count 75 as success: --skipped-ok makes an all-skipped
    --once exit 0 and says so; without it the same run exits 75."""
    running = tmp_path / "running"
    config = write_config(tmp_path, f"""\
        - name: holder
          call: tests.jobfuncs:touch_then_python_sleep
          kwargs: {{path: "{running}", seconds: 8}}
        """)
    first = subprocess.Popen([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                              "--once"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not running.exists() and time.monotonic() < deadline:   # it holds the job
            time.sleep(0.05)
        plain = worker("-c", str(config), "--once")
        assert plain.returncode == 75, plain.stderr
        done = worker("-c", str(config), "--once", "--skipped-ok")
        assert done.returncode == 0, done.stderr
        assert "exit 0, not 75 (--skipped-ok)" in done.stderr
        assert "holder  skipped" in done.stdout
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
    misuse = worker("-c", str(config), "--skipped-ok")
    assert misuse.returncode == 2 and "--skipped-ok goes with --once" in misuse.stderr


def test_the_summary_of_3000_jobs_is_written_in_a_few_writes_not_two_per_job(monkeypatch):
    """`--once` prints one line per job: on an unbuffered stdout (PYTHONUNBUFFERED=1)
    print() per line was two write() calls per job. The lines are the same."""
    import io

    from worker import reports
    from worker.runner import JobResult, Outcome

    class CountingStdout(io.StringIO):
        writes = 0

        def write(self, text):
            CountingStdout.writes += 1
            return super().write(text)

    results = [JobResult(f"job-{n:05d}", Outcome.SUCCESS, 1, 0.001) for n in range(3000)]
    results[7] = JobResult("job-00007", Outcome.FAILED, 3, 0.5, "boom")
    out = CountingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    reports.summary(results)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["job", "outcome", "attempts", "duration", "error"]
    assert [line.split()[0] for line in lines[1:3001]] == [r.job for r in results]
    assert lines[8].split() == ["job-00007", "failed", "3", "0.500s", "boom"]
    assert lines[3001] == "3000 job(s): 2999 succeeded, 1 failed"
    assert len(lines) == 3002
    assert CountingStdout.writes <= 12
