"""The validated configuration: frozen dataclasses, and ConfigError.

Each default is written here and only here: the schema reads it from the
dataclass (`default_of`) when a key is absent, and the accepted keys of each
section are the dataclass's fields (`keys_of`).
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ExtraCodes
from ..monitoring.settings import HookCalls, HooksSettings, MetricsSettings
from .durations import format_duration
from .masking import mask_secrets

DEFAULT_CONFIG_PATH = "config/jobs.yaml"
CONFIG_ENV_VAR = "WORKER_CONFIG"


class ConfigError(Exception):
    """An invalid configuration; nothing may run (exit code 78)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 job: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        # Masked from the start, so that no use of the error (str, repr, args, a
        # traceback) can show a password that the message quotes.
        message = mask_secrets(message)
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.job = job
        self.key = key
        self.line = line

    def __str__(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.job is not None:
            parts.append(f"job {self.job!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        # One line, and never a password (a message may quote a value, e.g. a URL
        # written where a mapping belongs; a key may be a URL written without ': ').
        message = " ".join(self.message.splitlines())
        return mask_secrets(": ".join(parts) + ": " + message)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5          # total tries; 1 means no retry
    wait_initial: float = 0.5  # seconds before the first retry
    wait_max: float = 30.0     # cap on any single wait
    on_timeout: bool = False   # retry an attempt that passed its job's timeout


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    pool_size: int                 # in a config file: worker.max_workers when absent
    max_overflow: int = 0
    pool_timeout: float = 30.0
    pool_recycle: float = 3600.0   # -1: never recycle
    pool_pre_ping: bool = False
    connect_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSettings:
    max_workers: int = 4
    timezone: str | None = None          # IANA name for cron schedules; None: local
    misfire_grace_time: float = 60.0     # a run later than this is skipped, not run
    shutdown_timeout: float = 30.0       # how long a stop waits for running jobs
    lock_dir: str | None = None          # per-job host locks; None: default_lock_dir()


@dataclass(frozen=True)
class HistorySettings:
    enabled: bool = True          # every run one row (daemon and --once)
    url: str | None = None        # its database (a local SQLite file...); None: database.url
    keep: float = 7 * 86400.0     # rows (and the cluster's finished runs) older are pruned
    max_runs_per_job: int = 1000  # a job's older rows beyond this are pruned


@dataclass(frozen=True)
class ClusterSettings:
    url: str | None = None        # the run table's database; None: database.url
    node: str | None = None       # this node's name; None: hostname:pid
    lease: float = 30.0           # a run not heartbeated for this long is abandoned
    heartbeat: float = 5.0        # how often running rows are heartbeated
    keep_history: float = HistorySettings.keep   # an alias of history.keep
    batch_slot: float = 60.0      # --once: the slot length for jobs without a schedule


@dataclass(frozen=True)
class JobSpec:
    name: str
    call: str                      # "package.module:function"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None   # seconds per attempt
    every: float | None = None     # seconds between runs (daemon)
    cron: str | None = None        # cron expression (daemon)
    retry: RetryPolicy = RetryPolicy()   # in a config file: the top-level retry section
    enabled: bool = True
    idempotent: bool = False       # safe to re-run when a commit's outcome is unknown
    hooks: HookCalls | None = None  # this job's own hooks (replace the global ones)
    line: int | None = None        # where the job starts in the YAML file

    @property
    def schedule(self) -> str | None:
        if self.cron is not None:
            return f"cron {self.cron!r}"
        if self.every is not None:
            return f"every {format_duration(self.every)}"
        return None


@dataclass(frozen=True)
class Config:
    path: Path
    database: DatabaseSettings
    worker: WorkerSettings
    retry: RetryPolicy
    jobs: tuple[JobSpec, ...]
    extra_codes: ExtraCodes = ExtraCodes()   # the site's additions to the classifier
    cluster: "ClusterSettings | None" = None  # runs coordinated across hosts
    metrics: MetricsSettings | None = None   # metrics, health and status page
    hooks: HooksSettings | None = None       # called with each run's JobResult
    history: HistorySettings = HistorySettings()   # every run one row

    def job_names(self) -> list[str]:
        return [job.name for job in self.jobs]

    def error(self, message: str, job: JobSpec | None = None,
              key: str | None = None) -> ConfigError:
        """A ConfigError about this file (used by later checks such as callables)."""
        return ConfigError(message, path=self.path, job=job.name if job else None,
                           key=key, line=job.line if job else None)


def default_of(settings: type, name: str) -> Any:
    """The default written on the dataclass `settings` for its field `name`."""
    spec = settings.__dataclass_fields__[name]
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    raise LookupError(f"{settings.__name__}.{name} has no default")


def keys_of(settings: type, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The keys a config section of `settings` accepts: its fields, in order."""
    return tuple(spec.name for spec in fields(settings) if spec.name not in without)
