"""Command line: parse the arguments, dispatch to a mode (worker.app) or a report
(worker.reports), and map what they return to exit codes that cron and systemd
understand. Heavy modules are imported only by the mode that needs them, so that
a one-shot run from cron starts fast."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

from .app import load_config
from .logs import command_error, flush_logs
from .config import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, Config, ConfigError, JobSpec
from .exitcodes import (EXIT_ALL_SKIPPED, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_JOB_FAILED,
                        EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE)

EXIT_CODES_HELP = """\
modes:
  (default)  daemon: run every enabled job on its `every` or `cron` schedule until
             SIGTERM/SIGINT (SIGHUP reloads the config)
  --once     run every enabled job once, print a summary, exit
  --check    validate the config and import the job functions, run nothing
  --list     print each job, its schedule and its next run time
  --history JOB  the recent runs of JOB from the run history (every mode; with
                 history disabled, from the cluster's run table)
  --run-now JOB  ask the running daemon to start a run of JOB now
  --pause JOB    ask the running daemon not to start scheduled runs of JOB
  --resume JOB   undo --pause
  --status   each job of the running daemon: running/paused/idle, next run, last
             outcome

exit codes:
  0   all jobs succeeded (--once), a clean stop (daemon), or a good --check
  1   a job failed after its retries or timed out (--once), or a stop had to
      cancel running jobs, or a thread was left stuck in a job (daemon);
      cluster: a run could not be claimed (database error), or a run's end
      could not be written to the run table within its lease
  2   command-line misuse, e.g. an unknown --job name (or --run-now/--pause/
      --resume name)
  69  --check --connect could not open a database connection; or the daemon
      found at start-up that it never can (login refused, ODBC driver not
      installed, database file cannot be opened), or cannot listen on the
      metrics address (port in use); cluster --once: the run table cannot be
      used at start (every job reported failed); or no daemon answers a
      control command (cluster: no node has heartbeated within its lease, or
      none took a --run-now before it expired)
  75  --once: every selected job was skipped, still running from an earlier run
      (0 with --skipped-ok); --run-now: the job's run is in progress (nothing
      started; cluster: on any node)
  77  a control command from a user who is neither the daemon's nor root (not
      in cluster mode: there the database's credentials are the permission)
  78  invalid configuration: nothing ran
  130 --once: interrupted by SIGINT (Ctrl-C); running jobs were stopped; a
      control command interrupted while it waits (not carried out, unless
      it already was)
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
                      help="print the recent runs of JOB (the run history, or the "
                           "cluster's run table when the history is disabled)")
    mode.add_argument("--run-now", metavar="NAME",
                      help="ask the running daemon to start a run of NAME now (exit 0 "
                           "once it has started, 75 if one is in progress)")
    mode.add_argument("--pause", metavar="NAME",
                      help="ask the running daemon not to start scheduled runs of NAME "
                           "until --resume (kept across restarts and reloads)")
    mode.add_argument("--resume", metavar="NAME",
                      help="ask the running daemon to schedule NAME again")
    mode.add_argument("--status", action="store_true",
                      help="print each job of the running daemon: running, paused or "
                           "idle, its next run and its last outcome")
    parser.add_argument("--job", metavar="NAME", action="append", dest="jobs",
                        help="only this job (repeatable); with --once a job named here "
                             "runs even when it is 'enabled: false'")
    parser.add_argument("--connect", action="store_true",
                        help="with --check: also open one database connection")
    parser.add_argument("--skipped-ok", action="store_true",
                        help="with --once: exit 0, not 75, when every selected job was "
                             "skipped because its previous run still holds it (a log "
                             "line says so); for schedulers that cannot count 75 as "
                             "success, such as a Kubernetes CronJob")
    parser.add_argument("--log-level", metavar="LEVEL", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text (default) or json: one JSON object per line, for "
                             "journald and log shippers")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("db-job-worker")
    except PackageNotFoundError:   # run from a checkout that was never installed
        return "(not installed)"


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
    from .logs import setup_logging
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if _wants_json(argv):
        # Even a command-line mistake is reported as JSON then.
        setup_logging("INFO", "json")
        parser.print_usage = lambda file=None: None

        def json_error(message: str):
            command_error(f"error: {message}")
            sys.exit(EXIT_USAGE)
        parser.error = json_error
    args = parser.parse_args(argv)
    if args.connect and not args.check:
        parser.error("--connect goes with --check")
    if args.skipped_ok and not args.once:
        parser.error("--skipped-ok goes with --once")
    setup_logging(args.log_level, args.log_format)
    # Job modules are imported by name ("jobs.commands:..."), relative to where
    # the worker is started, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    path = config_path(args)
    try:
        config, functions = load_config(path)
    except ConfigError as exc:
        command_error(f"invalid configuration: {exc}")
        return EXIT_CONFIG
    try:
        selected = select_jobs(config, args.jobs, include_disabled=args.once or args.check)
    except LookupError as exc:
        parser.print_usage(sys.stderr)
        command_error(f"error: {exc}")
        return EXIT_USAGE

    from . import reports
    if args.check:
        return reports.check(config, selected if args.jobs else list(config.jobs),
                             args.connect)
    if args.list:
        return reports.job_list(config)
    if args.history:
        return reports.history(config, args.history, lambda: parser.print_usage(sys.stderr))
    control = _control_command(args)
    if control is not None:
        from .control import command
        name, job = control
        if job is not None and job not in config.job_names():
            parser.print_usage(sys.stderr)
            command_error(f"error: unknown job {job!r}; the jobs in {config.path} are: "
                          f"{', '.join(config.job_names())}")
            return EXIT_USAGE
        return command(config, name, job)
    from .locks import LockDirectoryError
    try:
        return _run(args, path, config, functions, selected)
    except LockDirectoryError as exc:
        command_error(f"invalid configuration: {config.path}: key 'worker.lock_dir': {exc}")
        return EXIT_CONFIG


