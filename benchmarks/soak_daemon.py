"""Soak of the daemon itself: `python run_worker.py -c CONFIG` (no --once) as a
subprocess, watched from outside through /proc and the database.

The config: max_workers 4, pool_size left at its default (= max_workers), JOBS
jobs `every: EVERY`, each `benchmarks.jobs:select_one` (SELECT 1, the library
soak's job, so that the two rates compare), `retry: {attempts: 1}` so that every
failure shows. The daemon logs at its default level, INFO: that is how it is
deployed, its stop line (`daemon stopped: N connection(s) still checked out of
the pool`) is an INFO line, and the runs are counted from its per-run
`succeeded in` lines (logged after the COMMIT). stderr goes to a file in the
temp dir, tailed while it runs and scanned once it has exited.

While it runs, every POLL_SECONDS:
- runs finished: the `succeeded in` lines appended to its stderr since the last poll;
- connections open, from the daemon's side: /proc/<pid>/fd entries that are the
  SQLite file, or (MariaDB) its ESTABLISHED TCP sockets to the server's port
  (fd socket inodes matched in /proc/<pid>/net/tcp*); and (MariaDB, every
  SERVER_POLL_EVERY polls) from the server's side: worker_test's connections in
  information_schema.PROCESSLIST, minus the monitor's and those open before the
  daemon started.

VmRSS (/proc/<pid>/status) is read once `warmup` runs have finished, at every
RSS_STEPS-th of the measured runs, and after `warmup + jobs`; VmHWM at the end
is the peak. There is no gc.collect()
in the daemon, so the RSS figures include whatever garbage is pending.
CPU time per thread (/proc/<pid>/task/*/stat) over the measured stretch: the
main thread is the daemon's loop (scheduler, dispatch, collection); the others
are the job threads (and SQLAlchemy's, if any). mariadbd's CPU is read the same
way when its process is visible here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Backend
from .common import ROOT
from .server import ServerMonitor

MAX_WORKERS = 4
JOBS = 8
EVERY = "2ms"
POLL_SECONDS = 0.02
SERVER_POLL_EVERY = 5        # polls per PROCESSLIST query
RSS_STEPS = 10               # VmRSS readings along the measured runs
STALL_SECONDS = 30.0         # no run finished for this long: give up
STOP_TIMEOUT = 60.0          # SIGTERM to exit
MARIADB_PORT = 3306
KB = 1024
MB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class DaemonSoakResult:
    runs: int                       # runs finished between the two RSS readings
    seconds: float                  # time between the two readings
    runs_total: int                 # "succeeded" lines in its log, to its exit
    runs_reported: int | None       # "N run(s) finished" in its own stop line
    error_lines: int                # ERROR lines in its log
    rss_start_mb: float             # VmRSS after the warm-up
    rss_end_mb: float               # VmRSS after warm-up + jobs runs
    rss_peak_mb: float              # VmHWM before the stop
    open_peak_process: int          # SQLite: fds on the db file; MariaDB: TCP sockets to it
    open_peak_server: int | None    # MariaDB: the daemon's connections in PROCESSLIST
    checked_out_end: int | None     # from its "daemon stopped" line (None: line missing)
    exit_code: int | None           # None: did not exit within STOP_TIMEOUT (killed)
    stop_seconds: float             # SIGTERM to exit
    loop_cpu: float                 # main-thread CPU seconds / wall seconds, measured stretch
    jobs_cpu: float                 # the other threads, the same way
    server_cpu: float | None        # mariadbd, the same way (None: not visible)
    overlap_lines: int              # "skipped: the previous run is still going" + summaries
    overlap_skipped: int            # runs skipped that way
    coalesced_lines: int            # "missed N run(s) since the last report" lines
    coalesced_runs: int             # the N of those lines, summed
    misfire_lines: int              # runs skipped past misfire_grace_time
    lateness: str                   # the daemon's own "median X, worst Y"
    log_mb: float                   # size of its stderr
    rss_steps: list = field(default_factory=list)   # [runs after warm-up, VmRSS MB]
    error: str | None = None        # why the soak could not finish
    notes: list[str] = field(default_factory=list)

    @property
    def growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_start_mb

    @property
    def growth_second_half_mb(self) -> float:
        """VmRSS growth over the second half of the measured runs: a leak keeps
        climbing there, a warm-up effect (caches, bounded buffers filling) does not."""
        if len(self.rss_steps) < 2:
            return float("nan")
        middle = next(mb for runs, mb in self.rss_steps if runs >= self.runs / 2)
        return self.rss_steps[-1][1] - middle

    @property
    def open_peak(self) -> int:
        return max(self.open_peak_process, self.open_peak_server or 0)

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


CONFIG = """\
database:
  url: {url}
worker:
  max_workers: {workers}
  lock_dir: {lock_dir}
