"""The checks: YAML data -> a validated Config, or one ConfigError.

Everything is checked before anything runs, and every error names the file, the
job, the key and (where YAML knows it) the line, so that a bad deploy fails at
start-up with one readable message instead of half-way through a batch.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ExtraCodes
from .durations import format_duration, parse_duration
from .model import (ClusterSettings, Config, ConfigError, DatabaseSettings,
                    HistorySettings, JobSpec, RetryPolicy, WorkerSettings, default_of,
                    keys_of)
from ..monitoring.settings import hooks_settings, job_hooks, metrics_settings
from .urls import UrlProblem, check_url
from .yamlfile import KeyPath, UnsetVariable, dotted, expand_tree, read_yaml


class _Checker:
    """Typed getters that raise ConfigError naming the file, job, key and line."""

    def __init__(self, path: Path, lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.lines = lines
        self.jobs_raw: list = []

    def job_name_at(self, at: KeyPath) -> str | None:
        """The name of the job that a key path points into, if any."""
        if len(at) >= 2 and at[0] == "jobs":
            job = self.jobs_raw[at[1]] if at[1] < len(self.jobs_raw) else None
            if isinstance(job, dict) and isinstance(job.get("name"), str):
                return job["name"]
        return None

    def fail(self, message: str, at: KeyPath, job: str | None = None) -> ConfigError:
        line = None
        for n in range(len(at), -1, -1):
            if at[:n] in self.lines:
                line = self.lines[at[:n]]
                break
        if job is not None and len(at) >= 2 and at[0] == "jobs":
            key = dotted(at[2:]) or None
        else:
            key = dotted(at) or None
        return ConfigError(message, path=self.path, job=job, key=key, line=line)

    def mapping(self, value: Any, at: KeyPath, allowed: tuple[str, ...],
                job: str | None = None) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(f"must be a mapping of keys to values, got "
                            f"{_describe(value)}", at, job)
        for key in value:
            if key not in allowed:
                import difflib  # only on this error path: keeps start-up lean
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else \
                    f"; known keys: {', '.join(allowed)}"
                raise self.fail(f"unknown key {key!r}{suggestion}", at + (key,), job)
        return value

    def integer(self, value: Any, at: KeyPath, minimum: int, job=None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"must be a whole number, got {_describe(value)}", at, job)
        if value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}", at, job)
        return value

    def duration(self, value: Any, at: KeyPath, job=None, *, positive=True,
                 allow_never=False) -> float:
        if allow_never and value == -1:
            return -1.0
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.fail(str(exc), at, job) from None
        if seconds < 0 or (positive and seconds == 0):
            raise self.fail(f"must be {'greater than 0' if positive else 'at least 0'}"
                            f", got {value!r}", at, job)
        return seconds

    def boolean(self, value: Any, at: KeyPath, job=None) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"must be true or false, got {_describe(value)}", at, job)
        return value

    def string(self, value: Any, at: KeyPath, job=None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"must be a non-empty string, got {_describe(value)}", at, job)
        return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    kind = {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return kind
    # repr() of an int of 4,300 digits or more raises ValueError
    shown = repr(value) if not isinstance(value, int) or value.bit_length() < 10_000 \
        else f"about {value.bit_length() * 3 // 10} digits"
    return f"{kind} ({shown})"


TOP_KEYS = ("database", "worker", "retry", "jobs", "cluster", "metrics", "hooks",
            "history")
CLUSTER_KEYS = keys_of(ClusterSettings)
HISTORY_KEYS = keys_of(HistorySettings)
DATABASE_KEYS = keys_of(DatabaseSettings)
WORKER_KEYS = keys_of(WorkerSettings)
RETRY_KEYS = keys_of(RetryPolicy)
JOB_KEYS = keys_of(JobSpec, without=("line",))


def _given_or_default(raw: Mapping, settings: type, key: str) -> Any:
    """The value written for `key`, else the default the dataclass declares."""
    return raw[key] if key in raw else default_of(settings, key)


EXTRA_CODE_KEYS = ("transient_codes", "permanent_codes")  # top-level retry section only
_SQLSTATE_CODE = re.compile(r"[0-9A-Z]{5}")


_NATIVE_CODE = re.compile(r"-?[0-9]+")   # ASCII digits: str.isdigit() also takes '²'


def _extra_codes(raw: Any, check: _Checker) -> ExtraCodes:
    if not isinstance(raw, dict):
        return ExtraCodes()
    found = {}
    for key in EXTRA_CODE_KEYS:
        at = ("retry", key)
        values = raw.get(key) or []
        if not isinstance(values, list):
            raise check.fail(f"must be a list of native error numbers or SQLSTATEs, got "
                             f"{_describe(values)}", at)
        codes: set = set()
        for index, value in enumerate(values):
            if isinstance(value, int) and not isinstance(value, bool):
                codes.add(value)
            elif isinstance(value, str) and _NATIVE_CODE.fullmatch(value.strip()):
                codes.add(int(value))
            elif isinstance(value, str) and _SQLSTATE_CODE.fullmatch(value.strip()):
                codes.add(value.strip())
            else:
                raise check.fail(f"{value!r} is neither a native error number (e.g. 1205) "
                                 f"nor a five-character SQLSTATE (e.g. 'HYT00')",
                                 at + (index,))
        found[key] = frozenset(codes)
    both = found["transient_codes"] & found["permanent_codes"]
    if both:
        raise check.fail(f"{sorted(map(str, both))} listed as both transient and permanent",
                         ("retry", "permanent_codes"))
    return ExtraCodes(retry=found["transient_codes"], never=found["permanent_codes"])


def _retry_policy(raw: Any, at: KeyPath, base: RetryPolicy, check: _Checker,
                  job: str | None = None) -> RetryPolicy:
    if isinstance(raw, dict) and job is not None:
        for key in EXTRA_CODE_KEYS:
            if key in raw:
                raise check.fail(f"{key!r} applies to every job: set it in the top-level "
                                 f"'retry' section", at + (key,), job)
    raw = check.mapping(raw, at, RETRY_KEYS, job)
    policy = base
    if "attempts" in raw:
        policy = replace(policy, attempts=check.integer(raw["attempts"], at + ("attempts",),
                                                        1, job))
    if "wait_initial" in raw:
        policy = replace(policy, wait_initial=check.duration(
            raw["wait_initial"], at + ("wait_initial",), job, positive=False))
    if "on_timeout" in raw:
        policy = replace(policy, on_timeout=check.boolean(raw["on_timeout"],
                                                          at + ("on_timeout",), job))
    if "wait_max" in raw:
        policy = replace(policy, wait_max=check.duration(
            raw["wait_max"], at + ("wait_max",), job, positive=False))
    if policy.wait_max < policy.wait_initial:
        raise check.fail(f"wait_max ({format_duration(policy.wait_max)}) is smaller than "
                         f"wait_initial ({format_duration(policy.wait_initial)})",
                         at + ("wait_max",), job)
    return policy


_JOB_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _job(raw: Any, index: int, defaults: RetryPolicy, check: _Checker,
         cron_problem: Callable[[str], str | None]) -> JobSpec:
    at: KeyPath = ("jobs", index)
    if not isinstance(raw, dict):
        raise check.fail(f"each job must be a mapping with at least 'name' and 'call', "
                         f"got {_describe(raw)}", at)
    name_value = raw.get("name")
    if name_value is None:
        raise check.fail("job has no 'name'", at)
    name = check.string(name_value, at + ("name",)).strip()
    if not _JOB_NAME.fullmatch(name):
        raise check.fail("a job name may use letters, digits, '.', '_' and '-' only",
                         at + ("name",), name)
    check.mapping(raw, at, JOB_KEYS, name)
    if "call" not in raw:
        raise check.fail("missing key 'call' (the job's function, as "
                         "'package.module:function')", at + ("call",), name)
    call = check.string(raw["call"], at + ("call",), name).strip()
    module, sep, attr = call.partition(":")
    if not sep or not module or not attr:
        raise check.fail(f"must be 'package.module:function', got {call!r}",
                         at + ("call",), name)
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise check.fail(f"must be a mapping of argument names to values, got "
                         f"{_describe(kwargs)}", at + ("kwargs",), name)
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise check.fail(f"argument name {key!r} is not a Python identifier",
                             at + ("kwargs", key), name)
        if key == "session":
            raise check.fail("'session' is passed by the worker; it cannot be a kwarg",
                             at + ("kwargs", key), name)
    timeout = None
    if raw.get("timeout") is not None:
        timeout = check.duration(raw["timeout"], at + ("timeout",), name)
    every = cron = None
    if raw.get("every") is not None and raw.get("cron") is not None:
        raise check.fail("give either 'every' or 'cron', not both", at + ("cron",), name)
    if raw.get("every") is not None:
        every = check.duration(raw["every"], at + ("every",), name)
        # Below a millisecond the next run never moves past now (the loop spins on
        # overlap skips) and, near 1e-300, counting missed runs overflows.
        if every < 0.001:
            raise check.fail(f"must be at least 1ms, got {raw['every']!r}",
                             at + ("every",), name)
    if raw.get("cron") is not None:
        cron = raw["cron"] if isinstance(raw["cron"], str) else \
            check.string(raw["cron"], at + ("cron",), name)
        cron = cron.strip()
        problem = cron_problem(cron)
        if problem is not None:
            shown = repr(cron) if len(cron) <= 80 else repr(cron[:77]) + "..."
            raise check.fail(f"not a valid cron expression: {shown}: {problem} (e.g. "
                             "'*/5 * * * *': minute hour day-of-month month day-of-week; "
                             "or @hourly, @daily, @weekly, @monthly, @yearly)",
                             at + ("cron",), name)
    retry = _retry_policy(raw.get("retry"), at + ("retry",), defaults, check, name)
    enabled = check.boolean(_given_or_default(raw, JobSpec, "enabled"),
                            at + ("enabled",), name)
    idempotent = check.boolean(_given_or_default(raw, JobSpec, "idempotent"),
                               at + ("idempotent",), name)
    return JobSpec(name=name, call=call, kwargs=dict(kwargs), timeout=timeout,
                   every=every, cron=cron, retry=retry, enabled=enabled,
                   idempotent=idempotent, line=check.lines.get(at),
                   hooks=job_hooks(raw.get("hooks"), at, check, name))


def _cron_checker() -> Callable[[str], str | None]:
    """cron_problem(expression): why it is refused, or None; each distinct
    expression parsed once (a file of many jobs repeats a few schedules)."""
    verdicts: dict[str, str | None] = {}

    def cron_problem(expression: str) -> str | None:
        if expression not in verdicts:
            from ..cron import CronSyntaxError, parse
            try:
                parse(expression).check_fires(date.today())
                verdicts[expression] = None
            except CronSyntaxError as exc:
                verdicts[expression] = str(exc)
        return verdicts[expression]
    return cron_problem


def load(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError on the first problem."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    document = read_yaml(path)
    data = document.data
    check = _Checker(path, document.lines)
    if data is None:
        raise check.fail("the file is empty; it needs 'database' and 'jobs'", ())
    if isinstance(data, dict):   # `x-...` keys hold YAML anchors for the jobs to share
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    top = check.mapping(data, (), TOP_KEYS)
    if isinstance(top.get("jobs"), list):
        check.jobs_raw = top["jobs"]
    try:
        top = expand_tree(top, environ, document.quoted)
    except UnsetVariable as exc:
        raise check.fail(str(exc), exc.at, check.job_name_at(exc.at)) from None

    worker_raw = check.mapping(top.get("worker"), ("worker",), WORKER_KEYS)
    max_workers = check.integer(_given_or_default(worker_raw, WorkerSettings, "max_workers"),
                                ("worker", "max_workers"), 1)
    worker = _worker(worker_raw, max_workers, check)

    if "database" not in top:
        raise check.fail("missing section 'database' (at least 'url')", ("database",))
    db_raw = check.mapping(top["database"], ("database",), DATABASE_KEYS)
    database = _database(db_raw, worker, check)

    retry_raw = top.get("retry") or {}
    extra_codes = _extra_codes(retry_raw, check)
    retry = _retry_policy({k: v for k, v in retry_raw.items() if k not in EXTRA_CODE_KEYS}
                          if isinstance(retry_raw, dict) else retry_raw,
                          ("retry",), RetryPolicy(), check)

    jobs_raw = top.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise check.fail("'jobs' must be a non-empty list of jobs", ("jobs",))
    jobs: list[JobSpec] = []
    seen: dict[str, int] = {}
    cron_problem = _cron_checker()
    for index, raw in enumerate(jobs_raw):
        spec = _job(raw, index, retry, check, cron_problem)
        if spec.name in seen:
            raise check.fail(f"duplicate job name (first defined at line "
                             f"{seen[spec.name]})", ("jobs", index, "name"), spec.name)
        seen[spec.name] = spec.line or 0
        jobs.append(spec)
    history = _history(top.get("history"), check)
    cluster = None
    if "cluster" in top:
        keep_given = isinstance(top.get("history"), dict) and "keep" in top["history"]
        cluster = _cluster(top["cluster"], history.keep if keep_given else None, check)
        history = replace(history, keep=cluster.keep_history)
    metrics = metrics_settings(top["metrics"], check) if "metrics" in top else None
    hooks = hooks_settings(top["hooks"], check) if "hooks" in top else None
    return Config(path=path, database=database, worker=worker, retry=retry,
                  extra_codes=extra_codes, cluster=cluster,
                  jobs=tuple(jobs), metrics=metrics, hooks=hooks, history=history)


def _history(raw: Any, check: _Checker) -> HistorySettings:
    at: KeyPath = ("history",)
    raw = check.mapping(raw, at, HISTORY_KEYS)
    url = None
    if raw.get("url") is not None:
        url = check.string(raw["url"], at + ("url",)).strip()
        parsed = _checked_url(url, at + ("url",), check)
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "",
                                                                          ":memory:"):
            raise check.fail("an in-memory SQLite database would be lost at exit; use a "
                             "file, e.g. sqlite:////var/lib/run-worker/history.db",
                             at + ("url",))
    return HistorySettings(
        enabled=check.boolean(_given_or_default(raw, HistorySettings, "enabled"),
                              at + ("enabled",)),
        url=url,
        keep=check.duration(_given_or_default(raw, HistorySettings, "keep"),
                            at + ("keep",)),
        max_runs_per_job=check.integer(
            _given_or_default(raw, HistorySettings, "max_runs_per_job"),
            at + ("max_runs_per_job",), 1))


def _cluster(raw: Any, history_keep: float | None, check: _Checker) -> ClusterSettings:
    """`history_keep`: history.keep where the file gives it."""
    at: KeyPath = ("cluster",)
    raw = check.mapping(raw, at, CLUSTER_KEYS)
    url = node = None
    if raw.get("url") is not None:
        url = check.string(raw["url"], at + ("url",)).strip()
        _checked_url(url, at + ("url",), check)
    if raw.get("node") is not None:
        node = check.string(str(raw["node"]), at + ("node",)).strip()
    lease = check.duration(_given_or_default(raw, ClusterSettings, "lease"),
                           at + ("lease",))
    heartbeat = check.duration(_given_or_default(raw, ClusterSettings, "heartbeat"),
                               at + ("heartbeat",))
    if heartbeat * 2 > lease:
        raise check.fail(f"heartbeat ({format_duration(heartbeat)}) must be at most half "
                         f"the lease ({format_duration(lease)}), or one late heartbeat "
                         f"would have a live node's runs marked abandoned",
                         at + ("heartbeat",))
    # One retention for the history and the run table: keep_history is an alias of
    # history.keep (written before the history section existed).
    keep = history_keep if history_keep is not None else \
        default_of(HistorySettings, "keep")
    if "keep_history" in raw:
        alias = check.duration(raw["keep_history"], at + ("keep_history",))
        if history_keep is not None and alias != history_keep:
            raise check.fail(f"is an alias of history.keep, which says "
                             f"{format_duration(history_keep)}: give one of them",
                             at + ("keep_history",))
        keep = alias
    return ClusterSettings(
        url=url, node=node, lease=lease, heartbeat=heartbeat, keep_history=keep,
        batch_slot=check.duration(_given_or_default(raw, ClusterSettings, "batch_slot"),
                                  at + ("batch_slot",)))


def _checked_url(url: str, at: KeyPath, check: _Checker) -> Any:
    """The parsed URL, its dialect loaded and its driver module imported."""
    try:
        return check_url(url)
    except UrlProblem as exc:
        raise check.fail(str(exc), at) from None


def _worker(raw: dict, max_workers: int, check: _Checker) -> WorkerSettings:
    at: KeyPath = ("worker",)
    zone = raw.get("timezone")
    if zone is not None:
        zone = check.string(zone, at + ("timezone",)).strip()
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):   # OSError: 'Europe' is a folder
            raise check.fail(f"unknown time zone {zone!r} (use an IANA name such as "
                             f"'Europe/Berlin' or 'UTC')", at + ("timezone",)) from None
    lock_dir = raw.get("lock_dir")
    if lock_dir is not None:
        lock_dir = check.string(lock_dir, at + ("lock_dir",)).strip()
    return WorkerSettings(
        max_workers=max_workers,
        timezone=zone,
        misfire_grace_time=check.duration(
            _given_or_default(raw, WorkerSettings, "misfire_grace_time"),
            at + ("misfire_grace_time",)),
        shutdown_timeout=check.duration(
            _given_or_default(raw, WorkerSettings, "shutdown_timeout"),
            at + ("shutdown_timeout",), positive=False),
        lock_dir=lock_dir,
    )


def _database(raw: dict, worker: WorkerSettings, check: _Checker) -> DatabaseSettings:
    at: KeyPath = ("database",)
    if "url" not in raw:
        raise check.fail("missing key 'url' (an SQLAlchemy URL, e.g. "
                         "sqlite:///worker.db)", at + ("url",))
    url = check.string(raw["url"], at + ("url",)).strip()
    parsed = _checked_url(url, at + ("url",), check)
    if parsed.get_driver_name() == "pyodbc" and parsed.get_backend_name() in (
            "mysql", "mariadb") and parsed.port is not None:
        # SQLAlchemy's mysql+pyodbc builds Server=host,port (SQL Server syntax), and
        # MariaDB Connector/ODBC ignores the ",port": it would silently connect to 3306.
        raise check.fail(f"MariaDB/MySQL ODBC drivers ignore the port in host:port "
                         f"(it would silently connect to 3306); drop ':{parsed.port}' "
                         f"and add '&Port={parsed.port}' to the query string",
                         at + ("url",))
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise check.fail("an in-memory SQLite database cannot be shared by job threads; "
                         "use a file, e.g. sqlite:///worker.db", at + ("url",))
    # One connection per worker thread unless the file says otherwise.
    pool_size = check.integer(raw.get("pool_size", worker.max_workers),
                              at + ("pool_size",), 1)
    max_overflow = check.integer(_given_or_default(raw, DatabaseSettings, "max_overflow"),
                                 at + ("max_overflow",), 0)
    if worker.max_workers > pool_size + max_overflow:
        raise check.fail(
            f"worker.max_workers ({worker.max_workers}) is larger than pool_size + "
            f"max_overflow ({pool_size} + {max_overflow}); every job holds one "
            f"connection, so extra workers would wait on the pool and time out. Raise "
            f"pool_size or lower max_workers", at + ("pool_size",))
    connect_args = raw.get("connect_args") or {}
    if not isinstance(connect_args, dict):
        raise check.fail(f"must be a mapping, got {_describe(connect_args)}",
                         at + ("connect_args",))
    return DatabaseSettings(
        url=url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=check.duration(_given_or_default(raw, DatabaseSettings, "pool_timeout"),
                                    at + ("pool_timeout",)),
        pool_recycle=check.duration(_given_or_default(raw, DatabaseSettings, "pool_recycle"),
                                    at + ("pool_recycle",), allow_never=True),
        pool_pre_ping=check.boolean(_given_or_default(raw, DatabaseSettings, "pool_pre_ping"),
                                    at + ("pool_pre_ping",)),
        connect_args=dict(connect_args),
    )
