"""The job list: every broken config stops the worker with exit 78, one line on
stderr naming file, job, key and line, and nothing runs; valid configs load with
the documented defaults."""
from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker import cli
from worker.callables import resolve_jobs
from worker.config import (ConfigError, RetryPolicy, expand_env, format_duration, load,
                           mask_secrets, masked_url, parse_duration)

ROOT = Path(__file__).resolve().parent.parent

# Placeholders filled in per test: @DIR@ = tmp_path, @RAN@ = the file that the
# `touch` job creates when it runs.  A line ending in MARK is the line that the
# error must name (`path:LINE: ...`).
MARK = "# <-- error here"
DB = "database:\n  url: sqlite:///@DIR@/worker.db\n"
TOUCH = ("  - name: touch\n"
         "    call: tests.jobfuncs:touch\n"
         '    kwargs: {path: "@RAN@"}\n')
HEAD = DB + "jobs:\n" + TOUCH          # lines 1-6: a valid file with one job


@dataclass(frozen=True)
class Broken:
    id: str
    yaml: str | bytes | None   # None: see `path`
    fragment: str              # expected part of the message
    key: str | None = None     # key named in the error ("key 'retry.attempts'")
    job: str | None = None     # job named in the error
    path: str = "file"         # "file", "missing" (no such file) or "directory"
    no_line: bool = False      # the error must not name a line


def bad_cron(case_id: str, expression: str, fragment: str) -> Broken:
    """A job `b` whose cron expression must be refused (on line 9)."""
    return Broken(case_id, HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                                  f'    cron: "{expression}"  {MARK}\n',
                  fragment, key="cron", job="b")


