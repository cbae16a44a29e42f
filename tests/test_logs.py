"""worker.logs: the batching handler writes every line, whole and in order;
warnings at once; INFO lines without waiting for another line; before the
summary; never twice across a fork."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import ROOT
from worker import logs
from worker.logs import BatchingHandler, TextFormatter


@pytest.fixture
def handler():
    stream = io.StringIO()
    made = BatchingHandler(stream)
    made.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test-batching")
    logger.propagate = False
    logger.handlers[:] = [made]
    logger.setLevel(logging.DEBUG)
    yield logger, made, stream
    logger.handlers.clear()
    made.close()


def test_a_warning_writes_the_waiting_lines_first_then_itself(handler, monkeypatch):
    monkeypatch.setattr(logs, "FLUSH_AFTER", 3600.0)   # only the warning may write
    logger, _, stream = handler
    logger.info("first")
    logger.debug("second")
    assert stream.getvalue() == ""
    logger.warning("third")
    assert stream.getvalue() == "INFO first\nDEBUG second\nWARNING third\n"


def test_info_lines_are_written_without_another_line_coming(handler):
    logger, _, stream = handler
    logger.info("alone")
    deadline = time.monotonic() + 10
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "INFO alone\n"


def test_lines_from_many_threads_are_all_written_whole(tmp_path):
    path = tmp_path / "log"
    with open(path, "w") as stream:
        made = BatchingHandler(stream)
        made.setFormatter(TextFormatter())
        logger = logging.getLogger("test-batching-threads")
        logger.propagate = False
        logger.handlers[:] = [made]
        logger.setLevel(logging.INFO)

        def log_lines(thread: int) -> None:
            for number in range(500):
                logger.info("thread %d line %d end", thread, number)

        threads = [threading.Thread(target=log_lines, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        made.close()
        logger.handlers.clear()
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 500
    assert all(line.endswith(" end") for line in lines)
    for thread in range(8):   # each thread's lines in the order it logged them
        numbers = [int(line.split()[-2]) for line in lines
                   if f"thread {thread} line " in line]
        assert numbers == list(range(500))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_waiting_lines_are_written_at_exit_and_before_os_exit():
    done = run_python("""
        import logging, os, sys
        from worker import logs
        logs.FLUSH_AFTER = 3600.0
        logs.setup_logging("INFO")
        logging.getLogger("t").info("at exit")
        """)
    assert done.returncode == 0 and "INFO" in done.stderr and "at exit" in done.stderr
    done = run_python("""
        import logging, os
        from worker import logs
        logs.FLUSH_AFTER = 3600.0
        logs.setup_logging("INFO")
        logging.getLogger("t").info("before os._exit")
        logs.flush_logs()
        os._exit(3)
        """)
    assert done.returncode == 3 and "before os._exit" in done.stderr


def test_a_forked_child_does_not_write_the_parents_waiting_lines(tmp_path):
    """A job that forks: the parent's waiting INFO line is written once, by the
    parent; the child writes only its own."""
    path = tmp_path / "log"
    done = run_python(f"""
        import logging, os
        from worker import logs
        logs.FLUSH_AFTER = 3600.0
        stream = open({str(path)!r}, "a")
        logs.setup_logging("INFO", stream=stream)
        log = logging.getLogger("t")
        log.info("parent waiting")
        pid = os.fork()
        if pid == 0:
            log.warning("child line")
            os._exit(0)
        os.waitpid(pid, 0)
        log.warning("parent after")
        """)
    assert done.returncode == 0, done.stderr
    messages = [line.rsplit(": ", 1)[1] for line in path.read_text().splitlines()]
    assert sorted(messages) == ["child line", "parent after", "parent waiting"]
    assert messages.index("parent waiting") < messages.index("parent after")


def test_the_summary_comes_after_the_runs_log_lines_in_one_file(tmp_path):
    """cron's `>> log 2>&1`: stdout and stderr in one file. The summary (stdout)
    follows the run's log lines (stderr), not the other way round."""
    config = tmp_path / "jobs.yaml"
    config.write_text(textwrap.dedent(f"""\
        database: {{url: "sqlite:///{tmp_path / 'w.db'}"}}
        worker: {{lock_dir: "{tmp_path / 'locks'}"}}
        jobs:
          - {{name: one, call: 'tests.jobfuncs:noop'}}
          - {{name: two, call: 'tests.jobfuncs:noop'}}
        """))
    with open(tmp_path / "out", "w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "--once", "-c",
                               str(config)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              timeout=120)
    assert done.returncode == 0
    text = (tmp_path / "out").read_text()
    assert text.count("succeeded in") == 2
    assert text.index("work loop stopped") < text.index("2 job(s): 2 succeeded, 0 failed")


