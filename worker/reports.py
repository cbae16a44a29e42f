"""What the worker prints for people: `--check`, `--list`, `--history` and the
summary of a `--once` run. Each returns the exit code it stands for."""
from __future__ import annotations

import sys
from datetime import datetime
from typing import Sequence

from .config import Config, JobSpec, masked_url
from .exitcodes import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from .logs import command_error


def check(config: Config, shown: list[JobSpec], connect: bool) -> int:
    print(f"{config.path}: OK: {len(config.jobs)} jobs, database "
          f"{masked_url(config.database.url)}, max_workers {config.worker.max_workers}")
    for job in shown:
        state = "enabled" if job.enabled else "disabled"
        print(f"  {job.name}: {job.call} ({state}; {job.schedule or 'no schedule'})")
    if not connect:
        return EXIT_OK
    from .db import Database, installed_odbc_drivers
    from .errors import describe
    database = Database(config.database, config.extra_codes, for_jobs=False)
    try:
        database.ping()
    except Exception as exc:  # report any failure to connect, whatever the driver
        command_error(f"cannot connect to {database.display_url}: {describe(exc)}")
        if database.url.get_driver_name() == "pyodbc" and _is_missing_driver(exc):
            drivers = installed_odbc_drivers()
            command_error("installed ODBC drivers: "
                          + (", ".join(repr(d) for d in drivers) if drivers else "none"))
        return EXIT_UNAVAILABLE
    finally:
        database.dispose()
    print(f"connected to {database.display_url}")
    return EXIT_OK


def _is_missing_driver(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return ("IM002" in text or "Can't open lib" in text or "file not found" in text
            or "Data source name not found" in text)


def job_list(config: Config) -> int:
    """Each job and its next run: the running daemon's (worker.control) when one
    answers for this config, else computed now; the first line says which."""
    from .control import daemon_next_runs
    from .scheduler import Scheduler, zone_named
    scheduler = Scheduler(config.jobs, zone_named(config.worker.timezone),
                          config.worker.misfire_grace_time)
    daemon = daemon_next_runs(config)
    # On stderr: stdout stays the table alone, for scripts.
    nobody = "cluster node is live" if config.cluster is not None else "daemon answers"
    print(f"next runs: from {daemon[0]}" if daemon is not None
          else f"next runs: computed now (no {nobody} for this config)", file=sys.stderr)
    last = _last_runs(config)
    rows = []
    for job in config.jobs:
        if daemon is not None and job.name in daemon[1]:
            when = daemon[1][job.name]
        elif not job.enabled:
            when = "disabled (runs only with --once --job)"
        elif job.schedule is None:
            when = "no schedule: runs only with --once"
        else:
            when = scheduler.next_run(job.name)
        row = [job.name, job.schedule or "-", when]
        if last is UNREADABLE:
            row.append("unknown (the run table cannot be read)")
        elif last is not None:
            entry = last.get(job.name)
            row.append(f"{entry.outcome} at {_ms_to_text(entry.ended_ms or entry.started_ms)}"
                       f" on {entry.node}" if entry else "never")
        rows.append(row)
    header = ["job", "schedule", "next run"] + (["last run"] if last is not None else [])
    print_table(header, rows)
    return EXIT_OK


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(f"{str(cell):<{width}}" for cell, width in zip(row, widths)).rstrip())


UNREADABLE = object()     # _last_runs: the run table could not be read


def _last_runs(config: Config):
    """Each job's newest row in the cluster's run table; None without a cluster;
    UNREADABLE when it cannot be read (not "never": that would say no run was)."""
    from .app import open_cluster
    from .errors import describe
    cluster = open_cluster(config)
    if cluster is None:
        return None
    try:
        return cluster.last_runs()
    except Exception as exc:  # the listing must work without the run table
        command_error(f"cannot read the run table: {describe(exc)}")
        return UNREADABLE
    finally:
        cluster.database.dispose()


