"""The worker processes of a chaos run and the database around them.

A `Host` stands for one machine: two lock directories of its own (`lock_dir` a and
b, so a reload can move it), a TCP proxy in front of the database (to cut it), and
at most one daemon at a time (its node), plus `--once` runs now and then. Each
process is recorded as an `invariants.Proc`: pid, times, signals, stderr, exit
code, the configuration versions it ran, and samples of its threads and open files.

`Database` sets up and reads what the checks need: the jobs' execution rows
(`chaos_runs`), the cluster's run table, and holds a lock on the run table.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import MappingProxyType

import yaml

from .events import Plan
from .invariants import Execution, Proc, RunRow

ROOT = Path(__file__).resolve().parents[2]
# The driver's login timeout per backend: a node must not wait long on a cut proxy.
CONNECT_ARGS = MappingProxyType({"sqlite": ("timeout", 10), "mariadb": ("timeout", 5),
                                 "postgresql": ("connect_timeout", 5),
                                 "sqlserver": ("timeout", 5)})


def render(plan: Plan, *, backend: str, url: str, lock_dir: Path, host: str, node: str,
           cluster: bool) -> dict:
    """One node's YAML (as data) for a plan: its own lock_dir and node name."""
    config = {
        "database": {"url": url, "pool_size": plan.max_workers + plan.pool_extra,
                     "connect_args": dict([CONNECT_ARGS[backend]])},
        "worker": {"max_workers": plan.max_workers, "timezone": plan.timezone,
                   "shutdown_timeout": plan.shutdown_timeout,
                   "misfire_grace_time": plan.misfire_grace_time,
                   "lock_dir": str(lock_dir / plan.lock)},
        "retry": {"attempts": 2, "wait_initial": 0.1, "wait_max": 0.2},
        "jobs": [],
    }
    if cluster:
        config["cluster"] = {"lease": plan.lease, "heartbeat": plan.heartbeat, "node": node}
    if plan.metrics:
        config["metrics"] = {"port": 0}
    for job in plan.jobs:
        entry = {"name": job.name, "call": "tests.jobfuncs:chaos_job",
                 "kwargs": {"name": job.name, "host": host, "node": node, "lock": plan.lock,
                            "idem": job.idempotent, "seconds": job.seconds,
                            "mode": job.mode, "cluster": cluster},
                 "every": job.every, "idempotent": job.idempotent,
                 "enabled": job.enabled}
        if job.timeout is not None:
            entry["timeout"] = job.timeout
        config["jobs"].append(entry)
    return config


class Process:
    """A running worker process and its record."""

    def __init__(self, record: Proc, config: Path, log_path: Path, args: list[str]) -> None:
        self.record = record
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._stdout = log_path.with_suffix(".out")
        self._out = open(self._stdout, "w")
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
             "--log-format", "json", *args],
            cwd=ROOT, stdout=self._out, stderr=self._log, text=True)
        record.pid = self.popen.pid
        self.paused_since: float | None = None
        # The reload lines counted when a SIGHUP was sent to this paused process: its
        # answer is awaited from there at SIGCONT (a line written since counts).
        self.pending_hup: int | None = None
        self._ready = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ready(self) -> bool:
        """Its signal handlers are installed: it started, or waits for the database."""
        if not self._ready:
            self._ready = bool(self.count(("daemon started:", "database ")))
        return self._ready

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def count(self, prefixes: tuple[str, ...]) -> int:
        return sum(1 for line in self.lines() if any(f'"message": "{p}' in line
                                                     for p in prefixes))

    def signal(self, signum: int) -> float:
        now = time.time()
        if self.alive():
            self.popen.send_signal(signum)
        return now

    def pause(self) -> None:
        self.paused_since = self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.paused_since is not None:
            now = self.signal(signal.SIGCONT)
            self.record.paused.append((self.paused_since, now))
            self.paused_since = None

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.reap()
        return True

    def reap(self) -> None:
        if self.record.ended is None and self.popen.poll() is not None:
            self.record.ended = time.time()
            self.record.returncode = self.popen.returncode
            self._log.close()
            self._out.close()

    def finish_record(self) -> None:
        self.reap()
        self.record.lines = self.lines()
        self.record.stdout = self._stdout.read_text(errors="replace")

    def sample(self) -> None:
        pid = self.popen.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            threads = int(next(line.split()[1] for line in status.splitlines()
                               if line.startswith("Threads:")))
            files = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            return
        self.record.samples.append((time.time(), threads, files))