def run_once(tmp_path, jobs: str, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "jobs.yaml"
    config.write_text(f'database: {{url: "sqlite:///{tmp_path / "w.db"}"}}\n'
                      f'worker: {{lock_dir: "{tmp_path / "locks"}"}}\njobs:\n' + jobs)
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "--once", "-c",
                           str(config), "--log-level", "INFO", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_bind_parameters_are_never_printed(tmp_path, fmt):
    """A UNIQUE violation: the error line and the INFO traceback (text, and the
    JSON `traceback` field) show the SQL but not the card number bound to it."""
    done = run_once(tmp_path, "  - {name: cards, call: 'tests.jobfuncs:insert_card_twice', "
                              "kwargs: {card: '4111-1111-1111-1111'}}\n", "--log-format", fmt)
    assert done.returncode == 1
    assert "UNIQUE constraint failed" in done.stderr and "Traceback" in done.stderr
    assert "INSERT INTO worker_test_cards" in done.stderr
    assert "4111" not in done.stderr + done.stdout


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_bound_value_the_server_quotes_back_is_never_printed(backend_server, tmp_path,
                                                                fmt):
    """MariaDB's duplicate-key message quotes the value itself (`Duplicate entry
    '4111-...' for key`), past hide_parameters: it was in the ERROR line, the
    traceback and the --once summary."""
    from tests.conftest import backend_url
    config = tmp_path / "jobs.yaml"
    config.write_text(f'database: {{url: "{backend_url(backend_server, tmp_path)}"}}\n'
                      f'worker: {{lock_dir: "{tmp_path / "locks"}"}}\n'
                      "jobs:\n  - {name: cards, call: 'tests.jobfuncs:insert_card_twice', "
                      "kwargs: {card: '4111-1111-1111-1111'}, retry: {attempts: 1}}\n")
    done = subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "--once", "-c",
                           str(config), "--log-level", "INFO", "--log-format", fmt],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "IntegrityError" in done.stdout, done.stderr
    assert "INSERT INTO worker_test_cards" in done.stderr
    assert "4111" not in done.stderr + done.stdout


def test_every_stderr_line_is_json_and_thread_exceptions_are_throttled(tmp_path):
    """Five helper threads of a job die alike: one JSON line (with its traceback),
    not five plain-text tracebacks."""
    done = run_once(tmp_path, "  - {name: threads, call: 'tests.jobfuncs:raise_in_threads', "
                              "kwargs: {count: 5}}\n", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    uncaught = [e for e in entries if e["message"].startswith("uncaught exception")]
    assert len(uncaught) == 1, done.stderr
    assert uncaught[0]["message"] == "uncaught exception in helper: RuntimeError"
    assert "RuntimeError: thread failed" in uncaught[0]["traceback"]


def test_thread_exceptions_are_throttled_whatever_the_threads_are_named(tmp_path):
    """The throttle's kind held the thread's name (digits stripped): threads named
    `helper-<uuid>` were each a kind of their own, never throttled, and each kept
    an entry for the daemon's lifetime."""
    done = run_once(tmp_path, "  - {name: threads, call: 'tests.jobfuncs:raise_in_threads', "
                              "kwargs: {count: 5, unique_names: true}}\n",
                    "--log-format", "json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    uncaught = [e for e in entries if e["message"].startswith("uncaught exception")]
    assert len(uncaught) == 1, done.stderr


def test_the_throttle_forgets_kinds_it_has_not_seen_for_long():
    from worker.logs import THROTTLE_SECONDS, ErrorThrottle
    now = [0.0]
    throttle = ErrorThrottle(clock=lambda: now[0])
    for number in range(5000):
        assert throttle.admit(("kind", number)) == 0
    now[0] += THROTTLE_SECONDS + 1
    throttle.admit(("another",))
    assert throttle.kinds_kept() <= 1000


def test_the_throttle_counts_what_it_left_out():
    now = [0.0]
    throttle = logs.ErrorThrottle(clock=lambda: now[0])
    kind = ("helper", RuntimeError, "x.py:1")
    assert throttle.admit(kind) == 0
    assert [throttle.admit(kind) for _ in range(3)] == [None] * 3
    assert throttle.admit(("other", RuntimeError, "x.py:1")) == 0
    now[0] = logs.THROTTLE_SECONDS
    assert throttle.admit(kind) == 3
    assert throttle.admit(kind) is None


def test_a_segfaulting_job_still_leaves_the_start_up_line(tmp_path):
    """What a crash loses: INFO lines of the last FLUSH_AFTER (the job's own
    'about to crash', logged just before), never the start-up line."""
    done = run_once(tmp_path, "  - {name: crash, call: 'tests.jobfuncs:segfault'}\n")
    assert done.returncode == -11, done.stderr
    assert "running 1 job(s) once from" in done.stderr


@pytest.mark.parametrize("ending", ["return", "exit"])
def test_a_forked_childs_own_lines_are_written(tmp_path, ending):
    done = run_once(tmp_path, "  - {name: forks, call: 'tests.jobfuncs:fork_child_that_logs', "
                              f"kwargs: {{count: 3, ending: {ending}}}}}\n")
    assert done.returncode == 0, done.stderr
    assert [f"child line {n}" in done.stderr for n in range(3)] == [True] * 3, done.stderr
