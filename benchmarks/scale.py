"""Scale: the daemon with thousands of jobs against APScheduler 3.11, `--once` over
100,000 jobs, and cluster mode's claims and run-table size. Not part of the default
full run: `python -m benchmarks.run --only scale [--quick] [--scale-jobs N ...]`.

Daemon, per size N (the same jobs for both schedulers, SQLite job database, 8
threads, `SELECT 1` jobs): BURST jobs `every: 1h` (due at start, so BURST runs fall
due in the same second), each `benchmarks.jobs:stamp_select`; the other N - BURST
jobs `cron: "M * * * *"`, M spread over the hour's minutes except the few around
now (nothing else falls due while measured), each `select_one`. The worker:
`python run_worker.py -c <config>` at its default INFO level, the run history on;
APScheduler: `python -m benchmarks.apsched_scale` (BackgroundScheduler,
ThreadPoolExecutor(8), IntervalTrigger / CronTrigger, INFO log). Measured:
- start-up: spawn to ready (the worker's `daemon started:` line, APScheduler's
  `ready` after `scheduler.start()`);
- lateness: each burst run's start minus the burst's first start (median, p99, max);
- idle CPU: % of one core over IDLE seconds once the burst has run (utime + stime
  from /proc/<pid>/stat), RSS (VmRSS) at the end of that, and the peak (VmHWM).

`--once`: N jobs without a schedule, `select_one`, max_workers 8, SQLite: wall
seconds and the peak RSS (wait4's ru_maxrss).

Cluster: 3 `worker.cluster.Cluster` nodes in this process (threads) on the run
table (MariaDB when it answers, else SQLite) with an injected clock: all 3 race
to claim each of CLUSTER_JOBS jobs for one slot, the winner writes the end
(claims/s = jobs / wall). Then 24 hours of hourly runs of DAY_JOBS jobs, claimed
and finished through the nodes in turn, each node's heartbeat (with pruning)
after each simulated hour, keep_history KEEP: the table's row count is bounded by
DAY_JOBS x (KEEP / 1 h + 1).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .common import ROOT, Target, print_table, ratio
from .daemon import stop

WORKER, APSCHEDULER = "worker", "APScheduler 3.11"
THREADS = 8
BURST = 1000
START_TIMEOUT = 300.0
BURST_TIMEOUT = 120.0
CLUSTER_NODES = 3
KEEP_HOURS = 6
IDLE_NOISE = 0.1   # % of a core
SIZES, QUICK_SIZES = (1000, 10_000, 100_000), (1000,)


@dataclass(frozen=True)
class ScaleProfile:
    sizes: tuple[int, ...]
    idle_seconds: float
    once_jobs: int
    cluster_jobs: int
    day_jobs: int
    hours: int


def scale_profile(quick: bool, sizes: tuple[int, ...] | None) -> ScaleProfile:
    if quick:
        profile = ScaleProfile(QUICK_SIZES, 3.0, 2000, 300, 100, 12)
    else:
        profile = ScaleProfile(SIZES, 20.0, 100_000, 10_000, 1000, 24)
    if sizes:
        profile = ScaleProfile(tuple(sizes), profile.idle_seconds, max(sizes),
                               profile.cluster_jobs, profile.day_jobs, profile.hours)
    return profile


# --- the daemon, both schedulers -----------------------------------------------------

def quiet_minutes(margin: int = 6) -> list[int]:
    """The hour's minutes except the one now and the next `margin` ones (UTC)."""
    current = time.gmtime().tm_min
    busy = {(current + k) % 60 for k in range(-1, margin + 1)}
    return [m for m in range(60) if m not in busy]