jobs:
{jobs}"""

JOB = """\
  - name: soak-{index}
    call: benchmarks.jobs:select_one
    every: {every}
    retry: {{attempts: 1}}
"""


def write_config(directory: Path, backend: Backend) -> Path:
    jobs = "".join(JOB.format(index=index, every=EVERY) for index in range(JOBS))
    path = directory / "daemon-soak.yaml"
    # json.dumps: a YAML double-quoted scalar, whatever the URL holds (& ? %).
    path.write_text(CONFIG.format(url=json.dumps(backend.url), workers=MAX_WORKERS,
                                  lock_dir=json.dumps(str(directory / "locks")), jobs=jobs))
    return path


# --- /proc readings -------------------------------------------------------------

def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of pid."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def find_process(name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    return int(entry)
            except OSError:
                continue
    return None


def fd_targets(pid: int) -> list[str]:
    targets = []
    directory = f"/proc/{pid}/fd"
    for fd in os.listdir(directory):
        try:
            targets.append(os.readlink(f"{directory}/{fd}"))
        except OSError:             # closed meanwhile
            continue
    return targets


def count_file_fds(pid: int, path: str) -> int:
    return sum(1 for target in fd_targets(pid) if target == path)


def count_tcp_to_port(pid: int, port: int) -> int:
    """ESTABLISHED TCP sockets of pid whose remote port is `port`."""
    inodes = {target[8:-1] for target in fd_targets(pid) if target.startswith("socket:[")}
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                        count += 1
        except FileNotFoundError:
            continue
    return count


# --- the soak --------------------------------------------------------------------

class _LogTail:
    """Counts `succeeded in` lines as they are appended to the daemon's stderr."""

    MARK = b"succeeded in"

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")
        self.carry = b""
        self.count = 0

    def read(self) -> int:
        chunk = self.carry + self.file.read()
        cut = chunk.rfind(b"\n") + 1          # whole lines only; the rest waits
        self.count += chunk.count(self.MARK, 0, cut)
        self.carry = chunk[cut:]
        return self.count

    def close(self) -> None:
        self.file.close()


def soak_daemon(backend: Backend, warmup: int, jobs: int) -> DaemonSoakResult:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as directory:
        return _soak(backend, Path(directory), warmup, jobs)


def _soak(backend: Backend, directory: Path, warmup: int, jobs: int) -> DaemonSoakResult:
    config = write_config(directory, backend)
    log_path = directory / "daemon.stderr"
    monitor = ServerMonitor() if backend.is_mariadb else None
    before = monitor.client_ids("worker_test") if monitor else set()
    server_pid = find_process("mariadbd") if backend.is_mariadb else None
    db_path = os.path.realpath(backend.url.removeprefix("sqlite:///")) \
        if not backend.is_mariadb else None
    peak_process = 0
    peak_server: int | None = 0 if monitor else None
    readings: dict[str, float] = {}
    steps: list[list[float]] = []
    error = None
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "run_worker.py", "-c", str(config)],
                                  cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=log_file)
    pid = daemon.pid
    tail = _LogTail(log_path)
    try:
        polls, runs, last_progress = 0, 0, time.monotonic()
        phase = "warm-up"
        while True:
            time.sleep(POLL_SECONDS)
            if daemon.poll() is not None:
                error = f"the daemon exited early with code {daemon.returncode}"
                break
            try:
                opened = count_tcp_to_port(pid, MARIADB_PORT) if monitor \
                    else count_file_fds(pid, db_path)
            except FileNotFoundError:
                continue            # the process is going away; poll() says so next time
            peak_process = max(peak_process, opened)
            if monitor is not None and polls % SERVER_POLL_EVERY == 0:
                ours = monitor.client_ids("worker_test") - before
                peak_server = max(peak_server, len(ours))
            polls += 1
            now_runs = tail.read()
            if now_runs > runs:
                runs, last_progress = now_runs, time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                error = f"no run finished for {STALL_SECONDS:g}s ({runs} so far)"
                break
            if phase == "warm-up" and runs >= warmup:
                readings.update(_reading("start", pid, server_pid, runs))
                steps.append([0, readings["start_rss_kb"] * KB / MB])
                phase = "measured"
            elif phase == "measured":
                measured = runs - readings["start_runs"]
                if measured >= jobs:
                    readings.update(_reading("end", pid, server_pid, runs))
                    readings["hwm_kb"] = status_kb(pid, "VmHWM")
                    steps.append([measured, readings["end_rss_kb"] * KB / MB])
                    break
                if measured >= jobs * len(steps) / RSS_STEPS:
                    steps.append([measured, status_kb(pid, "VmRSS") * KB / MB])
    finally:
        stop_started = time.perf_counter()
        exit_code = _stop(daemon)
        stop_seconds = time.perf_counter() - stop_started
        tail.close()
        if monitor is not None:
            monitor.close()
    result = _result(readings, log_path, peak_process, peak_server, exit_code,
                     stop_seconds, error, server_pid)
    result.rss_steps = steps
    return result


