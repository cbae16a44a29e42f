"""worker.logs: the batching handler writes every line, whole and in order;
warnings at once; INFO lines without waiting for another line; before the
summary; never twice across a fork."""
from __future__ import annotations

import io
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