def write_daemon_config(path: Path, url: str, jobs: int, out: Path, lock_dir: Path,
                        minutes: list[int]) -> Path:
    lines = ["database:", f"  url: '{url}'", "worker:", f"  max_workers: {THREADS}",
             f"  lock_dir: {lock_dir}", "  timezone: UTC", "jobs:"]
    for number in range(jobs):
        name = f"job-{number:06d}"
        if number < BURST:
            lines += [f"  - name: {name}", "    call: benchmarks.jobs:stamp_select",
                      f"    kwargs: {{out: '{out}', tag: {name}}}", "    every: 1h"]
        else:
            lines += [f"  - name: {name}", "    call: benchmarks.jobs:select_one",
                      f"    cron: '{minutes[number % len(minutes)]} * * * *'"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _stamps(out: Path) -> list[float]:
    if not out.exists():
        return []
    return [float(line.split()[1]) for line in out.read_text().splitlines()
            if len(line.split()) == 2]


def measure_daemon(name: str, argv: list[str], log_path: Path, out: Path,
                   ready: Callable[[], bool], burst: int, idle_seconds: float) -> dict:
    """`ready`: whether the process says it has started."""
    out.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            startup = _wait(ready, process, log_path, START_TIMEOUT) - started
            _wait(lambda: len(_stamps(out)) >= burst, process, log_path, BURST_TIMEOUT)
            time.sleep(1.0)   # the last runs' ends, their log lines, history writes
            cpu_before, idle_started = _cpu_seconds(process.pid), time.monotonic()
            time.sleep(idle_seconds)
            idle = (_cpu_seconds(process.pid) - cpu_before) / (time.monotonic()
                                                               - idle_started)
            rss, peak = _status_kb(process.pid, "VmRSS"), _status_kb(process.pid, "VmHWM")
        finally:
            stop(process, 60)
    stamps = sorted(_stamps(out))[:burst]
    late = [stamp - stamps[0] for stamp in stamps]
    figures = {"startup": startup, "rss_mb": rss / 1024, "peak_mb": peak / 1024,
               "idle_cpu": idle * 100, "median": _pct(late, 50), "p99": _pct(late, 99),
               "max": max(late), "runs": len(late)}
    print(f"  {name:16} start-up "
          f"{startup:6.2f} s  RSS {figures['rss_mb']:6.1f} MB  idle "
          f"{figures['idle_cpu']:5.2f} %  lateness median {figures['median'] * 1000:7.1f} "
          f"p99 {figures['p99'] * 1000:7.1f} max {figures['max'] * 1000:7.1f} ms", flush=True)
    return figures


class LogWatch:
    """Whether a line has appeared in a growing log, reading only what is new
    (APScheduler's log of 100,000 jobs is 24 MB)."""

    def __init__(self, path: Path, text: bytes) -> None:
        self.path, self.text, self.offset, self.tail = path, text, 0, b""

    def seen(self) -> bool:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                new = log.read()
        except FileNotFoundError:
            return False
        self.offset += len(new)
        window, self.tail = self.tail + new, (self.tail + new)[-len(self.text):]
        return self.text in window


def _wait(condition, process, log_path: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args[1]} did not get there:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.01)
    return time.monotonic()


def daemon_sizes(directory: Path, profile: ScaleProfile) -> dict[int, dict[str, dict]]:
    results: dict[int, dict[str, dict]] = {}
    for position, jobs in enumerate(profile.sizes):
        burst = min(BURST, jobs)
        url = f"sqlite:///{directory / f'jobs-{jobs}.db'}"
        out = directory / "stamps"
        minutes = quiet_minutes()
        config = write_daemon_config(directory / f"scale-{jobs}.yaml", url, jobs, out,
                                     directory / "locks", minutes)
        print(f"  {jobs:,} jobs ({burst:,} due at start):", flush=True)
        results[jobs] = {}
        order = (WORKER, APSCHEDULER) if position % 2 == 0 else (APSCHEDULER, WORKER)
        for name in order:   # who goes first alternates between sizes
            log_path = directory / f"{name.split()[0]}-{jobs}.log"
            if name == WORKER:
                argv = [sys.executable, "run_worker.py", "-c", str(config)]
                ready = LogWatch(log_path, b"daemon started:").seen
            else:
                marker = directory / "ready"
                marker.unlink(missing_ok=True)
                argv = [sys.executable, "-m", "benchmarks.apsched_scale", url, str(jobs),
                        str(burst), str(THREADS), str(out),
                        ",".join(str(m) for m in minutes), str(marker)]
                ready = marker.exists
            results[jobs][name] = measure_daemon(name, argv, log_path, out, ready, burst,
                                                 profile.idle_seconds)
    return results


# --- --once over many jobs -----------------------------------------------------------