def _reading(name: str, pid: int, server_pid: int | None, runs: int) -> dict[str, float]:
    cpu = thread_cpu(pid)
    reading = {f"{name}_time": time.perf_counter(), f"{name}_runs": runs,
               f"{name}_rss_kb": status_kb(pid, "VmRSS"),
               f"{name}_loop_cpu": cpu.get(pid, 0.0),
               f"{name}_jobs_cpu": sum(s for tid, s in cpu.items() if tid != pid)}
    if server_pid is not None:
        try:
            reading[f"{name}_server_cpu"] = process_cpu(server_pid)
        except OSError:
            pass
    return reading


def _stop(daemon: subprocess.Popen) -> int | None:
    if daemon.poll() is not None:
        return daemon.returncode
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        return None


_STOPPED = re.compile(r"daemon stopped: (\d+) connection\(s\) still checked out")
_LATE = re.compile(r"started late by (median [\d.]+s, worst [\d.]+s)")
_OVERLAP_SUMMARY = re.compile(r"job=\S+ (\d+) runs were skipped while its previous run")
_LOOP_STOPPED = re.compile(r"work loop stopped: .*\((\d+) run\(s\) finished")
_COALESCED = re.compile(r"job=\S+ missed (\d+) run\(s\) since the last report")


def _scan_log(path: Path) -> dict:
    found = {"checked_out": None, "lateness": "-", "succeeded": 0, "errors": 0,
             "overlap_first": 0, "overlap_summaries": 0, "overlap_extra": 0, "coalesced_lines": 0,
             "coalesced_runs": 0, "misfire": 0, "first_error": None, "runs_reported": None}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if "succeeded in" in line:
                found["succeeded"] += 1
                continue
            if " ERROR " in line:
                found["errors"] += 1
                found["first_error"] = found["first_error"] or line.strip()[:300]
            if "skipped: the previous run is still going" in line:
                found["overlap_first"] += 1
            elif match := _OVERLAP_SUMMARY.search(line):
                found["overlap_summaries"] += 1
                found["overlap_extra"] += int(match.group(1)) - 1
            elif match := _COALESCED.search(line):
                found["coalesced_lines"] += 1
                found["coalesced_runs"] += int(match.group(1))
            elif "misfire_grace_time" in line:
                found["misfire"] += 1
            elif match := _STOPPED.search(line):
                found["checked_out"] = int(match.group(1))
            elif match := _LOOP_STOPPED.search(line):
                found["runs_reported"] = int(match.group(1))
            elif match := _LATE.search(line):
                found["lateness"] = match.group(1)
    return found


def _result(readings: dict, log_path: Path, peak_process: int,
            peak_server: int | None, exit_code: int | None, stop_seconds: float,
            error: str | None, server_pid: int | None) -> DaemonSoakResult:
    found = _scan_log(log_path)
    complete = "end_time" in readings
    if error is None and not complete:
        error = "the soak stopped before its last reading"
    if error is not None:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        error = f"{error}; last log lines: {' | '.join(tail)}"
    elapsed = readings["end_time"] - readings["start_time"] if complete else 0.0

    def share(key: str) -> float:
        if not complete or f"start_{key}" not in readings:
            return float("nan")
        return (readings[f"end_{key}"] - readings[f"start_{key}"]) / elapsed

    notes = []
    if found["first_error"]:
        notes.append(f"first ERROR line: {found['first_error']}")
    return DaemonSoakResult(
        runs=int(readings["end_runs"] - readings["start_runs"]) if complete else 0,
        seconds=elapsed, runs_total=found["succeeded"], runs_reported=found["runs_reported"],
        error_lines=found["errors"],
        rss_start_mb=readings.get("start_rss_kb", 0) * KB / MB,
        rss_end_mb=readings.get("end_rss_kb", 0) * KB / MB,
        rss_peak_mb=readings.get("hwm_kb", 0) * KB / MB,
        open_peak_process=peak_process, open_peak_server=peak_server,
        checked_out_end=found["checked_out"], exit_code=exit_code,
        stop_seconds=stop_seconds, loop_cpu=share("loop_cpu"), jobs_cpu=share("jobs_cpu"),
        server_cpu=share("server_cpu") if server_pid is not None else None,
        overlap_lines=found["overlap_first"] + found["overlap_summaries"],
        overlap_skipped=found["overlap_first"] + found["overlap_extra"],
        coalesced_lines=found["coalesced_lines"], coalesced_runs=found["coalesced_runs"],
        misfire_lines=found["misfire"], lateness=found["lateness"],
        log_mb=log_path.stat().st_size / MB, error=error, notes=notes)