def _ms_to_text(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def history(config: Config, job_name: str, usage) -> int:
    """`usage()` prints the command's usage line (for an unknown job). Read from the
    run history (every mode), else from the cluster's run table."""
    if not config.history.enabled and config.cluster is None:
        command_error(f"error: --history needs the run history (history.enabled is "
                      f"false in {config.path}) or a 'cluster' section")
        return EXIT_USAGE
    if job_name not in config.job_names():
        usage()
        command_error(f"error: unknown job {job_name!r}; the jobs in {config.path} "
                      f"are: {', '.join(config.job_names())}")
        return EXIT_USAGE
    if config.history.enabled:
        return _stored_history(config, job_name)
    from .app import open_cluster
    from .errors import describe
    cluster = open_cluster(config)
    try:
        rows = cluster.history(job_name)
    except Exception as exc:  # no table yet, or no database
        command_error(f"cannot read the run table: {describe(exc)}")
        return EXIT_UNAVAILABLE
    finally:
        cluster.database.dispose()
    print(f"{'slot':<26} {'node':<24} {'outcome':<10} attempts  duration  error")
    for row in rows:
        duration = f"{(row.ended_ms - row.started_ms) / 1000:.3f}s" if row.ended_ms else "-"
        recovered = f" (recovered x{row.recovered})" if row.recovered else ""
        print(f"{_ms_to_text(row.slot_ms):<26} {row.node:<24} {row.outcome:<10} "
              f"{row.attempts:>8}  {duration:>8}  {(row.error or '') + recovered}".rstrip())
    if not rows:
        print(f"no runs of {job_name} recorded yet")
    return EXIT_OK


def _stored_history(config: Config, job_name: str) -> int:
    from .errors import describe
    from .history import open_store
    store = open_store(config)
    try:
        rows = store.runs_of(job_name)
    except Exception as exc:  # no database, or a table of another version
        command_error(f"cannot read the run history in {store.display_url}: "
                      f"{describe(exc)}")
        return EXIT_UNAVAILABLE
    finally:
        store.dispose()
    print_table(["started", "node", "outcome", "attempts", "duration", "kind",
                  "scheduled", "error"],
                 [[_ms_to_text(row.started_ms), row.node, row.outcome, row.attempts,
                   f"{(row.ended_ms - row.started_ms) / 1000:.3f}s", row.kind,
                   _ms_to_text(row.scheduled_ms), row.error or ""] for row in rows])
    if not rows:
        print(f"no runs of {job_name} recorded yet")
    return EXIT_OK


SUMMARY_LINES_PER_WRITE = 1000


def summary(results: Sequence, unwritten: Sequence[str] = ()) -> None:
    """`unwritten`: cluster: jobs whose run's end the run table never received.

    The table goes out SUMMARY_LINES_PER_WRITE lines per write: a print() per line
    is two write() system calls per job on an unbuffered stdout (PYTHONUNBUFFERED=1,
    as container images set it): 60,000 for a 30,000-job batch."""
    width = max([len(r.job) for r in results] + [3])
    lines = [f"{'job':<{width}}  {'outcome':<9} attempts  duration  error"]
    for r in results:
        lines.append(f"{r.job:<{width}}  {r.outcome.value:<9} {r.attempts:>8}  "
                     f"{r.duration:>7.3f}s  {r.error or ''}".rstrip())
        if len(lines) == SUMMARY_LINES_PER_WRITE:
            print("\n".join(lines))
            lines = []
    if lines:
        print("\n".join(lines))
    failed = sum(1 for r in results if not r.ok and r.outcome.value != "skipped")
    skipped = sum(1 for r in results if r.outcome.value == "skipped")
    print(f"{len(results)} job(s): {len(results) - failed - skipped} succeeded, "
          f"{failed} failed" + (f", {skipped} skipped" if skipped else ""))
    if unwritten:
        print(f"not written to the run table: {', '.join(sorted(set(unwritten)))} (their "
              f"rows stay 'running' until marked abandoned)")
