"""Command line: arguments, logging, signals, and exit codes that cron and systemd
understand. Heavy modules are imported only by the mode that needs them, so that
a one-shot run from cron starts fast."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from typing import Sequence, TextIO

from .config import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, Config, ConfigError, JobSpec

EXIT_OK = 0            # every job that ran succeeded; a daemon stopped cleanly
EXIT_JOB_FAILED = 1    # a job failed after its retries, timed out, or was cancelled
EXIT_USAGE = 2         # command-line misuse (argparse uses 2 as well)
EXIT_UNAVAILABLE = 69  # --check --connect could not reach the database (EX_UNAVAILABLE)
EXIT_ALL_SKIPPED = 75  # --once: every selected job was still running elsewhere (EX_TEMPFAIL)
EXIT_CONFIG = 78       # invalid configuration, nothing ran (EX_CONFIG)

EXIT_CODES_HELP = """\
modes:
  (default)  daemon: run every enabled job on its `every` or `cron` schedule until
             SIGTERM/SIGINT (SIGHUP reloads the config)
  --once     run every enabled job once, print a summary, exit
  --check    validate the config and import the job functions, run nothing
  --list     print each job, its schedule and its next run time
  --history JOB  the recent runs of JOB across the cluster (needs `cluster:`)

exit codes:
  0   all jobs succeeded (--once), a clean stop (daemon), or a good --check
  1   a job failed after its retries or timed out (--once), or a stop had to
      cancel running jobs
  2   command-line misuse, e.g. an unknown --job name
  69  --check --connect could not open a database connection
  75  --once: every selected job was skipped, still running from an earlier run
  78  invalid configuration: nothing ran
