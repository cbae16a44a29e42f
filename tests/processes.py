"""Worker processes for tests: started from a config file, signalled, and read."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.conftest import ROOT


class Daemon:
    """A worker process started from a config file, its stderr kept in a file."""

    def __init__(self, config: Path, *args: str, env: dict | None = None) -> None:
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_worker.py"), "-c", str(config), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, **(env or {})})

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, fragment: str, timeout: float = 20, count: int = 1) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(fragment) >= count:
                return time.monotonic()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{fragment!r} not logged within {timeout}s:\n{self.log}")

    def signal(self, signum: int) -> float:
        self.process.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float = 30) -> int:
        try:
            self.process.wait(timeout)
        finally:
            self._log.close()
            if self.process.poll() is None:
                self.process.kill()
        return self.process.returncode

    def stop(self) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()


def runs(url: str, name: str, after: float = 0.0) -> list[float]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(
                text("SELECT at FROM worker_test_runs WHERE name = :n AND at >= :t "
                     "ORDER BY at"), {"n": name, "t": after})]
    finally:
        engine.dispose()


def history_rows(url: str, job: str) -> list:
    """The job's rows in the run history (worker_history), oldest first; none when
    the table was never created there."""
    from sqlalchemy import inspect
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("worker_history"):
                return []
            return connection.execute(text(
                "SELECT job, kind, scheduled_ms, started_ms, ended_ms, outcome, attempts, "
                "node, pid, error FROM worker_history WHERE job = :j ORDER BY id"),
                {"j": job}).all()
    finally:
        engine.dispose()
