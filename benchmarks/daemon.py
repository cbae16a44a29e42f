"""Daemon start lateness: this worker's daemon against APScheduler 3.11, as whole
processes, in interleaved rounds.

The load: JOBS jobs due every EVERY second, THREADS threads, each run
`benchmarks.jobs:stamp_select` (it appends its tag and its start time on the
system-wide monotonic clock to a file, then SELECT 1, then commit). The worker:
`python run_worker.py -c <config>` (daemon, INFO log to a file, retry attempts 1,
max_workers THREADS). APScheduler: `python -m benchmarks.apsched` (a
BackgroundScheduler, ThreadPoolExecutor(THREADS), one IntervalTrigger per job,
INFO log to a file). Both start every job at once and then every EVERY, so each
second JOBS runs come due together.

Each measurement runs until `seconds` bursts after the first have been due, then
SIGTERM. Lateness of a run = its start time - its occurrence on the grid. The
grid is read from the stamps: origin = the earliest start, each stamp belongs to
the occurrence nearest to it (k = round((t - origin) / EVERY)), and the origin is
then moved to the least late stamp of all (so the figures are lateness beyond the
least late run's, the same for both). The first burst (process start-up) is left
out; runs missed = the jobs x bursts expected in the window minus the (job,
occurrence) pairs seen. Median and p99 are over every run of every round.
"""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, Target, interleaved, print_table, ratio

JOBS, EVERY, THREADS = 50, 1.0, 8
WORKER, APSCHEDULER = "worker", "APScheduler 3.11"
TARGET_MEDIAN, TARGET_P99 = 0.3, 0.6
START_TIMEOUT = 30.0


def write_config(path: Path, url: str, out: Path, lock_dir: Path) -> Path:
    lines = ["database:", f"  url: '{url}'", "worker:", f"  max_workers: {THREADS}",
             f"  lock_dir: {lock_dir}", "retry:", "  attempts: 1", "jobs:"]
    for number in range(JOBS):
        lines += [f"  - name: job-{number:02d}", "    call: benchmarks.jobs:stamp_select",
                  f"    kwargs: {{out: '{out}', tag: job-{number:02d}}}",
                  f"    every: {EVERY:g}s"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(context) -> tuple[dict, list[Target]]:
    if importlib.util.find_spec("apscheduler") is None:
        note = "daemon: skipped, APScheduler is not installed (pip install -e '.[bench]')"
        context.report.notes.append(note)
        print(f"  {note}")
        return {}, []
    backend = context.mariadb or context.backends[0]
    seconds = context.profile.daemon_seconds
    lateness: dict[str, list[float]] = {WORKER: [], APSCHEDULER: []}
    missed: dict[str, int] = {WORKER: 0, APSCHEDULER: 0}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as directory:
        directory = Path(directory)

        def measure(name: str) -> float:
            out = directory / "stamps"
            out.unlink(missing_ok=True)
            if name == WORKER:
                config = write_config(directory / "daemon.yaml", backend.url, out,
                                      directory / "locks")
                argv = [sys.executable, "run_worker.py", "-c", str(config)]
            else:
                argv = [sys.executable, "-m", "benchmarks.apsched", backend.url, str(JOBS),
                        str(EVERY), str(THREADS), str(out)]
            stamps = _run(argv, out, directory / f"{name.split()[0]}.log", seconds)
            late, lost = lateness_of(stamps, seconds)
            lateness[name] += late
            missed[name] += lost
            print(f"  {name:16} median {_pct(late, 50) * 1000:6.2f} ms  p99 "
                  f"{_pct(late, 99) * 1000:6.2f} ms  max {max(late) * 1000:6.1f} ms  "
                  f"missed {lost}", flush=True)
            return _pct(late, 50)

        interleaved([WORKER, APSCHEDULER], context.profile.daemon_rounds, measure)
    figures = {name: {"median": _pct(values, 50), "p99": _pct(values, 99),
                      "max": max(values), "runs": len(values), "missed": missed[name]}
               for name, values in lateness.items()}
    print_table(f"Daemon start lateness, {JOBS} jobs every {EVERY:g}s on {THREADS} threads, "
                f"{seconds}s x {context.profile.daemon_rounds} round(s), {backend.name} "
                f"(ms; all runs of all rounds)",
                ["scheduler", "runs", "median ms", "p99 ms", "max ms", "missed"],
                [[name, f["runs"], f"{f['median'] * 1000:.2f}", f"{f['p99'] * 1000:.2f}",
                  f"{f['max'] * 1000:.1f}", f["missed"]] for name, f in figures.items()])
    mine, theirs = figures[WORKER], figures[APSCHEDULER]
    median_ratio = ratio(mine["median"], theirs["median"])
    p99_ratio = ratio(mine["p99"], theirs["p99"])
    targets = [
        Target("daemon lateness median, 50 jobs/s", f"{mine['median'] * 1000:.2f} ms",
               f"APScheduler {theirs['median'] * 1000:.2f} ms", f"{median_ratio:.2f}x",
               f"<= {TARGET_MEDIAN}x", median_ratio <= TARGET_MEDIAN),
        Target("daemon lateness p99, 50 jobs/s", f"{mine['p99'] * 1000:.2f} ms",
               f"APScheduler {theirs['p99'] * 1000:.2f} ms", f"{p99_ratio:.2f}x",
               f"<= {TARGET_P99}x", p99_ratio <= TARGET_P99),
        Target("daemon runs missed", str(mine["missed"]),
               f"APScheduler {theirs['missed']}", "", "0", mine["missed"] == 0),
    ]
    return {"figures": figures, "samples": lateness}, targets


def _run(argv: list[str], out: Path, log_path: Path, seconds: int) -> list[tuple[str, float]]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not out.exists() or not out.stat().st_size:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[1]} did not start:\n"
                                       f"{log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.01)
            first = min(stamp for _, stamp in _read(out))
            # Until the window's last burst has been due and had time to start.
            time.sleep(max(0.0, first + seconds * EVERY + EVERY / 2 - time.monotonic()))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return _read(out)


def _read(out: Path) -> list[tuple[str, float]]:
    stamps = []
    for line in out.read_text().splitlines():
        tag, _, value = line.partition(" ")
        if value:
            stamps.append((tag, float(value)))
    return stamps


def lateness_of(stamps: list[tuple[str, float]], bursts: int) -> tuple[list[float], int]:
    """(the lateness of each run of bursts 1..`bursts`, runs missed there)."""
    origin = min(stamp for _, stamp in stamps)
    placed = [(tag, round((stamp - origin) / EVERY), stamp) for tag, stamp in stamps]
    origin += min(stamp - origin - k * EVERY for _, k, stamp in placed)
    seen: set[tuple[str, int]] = set()
    late = []
    for tag, k, stamp in placed:
        if 1 <= k <= bursts and (tag, k) not in seen:
            seen.add((tag, k))
            late.append(stamp - origin - k * EVERY)
    return late, JOBS * bursts - len(seen)


def _pct(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]