"""

log = logging.getLogger("worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run-worker",
        description="Run the jobs of a YAML job list on a thread pool, each job in its "
                    "own SQLAlchemy Session, retrying transient database errors.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="PATH",
                        help=f"the job list (default: ${CONFIG_ENV_VAR}, else "
                             f"{DEFAULT_CONFIG_PATH})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="run every enabled job once, wait for all, print a summary "
                           "and exit (schedules are ignored)")
    mode.add_argument("--check", action="store_true",
                      help="validate the config and import every job's function, run "
                           "nothing, and exit")
    mode.add_argument("--list", action="store_true",
                      help="print each job, its schedule and its next run time (and, "
                           "with a cluster section, its last run)")
    mode.add_argument("--history", metavar="JOB",
                      help="with a cluster section: print the recent runs of JOB")
    parser.add_argument("--job", metavar="NAME", action="append", dest="jobs",
                        help="only this job (repeatable); with --once a job named here "
                             "runs even when it is 'enabled: false'")
    parser.add_argument("--connect", action="store_true",
                        help="with --check: also open one database connection")
    parser.add_argument("--log-level", metavar="LEVEL", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text (default) or json: one JSON object per line, for "
                             "journald and log shippers")
    return parser


_JOB_FIELDS = re.compile(r"\bjob=(?P<job>\S+)(?: attempt=(?P<attempt>\d+)/(?P<of>\d+))?")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `job` and `attempt` lifted out of the message."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") +
                 f".{int(record.msecs):03d}", "level": record.levelname,
                 "logger": record.name, "thread": record.threadName, "message": message}
        match = _JOB_FIELDS.search(message)
        if match:
            entry["job"] = match["job"]
            if match["attempt"]:
                entry["attempt"], entry["attempts"] = int(match["attempt"]), int(match["of"])
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def select_jobs(config: Config, names: Sequence[str] | None,
                include_disabled: bool = True) -> list[JobSpec]:
    """The jobs to run: the named ones, else every enabled one."""
    if not names:
        return [job for job in config.jobs if job.enabled]
    by_name = {job.name: job for job in config.jobs}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise LookupError(f"unknown job {', '.join(map(repr, unknown))}; the jobs in "
                          f"{config.path} are: {', '.join(config.job_names())}")
    chosen = [by_name[name] for name in dict.fromkeys(names)]
    return chosen if include_disabled else [job for job in chosen if job.enabled]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:   # `run-worker --history x | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connect and not args.check:
        parser.error("--connect goes with --check")
    setup_logging(args.log_level, args.log_format)
    # Job modules are imported by name ("jobs.commands:..."), relative to where
    # the worker is started, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    path = config_path(args)
    try:
        config, functions = load_runtime_parts(path)
    except ConfigError as exc:
        print(f"run-worker: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        selected = select_jobs(config, args.jobs, include_disabled=args.once or args.check)
    except LookupError as exc:
        parser.print_usage(sys.stderr)
        print(f"run-worker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.check:
        return _check(config, selected if args.jobs else list(config.jobs), args.connect)
    if args.list:
        return _list(config)
    if args.history:
        return _history(config, args.history, parser)
    if args.once:
        return _run_once(config, selected, functions)
    return _run_daemon(path, config, functions, args.jobs)


def load_runtime_parts(path: str):
    from . import config as config_module
    from .callables import resolve_jobs
    config = config_module.load(path)
    return config, resolve_jobs(config)


def _check(config: Config, shown: list[JobSpec], connect: bool) -> int:
    from .config import masked_url
    print(f"{config.path}: OK: {len(config.jobs)} jobs, database "
          f"{masked_url(config.database.url)}, max_workers {config.worker.max_workers}")
    for job in shown:
        state = "enabled" if job.enabled else "disabled"
        print(f"  {job.name}: {job.call} ({state}; {job.schedule or 'no schedule'})")
    if not connect:
        return EXIT_OK
    from .db import Database, installed_odbc_drivers
    from .errors import describe
    database = Database(config.database, config.extra_codes)
    try:
        database.ping()
    except Exception as exc:  # report any failure to connect, whatever the driver
        print(f"run-worker: cannot connect to {database.display_url}: {describe(exc)}",
              file=sys.stderr)
        if database.url.get_driver_name() == "pyodbc" and _is_missing_driver(exc):
            drivers = installed_odbc_drivers()
            print("run-worker: installed ODBC drivers: "
                  + (", ".join(repr(d) for d in drivers) if drivers else "none"),
                  file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        database.dispose()
    print(f"connected to {database.display_url}")
    return EXIT_OK


def _is_missing_driver(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return ("IM002" in text or "Can't open lib" in text or "file not found" in text
            or "Data source name not found" in text)


def _list(config: Config) -> int:
    from .scheduler import Scheduler, zone_named
    scheduler = Scheduler(config.jobs, zone_named(config.worker.timezone),
                          config.worker.misfire_grace_time)
    last = _last_runs(config)
    width = max(len(job.name) for job in config.jobs)
    print(f"{'job':<{width}}  {'schedule':<22} {'next run':<26}" +
          ("last run" if last is not None else ""))
    for job in config.jobs:
        if not job.enabled:
            when = "disabled (runs only with --once --job)"
        elif job.schedule is None:
            when = "no schedule: runs only with --once"
        else:
            when = scheduler.next_run(job.name)
        line = f"{job.name:<{width}}  {job.schedule or '-':<22} {when:<26}"
        if last is not None:
            row = last.get(job.name)
            line += (f"{row.outcome} at {_ms_to_text(row.ended_ms or row.started_ms)} on "
                     f"{row.node}" if row else "never")
        print(line.rstrip())
    return EXIT_OK


def _last_runs(config: Config):
    """Each job's newest row in the cluster's run table; None without a cluster."""
    if config.cluster is None:
        return None
    from .cluster import Cluster
    from .errors import describe
    cluster = Cluster(config.cluster, config.database.url, config.extra_codes)
    try:
        return cluster.last_runs()
    except Exception as exc:  # the listing must work without the run table
        print(f"run-worker: cannot read the run table: {describe(exc)}", file=sys.stderr)
        return {}
    finally:
        cluster.database.dispose()


def _ms_to_text(ms: int | None) -> str:
    if ms is None:
        return "-"
    from datetime import datetime
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def _history(config: Config, job_name: str, parser) -> int:
    if config.cluster is None:
        print(f"run-worker: error: --history needs a 'cluster' section in {config.path}",
              file=sys.stderr)
        return EXIT_USAGE
    if job_name not in config.job_names():
        parser.print_usage(sys.stderr)
        print(f"run-worker: error: unknown job {job_name!r}; the jobs in {config.path} "
              f"are: {', '.join(config.job_names())}", file=sys.stderr)
        return EXIT_USAGE
    from .cluster import Cluster
    from .errors import describe
    cluster = Cluster(config.cluster, config.database.url, config.extra_codes)
    try:
        rows = cluster.history(job_name)
    except Exception as exc:  # no table yet, or no database
        print(f"run-worker: cannot read the run table: {describe(exc)}", file=sys.stderr)
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


def _install_signal_handlers(loop, reload: bool) -> None:
    def stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        loop.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if reload:
        def hup(signum, _frame):
            log.info("received SIGHUP: reloading the configuration")
            loop.request_reload()
        signal.signal(signal.SIGHUP, hup)


def _run_once(config: Config, selected: list[JobSpec], functions) -> int:
    from .db import Database
    from .locks import HostLocks
    from .loop import Runtime, WorkLoop
    from .pool import WorkerPool
    from .runner import Outcome

    database = Database(config.database, config.extra_codes)
    log.info("running %d job(s) once from %s on %s, max_workers %d", len(selected),
             config.path, database.display_url, config.worker.max_workers)
    cluster = _start_cluster(config)
    pool = WorkerPool(config.worker.max_workers)
    loop = WorkLoop(Runtime(config, functions, database), pool, burst=selected,
                    locks=HostLocks(config.worker.lock_dir, config.database.url),
                    shutdown_timeout=config.worker.shutdown_timeout, cluster=cluster)
    _install_signal_handlers(loop, reload=False)
    try:
        report = loop.run()
    finally:
        pool.shutdown(wait=False)
        if cluster is not None:
            cluster.stop()
    _print_summary(report.results)
    if report.results and all(r.outcome is Outcome.SKIPPED for r in report.results):
        code = EXIT_ALL_SKIPPED
    else:
        code = EXIT_OK if report.ok else EXIT_JOB_FAILED
    if report.abandoned:
        # A thread cannot be killed; waiting for it would hang cron. Leave now.
        log.error("%d job thread(s) stuck past their deadline; exiting without them",
                  report.abandoned)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    pool.shutdown(wait=True)
    database.dispose()
    return code


def _start_cluster(config: Config):
    """The cluster's run table, joined; None without a `cluster` section."""
    if config.cluster is None:
        return None
    from .cluster import Cluster
    cluster = Cluster(config.cluster, config.database.url, config.extra_codes)
    cluster.start()
    return cluster


