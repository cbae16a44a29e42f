"""Soak: the daemon running many short jobs, and the library path, watching
memory and connections.

1. The daemon (benchmarks/soak_daemon.py): `python run_worker.py -c CONFIG`, no
   --once, as a subprocess: 8 jobs `every: 2ms`, max_workers 4, pool_size at its
   default (= max_workers), SELECT 1 jobs, INFO log to a file (runs are counted
   from its "succeeded" lines). VmRSS after the warm-up, along the way and after
   profile.soak_jobs more runs (60,000 in the full run), connections
   open (the daemon's fds / sockets, and PROCESSLIST), and the "still checked
   out" figure it logs when SIGTERM stops it, plus its exit code. Targets.
2. The library path (this module), as before but shorter (profile.soak_library_jobs):
   WorkerPath with max_workers 4 and pool_size 4 (JobSpec + run_job on
   WorkerPool), SELECT 1 jobs, at most 2 x max_workers in flight (no future is
   kept, so the harness itself does not grow). It tells growth in run_job and
   the pool apart from growth in the daemon's loop. Its rows are targets too.

Library path figures:
- RSS (/proc/self/statm) after a warm-up and at the end, each after gc.collect();
- peak connections open, seen three ways: the pool's own connect/close events,
  the pool's size() + overflow() polled, and (MariaDB) this pool's connections
  present in information_schema.PROCESSLIST, polled, matched by CONNECTION_ID()
  taken when each connection opened (so other clients of the server don't count);
- peak and final pool.checkedout(), and database.checked_out() at the end.
"""
from __future__ import annotations

import gc
import math
import threading
from dataclasses import asdict, dataclass

from sqlalchemy import event

from .backends import Backend
from .common import Target, print_table, rss_bytes
from .contenders import WorkerPath, feed_count
from .jobs import SELECT_ONE
from .server import ServerMonitor
from .soak_daemon import EVERY, JOBS, DaemonSoakResult, soak_daemon
from .soak_daemon import MAX_WORKERS as DAEMON_WORKERS

MAX_WORKERS = 4
WINDOW = 2 * MAX_WORKERS
MEMORY_LIMIT_MB = 5.0
MB = 1024 * 1024
POLL_SECONDS = 0.02
SERVER_POLL_EVERY = 5       # polls of the pool per poll of the server


def run(context) -> tuple[dict, list[Target]]:
    profile = context.profile
    data: dict = {"daemon": {}, "library": {}}
    targets: list[Target] = []
    for backend in context.backends:
        print(f"  daemon soak on {backend.name}: {profile.soak_warmup:,} warm-up runs, then "
              f"{profile.soak_jobs:,}", flush=True)
        daemon = soak_daemon(backend, profile.soak_warmup, profile.soak_jobs)
        data["daemon"][backend.name] = asdict(daemon) | {
            "growth_second_half_mb": daemon.growth_second_half_mb}
        targets += _daemon_targets(backend, daemon)
        if daemon.error:
            context.report.notes.append(f"soak daemon {backend.name}: {daemon.error}")
        context.report.notes += [f"soak daemon {backend.name}: {n}" for n in daemon.notes]
    for backend in context.backends:
        result = _soak(backend, profile.soak_warmup, profile.soak_library_jobs)
        data["library"][backend.name] = asdict(result)
        targets += _targets(backend, result)
    _print_daemon(data["daemon"])
    _print(data["library"])
    return data, targets


@dataclass
class SoakResult:
    jobs: int
    seconds: float
    failures: int
    first_error: str | None
    rss_start_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    open_peak_events: int          # pool connect/close events
    open_peak_pool: int            # pool.size() + pool.overflow(), polled
    open_peak_server: int | None   # this pool's connections in PROCESSLIST (MariaDB)
    checked_out_peak: int          # pool.checkedout(), polled
    checked_out_end: int           # database.checked_out() after the last job

    @property
    def growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_start_mb

    @property
    def open_peak(self) -> int:
        return max(self.open_peak_events, self.open_peak_pool, self.open_peak_server or 0)


