"""Scaling of jobs that wait on the database: SELECT SLEEP(0.05) at 8, 32, 64 workers.

Each measurement builds the contender (pool_size = workers), warms it up so that
every thread has its connection, submits workers x K jobs at once and times them
until the last finishes; then it closes the contender, so that no more than one
contender's connections are open at a time. Efficiency = jobs/s divided by the
ideal, workers / 0.05 s. Rounds are interleaved as elsewhere; figures are medians.
"""
from __future__ import annotations

from .common import Target, interleaved, median, print_table
from .contenders import CONTENDERS, WORKER, build, feed_count
from .jobs import SLEEP, SLEEP_SECONDS
from .server import ServerMonitor

TARGET_WORKERS, TARGET_EFFICIENCY = (32, 64), 0.9
SPARE_CONNECTIONS = 5   # for the monitor and anyone else using the server


def run(context) -> tuple[dict, list[Target]]:
    backend = context.mariadb
    worker_counts = _affordable(context.profile.scaling_workers)
    data = {}
    for workers in worker_counts:
        jobs = workers * context.profile.scaling_jobs_per_worker

        def measure(name: str, workers=workers, jobs=jobs) -> float:
            return _measure(name, backend, workers, jobs)

        samples = interleaved(CONTENDERS, context.profile.rounds, measure)
        data[workers] = {"jobs": jobs, "samples": samples,
                         "efficiency": {n: median(v) for n, v in samples.items()}}
    _print(data)
    targets = []
    for workers in TARGET_WORKERS:
        if workers not in data:
            continue
        efficiency = data[workers]["efficiency"][WORKER]
        ideal = workers / SLEEP_SECONDS
        targets.append(Target(
            figure=f"scaling mariadb SLEEP({SLEEP_SECONDS}) x{workers}",
            value=f"{efficiency * ideal:,.0f}/s", baseline=f"ideal {ideal:,.0f}/s",
            ratio=f"{efficiency:.3f}", target=f">= {TARGET_EFFICIENCY}",
            met=efficiency >= TARGET_EFFICIENCY))
    return data, targets


def _affordable(worker_counts) -> list[int]:
    """The worker counts the server has connections for (one contender at a time)."""
    monitor = ServerMonitor()
    try:
        limit = monitor.variable("max_connections")
        in_use = int(monitor.scalar(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
            "WHERE VARIABLE_NAME = 'THREADS_CONNECTED'"))
    finally:
        monitor.close()
    free = limit - in_use - SPARE_CONNECTIONS
    affordable = [count for count in worker_counts if count <= free]
    for count in worker_counts:
        if count not in affordable:
            print(f"  WARNING scaling x{count} skipped: max_connections {limit}, "
                  f"{in_use} in use")
    return affordable


def _measure(name: str, backend, workers: int, jobs: int) -> float:
    contender = build(name, backend, SLEEP, workers)
    try:
        feed_count(contender, 2 * workers, 2 * workers)  # every thread opens a connection
        result = feed_count(contender, jobs, jobs)        # all submitted at once
    finally:
        contender.close()
    if result.failures:
        print(f"  WARNING scaling {name} x{workers}: {result.failures} failed job(s), "
              f"first: {result.first_error}")
    return result.rate / (workers / SLEEP_SECONDS)


def _print(data: dict) -> None:
    rows = []
    for workers, entry in data.items():
        efficiency = entry["efficiency"]
        ideal = workers / SLEEP_SECONDS
        rows.append([workers, entry["jobs"], ideal] +
                    [value for name in CONTENDERS
                     for value in (efficiency[name] * ideal, f"{efficiency[name]:.3f}")])
    headers = ["workers", "jobs", "ideal/s"]
    for name in CONTENDERS:
        headers += [f"{name} /s", "eff"]
    print_table(f"Scaling, MariaDB, SELECT SLEEP({SLEEP_SECONDS}) jobs "
                f"(eff = jobs/s / ideal, median of rounds)", headers, rows)