def once_batch(directory: Path, jobs: int) -> dict:
    from .batch import write_config
    config = write_config(directory / f"once-{jobs}.yaml",
                          f"sqlite:///{directory / 'once.db'}", jobs, directory / "locks")
    text = config.read_text().replace("  max_workers: 4", f"  max_workers: {THREADS}")
    config.write_text(text)
    started = time.monotonic()
    with open(directory / "once.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "run_worker.py", "--once",
                                    "--log-level", "WARNING", "-c", str(config)], cwd=ROOT,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"--once exited {process.returncode}:\n"
                           f"{(directory / 'once.log').read_text()[-2000:]}")
    figures = {"jobs": jobs, "wall": wall, "rss_mb": usage.ru_maxrss / 1024,
               "cpu": usage.ru_utime + usage.ru_stime}
    print(f"  --once {jobs:,} jobs: {wall:.1f} s, peak RSS {figures['rss_mb']:.1f} MB, "
          f"CPU {figures['cpu']:.1f} s", flush=True)
    return figures


# --- cluster mode --------------------------------------------------------------------

class SetClock:
    """A clock the benchmark sets (epoch seconds), in place of the database's."""

    def __init__(self, instant: float) -> None:
        self.instant = instant

    def sync(self, connection) -> None:
        pass

    def now(self) -> float:
        return self.instant

    def now_ms(self) -> int:
        return int(self.instant * 1000)


def cluster_nodes(url: str, clock: SetClock) -> list:
    from worker.cluster import Cluster, runs
    from worker.config import ClusterSettings
    nodes = []
    for number in range(CLUSTER_NODES):
        node = Cluster(ClusterSettings(node=f"bench-node-{number}",
                                       keep_history=KEEP_HOURS * 3600.0), url)
        node.clock = node.ends.clock = clock
        nodes.append(node)
    nodes[0].ensure_schema()
    with nodes[0].database.engine.begin() as connection:
        connection.execute(runs.delete())
    return nodes