def _soak(backend: Backend, warmup: int, jobs: int) -> SoakResult:
    contender = WorkerPath(backend, SELECT_ONE, MAX_WORKERS)
    watch = ConnectionWatch(contender.database, backend.is_mariadb)
    try:
        watch.start()
        feed_count(contender, warmup, WINDOW)
        rss_start = _settled_rss()
        fed = feed_count(contender, jobs, WINDOW)
        rss_end = _settled_rss()
        checked_out_end = contender.database.checked_out()
    finally:
        watch.stop()
        contender.close()
    return SoakResult(
        jobs=fed.jobs, seconds=fed.seconds, failures=fed.failures,
        first_error=fed.first_error, rss_start_mb=rss_start / MB, rss_end_mb=rss_end / MB,
        rss_peak_mb=max(watch.rss_peak, rss_end) / MB, open_peak_events=watch.events_peak,
        open_peak_pool=watch.pool_peak, open_peak_server=watch.server_peak,
        checked_out_peak=watch.checked_out_peak, checked_out_end=checked_out_end)


def _settled_rss() -> int:
    gc.collect()
    return rss_bytes()


class ConnectionWatch:
    """Peaks of open and checked-out connections, from pool events and a poller."""

    def __init__(self, database, on_mariadb: bool) -> None:
        self.pool = database.engine.pool
        self.events_open = self.events_peak = 0
        self.pool_peak = self.checked_out_peak = self.rss_peak = 0
        self.server_peak: int | None = 0 if on_mariadb else None
        self.server_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="soak-watch", daemon=True)
        # connect/close listeners do not slow checkout (a checkout listener would:
        # it turns off the pool's fast path).
        event.listen(database.engine, "connect", self._on_connect)
        event.listen(database.engine, "close", self._on_close)
        event.listen(database.engine, "close_detached", self._on_close)

    def _on_connect(self, dbapi_connection, record) -> None:
        if self.server_peak is not None:
            cursor = dbapi_connection.cursor()
            self.server_ids.add(int(cursor.execute("SELECT CONNECTION_ID()").fetchone()[0]))
            cursor.close()
        with self._lock:
            self.events_open += 1
            self.events_peak = max(self.events_peak, self.events_open)

    def _on_close(self, dbapi_connection, record=None) -> None:
        with self._lock:
            self.events_open -= 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        monitor = ServerMonitor() if self.server_peak is not None else None
        try:
            polls = 0
            while not self._stop.wait(POLL_SECONDS):
                self._poll_pool()
                if monitor is not None and polls % SERVER_POLL_EVERY == 0:
                    ours = monitor.client_ids("worker_test") & self.server_ids
                    self.server_peak = max(self.server_peak, len(ours))
                polls += 1
        finally:
            if monitor is not None:
                monitor.close()

    def _poll_pool(self) -> None:
        if hasattr(self.pool, "overflow"):   # QueuePool (SQLite files get one too)
            self.checked_out_peak = max(self.checked_out_peak, self.pool.checkedout())
            self.pool_peak = max(self.pool_peak, self.pool.size() + self.pool.overflow())
        self.rss_peak = max(self.rss_peak, rss_bytes())


def _print(data: dict) -> None:
    rows = []
    for backend, r in data.items():
        rows.append([backend, r["jobs"], f"{r['jobs'] / r['seconds']:,.0f}", r["failures"],
                     f"{r['rss_start_mb']:.1f}", f"{r['rss_end_mb']:.1f}",
                     f"{r['rss_end_mb'] - r['rss_start_mb']:+.2f}",
                     f"{r['rss_peak_mb']:.1f}", r["open_peak_events"], r["open_peak_pool"],
                     "-" if r["open_peak_server"] is None else r["open_peak_server"],
                     r["checked_out_peak"], r["checked_out_end"]])
    print_table(f"Soak, library path (run_job on WorkerPool), max_workers {MAX_WORKERS}, "
                f"pool_size {MAX_WORKERS}, "
                f"SELECT 1 jobs (MB = MiB)",
                ["backend", "jobs", "jobs/s", "failed", "RSS start", "RSS end", "growth",
                 "RSS peak", "open peak (events)", "(pool)", "(server)",
                 "checked out peak", "at end"], rows)


def _targets(backend: Backend, result: SoakResult) -> list[Target]:
    name = f"library {backend.name}"
    return [
        Target(f"soak {name} memory growth", f"{result.growth_mb:+.2f} MB",
               f"start {result.rss_start_mb:.1f} MB", "", f"< {MEMORY_LIMIT_MB:g} MB",
               result.growth_mb < MEMORY_LIMIT_MB),
        Target(f"soak {name} peak connections", str(result.open_peak),
               f"max_workers {MAX_WORKERS}", "", f"<= {MAX_WORKERS}",
               result.open_peak <= MAX_WORKERS),
        Target(f"soak {name} checked out at end", str(result.checked_out_end),
               f"{result.failures} failed job(s)", "", "0", result.checked_out_end == 0),
    ]