def _run_daemon(path: str, config: Config, functions, only: Sequence[str] | None) -> int:
    from .db import Database
    from .errors import describe
    from .locks import HostLocks
    from .loop import Runtime, WorkLoop
    from .pool import WorkerPool
    from .scheduler import Scheduler, zone_named
    from .systemd import Notifier

    def scheduled(cfg: Config) -> list[JobSpec]:
        return list(_only(cfg, only).jobs)

    notifier = Notifier()
    database = Database(config.database, config.extra_codes)
    cluster = None
    if config.cluster is not None:
        from .cluster import Cluster
        cluster = Cluster(config.cluster, config.database.url, config.extra_codes)

    def schedule_factory(job, zone):
        from .scheduler import schedule_for
        return schedule_for(job, zone, cluster.clock.now if cluster else None)

    scheduler = Scheduler(scheduled(config), zone_named(config.worker.timezone),
                          config.worker.misfire_grace_time, schedule_factory)
    if scheduler.unscheduled:
        log.info("batch-only jobs (no every/cron; they run only with --once): %s",
                 ", ".join(scheduler.unscheduled))
    if not scheduler.jobs:
        log.warning("no enabled job has a schedule: the daemon has nothing to run")

    def reload() -> Runtime:
        new_config, new_functions = load_runtime_parts(path)
        current = loop.runtime
        if (new_config.database, new_config.extra_codes) == \
                (current.config.database, current.config.extra_codes):
            new_database = current.database
        else:
            new_database = Database(new_config.database, new_config.extra_codes)
        return Runtime(_only(new_config, only), new_functions, new_database)

    pool = WorkerPool(config.worker.max_workers)
    loop = WorkLoop(Runtime(_only(config, only), functions, database), pool,
                    scheduler=scheduler, locks=HostLocks(config.worker.lock_dir,
                                                         config.database.url),
                    notifier=notifier, reload=reload,
                    shutdown_timeout=config.worker.shutdown_timeout, cluster=cluster)
    _install_signal_handlers(loop, reload=True)

    # READY only once the database answers; until then say why we wait.
    delay = 0.5
    while not loop.stop_requested:
        try:
            database.ping()
            if cluster is not None:
                cluster.start()
                scheduler.reset(scheduled(config))  # first runs on the synced clock
            break
        except Exception as exc:  # any failure to connect: wait and try again
            notifier.status(f"waiting for the database: {describe(exc)}")
            log.warning("database %s not answering (%s); retrying in %.1fs",
                        database.display_url, describe(exc), delay)
            loop.pause(delay)
            delay = min(delay * 2, 30.0)
    if loop.stop_requested:
        log.info("stopped while waiting for the database: no job ran")
        notifier.close()
        database.dispose()
        return EXIT_OK
    log.info("daemon started: %d scheduled job(s) from %s on %s, max_workers %d",
             len(scheduler.jobs), config.path, database.display_url,
             config.worker.max_workers)
    notifier.ready(f"running {len(scheduler.jobs)} scheduled job(s)")
    try:
        report = loop.run()
    finally:
        loop.pool.shutdown(wait=False)
        notifier.close()
        if cluster is not None:
            cluster.stop()
    if report.abandoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_JOB_FAILED)
    loop.pool.shutdown(wait=True)
    log.info("daemon stopped: %d connection(s) still checked out of the pool",
             loop.runtime.database.checked_out())
    loop.runtime.database.dispose()
    return EXIT_OK if not report.cancelled else EXIT_JOB_FAILED


def _only(config: Config, only: Sequence[str] | None) -> Config:
    """The config restricted to the --job names (the daemon's selection)."""
    if not only:
        return config
    from dataclasses import replace
    return replace(config, jobs=tuple(job for job in config.jobs if job.name in only))


def _print_summary(results) -> None:
    width = max([len(r.job) for r in results] + [3])
    print(f"{'job':<{width}}  {'outcome':<9} attempts  duration  error")
    for r in results:
        print(f"{r.job:<{width}}  {r.outcome.value:<9} {r.attempts:>8}  "
              f"{r.duration:>7.3f}s  {r.error or ''}".rstrip())
    failed = sum(1 for r in results if not r.ok and r.outcome.value != "skipped")
    skipped = sum(1 for r in results if r.outcome.value == "skipped")
    print(f"{len(results)} job(s): {len(results) - failed - skipped} succeeded, "
          f"{failed} failed" + (f", {skipped} skipped" if skipped else ""))