def cluster_figures(url: str, profile: ScaleProfile) -> dict:
    from worker.cluster import runs
    from sqlalchemy import func, select
    hour = 3600.0
    base = (time.time() // hour) * hour
    clock = SetClock(base)
    nodes = cluster_nodes(url, clock)
    try:
        # All nodes race for every job's occurrence of one slot.
        slot_ms = int(base * 1000)
        won = [0] * CLUSTER_NODES

        def race(index: int) -> None:
            node = nodes[index]
            for job in range(profile.cluster_jobs):
                claim = node.claim(f"job-{job:06d}", slot_ms)
                if claim is not None:
                    won[index] += 1
                    node.finish(claim, "success", 1, None)

        started = time.monotonic()
        threads = [threading.Thread(target=race, args=(i,)) for i in range(CLUSTER_NODES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        claims = sum(won)
        print(f"  cluster: {CLUSTER_NODES} nodes racing for {profile.cluster_jobs:,} "
              f"occurrences: {claims:,} claimed ({won}) in {wall:.1f} s: "
              f"{claims / wall:,.0f} claims/s", flush=True)
        # A day (or `hours`) of hourly runs with the injected clock, pruning on.
        with nodes[0].database.engine.begin() as connection:
            connection.execute(runs.delete())   # the race's rows: counted on their own
        sizes = []
        day_started = time.monotonic()
        for h in range(1, profile.hours + 1):
            clock.instant = base + h * hour
            slot_ms = int(clock.instant * 1000)
            for job in range(profile.day_jobs):
                node = nodes[job % CLUSTER_NODES]
                claim = node.claim(f"job-{job:06d}", slot_ms)
                node.finish(claim, "success", 1, None)
            for node in nodes:
                node._last_prune = float("-inf")   # its 10-minute throttle is real time
                node.beat()
            with nodes[0].database.engine.connect() as connection:
                sizes.append(connection.execute(select(func.count()).select_from(runs))
                             .scalar_one())
        bound = profile.day_jobs * (KEEP_HOURS + 1)
        print(f"  cluster: {profile.hours} h of hourly runs of {profile.day_jobs:,} jobs "
              f"({profile.hours * profile.day_jobs:,} runs, "
              f"{time.monotonic() - day_started:.1f} s), keep {KEEP_HOURS} h: run table "
              f"{sizes[-1]:,} rows at the end, at most {max(sizes):,} (bound {bound:,})",
              flush=True)
        with nodes[0].database.engine.begin() as connection:
            connection.execute(runs.delete())
    finally:
        for node in nodes:
            node.database.dispose()
    return {"claims": claims, "wall": wall, "claims_per_s": claims / wall,
            "won": won, "rows_end": sizes[-1], "rows_max": max(sizes), "bound": bound,
            "rows_per_hour": sizes}


# --- the section ---------------------------------------------------------------------

def run(context) -> tuple[dict, list[Target]]:
    profile = context.scale
    data: dict = {"profile": profile.__dict__}
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        directory = Path(directory)
        if importlib.util.find_spec("apscheduler") is None:
            note = "scale: daemon part skipped, APScheduler is not installed"
            context.report.notes.append(note)
            print(f"  {note}")
        else:
            daemons = daemon_sizes(directory, profile)
            data["daemon"] = daemons
            targets += _daemon_table(daemons)
        data["once"] = once_batch(directory, profile.once_jobs)
        backend = context.mariadb or context.backends[0]
        url = backend.url if backend.is_mariadb else f"sqlite:///{directory / 'runs.db'}"
        data["cluster"] = cluster = cluster_figures(url, profile)
        data["cluster"]["backend"] = backend.name if backend.is_mariadb else "sqlite"
    once = data["once"]
    print_table("--once and cluster mode",
                ["figure", "value"],
                [[f"--once {once['jobs']:,} jobs, SQLite, 8 threads: wall",
                  f"{once['wall']:.1f} s"],
                 [f"--once {once['jobs']:,} jobs: peak RSS", f"{once['rss_mb']:.1f} MB"],
                 [f"cluster {CLUSTER_NODES} nodes, {profile.cluster_jobs:,} jobs "
                  f"({data['cluster']['backend']}): claims/s",
                  f"{cluster['claims_per_s']:,.0f}"],
                 [f"run table after {profile.hours} h x {profile.day_jobs:,} jobs hourly, "
                  f"keep {KEEP_HOURS} h", f"{cluster['rows_end']:,} rows (max "
                  f"{cluster['rows_max']:,}, bound {cluster['bound']:,})"]])
    targets.append(Target(f"cluster run table after {profile.hours} h, pruning on",
                          f"{cluster['rows_max']:,} rows", f"bound {cluster['bound']:,}",
                          "", "bounded", cluster["rows_max"] <= cluster["bound"]))
    return data, targets


FIGURES = (("start-up s", "startup", 1), ("RSS MB", "rss_mb", 1),
           ("idle CPU %", "idle_cpu", 1), ("late median ms", "median", 1000),
           ("late p99 ms", "p99", 1000), ("late max ms", "max", 1000))


def _daemon_table(daemons: dict[int, dict[str, dict]]) -> list[Target]:
    rows, targets = [], []
    for jobs, pair in daemons.items():
        mine, theirs = pair[WORKER], pair[APSCHEDULER]
        for label, key, scale in FIGURES:
            rows.append([f"{jobs:,}", label, f"{mine[key] * scale:,.2f}",
                         f"{theirs[key] * scale:,.2f}",
                         f"{ratio(mine[key], theirs[key]):.2f}x"])
        for label, key, unit, scale in (("RSS", "rss_mb", "MB", 1),
                                        ("idle CPU", "idle_cpu", "%", 1),
                                        ("lateness median", "median", "ms", 1000),
                                        ("lateness p99", "p99", "ms", 1000)):
            value, base = mine[key] * scale, theirs[key] * scale
            # The CPU clock counts 10 ms ticks: 0.05 % over 20 s. Below 0.1 % of a
            # core idle is no cost a user can measure, whatever APScheduler's.
            met = value <= base or (key == "idle_cpu" and value < IDLE_NOISE)
            targets.append(Target(f"scale daemon {jobs:,} jobs: {label}",
                                  f"{value:,.2f} {unit}", f"APScheduler {base:,.2f} {unit}",
                                  f"{ratio(value, base):.2f}x",
                                  f"<= 1.0x{' or < 0.1 %' if key == 'idle_cpu' else ''}",
                                  met))
    print_table(f"Daemon at scale: {BURST:,} jobs due at start, the rest cron over the "
                f"hour, SQLite, {THREADS} threads (lateness: start minus the burst's "
                f"first start)", ["jobs", "figure", "worker", "APScheduler", "ratio"], rows)
    return targets


def _pct(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]