class Host:
    """One machine of the run: lock directories, a proxy, a daemon, `--once` runs."""

    def __init__(self, index: int, workdir: Path, backend: str, url: str, proxy,
                 cluster: bool) -> None:
        self.index = index
        self.name = f"n{index + 1}"
        self.dir = workdir / self.name
        for tag in ("a", "b"):
            (self.dir / "locks" / tag).mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(self.dir / "locks", 0o700)
        self.backend = backend
        self.proxy = proxy
        self.url = url
        self.cluster = cluster
        self.starts = 0
        self.daemon: Process | None = None

    def _config(self, plan: Plan, node: str, stem: str) -> Path:
        path = self.dir / f"{stem}.yaml"
        data = render(plan, backend=self.backend, url=self.url, lock_dir=self.dir / "locks",
                      host=self.name, node=node, cluster=self.cluster)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(data, sort_keys=False))
        temporary.replace(path)          # a reload never reads half a file
        return path

    def write(self, plan: Plan) -> None:
        """The daemon's config file for the next reload."""
        if self.daemon is not None:
            self._config(plan, self.daemon.record.node, "daemon")

    def start_daemon(self, plan: Plan) -> Process:
        self.starts += 1
        node = f"{self.name}-{self.starts}" if self.cluster else self.name
        config = self._config(plan, node, "daemon")
        record = Proc(f"{self.name}#{self.starts}", self.name, "daemon", node, 0, time.time())
        record.versions.append((record.started, plan))
        self.daemon = Process(record, config, self.dir / f"{node}-{self.starts}.log", [])
        return self.daemon

    def start_once(self, plan: Plan, number: int, jobs: tuple[str, ...]) -> Process:
        node = f"{self.name}-once{number}" if self.cluster else self.name
        config = self._config(plan, node, f"once{number}")
        record = Proc(f"once#{number}", self.name, "once", node, 0, time.time())
        record.versions.append((record.started, plan))
        args = ["--once"] + [arg for job in jobs for arg in ("--job", job)]
        return Process(record, config, self.dir / f"once{number}.log", args)


class Database:
    """The database side of a run, through a connection of its own (no proxy)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name

    def reset(self) -> None:
        """An empty run table and an empty chaos_runs; no run history, no job paused
        in the cluster, no node row and no run-now request left by an earlier run or
        test on the same database."""
        from sqlalchemy import (BigInteger, Column, Float, Integer, MetaData, String,
                                Table, text)
        from worker.db import create_tables
        with self.engine.begin() as connection:
            for table in ("chaos_runs", "worker_runs", "worker_history", "worker_paused",
                          "worker_nodes", "worker_requests", "worker_schema"):
                connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        metadata = MetaData()
        Table("chaos_runs", metadata,
              Column("id", Integer, primary_key=True, autoincrement=True),
              Column("job", String(200), nullable=False),
              Column("host", String(50), nullable=False),
              Column("node", String(200), nullable=False),
              Column("lock_tag", String(8), nullable=False),
              Column("idempotent", Integer, nullable=False),
              Column("pid", Integer, nullable=False),
              Column("slot_ms", BigInteger, nullable=True),
              Column("started", Float, nullable=False),
              Column("ended", Float, nullable=False))
        with self.engine.begin() as connection:
            create_tables(connection, metadata)

    def executions(self) -> list[Execution]:
        from sqlalchemy import text
        with self.engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT job, host, node, lock_tag, idempotent, pid, slot_ms, started, "
                "ended FROM chaos_runs")).all()
        return [Execution(r[0], r[1], r[2], r[3], bool(r[4]), r[5],
                          None if r[6] is None else int(r[6]), r[7], r[8]) for r in rows]

    def run_rows(self) -> list[RunRow]:
        from sqlalchemy import inspect, text
        if not inspect(self.engine).has_table("worker_runs"):
            return []
        with self.engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT job, slot_ms, node, started_ms, ended_ms, outcome, recovered "
                "FROM worker_runs")).all()
        return [RunRow(r[0], int(r[1]), r[2], int(r[3]),
                       None if r[4] is None else int(r[4]), r[5], r[6]) for r in rows]

    def hold_run_table(self, seconds: float, held: list, tds=None) -> threading.Thread:
        """Lock the run table from another connection for `seconds`, in a thread;
        (from, to) is appended to `held` once it was held. The lock is given up if it
        cannot be had within 2 s (a long transaction in the way)."""
        def hold() -> None:
            from sqlalchemy import text
            if tds is not None:
                # SQLite behind the TDS test server locks per database, not per table:
                # the server holds every run-table statement instead, as SQL Server
                # would behind another session's table lock.
                begin = time.time()
                tds.set_faults(f'- match: "worker_runs"\n  delay: {seconds}s\n'
                               f'  times: 200\n')
                time.sleep(seconds)
                tds.set_faults("[]\n")
                held.append((begin, time.time() + seconds))  # delays already begun
                return
            begin = time.time()   # a lock request waiting already holds others up
            try:
                with self.engine.connect() as connection:
                    if self.dialect == "sqlite":
                        connection.exec_driver_sql("BEGIN EXCLUSIVE")
                    elif self.dialect == "postgresql":
                        connection.execute(text("SET lock_timeout = '2s'"))
                        connection.execute(text("LOCK TABLE worker_runs IN ACCESS "
                                                "EXCLUSIVE MODE"))
                    else:
                        connection.execute(text("SET SESSION lock_wait_timeout = 2"))
                        connection.execute(text("LOCK TABLES worker_runs WRITE"))
                    time.sleep(seconds)
                    if self.dialect == "mysql":
                        connection.execute(text("UNLOCK TABLES"))
                    connection.rollback()
                    held.append((begin, time.time()))
            except Exception as exc:   # of any kind: the run goes on without the lock
                held.append((begin, time.time()))
                print(f"chaos: could not lock the run table: {exc}", file=sys.stderr)
        thread = threading.Thread(target=hold, daemon=True, name="chaos-lock")
        thread.start()
        return thread

    def close(self) -> None:
        self.engine.dispose()