BROKEN = [
    # --- YAML itself ----------------------------------------------------------
    Broken("yaml-syntax-error",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"   stray: indentation  {MARK}\n",
           "invalid YAML"),
    Broken("tabs-for-indentation",
           HEAD + f"\t- name: b  {MARK}\n",
           "YAML does not allow tabs for indentation"),
    Broken("duplicate-key-in-database",
           DB + f"  url: sqlite:///@DIR@/other.db  {MARK}\njobs:\n" + TOUCH,
           "duplicate key 'url' in the same mapping", key="database.url"),
    Broken("duplicate-key-in-job",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    call: tests.jobfuncs:select_one  {MARK}\n",
           "duplicate key 'call' in the same mapping", key="call", job="b"),
    Broken("python-object-tag",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f'    kwargs: !!python/object/apply:os.system ["touch @RAN@"]  {MARK}\n',
           "could not determine a constructor for the tag"),
    Broken("recursive-alias",
           DB + f"jobs: &jobs [*jobs]  {MARK}\n",
           "an alias refers to a node that contains it"),
    Broken("file-is-a-list",
           f"- database  {MARK}\n- jobs\n",
           "must be a mapping of keys to values, got a list"),
    Broken("empty-file", "", "the file is empty", no_line=True),
    Broken("only-comments", "# nothing here yet\n", "the file is empty", no_line=True),
    Broken("missing-file", None, "file not found", path="missing", no_line=True),
    Broken("directory-as-path", None, "cannot read the file", path="directory",
           no_line=True),
    Broken("not-utf8", HEAD.encode() + b"  # caf\xe9\n", "cannot read the file",
           no_line=True),
    # --- unknown keys -----------------------------------------------------------
    Broken("unknown-top-level-key-close",
           HEAD + f"wroker:  {MARK}\n  max_workers: 2\n",
           "unknown key 'wroker'; did you mean 'worker'?", key="wroker"),
    Broken("unknown-top-level-key-far",
           HEAD + f"flavour: blue  {MARK}\n",
           "known keys: database, worker, retry, jobs, cluster", key="flavour"),
    Broken("unknown-job-key-kwarg",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    kwarg: {{a: 1}}  {MARK}\n",
           "unknown key 'kwarg'; did you mean 'kwargs'?", key="kwarg", job="b"),
    Broken("unknown-database-key",
           DB + f"  pool_sise: 4  {MARK}\njobs:\n" + TOUCH,
           "did you mean 'pool_size'?", key="database.pool_sise"),
    Broken("unknown-job-retry-key",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    retry: {{attempt: 3}}  {MARK}\n",
           "did you mean 'attempts'?", key="retry.attempt", job="b"),
    # --- types and ranges ---------------------------------------------------------
    Broken("pool-size-wrong-type",
           DB + f'  pool_size: "four"  {MARK}\njobs:\n' + TOUCH,
           "must be a whole number, got a string ('four')", key="database.pool_size"),
    Broken("max-workers-zero",
           HEAD + f"worker:\n  max_workers: 0  {MARK}\n",
           "must be at least 1, got 0", key="worker.max_workers"),
    Broken("pool-size-negative",
           DB + f"  pool_size: -1  {MARK}\njobs:\n" + TOUCH,
           "must be at least 1, got -1", key="database.pool_size"),
    Broken("max-workers-above-pool",
           DB + f"  pool_size: 4  {MARK}\n  max_overflow: 2\n"
                "worker:\n  max_workers: 8\njobs:\n" + TOUCH,
           "worker.max_workers (8) is larger than pool_size + max_overflow (4 + 2); "
           "every job holds one connection", key="database.pool_size"),
    Broken("retry-attempts-zero",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n    retry:\n"
                  f"      attempts: 0  {MARK}\n",
           "must be at least 1, got 0", key="retry.attempts", job="b"),
    Broken("wait-max-below-wait-initial",
           HEAD + f"retry:\n  wait_initial: 2s\n  wait_max: 1s  {MARK}\n",
           "wait_max (1s) is smaller than wait_initial (2s)", key="retry.wait_max"),
    Broken("enabled-not-a-boolean",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f'    enabled: "yes-ish"  {MARK}\n',
           "must be true or false, got a string ('yes-ish')", key="enabled", job="b"),
    # --- durations and schedules ----------------------------------------------------
    Broken("duration-in-words",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f'    timeout: "5 minutes"  {MARK}\n',
           "not a duration: '5 minutes'", key="timeout", job="b"),
    Broken("duration-abc",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    every: abc  {MARK}\n",
           "not a duration: 'abc'", key="every", job="b"),
    Broken("duration-nan",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    timeout: .nan  {MARK}\n",
           "not a duration", key="timeout", job="b"),
    Broken("every-zero",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    every: 0  {MARK}\n",
           "must be greater than 0, got 0", key="every", job="b"),
    # Accepted before: the loop spun on overlap skips, and near 1e-300 counting the
    # missed runs raised OverflowError out of the loop (the daemon died).
    Broken("every-below-a-millisecond",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    every: 1.0e-320  {MARK}\n",
           "must be at least 1ms, got 1e-320", key="every", job="b"),
    bad_cron("bad-cron", "61 * * * *", "not a valid cron expression: '61 * * * *'"),
    bad_cron("cron-never-fires-feb-30", "0 0 30 2 *", "no fire time within 28 years"),
    bad_cron("cron-never-fires-31-april-june", "0 0 31 4,6 *", "no fire time within 28 years"),
    bad_cron("cron-year-field", "* * * * * * 2020", "7 fields; give 5"),
    bad_cron("cron-seconds-field", "* * * * * *", "6 fields; give 5"),
    bad_cron("cron-quartz", "0 */5 * * * *", "6 fields; give 5"),
    bad_cron("cron-wrapping-range", "10-5 * * * *", "the range '10-5' runs backwards"),
    bad_cron("cron-step-on-a-number", "5/10 * * * *", "a step needs '*' or a range"),
    bad_cron("cron-L", "0 0 L * *", "'L' is not a number 1-31"),
    bad_cron("cron-W", "0 0 15W * *", "'15W' is not a number 1-31"),
    bad_cron("cron-hash", "0 0 * * 5#3", "'5#3' is not a number 0-7 or SUN-SAT"),
    bad_cron("cron-question-mark", "0 0 ? * MON", "'?' is not a number 1-31"),
    bad_cron("cron-H", "H * * * *", "'H' is not a number 0-59"),
    bad_cron("cron-reboot", "@reboot", "unknown '@reboot'"),
    bad_cron("cron-empty", "", "not a valid cron expression: '': empty"),
    # A number too long for int() was a ValueError traceback; 'ſun'.upper() == 'SUN'.
    bad_cron("cron-5000-digit-day", "0 0 1" + "0" * 5000 + " * *",
             "'... is outside 1-31"),
    bad_cron("cron-non-ascii-day-name", "0 0 * * \u017fun", "non-ASCII character"),
    bad_cron("cron-non-ascii-digit-step", "*/\u0661 * * * *", "non-ASCII character"),
    Broken("transient-code-double-minus",
           HEAD + f"retry:\n  transient_codes: ['--1205']  {MARK}\n",
           "'--1205' is neither a native error number", key="retry.transient_codes[0]"),
    Broken("transient-code-superscript",
           HEAD + f"retry:\n  permanent_codes: ['\u00b2']  {MARK}\n",
           "is neither a native error number", key="retry.permanent_codes[0]"),
    Broken("timezone-a-folder",
           HEAD + f"worker:\n  timezone: Europe  {MARK}\n",
           "unknown time zone 'Europe'", key="worker.timezone"),
    Broken("cron-and-every",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n    every: 5m\n"
                  f'    cron: "0 3 * * *"  {MARK}\n',
           "give either 'every' or 'cron', not both", key="cron", job="b"),
    # --- jobs -------------------------------------------------------------------------
    Broken("empty-job-list",
           DB + f"jobs: []  {MARK}\n",
           "'jobs' must be a non-empty list of jobs", key="jobs"),
    Broken("missing-jobs-key",
           DB + "worker:\n  max_workers: 2\n",
           "'jobs' must be a non-empty list of jobs", key="jobs"),
    Broken("job-not-a-mapping",
           HEAD + f"  - just-a-string  {MARK}\n",
           "each job must be a mapping", key="jobs[1]"),
    Broken("job-without-name",
           HEAD + f"  - call: tests.jobfuncs:noop  {MARK}\n",
           "job has no 'name'", key="jobs[1]"),
    Broken("duplicate-job-name",
           HEAD + f"  - name: touch  {MARK}\n    call: tests.jobfuncs:noop\n",
           "duplicate job name (first defined at line 4)", key="name", job="touch"),
    Broken("job-name-with-space",
           HEAD + f'  - name: "my job"  {MARK}\n    call: tests.jobfuncs:noop\n',
           "a job name may use letters, digits", key="name", job="my job"),
    Broken("session-as-kwarg",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    kwargs: {{session: 1}}  {MARK}\n",
           "'session' is passed by the worker", key="kwargs.session", job="b"),
    # --- call: checked at load time, before any job starts ------------------------------
    Broken("call-without-colon",
           HEAD + f"  - name: b\n    call: tests.jobfuncs.noop  {MARK}\n",
           "must be 'package.module:function', got 'tests.jobfuncs.noop'",
           key="call", job="b"),
    Broken("call-missing-module",
           HEAD + f"  - name: b  {MARK}\n    call: tests.no_such_module:run\n",
           "no module named 'tests.no_such_module'", key="call", job="b"),
    Broken("call-missing-attribute",
           HEAD + f"  - name: b  {MARK}\n    call: tests.jobfuncs:no_such_function\n",
           "module 'tests.jobfuncs' has no attribute 'no_such_function'",
           key="call", job="b"),
    Broken("call-not-callable",
           HEAD + f"  - name: b  {MARK}\n    call: tests.jobfuncs:NOT_CALLABLE\n",
           "'tests.jobfuncs:NOT_CALLABLE' is an int, not a function", key="call", job="b"),
    Broken("kwargs-do-not-fit",
           HEAD + f"  - name: b  {MARK}\n    call: tests.jobfuncs:needs_two_args\n"
                  "    kwargs: {a: 1}\n",
           "missing a required argument: 'b'", key="call", job="b"),
    Broken("kwargs-unexpected",
           HEAD + f"  - name: b  {MARK}\n    call: tests.jobfuncs:noop\n"
                  "    kwargs: {colour: red}\n",
           "unexpected keyword argument 'colour'", key="call", job="b"),
    # --- database -----------------------------------------------------------------------
    Broken("missing-database",
           "jobs:\n" + TOUCH,
           "missing section 'database'", key="database"),
    Broken("missing-database-url",
           f"database:  {MARK}\n  pool_size: 4\njobs:\n" + TOUCH,
           "missing key 'url'", key="database.url"),
    Broken("in-memory-sqlite",
           f'database:\n  url: "sqlite:///:memory:"  {MARK}\njobs:\n' + TOUCH,
           "an in-memory SQLite database cannot be shared", key="database.url"),
    Broken("in-memory-sqlite-no-path",
           f"database:\n  url: sqlite://  {MARK}\njobs:\n" + TOUCH,
           "an in-memory SQLite database cannot be shared", key="database.url"),
    Broken("url-port-not-a-number",
           f"database:\n  url: postgresql://db.example:port/x  {MARK}\njobs:\n" + TOUCH,
           "not a valid SQLAlchemy URL", key="database.url"),
    # --- environment ------------------------------------------------------------------------
    Broken("env-var-unset-no-default",
           f"database:\n  url: ${{WORKER_TEST_UNSET_URL}}  {MARK}\njobs:\n" + TOUCH,
           "environment variable WORKER_TEST_UNSET_URL is not set and has no default",
           key="database.url"),
    # A scalar YAML types but Python cannot build: it was a ValueError traceback.
    Broken("yaml-impossible-date",
           HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n"
                  f"    kwargs: {{day: 2026-02-30}}  {MARK}\n",
           "cannot read the value '2026-02-30': day is out of range for month"),
    Broken("yaml-integer-of-5000-digits",
           HEAD + f"worker:\n  max_workers: 1{'0' * 5000}  {MARK}\n",
           "cannot read the value '1000000000"),
    Broken("env-var-unset-in-job",
           HEAD + "  - name: b\n    call: tests.jobfuncs:touch\n"
                  f"    kwargs:\n      path: ${{WORKER_TEST_UNSET_PATH}}  {MARK}\n",
           "environment variable WORKER_TEST_UNSET_PATH is not set",
           key="kwargs.path", job="b"),
    # --- the run history ---------------------------------------------------------------------
    Broken("history-unknown-key",
           HEAD + f"history:\n  kep: 1d  {MARK}\n",
           "unknown key 'kep'; did you mean 'keep'?", key="history.kep"),
    Broken("history-keep-zero",
           HEAD + f"history:\n  keep: 0  {MARK}\n",
           "must be greater than 0", key="history.keep"),
    Broken("history-cap-zero",
           HEAD + f"history:\n  max_runs_per_job: 0  {MARK}\n",
           "must be at least 1", key="history.max_runs_per_job"),
    Broken("history-enabled-not-a-boolean",
           HEAD + f"history:\n  enabled: sometimes  {MARK}\n",
           "must be true or false", key="history.enabled"),
    Broken("history-in-memory-sqlite",
           HEAD + f"history:\n  url: 'sqlite://'  {MARK}\n",
           "an in-memory SQLite database would be lost at exit", key="history.url"),
    Broken("history-keep-and-its-alias-disagree",
           HEAD + f"history: {{keep: 1d}}\ncluster:\n  keep_history: 2d  {MARK}\n",
           "is an alias of history.keep, which says 24h: give one of them",
           key="cluster.keep_history"),
]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """cli.main() edits sys.path and the root logger: undo both after each test."""
    monkeypatch.chdir(ROOT)   # `tests.jobfuncs:...` imports resolve from here
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("WORKER_CONFIG", "WORKER_DATABASE_URL", "WORKER_TEST_UNSET_URL",
                 "WORKER_TEST_UNSET_PATH"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def fill(text, tmp_path: Path):
    if isinstance(text, bytes):
        return text.replace(b"@DIR@", str(tmp_path).encode()).replace(
            b"@RAN@", str(tmp_path / "ran").encode())
    return text.replace("@DIR@", str(tmp_path)).replace("@RAN@", str(tmp_path / "ran"))


def write_config(tmp_path: Path, text) -> Path:
    path = tmp_path / "jobs.yaml"
    text = fill(text, tmp_path)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def marked_line(text) -> int | None:
    if isinstance(text, bytes) or text is None:
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.endswith(MARK):
            return number
    return None


def test_the_touch_job_runs_when_the_config_is_valid(tmp_path, capsys):
    """The control for every broken case: if the config were accepted, `ran` would exist."""
    path = write_config(tmp_path, HEAD)
    assert cli.main(["-c", str(path), "--once"]) == cli.EXIT_OK
    assert (tmp_path / "ran").read_text() == "ran"
    assert "1 job(s): 1 succeeded, 0 failed" in capsys.readouterr().out


def test_there_are_enough_broken_cases():
    assert len(BROKEN) >= 28
    assert len({case.id for case in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize("case", BROKEN, ids=[case.id for case in BROKEN])
def test_broken_config_exits_78_with_one_line_and_runs_nothing(case, tmp_path, capsys):
    assert_refused_with_one_line(case, tmp_path, capsys)


@pytest.mark.parametrize("case", BROKEN, ids=[case.id for case in BROKEN])
def test_broken_config_without_libyaml_gives_the_same_line(case, tmp_path, capsys,
                                                          monkeypatch):
    """The pure-Python loader (PyYAML built without libyaml) names the same lines."""
    import yaml
    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    assert_refused_with_one_line(case, tmp_path, capsys)


def test_the_file_is_read_by_libyaml_when_pyyaml_has_it(tmp_path, monkeypatch):
    import yaml
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML was built without libyaml")
    made = []

    class RecordingLoader(yaml.CSafeLoader):
        def __init__(self, stream):
            made.append(type(self))
            super().__init__(stream)

    monkeypatch.setattr(yaml, "CSafeLoader", RecordingLoader)
    config = load_text(tmp_path, HEAD + "  - name: b\n    call: tests.jobfuncs:noop\n")
    assert len(made) == 1 and issubclass(made[0], RecordingLoader)
    assert [job.line for job in config.jobs] == [4, 7]


def assert_refused_with_one_line(case: Broken, tmp_path: Path, capsys) -> None:
    if case.path == "missing":
        path = tmp_path / "no-such-dir" / "jobs.yaml"
    elif case.path == "directory":
        path = tmp_path / "a-directory"
        path.mkdir()
    else:
        path = write_config(tmp_path, case.yaml)

    code = cli.main(["-c", str(path), "--once"])

    out, err = capsys.readouterr()
    assert code == cli.EXIT_CONFIG == 78
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert line.strip()
    assert line.startswith("run-worker: invalid configuration: ")
    assert str(path) in line
    assert case.fragment in line
    if case.key is not None:
        assert f"key {case.key!r}" in line
    if case.job is not None:
        assert f"job {case.job!r}" in line
    expected_line = marked_line(case.yaml)
    if expected_line is not None:
        assert f"{path}:{expected_line}: " in line
    if case.no_line:
        assert f"{path}: " in line
    assert not (tmp_path / "ran").exists(), "a job ran although the config is invalid"
    assert not (tmp_path / "worker.db").exists(), "the database was opened"


def test_a_broken_module_with_a_multiline_error_still_gives_one_line(tmp_path, capsys,
                                                                    monkeypatch):
    (tmp_path / "multiline_broken_jobs.py").write_text(
        'raise RuntimeError("first line\\nsecond line")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, HEAD + "  - name: b\n"
                                         "    call: multiline_broken_jobs:run\n")
    assert cli.main(["-c", str(path), "--once"]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "RuntimeError: first line second line" in err
    assert f"{path}:7: job 'b': key 'call'" in err
    assert not (tmp_path / "ran").exists()


def test_a_module_that_exits_at_import_is_a_config_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "script_like_jobs.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, HEAD + "  - name: b\n"
                                         "    call: script_like_jobs:run\n")
    assert cli.main(["-c", str(path), "--once"]) == 78
    assert "importing 'script_like_jobs' failed: SystemExit" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def test_config_path_comes_from_worker_config_env(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path, DB + "jobs: []\n")
    monkeypatch.setenv("WORKER_CONFIG", str(path))
    assert cli.main(["--once"]) == 78
    assert f"{path}:3: key 'jobs'" in capsys.readouterr().err


# --- passwords ------------------------------------------------------------------------

SECRET_URL = "postgresql://u:s3cret@127.0.0.1/x"

PASSWORD_CASES = [
    ("error-elsewhere",
     f"database:\n  url: {SECRET_URL}\njobs:\n" + TOUCH + "    retry: {attempts: 0}\n"),
    ("url-where-the-section-belongs", f"database: {SECRET_URL}\njobs:\n" + TOUCH),
    ("url-without-key", f"database:\n  url {SECRET_URL}\njobs:\n" + TOUCH),
    ("url-as-the-whole-file", f"{SECRET_URL}\n"),
    ("odbc-pwd-where-a-mapping-belongs",
     "database:\n  url: mssql+pyodbc://h/db\n  connect_args: \"UID=u;PWD=s3cret\"\n"
     "jobs:\n" + TOUCH),
]


@pytest.mark.parametrize("text", [text for _, text in PASSWORD_CASES],
                         ids=[name for name, _ in PASSWORD_CASES])
def test_password_never_in_config_error(text, tmp_path, capsys):
    path = write_config(tmp_path, text)
    assert cli.main(["-c", str(path), "--once"]) == 78
    out, err = capsys.readouterr()
    assert str(path) in err
    assert "s3cret" not in out + err


@pytest.mark.parametrize("url, shown", [
    # (a postgresql:// URL is refused by --check unless its driver is installed)
    ("mysql+pyodbc://u:s3cret@127.0.0.1/x?driver=MariaDB+Unicode",
     "mysql+pyodbc://u:***@127.0.0.1/x"),
    ("mssql+pyodbc://u:s3cret@sqlhost/db?driver=ODBC+Driver+18+for+SQL+Server",
     "mssql+pyodbc://u:***@sqlhost/db"),
    ("mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BX%7D%3BSERVER%3Dh%3BUID%3Du%3BPWD%3Ds3cret",
     "mssql+pyodbc:///?odbc_connect="),
], ids=["userinfo", "pyodbc-url", "pyodbc-odbc_connect"])
def test_password_never_in_check_output(url, shown, tmp_path, capsys):
    path = write_config(tmp_path, f"database:\n  url: '{url}'\njobs:\n" + TOUCH)
    assert cli.main(["-c", str(path), "--check"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert shown in out
    assert "s3cret" not in out + err
    assert not (tmp_path / "ran").exists()


def test_masked_url():
    assert masked_url(SECRET_URL) == "postgresql://u:***@127.0.0.1/x"
    assert masked_url("sqlite:///worker.db") == "sqlite:///worker.db"
    assert "s3cret" not in masked_url("postgresql://u:s3cret@h:notaport/x")


# --- --check ---------------------------------------------------------------------------

def test_check_on_the_default_config_prints_jobs_and_runs_nothing(tmp_path, capsys,
                                                                  monkeypatch):
    database_file = tmp_path / "check.db"
    monkeypatch.setenv("WORKER_DATABASE_URL", f"sqlite:///{database_file}")
    assert cli.main(["--check"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == (f"config/jobs.yaml: OK: 3 jobs, database sqlite:///{database_file}, "
                        "max_workers 4")
    assert lines[1:] == [
        "  enqueue-commands: jobs.commands:enqueue_commands (enabled; every 10s)",
        "  process-commands: jobs.commands:process_pending (enabled; every 30s)",
        "  purge-commands: jobs.commands:purge_processed (enabled; cron '0 3 * * *')",
    ]
    assert err == ""
    assert not database_file.exists(), "--check without --connect opened the database"


def test_check_runs_no_job(tmp_path, capsys):
    path = write_config(tmp_path, HEAD)
    assert cli.main(["-c", str(path), "--check"]) == cli.EXIT_OK
    assert "  touch: tests.jobfuncs:touch (enabled; no schedule)" in capsys.readouterr().out
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "worker.db").exists()


# --- config.load: what a valid file means ------------------------------------------------

def load_text(tmp_path: Path, text: str, environ=None):
    return load(write_config(tmp_path, text), environ=environ if environ is not None else {})


def test_defaults(tmp_path):
    config = load_text(tmp_path, "database:\n  url: sqlite:///w.db\njobs:\n"
                                 "  - name: a\n    call: tests.jobfuncs:noop\n")
    assert config.worker.max_workers == 4
    db = config.database
    assert (db.url, db.pool_size, db.max_overflow, db.pool_timeout, db.pool_recycle,
            db.pool_pre_ping, dict(db.connect_args)) == (
        "sqlite:///w.db", 4, 0, 30.0, 3600.0, False, {})
    assert config.retry == RetryPolicy(attempts=5, wait_initial=0.5, wait_max=30.0)
    (job,) = config.jobs
    assert (job.name, job.call, dict(job.kwargs), job.timeout, job.every, job.cron,
            job.enabled, job.idempotent, job.line) == (
        "a", "tests.jobfuncs:noop", {}, None, None, None, True, False, 4)
    assert job.retry == config.retry
    assert job.schedule is None


def test_pool_size_defaults_to_max_workers(tmp_path):
    config = load_text(tmp_path, "database:\n  url: sqlite:///w.db\nworker:\n"
                                 "  max_workers: 7\njobs:\n  - {name: a, call: 'm:f'}\n")
    assert config.database.pool_size == 7


# Each key a config may leave out, and a valid value different from its default.
DEFAULTED_KEYS = [
    ("worker", "max_workers", 3), ("worker", "misfire_grace_time", 90.0),
    ("worker", "shutdown_timeout", 45.0),
    ("database", "max_overflow", 2), ("database", "pool_timeout", 12.0),
    ("database", "pool_recycle", 600.0), ("database", "pool_pre_ping", True),
    ("cluster", "lease", 40.0), ("cluster", "heartbeat", 10.0),
    ("cluster", "batch_slot", 120.0),
    ("history", "enabled", False), ("history", "keep", 3600.0),
    ("history", "max_runs_per_job", 5),
    ("job", "enabled", False), ("job", "idempotent", True),
]


@pytest.mark.parametrize("section, key, value", DEFAULTED_KEYS,
                         ids=[f"{s}.{k}" for s, k, _ in DEFAULTED_KEYS])
def test_each_default_is_written_once_on_its_dataclass(section, key, value, tmp_path,
                                                       monkeypatch):
    """A default changed on the dataclass is the default a config file gets: the
    schema has no second copy of it."""
    from worker.config import (ClusterSettings, DatabaseSettings, HistorySettings, JobSpec,
                               WorkerSettings)
    settings = {"worker": WorkerSettings, "database": DatabaseSettings,
                "cluster": ClusterSettings, "history": HistorySettings,
                "job": JobSpec}[section]
    monkeypatch.setattr(settings.__dataclass_fields__[key], "default", value)
    config = load_text(tmp_path, "database:\n  url: sqlite:///w.db\n  pool_size: 4\n"
                                 "cluster: {}\njobs:\n  - {name: a, call: 'm:f'}\n")
    loaded = {"worker": config.worker, "database": config.database,
              "cluster": config.cluster, "history": config.history,
              "job": config.jobs[0]}[section]
    assert getattr(loaded, key) == value


@pytest.mark.parametrize("written, keep", [
    ("", 7 * 86400.0), ("history: {keep: 2h}\ncluster: {}\n", 7200.0),
    ("cluster: {keep_history: 3h}\n", 10800.0),
    ("history: {keep: 4h}\ncluster: {keep_history: 4h}\n", 14400.0)],
    ids=["default", "history.keep", "cluster.keep_history", "both, equal"])
def test_one_retention_for_the_history_and_the_run_table(written, keep, tmp_path):
    """cluster.keep_history is an alias of history.keep: either one sets both."""
    config = load_text(tmp_path, "database:\n  url: sqlite:///w.db\n" + written +
                       "jobs:\n  - {name: a, call: 'm:f'}\n")
    assert config.history.keep == keep and config.history.enabled
    assert config.cluster is None or config.cluster.keep_history == keep


def test_every_key_is_read(tmp_path):
    config = load_text(tmp_path, """\
database:
  url: sqlite:///w.db
  pool_size: 2
  max_overflow: 3
  pool_timeout: 5s
  pool_recycle: -1
  pool_pre_ping: true
  connect_args: {timeout: 15}
worker:
  max_workers: 5
jobs:
  - name: a
    call: m:f
    kwargs: {x: 1, y: [1, 2]}
    timeout: 2m
    every: 1h
    enabled: false
    idempotent: true
  - name: b
    call: m:g
    cron: "*/5 * * * *"
""")
    db = config.database
    assert (db.pool_size, db.max_overflow, db.pool_timeout, db.pool_recycle,
            db.pool_pre_ping, dict(db.connect_args)) == (2, 3, 5.0, -1.0, True, {"timeout": 15})
    assert config.worker.max_workers == 5
    a, b = config.jobs
    assert (dict(a.kwargs), a.timeout, a.every, a.enabled, a.idempotent) == (
        {"x": 1, "y": [1, 2]}, 120.0, 3600.0, False, True)
    assert a.schedule == "every 1h"
    assert b.cron == "*/5 * * * *" and b.schedule == "cron '*/5 * * * *'"
    assert (a.line, b.line) == (12, 19)
    assert config.job_names() == ["a", "b"]


def test_retry_defaults_are_inherited_and_overridden_per_job(tmp_path):
    config = load_text(tmp_path, """\
database: {url: "sqlite:///w.db"}
retry: {attempts: 3, wait_initial: 1s}
jobs:
  - {name: inherits, call: "m:f"}
  - {name: one-try, call: "m:f", retry: {attempts: 1}}
  - {name: longer-wait, call: "m:f", retry: {wait_max: 2m}}
""")
    assert config.retry == RetryPolicy(attempts=3, wait_initial=1.0, wait_max=30.0)
    retries = {job.name: job.retry for job in config.jobs}
    assert retries == {
        "inherits": RetryPolicy(3, 1.0, 30.0),
        "one-try": RetryPolicy(1, 1.0, 30.0),
        "longer-wait": RetryPolicy(3, 1.0, 120.0),
    }


def test_yaml_merge_keys_share_settings_between_jobs(tmp_path):
    config = load_text(tmp_path, """\
database: {url: "sqlite:///w.db"}
jobs:
  - &base
    name: a
    call: m:f
    retry: {attempts: 2}
  - <<: *base
    name: b
""")
    a, b = config.jobs
    assert (a.name, b.name) == ("a", "b")
    assert b.call == "m:f" and b.retry.attempts == 2


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("1h 30m", 5400.0), ("7d", 604800.0), ("1.5s", 1.5), (" 2s ", 2.0), (2.5, 2.5), (10, 10.0), (0, 0.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 minutes", "abc", "", "5", "1h30", "-1s", "5w",
                                   True, None, [1], float("nan"), float("inf")])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_durations_in_a_file(tmp_path):
    config = load_text(tmp_path, """\
database: {url: "sqlite:///w.db", pool_timeout: 500ms}
retry: {wait_initial: 30s, wait_max: 5m}
jobs:
  - {name: a, call: "m:f", timeout: 1h, every: 1h30m}
  - {name: b, call: "m:f", timeout: 2.5}
""")
    assert config.database.pool_timeout == 0.5
    assert config.retry == RetryPolicy(5, 30.0, 300.0)
    a, b = config.jobs
    assert (a.timeout, a.every, b.timeout) == (3600.0, 5400.0, 2.5)


@pytest.mark.parametrize("seconds, text", [
    (0.5, "500ms"), (0.001, "1ms"), (1, "1s"), (2.5, "2.5s"), (30, "30s"), (90, "90s"),
    (60, "1m"), (300, "5m"), (5400, "90m"), (3600, "1h"), (7200, "2h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_round_trips_through_parse():
    for seconds in (0.25, 1, 45, 120, 5400, 86400):
        assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text, environ, expanded", [
    ("${A}", {"A": "x"}, "x"),
    ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
    ("${A:-fallback}", {"A": "x"}, "x"),
    ("${A:-fallback}", {}, "fallback"),
    ("${A:-fallback}", {"A": ""}, "fallback"),     # empty takes the default, as in sh
    ("${A:-}", {}, ""),
    ("${A}", {"A": ""}, ""),                        # set but empty, no default: empty
    ("$$", {}, "$"),
    ("$${A}", {"A": "x"}, "${A}"),                  # $$ escapes the reference
    ("cost: $5", {}, "cost: $5"),                   # a lone $ stays
    ("${A}${B:-b}", {"A": "a"}, "ab"),
])
def test_expand_env(text, environ, expanded):
    assert expand_env(text, environ) == expanded


def test_expand_env_unset_without_default():
    with pytest.raises(LookupError, match=r"MISSING is not set.*\$\{MISSING:-default\}"):
        expand_env("${MISSING}", {})


def test_env_expansion_in_a_file(tmp_path):
    text = """\
database:
  url: ${DB_URL}
jobs:
  - name: a
    call: m:f
    kwargs:
      path: ${OUT:-/tmp/default}
      label: ${LABEL:-unnamed}
      price: $$5
      literal: $${DB_URL}
"""
    config = load_text(tmp_path, text, {"DB_URL": "sqlite:///from-env.db", "LABEL": ""})
    assert config.database.url == "sqlite:///from-env.db"
    assert dict(config.jobs[0].kwargs) == {"path": "/tmp/default", "label": "unnamed",
                                           "price": "$5", "literal": "${DB_URL}"}


def test_a_value_that_is_only_an_env_reference_is_typed_like_yaml(tmp_path):
    text = """\
database:
  url: sqlite:///w.db
  pool_pre_ping: ${PING:-false}
worker:
  max_workers: ${WORKERS:-4}
jobs:
  - name: a
    call: m:f
    every: ${EVERY:-30}
    kwargs:
      label: "id-${N}"
      n: ${N}
      text: ${TEXT}
"""
    config = load_text(tmp_path, text, {"WORKERS": "6", "PING": "true", "N": "7",
                                        "TEXT": "hello"})
    assert config.worker.max_workers == 6 and config.database.pool_size == 6
    assert config.database.pool_pre_ping is True
    assert config.jobs[0].every == 30.0
    assert dict(config.jobs[0].kwargs) == {"label": "id-7", "n": 7, "text": "hello"}


@pytest.mark.parametrize("value", ["1" + "0" * 5000, "[" * 100_000],
                         ids=["5000-digits", "100000-brackets"])
def test_an_env_value_yaml_cannot_type_is_refused_not_a_traceback(value, tmp_path,
                                                                   capsys, monkeypatch):
    """`max_workers: ${W}` typed the expansion with yaml.safe_load, which raised a
    ValueError (too many digits) or RecursionError (nesting) out of --check."""
    monkeypatch.setenv("WORKER_TEST_HUGE", value)
    path = write_config(tmp_path, DB + "worker:\n  max_workers: ${WORKER_TEST_HUGE}\n"
                                       "jobs:\n" + TOUCH)
    assert cli.main(["-c", str(path), "--check"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key 'worker.max_workers'" in err, err[:300]
    assert "must be a whole number, got a string" in err, err[:300]


def test_load_reads_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKER_TEST_DB_URL", "sqlite:///os-environ.db")
    path = write_config(tmp_path, "database:\n  url: ${WORKER_TEST_DB_URL}\n"
                                  "jobs:\n  - {name: a, call: 'm:f'}\n")
    assert load(path).database.url == "sqlite:///os-environ.db"


def test_the_default_config_loads_and_its_callables_resolve():
    config = load(ROOT / "config" / "jobs.yaml", environ={})
    assert config.database.url == "sqlite:///worker.db"
    assert config.database.pool_recycle == 3600.0
    assert config.database.pool_size == config.worker.max_workers == 4
    assert config.job_names() == ["enqueue-commands", "process-commands", "purge-commands"]
    process = config.jobs[1]
    assert process.timeout == 300.0 and process.every == 30.0
    assert process.retry == RetryPolicy(attempts=3, wait_initial=0.5, wait_max=30.0)
    functions = resolve_jobs(config)
    import jobs.commands
    assert functions == {
        "enqueue-commands": jobs.commands.enqueue_commands,
        "process-commands": jobs.commands.process_pending,
        "purge-commands": jobs.commands.purge_processed,
    }


def test_the_default_config_takes_the_url_from_the_environment():
    config = load(ROOT / "config" / "jobs.yaml",
                  environ={"WORKER_DATABASE_URL": "sqlite:///elsewhere.db"})
    assert config.database.url == "sqlite:///elsewhere.db"


def test_config_error_format():
    error = ConfigError("must be at least 1, got 0", path="/tmp/x/jobs.yaml", job="a",
                        key="retry.attempts", line=12)
    assert str(error) == ("/tmp/x/jobs.yaml:12: job 'a': key 'retry.attempts': "
                          "must be at least 1, got 0")
    assert str(ConfigError("the file is empty", path="f.yaml")) == "f.yaml: the file is empty"
    assert str(ConfigError("x\ny")) == "<config>: x y"


def test_site_codes_extend_the_classifier(tmp_path):
    config = load_text(tmp_path, """\
database:
  url: sqlite:///w.db
retry:
  attempts: 2
  transient_codes: [4060, "HYT00", "1234"]
  permanent_codes: [1205]
jobs:
  - {name: a, call: 'm:f'}
""")
    assert config.extra_codes.retry == {4060, "HYT00", 1234}
    assert config.extra_codes.never == {1205}
    assert config.retry.attempts == 2


@pytest.mark.parametrize("retry,fragment", [
    ("{transient_codes: [abc]}", "neither a native error number"),
    ("{transient_codes: 1205}", "must be a list"),
    ("{transient_codes: [1205], permanent_codes: [1205]}", "both transient and permanent"),
])
def test_site_codes_are_validated(tmp_path, retry, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_text(tmp_path, f"database:\n  url: sqlite:///w.db\nretry: {retry}\n"
                            "jobs:\n  - {name: a, call: 'm:f'}\n")


def test_site_codes_only_at_the_top_level(tmp_path):
    with pytest.raises(ConfigError, match="top-level 'retry' section") as raised:
        load_text(tmp_path, "database:\n  url: sqlite:///w.db\njobs:\n"
                            "  - {name: a, call: 'm:f', retry: {transient_codes: [1]}}\n")
    assert raised.value.job == "a"


def test_quoted_env_references_stay_strings(tmp_path):
    config = load_text(tmp_path, """\
database:
  url: sqlite:///w.db
  connect_args:
    password: "${PW}"
    retries: ${N}
jobs:
  - {name: a, call: 'm:f'}
""", {"PW": "0123", "N": "3"})
    assert dict(config.database.connect_args) == {"password": "0123", "retries": 3}


def test_a_quoted_env_reference_stays_a_string_through_a_merge_key(tmp_path, monkeypatch,
                                                                  capsys):
    """`"${PIN}"` with PIN=0123 is the string '0123' whether the job writes it or
    gets it through `<<: *common` (it was the octal integer 83 through the merge)."""
    monkeypatch.setenv("WORKER_TEST_PIN", "0123")
    path = write_config(tmp_path, DB + f"""\
x-common: &common
  call: tests.jobfuncs:write_repr
  kwargs: {{path: "@DIR@/merged.txt", value: "${{WORKER_TEST_PIN}}"}}
x-nested: &nested
  <<: *common
  kwargs: {{path: "@DIR@/nested.txt", value: "${{WORKER_TEST_PIN}}"}}
jobs:
  - <<: *common
    name: merged
  - {{<<: [*nested, *common], name: nested}}
  - name: direct
    call: tests.jobfuncs:write_repr
    kwargs: {{path: "@DIR@/direct.txt", value: "${{WORKER_TEST_PIN}}"}}
  - name: aliased
    call: tests.jobfuncs:write_repr
    kwargs: &aliased {{path: "@DIR@/aliased.txt", value: "${{WORKER_TEST_PIN}}"}}
  - {{name: alias, call: "tests.jobfuncs:write_repr", kwargs: *aliased}}
""")
    assert cli.main(["-c", str(path), "--once"]) == 0, capsys.readouterr().err
    for name in ("merged", "nested", "direct", "aliased"):
        assert (tmp_path / f"{name}.txt").read_text() == "'0123'", name


def test_a_never_firing_cron_is_refused_at_check_and_at_start_up(tmp_path):
    """Through the real CLI: `--check` and the daemon's start-up both exit 78 with
    one line (file:line, job, key) for an expression that never fires; on main
    `--check` passed it and the daemon died with a croniter traceback (exit 1)."""
    path = write_config(tmp_path, HEAD + "  - name: leap\n    call: tests.jobfuncs:noop\n"
                                         '    cron: "0 0 30 2 *"\n')
    for args in (["--check"], []):
        done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(path),
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 78, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{path}:9: job 'leap': key 'cron': not a valid cron expression: " \
               "'0 0 30 2 *': it has no fire time within 28 years" in done.stderr


def test_x_keys_hold_anchors_for_jobs(tmp_path):
    config = load_text(tmp_path, """\
x-common: &common
  call: m:f
  retry: {attempts: 2}
database:
  url: sqlite:///w.db
jobs:
  - {<<: *common, name: a}
  - {<<: *common, name: b, every: 1m}
""")
    assert [(j.name, j.call, j.retry.attempts) for j in config.jobs] == [
        ("a", "m:f", 2), ("b", "m:f", 2)]


def test_the_mysql_odbc_port_trap_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"drop ':3399' and add '&Port=3399'"):
        load_text(tmp_path, """\
database:
  url: mysql+pyodbc://u:p@127.0.0.1:3399/test?driver=MariaDB+Unicode
jobs:
  - {name: a, call: 'm:f'}
""")
    config = load_text(tmp_path, """\
database:
  url: mysql+pyodbc://u:p@127.0.0.1/test?driver=MariaDB+Unicode&Port=3399
jobs:
  - {name: a, call: 'm:f'}
""")
    assert "Port=3399" in config.database.url


# --- hostile files, through the real command ---------------------------------------------

CLI_MEMORY_LIMIT = 1 << 30   # address space for one `--check`: several times what it needs


def check_in_a_process(path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`run_worker.py --check -c PATH` in a fresh process with its memory capped
    (going past the cap is a MemoryError, not exit 78) and a bounded wait."""
    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY_LIMIT, CLI_MEMORY_LIMIT))
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "--check", "-c",
                           str(path), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, preexec_fn=cap_memory)


def assert_one_config_error_line(done: subprocess.CompletedProcess, path: Path,
                                 fragment: str) -> str:
    assert done.returncode == 78, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith(f"run-worker: invalid configuration: {path}")
    assert fragment in done.stderr
    return done.stderr


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: each level a list of 9 aliases to the one before."""
    lines = ['x-0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"x-{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs() + DB.replace("@DIR@", str(tmp_path)) +
                    "jobs:\n  - name: a\n    call: tests.jobfuncs:touch\n"
                    "    kwargs: {path: *l8}\n")
    assert path.stat().st_size < 1000   # 9^9 = 387 million "lol"s expanded
    assert_one_config_error_line(check_in_a_process(path), path,
                                 "invalid YAML: its aliases expand it to more than 100,000 "
                                 "nodes")


def test_aliases_within_the_limit_are_expanded(tmp_path):
    """Anchors shared by many jobs are what aliases are for: not a bomb."""
    config = load_text(tmp_path, billion_laughs(levels=4) + DB + "jobs:\n" + "".join(
        f"  - {{name: j{i}, call: 'm:f', kwargs: {{data: *l3}}}}\n" for i in range(10)))
    data = config.jobs[9].kwargs["data"]   # 9 * 9 * 9 lists of 9: 7,380 nodes per job
    assert len(data) == 9 and data[8][8][8] == ["lol"] * 9


@pytest.mark.parametrize("levels, fragment", [
    (3000, "invalid YAML: nested more than 100 levels deep"),   # RecursionError before
    (101, "invalid YAML: nested more than 100 levels deep"),
], ids=["3000-levels", "101-levels"])
def test_deep_nesting_is_refused(levels, fragment, tmp_path):
    path = write_config(tmp_path, HEAD.replace(
        '    kwargs: {path: "@RAN@"}\n',
        "    kwargs:\n      path: " + "[" * (levels - 4) + "]" * (levels - 4) + "\n"))
    line = assert_one_config_error_line(check_in_a_process(path), path, fragment)
    assert f"{path}:7: " in line   # the line where the nesting starts


def test_a_hundred_levels_are_allowed(tmp_path):
    config = load_text(tmp_path, HEAD.replace(
        '    kwargs: {path: "@RAN@"}\n',
        "    kwargs:\n      path: " + "[" * 96 + "]" * 96 + "\n"))
    assert isinstance(config.jobs[0].kwargs["path"], list)


@pytest.mark.parametrize("kind", ["fifo", "character-device", "directory"])
def test_a_path_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    if kind == "fifo":
        path = tmp_path / "jobs.yaml"
        os.mkfifo(path)   # opening it to read would wait for a writer for ever
        fragment = "it is a FIFO (named pipe), not a regular file"
    elif kind == "character-device":
        path = Path("/dev/zero")   # reading it would never end
        fragment = "it is a character device, not a regular file"
    else:
        path = tmp_path
        fragment = "it is a directory, not a regular file"
    assert_one_config_error_line(check_in_a_process(path), path,
                                 f"cannot read the file: {fragment}")


# --- dialects and drivers, through the real command ------------------------------------------

def write_url_config(tmp_path: Path, url: str, cluster_url: str | None = None) -> Path:
    text = f"database:\n  url: '{url}'\n"
    if cluster_url is not None:
        text += f"cluster:\n  url: '{cluster_url}'\n"
    return write_config(tmp_path, text + "jobs:\n" + TOUCH)


def module_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("url, fragment", [
    ("postgres://u:s3cret@127.0.0.1/x", "unknown dialect 'postgres'; did you mean "
                                        "'postgresql'?"),
    ("mssql+pydobc://u:s3cret@h/db?driver=X", "unknown dialect 'mssql+pydobc'; did you "
                                              "mean 'mssql+pyodbc'?"),
    ("nosuchdb://u:s3cret@h/db", "unknown dialect 'nosuchdb'; known: mariadb, mssql"),
    ("postgresql+asyncpg://u:s3cret@h/db", "'postgresql+asyncpg' is an asyncio driver"),
], ids=["postgres", "mssql+pydobc", "nonsense", "asyncio"])
def test_an_unknown_dialect_is_refused_by_check(url, fragment, tmp_path):
    assert_url_refused(tmp_path, url, fragment, "database.url")


def test_an_unknown_dialect_in_the_cluster_url_is_refused_by_check(tmp_path):
    assert_url_refused(tmp_path, "postgres://u:s3cret@127.0.0.1/x", "unknown dialect "
                       "'postgres'; did you mean 'postgresql'?", "cluster.url")


def assert_url_refused(tmp_path: Path, url: str, fragment: str, key: str) -> str:
    good = f"sqlite:///{tmp_path / 'w.db'}"
    path = (write_url_config(tmp_path, url) if key == "database.url" else
            write_url_config(tmp_path, good, cluster_url=url))
    line = assert_one_config_error_line(check_in_a_process(path), path, fragment)
    assert f"key {key!r}" in line
    assert "s3cret" not in line
    return line


MISSING_DRIVERS = [  # (URL, the module its dialect imports, the package to install)
    ("postgresql+psycopg2://u:s3cret@127.0.0.1/x", "psycopg2", "psycopg2-binary"),
    ("postgresql+psycopg://u:s3cret@127.0.0.1/x", "psycopg", "psycopg[binary]"),
    ("mysql+pymysql://u:s3cret@127.0.0.1/x", "pymysql", "PyMySQL"),
    ("mssql+pymssql://u:s3cret@127.0.0.1/x", "pymssql", "pymssql"),
]


@pytest.mark.parametrize("url, module, package, key",
                         [(*case, "database.url") for case in MISSING_DRIVERS] +
                         [(*MISSING_DRIVERS[0], "cluster.url")],
                         ids=[f"{case[1]}-database" for case in MISSING_DRIVERS] +
                         [f"{MISSING_DRIVERS[0][1]}-cluster"])
def test_a_missing_driver_module_is_refused_by_check(url, module, package, key, tmp_path):
    if not module_missing(module):
        pytest.skip(f"{module} is installed here")
    line = assert_url_refused(tmp_path, url, f"needs the Python module {module!r}", key)
    assert f"dialect {url.split(':')[0]!r}" in line
    assert f"pip install {package}" in line


def test_an_installed_driver_passes_check(tmp_path):
    path = write_url_config(tmp_path, "mysql+pyodbc://u:s3cret@127.0.0.1/x?driver=X",
                            cluster_url=f"sqlite:///{tmp_path / 'runs.db'}")
    done = check_in_a_process(path)
    assert done.returncode == 0, done.stderr
    assert "database mysql+pyodbc://u:***@127.0.0.1/x" in done.stdout


# --- credentials in URLs and connection strings ------------------------------------------

def odbc_connect(connection_string: str) -> str:
    from urllib.parse import quote_plus
    return "mssql+pyodbc:///?odbc_connect=" + quote_plus(connection_string)


# Every URL shape that can carry a credential; "s3cret" is every credential in
# them, so any part of one that is shown is caught.
CREDENTIAL_URLS = [
    ("userinfo", "mysql+pyodbc://u:s3cret@127.0.0.1/db?driver=X"),
    ("userinfo-azure-user", "mssql+pyodbc://u@server:s3cret@sqlhost/db?driver=X"),
    ("query-PWD", "mssql+pyodbc://u@sqlhost/db?driver=X&PWD=s3cret"),
    ("query-password", "mysql+pyodbc://u@127.0.0.1/db?driver=X&password=s3cret&Port=3306"),
    ("query-token", "mssql+pyodbc://u@sqlhost/db?AccessToken=s3cret&driver=X"),
    ("query-secret", "mssql+pyodbc://u@sqlhost/db?driver=X&Client_Secret=s3cret"),
    ("query-key", "mssql+pyodbc://u@sqlhost/db?driver=X&api_key=s3cret"),
    ("odbc_connect", odbc_connect("DRIVER={X};SERVER=h;UID=u;PWD=s3cret;APP=w")),
    ("odbc_connect-braced", odbc_connect(
        "DRIVER={X};SERVER=h;UID=u;PWD={s3cret;s3cret}}s3cret};APP=w")),
    ("odbc_connect-password-key", odbc_connect("Driver={X};Server=h;Password=s3cret")),
]


@pytest.mark.parametrize("url", [url for _, url in CREDENTIAL_URLS],
                         ids=[name for name, _ in CREDENTIAL_URLS])
def test_check_shows_every_url_shape_without_its_credential(url, tmp_path, capsys):
    path = write_config(tmp_path, f"database:\n  url: '{url}'\njobs:\n" + TOUCH)
    assert cli.main(["-c", str(path), "--check"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    shown = out.splitlines()[0]
    assert "***" in shown
    assert "s3cret" not in out + err
    assert masked_url(url) in shown


@pytest.mark.parametrize("url", [url for _, url in CREDENTIAL_URLS],
                         ids=[name for name, _ in CREDENTIAL_URLS])
@pytest.mark.parametrize("where", ["instead-of-the-section", "as-a-key", "as-connect_args"])
def test_a_url_echoed_in_a_config_error_shows_no_credential(url, where, tmp_path, capsys):
    text = {"instead-of-the-section": f"database: '{url}'\njobs:\n" + TOUCH,
            "as-a-key": f"database:\n  url: sqlite:///w.db\n  {url}: 1\njobs:\n" + TOUCH,
            "as-connect_args": f"database:\n  url: sqlite:///w.db\n  connect_args: '{url}'\n"
                               "jobs:\n" + TOUCH}[where]
    path = write_config(tmp_path, text)
    assert cli.main(["-c", str(path), "--check"]) == 78
    out, err = capsys.readouterr()
    assert str(path) in err and "***" in err
    assert "s3cret" not in out + err


@pytest.mark.parametrize("key", ["database.url", "cluster.url"])
def test_an_unencoded_at_in_the_password_is_refused(key, tmp_path, capsys):
    url = "mysql+pyodbc://u:p@s3cret@127.0.0.1/db?driver=X"
    text = (f"database:\n  url: '{url}'\n" if key == "database.url" else
            f"database:\n  url: sqlite:///w.db\ncluster:\n  url: '{url}'\n")
    path = write_config(tmp_path, text + "jobs:\n" + TOUCH)
    assert cli.main(["-c", str(path), "--check"]) == 78
    out, err = capsys.readouterr()
    assert f"key {key!r}" in err
    assert "an '@' that is not encoded; write each '@' in the user name or password " \
           "as %40" in err
    assert "s3cret" not in out + err
    # Encoded, the same password is fine.
    path.write_text(path.read_text().replace("p@s3cret", "p%40s3cret"))
    assert cli.main(["-c", str(path), "--check"]) == cli.EXIT_OK


@pytest.mark.parametrize("text, shown", [
    ("UID=u;PWD=s3cret;APP=w", "UID=u;PWD=***;APP=w"),
    ("DRIVER={X};UID=u;PWD={s3cret;s3cret}}s3cret};APP=w", "DRIVER={X};UID=u;PWD=***;APP=w"),
    ("PWD={s3cret s3cret", "PWD=***"),    # a brace never closed: the rest of the line
    ("Password = s3cret; Server=h", "Password = ***; Server=h"),
    ("?driver=X&token=s3cret&Port=1", "?driver=X&token=***&Port=1"),
    ("cannot connect to postgresql://u:p@s3cret@h/x: refused",
     "cannot connect to postgresql://u:***@h/x: refused"),
    ("cannot connect to postgresql://u:password@h/x", "cannot connect to "
                                                      "postgresql://u:password@h/x"),
    ("connect_args {'password': 's3cret', 'timeout': 5}",
     "connect_args {'password': '***', 'timeout': 5}"),
    ('{"api_key": "s3cret", "n": 1}', '{"api_key": "***", "n": 1}'),
    ("odbc_connect=UID%3Du%3BPWD%3D%7Bs3cret%3Bs3cret%7D%7Ds3cret%7D%3BAPP%3Dw",
     "odbc_connect=UID%3Du%3BPWD%3D***%3BAPP%3Dw"),
    ("job=report attempt=1/3 succeeded", "job=report attempt=1/3 succeeded"),
    # Values a server quotes back from the statement's bind parameters (as each
    # server words it): hide_parameters does not reach the server's own message.
    ("[ma-3.1.15]Duplicate entry '4111-1111' for key 'PRIMARY' (1062)",
     "[ma-3.1.15]Duplicate entry '***' for key 'PRIMARY' (1062)"),
    ("Incorrect integer value: '4111x' for column `w`.`t`.`a` at row 1",
     "Incorrect integer value: '***' for column `w`.`t`.`a` at row 1"),
    ('violates unique constraint "c"\nDETAIL:  Key (lower(card))=(4111) already exists.',
     'violates unique constraint "c"\nDETAIL:  Key (lower(card))=(***) already exists.'),
    ('DETAIL:  Key (card)=(4111) is not present in table "p".',
     'DETAIL:  Key (card)=(***) is not present in table "p".'),
    ('violates check constraint "c"\nDETAIL:  Failing row contains (4111, x).\n',
     'violates check constraint "c"\nDETAIL:  Failing row contains (***).\n'),
    ('invalid input syntax for type integer: "4111x"',
     'invalid input syntax for type integer: "***"'),
    ("Cannot insert duplicate key in object 'dbo.t'. The duplicate key value is (4111). "
     "(2627) (SQLExecDirectW)", "Cannot insert duplicate key in object 'dbo.t'. The "
     "duplicate key value is (***). (2627) (SQLExecDirectW)"),
], ids=["odbc", "odbc-braced", "odbc-unclosed-brace", "odbc-spaces", "query",
        "url-unencoded-at", "url-placeholder", "dict-repr", "json", "percent-encoded",
        "no-credential", "mariadb-duplicate-entry", "mariadb-incorrect-value",
        "postgresql-duplicate-key", "postgresql-foreign-key", "postgresql-failing-row",
        "postgresql-invalid-input", "sqlserver-duplicate-key"])
def test_mask_secrets(text, shown):
    assert mask_secrets(text) == shown


def test_config_error_holds_no_credential_in_any_form():
    error = ConfigError("got 'mssql+pyodbc://u@h/db?PWD=s3cret'", path="x.yaml")
    assert "s3cret" not in str(error) + repr(error) + error.message + str(error.args)