def _control_command(args) -> tuple[str, str | None] | None:
    """(command, job) for a control mode (worker.control), else None."""
    for command, job in (("run-now", args.run_now), ("pause", args.pause),
                         ("resume", args.resume)):
        if job is not None:
            return command, job
    return ("status", None) if args.status else None


def _wants_json(argv: Sequence[str]) -> bool:
    """--log-format json on the command line, read before argparse can complain."""
    for index, arg in enumerate(argv):
        if arg == "--log-format=json" or (arg == "--log-format" and
                                          argv[index + 1:index + 2] == ["json"]):
            return True
    return False


def _run(args, path: str, config: Config, functions, selected: list[JobSpec]) -> int:
    from . import reports
    if args.once:
        from .app import run_once
        report = run_once(config, functions, selected)
        flush_logs()    # the run's log lines before the summary, where both go to one file
        reports.summary(report.results, report.unwritten)
        if report.unavailable is not None:
            return _exit(report, EXIT_UNAVAILABLE)
        if report.stop_signal == signal.SIGINT:
            # Interrupted from the terminal: 128 + SIGINT, as shells expect.
            return _exit(report, EXIT_INTERRUPTED)
        _say_unwritten(report)
        if report.unwritten:
            return _exit(report, EXIT_JOB_FAILED)
        if report.results and all(r.outcome.value == "skipped" for r in report.results):
            if args.skipped_ok:
                log.info("every selected job was skipped, its previous run still going: "
                         "exit 0, not %d (--skipped-ok)", EXIT_ALL_SKIPPED)
                return _exit(report, EXIT_OK)
            return _exit(report, EXIT_ALL_SKIPPED)
        return _exit(report, EXIT_OK if report.ok else EXIT_JOB_FAILED)
    from .app import DatabaseUnusable, run_daemon
    from .monitoring.observe import ListenError
    try:
        report = run_daemon(path, config, functions, args.jobs)
    except ListenError as exc:
        command_error(str(exc))
        return EXIT_UNAVAILABLE
    except DatabaseUnusable as exc:
        log.error("%s; waiting cannot fix this, exiting", exc)
        return EXIT_UNAVAILABLE
    if report is None:           # stopped before the database answered
        return EXIT_OK
    _say_unwritten(report)
    # A thread left stuck in a job is a failure even when the stop cancelled nothing.
    return _exit(report, EXIT_JOB_FAILED if report.cancelled or report.abandoned
                 or report.unwritten else EXIT_OK)


def _say_unwritten(report) -> None:
    if report.unwritten:
        command_error(f"error: the end of {len(report.unwritten)} run(s) could not be "
                      f"written to the cluster's run table within its lease (jobs: "
                      f"{', '.join(sorted(set(report.unwritten)))}); their rows stay "
                      f"'running' until marked abandoned")


def _exit(report, code: int) -> int:
    if report.abandoned:
        # A thread cannot be killed; waiting for it would hang cron. Leave now.
        log.error("%d job thread(s) did not end (stuck past a deadline, or after being "
                  "cancelled): %s; exiting without them", report.abandoned,
                  ", ".join(f"job={name}" for name in report.abandoned_jobs))
        flush_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
