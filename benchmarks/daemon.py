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

What a burst costs: the gap between two consecutive starts within a burst
(median) and the burst's span (first start to last). Once the threads are busy a
run starts only when another ends, so the gap is about one run's cost in the
process; the median run starts about JOBS / 2 gaps into the burst. Then the same
load once more, shorter (NO_SQL_SECONDS, one round), with `stamp_only`: the job
without its SELECT (the Session is opened and committed, no connection is used),
so that what remains is each scheduler's own work per run.
"""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT, Target, interleaved, print_table, ratio

JOBS, EVERY, THREADS = 50, 1.0, 8
WORKER, APSCHEDULER = "worker", "APScheduler 3.11"
TARGET_MEDIAN, TARGET_P99 = 0.3, 0.6
START_TIMEOUT = 30.0
NO_SQL_SECONDS = 8      # bursts measured for the variant without SQL (one round)


def write_config(path: Path, url: str, out: Path, lock_dir: Path,
                 job: str = "stamp_select") -> Path:
    lines = ["database:", f"  url: '{url}'", "worker:", f"  max_workers: {THREADS}",
             f"  lock_dir: {lock_dir}", "retry:", "  attempts: 1", "jobs:"]
    for number in range(JOBS):
        lines += [f"  - name: job-{number:02d}", f"    call: benchmarks.jobs:{job}",
                  f"    kwargs: {{out: '{out}', tag: job-{number:02d}}}",
                  f"    every: {EVERY:g}s"]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Samples:
    """Every run's lateness, the gaps between consecutive starts within a burst,
    each burst's span (first start to last), runs missed."""
    lateness: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    spans: list[float] = field(default_factory=list)
    missed: int = 0

    def figures(self) -> dict:
        return {"median": _pct(self.lateness, 50), "p99": _pct(self.lateness, 99),
                "max": max(self.lateness), "runs": len(self.lateness),
                "missed": self.missed, "gap": _pct(self.gaps, 50),
                "span": _pct(self.spans, 50)}


def run(context) -> tuple[dict, list[Target]]:
    if importlib.util.find_spec("apscheduler") is None:
        note = "daemon: skipped, APScheduler is not installed (pip install -e '.[bench]')"
        context.report.notes.append(note)
        print(f"  {note}")
        return {}, []
    backend = context.mariadb or context.backends[0]
    profile = context.profile
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as directory:
        directory = Path(directory)
        with_sql = _measure(directory, backend.url, "stamp_select", profile.daemon_seconds,
                            profile.daemon_rounds)
        # The same load without the SELECT, shorter: how much of a burst is the
        # scheduler's own work, and how much the job's round trips (the same in both).
        without_sql = _measure(directory, backend.url, "stamp_only",
                               min(NO_SQL_SECONDS, profile.daemon_seconds), 1)
    figures = {name: samples.figures() for name, samples in with_sql.items()}
    bare = {name: samples.figures() for name, samples in without_sql.items()}
    rows = []
    for job, table in (("SELECT 1", figures), ("no SQL", bare)):
        for name, f in table.items():
            rows.append([name, job, f["runs"], f"{f['median'] * 1000:.2f}",
                         f"{f['p99'] * 1000:.2f}", f"{f['max'] * 1000:.1f}", f["missed"],
                         f"{f['gap'] * 1000:.2f}", f"{f['span'] * 1000:.1f}"])
    print_table(f"Daemon start lateness, {JOBS} jobs every {EVERY:g}s on {THREADS} threads, "
                f"{backend.name} (ms; all runs of all rounds; gap: median time between "
                f"two starts within a burst; span: median first-to-last start of a burst)",
                ["scheduler", "job", "runs", "median ms", "p99 ms", "max ms", "missed",
                 "gap ms", "span ms"], rows)
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
    return {"figures": figures, "no_sql": bare,
            "samples": {name: s.lateness for name, s in with_sql.items()}}, targets


def _measure(directory: Path, url: str, job: str, seconds: int,
             rounds: int) -> dict[str, Samples]:
    samples = {WORKER: Samples(), APSCHEDULER: Samples()}

    def measure(name: str) -> float:
        out = directory / "stamps"
        out.unlink(missing_ok=True)
        if name == WORKER:
            config = write_config(directory / "daemon.yaml", url, out, directory / "locks",
                                  job)
            argv = [sys.executable, "run_worker.py", "-c", str(config)]
        else:
            argv = [sys.executable, "-m", "benchmarks.apsched", url, str(JOBS), str(EVERY),
                    str(THREADS), str(out), job]
        stamps = _run(argv, out, directory / f"{name.split()[0]}.log", seconds)
        late, lost, bursts = lateness_of(stamps, seconds)
        kept = samples[name]
        kept.lateness += late
        kept.missed += lost
        for starts in bursts:
            kept.gaps += [b - a for a, b in zip(starts, starts[1:])]
            kept.spans.append(starts[-1] - starts[0])
        print(f"  {name:16} {job:12} median {_pct(late, 50) * 1000:6.2f} ms  p99 "
              f"{_pct(late, 99) * 1000:6.2f} ms  max {max(late) * 1000:6.1f} ms  "
              f"missed {lost}", flush=True)
        return _pct(late, 50)

    interleaved([WORKER, APSCHEDULER], rounds, measure)
    return samples


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
            stop(process, 30)
    return _read(out)


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read(out: Path) -> list[tuple[str, float]]:
    stamps = []
    for line in out.read_text().splitlines():
        tag, _, value = line.partition(" ")
        if value:
            stamps.append((tag, float(value)))
    return stamps


def lateness_of(stamps: list[tuple[str, float]],
                bursts: int) -> tuple[list[float], int, list[list[float]]]:
    """(the lateness of each run of bursts 1..`bursts`, runs missed there, each
    of those bursts' start times in order)."""
    origin = min(stamp for _, stamp in stamps)
    placed = [(tag, round((stamp - origin) / EVERY), stamp) for tag, stamp in stamps]
    origin += min(stamp - origin - k * EVERY for _, k, stamp in placed)
    seen: set[tuple[str, int]] = set()
    late = []
    starts: dict[int, list[float]] = {}
    for tag, k, stamp in placed:
        if 1 <= k <= bursts and (tag, k) not in seen:
            seen.add((tag, k))
            late.append(stamp - origin - k * EVERY)
            starts.setdefault(k, []).append(stamp)
    return late, JOBS * bursts - len(seen), [sorted(v) for v in starts.values() if len(v) > 1]


def _pct(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]