def _maybe(value) -> str:
    return "missing" if value is None else f"{value:,}"


def _percent(share: float | None) -> str:
    return "-" if share is None or math.isnan(share) else f"{100 * share:.0f}%"


def _print_daemon(data: dict) -> None:
    rows, rows2 = [], []
    for backend, r in data.items():
        rate = r["runs"] / r["seconds"] if r["seconds"] else 0.0
        rows.append([backend, f"{r['runs']:,}", f"{rate:,.0f}",
                     f"{r['runs_total']:,} / {_maybe(r['runs_reported'])}", r["error_lines"],
                     f"{r['rss_start_mb']:.1f}", f"{r['rss_end_mb']:.1f}",
                     f"{r['rss_end_mb'] - r['rss_start_mb']:+.2f}",
                     f"{r['growth_second_half_mb']:+.2f}", f"{r['rss_peak_mb']:.1f}",
                     r["open_peak_process"],
                     "-" if r["open_peak_server"] is None else r["open_peak_server"],
                     "missing" if r["checked_out_end"] is None else r["checked_out_end"],
                     "killed" if r["exit_code"] is None else r["exit_code"],
                     f"{r['stop_seconds']:.2f}s"])
        rows2.append([backend, _percent(r["loop_cpu"]), _percent(r["jobs_cpu"]),
                      _percent(r["server_cpu"]), f"{r['overlap_skipped']:,}",
                      f"{r['overlap_lines']:,}",
                      f"{r['coalesced_runs']:,} / {r['coalesced_lines']}",
                      r["misfire_lines"], r["lateness"], f"{r['log_mb']:.1f}"])
    print_table(f"Soak, daemon (run_worker.py, no --once): {JOBS} jobs every {EVERY}, "
                f"max_workers {DAEMON_WORKERS}, pool_size default, SELECT 1 jobs, INFO log to a "
                f"file (MB = MiB)",
                ["backend", "runs", "runs/s", "all runs: logged / loop's count", "ERROR lines",
                 "RSS start", "RSS end", "growth", "(2nd half)", "RSS peak",
                 "open peak (process)",
                 "(server)", "checked out at stop", "exit", "stop took"], rows)
    print_table("Soak, daemon: where the time went (CPU / wall, measured stretch), and "
                "what its log says",
                ["backend", "loop thread", "job threads", "mariadbd", "overlap skips",
                 "(lines)", "coalesced (lines)", "misfire skips", "lateness", "log MB"],
                rows2)
    for backend, r in data.items():
        steps = "  ".join(f"{runs / 1000:.1f}k:{mb:.2f}" for runs, mb in r["rss_steps"])
        print(f"  {backend} VmRSS MB along the measured runs: {steps}")
    for backend, r in data.items():
        if r["error"]:
            print(f"  ERROR daemon soak on {backend}: {r['error']}")


def _daemon_targets(backend: Backend, result: DaemonSoakResult) -> list[Target]:
    name = f"daemon {backend.name}"
    failed = result.error is not None
    runs = f"{result.runs:,} runs" if not failed else "soak incomplete"
    checked = result.checked_out_end
    return [
        Target(f"soak {name} memory growth", f"{result.growth_mb:+.2f} MB",
               f"start {result.rss_start_mb:.1f} MB, {runs}", "", f"< {MEMORY_LIMIT_MB:g} MB",
               not failed and result.growth_mb < MEMORY_LIMIT_MB),
        Target(f"soak {name} peak connections", str(result.open_peak),
               f"max_workers {DAEMON_WORKERS}", "", f"<= {DAEMON_WORKERS}",
               not failed and 0 < result.open_peak <= DAEMON_WORKERS),
        Target(f"soak {name} checked out at end", "missing" if checked is None else str(checked),
               f"{result.error_lines} ERROR line(s)", "", "0", checked == 0),
        Target(f"soak {name} exit code on SIGTERM",
               "killed" if result.exit_code is None else str(result.exit_code),
               f"stop took {result.stop_seconds:.2f}s", "", "0", result.exit_code == 0),
    ]
