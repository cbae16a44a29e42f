"""The exit codes, in one place (sysexits.h names where one fits): cron, systemd
and scripts depend on them."""

EXIT_OK = 0            # every job that ran succeeded; a daemon stopped cleanly
EXIT_JOB_FAILED = 1    # a job failed after its retries, timed out, or was cancelled;
                       # cluster: a claim failed, or a run's end was never written
EXIT_USAGE = 2         # command-line misuse (argparse uses 2 as well)
EXIT_UNAVAILABLE = 69  # the database cannot be used: --check --connect, the daemon at
                       # start-up with an error waiting cannot fix, or cluster --once
                       # whose run table cannot be used at start; a control command
                       # that no daemon answers (EX_UNAVAILABLE)
EXIT_ALL_SKIPPED = 75  # --once: every selected job was still running elsewhere; --run-now:
                       # the job's run is in progress (EX_TEMPFAIL)
EXIT_NOT_ALLOWED = 77  # a control command from a user who is neither the daemon's nor root
                       # (EX_NOPERM)
EXIT_CONFIG = 78       # invalid configuration, nothing ran (EX_CONFIG)
EXIT_INTERRUPTED = 130  # --once: stopped by SIGINT (128 + 2, as shells report it)
