"""Command line: arguments, logging, and exit codes that cron and systemd understand."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence, TextIO

from .config import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, Config, ConfigError, JobSpec

EXIT_OK = 0            # every job that ran succeeded
EXIT_JOB_FAILED = 1    # at least one job failed after its retries
EXIT_USAGE = 2         # command-line misuse (argparse uses 2 as well)
EXIT_UNAVAILABLE = 69  # --check --connect could not reach the database (EX_UNAVAILABLE)
EXIT_CONFIG = 78       # invalid configuration, nothing ran (EX_CONFIG)

EXIT_CODES_HELP = """\
exit codes:
  0   all jobs succeeded (or --check found nothing wrong)
  1   at least one job failed after its retries
  2   command-line misuse, e.g. an unknown --job name
  69  --check --connect could not open a database connection
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
    parser.add_argument("--once", action="store_true",
                        help="run every enabled job once, wait for all, print a summary "
                             "and exit (schedules are ignored)")
    parser.add_argument("--job", metavar="NAME", action="append", dest="jobs",
                        help="run only this job (repeatable); a job named here runs even "
                             "when it is 'enabled: false'")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and import every job's function, run "
                             "nothing, and exit")
    parser.add_argument("--connect", action="store_true",
                        help="with --check: also open one database connection")
    parser.add_argument("--log-level", metavar="LEVEL", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")
    return parser


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def select_jobs(config: Config, names: Sequence[str] | None) -> list[JobSpec]:
    """The jobs to run: the named ones (even if disabled), else every enabled one."""
    if not names:
        return [job for job in config.jobs if job.enabled]
    by_name = {job.name: job for job in config.jobs}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise LookupError(f"unknown job {', '.join(map(repr, unknown))}; the jobs in "
                          f"{config.path} are: {', '.join(config.job_names())}")
    return [by_name[name] for name in dict.fromkeys(names)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connect and not args.check:
        parser.error("--connect goes with --check")
    setup_logging(args.log_level)
    # Job modules are imported by name ("jobs.commands:..."), relative to where
    # the worker is started, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    from . import config as config_module
    from .callables import resolve_jobs
    path = config_path(args)
    try:
        config = config_module.load(path)
        functions = resolve_jobs(config)
    except ConfigError as exc:
        print(f"run-worker: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        selected = select_jobs(config, args.jobs)
    except LookupError as exc:
        parser.print_usage(sys.stderr)
        print(f"run-worker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.check:
        return _check(config, selected, args.connect)
    if not args.once:
        parser.print_usage(sys.stderr)
        print("run-worker: error: daemon mode (no --once) is not available yet; use "
              "--once to run the jobs one time", file=sys.stderr)
        return EXIT_USAGE
    return _run_once(config, selected, functions)


def _check(config: Config, selected: list[JobSpec], connect: bool) -> int:
    from .config import masked_url
    print(f"{config.path}: OK: {len(config.jobs)} jobs, database "
          f"{masked_url(config.database.url)}, max_workers {config.worker.max_workers}")
    for job in config.jobs:
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


def _run_once(config: Config, selected: list[JobSpec], functions) -> int:
    from .batch import run_batch
    from .db import Database
    from .pool import WorkerPool

    database = Database(config.database, config.extra_codes)
    log.info("running %d job(s) once from %s on %s, max_workers %d", len(selected),
             config.path, database.display_url, config.worker.max_workers)
    pool = WorkerPool(config.worker.max_workers)
    try:
        batch = run_batch(selected, functions, database, pool)
    finally:
        pool.shutdown(wait=False)
    _print_summary(batch.results)
    code = EXIT_OK if batch.ok else EXIT_JOB_FAILED
    if batch.abandoned:
        # A thread cannot be killed; waiting for it would hang cron. Leave now.
        log.error("%d job thread(s) stuck past their deadline; exiting without them",
                  batch.abandoned)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    pool.shutdown(wait=True)
    database.dispose()
    return code


def _print_summary(results) -> None:
    width = max([len(r.job) for r in results] + [3])
    print(f"{'job':<{width}}  {'outcome':<8} attempts  duration  error")
    for r in results:
        print(f"{r.job:<{width}}  {r.outcome.value:<8} {r.attempts:>8}  "
              f"{r.duration:>7.3f}s  {r.error or ''}".rstrip())
    failed = sum(1 for r in results if not r.ok)
    print(f"{len(results)} job(s): {len(results) - failed} succeeded, {failed} failed")
