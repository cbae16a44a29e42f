"""YAML job list -> frozen, validated settings.

Everything is checked before anything runs, and every error names the file, the
job, the key and (where YAML knows it) the line, so that a bad deploy fails at
start-up with one readable message instead of half-way through a batch.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import ExtraCodes
from .observe_config import (HookCalls, HooksSettings, MetricsSettings, hooks_settings,
                             job_hooks, metrics_settings)

DEFAULT_CONFIG_PATH = "config/jobs.yaml"
CONFIG_ENV_VAR = "WORKER_CONFIG"


class ConfigError(Exception):
    """An invalid configuration; nothing may run (exit code 78)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 job: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
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
        # written where a mapping belongs).
        message = " ".join(self.message.splitlines())
        return mask_secrets(": ".join(parts) + ": " + message)


_URL_PASSWORD = re.compile(  # the placeholder in "user:password@host" may stay
    r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?!password@)[^\s'\"]*@")
_ODBC_PASSWORD = re.compile(r"(?i)\b(pwd|password)(\s*=\s*)[^;\s'\"]*")


def mask_secrets(text: str) -> str:
    """`text` with URL passwords and ODBC PWD=... values replaced by ***."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _ODBC_PASSWORD.sub(r"\1\2***", text)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5          # total tries; 1 means no retry
    wait_initial: float = 0.5  # seconds before the first retry
    wait_max: float = 30.0     # cap on any single wait
    on_timeout: bool = False   # retry an attempt that passed its job's timeout


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    pool_size: int
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
class ClusterSettings:
    url: str | None = None        # the run table's database; None: database.url
    node: str | None = None       # this node's name; None: hostname:pid
    lease: float = 30.0           # a run not heartbeated for this long is abandoned
    heartbeat: float = 5.0        # how often running rows are heartbeated
    keep_history: float = 7 * 86400.0   # finished runs older than this are pruned
    batch_slot: float = 60.0      # --once: the slot length for jobs without a schedule


@dataclass(frozen=True)
class JobSpec:
    name: str
    call: str                      # "package.module:function"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None   # seconds per attempt
    every: float | None = None     # seconds between runs (daemon)
    cron: str | None = None        # cron expression (daemon)
    retry: RetryPolicy = RetryPolicy()
    enabled: bool = True
    idempotent: bool = False       # safe to re-run when a commit's outcome is unknown
    line: int | None = None        # where the job starts in the YAML file
    hooks: HookCalls | None = None  # this job's own hooks (replace the global ones)

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

    def job_names(self) -> list[str]:
        return [job.name for job in self.jobs]

    def error(self, message: str, job: JobSpec | None = None,
              key: str | None = None) -> ConfigError:
        """A ConfigError about this file (used by later checks such as callables)."""
        return ConfigError(message, path=self.path, job=job.name if job else None,
                           key=key, line=job.line if job else None)


# --- durations -------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '500ms', '30s', '5m', '1h30m'."""
    if isinstance(value, bool):
        raise ValueError("a duration, not true/false")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"not a duration: {value!r} (use a finite number of seconds)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total, matched = 0, 0.0, False
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if not m:
                break
            total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
            matched = True
            while pos < len(text) and text[pos] == " ":
                pos += 1
        if matched and pos == len(text):
            return total
    raise ValueError(f"not a duration: {value!r} (use seconds, or a number with "
                     "ms, s, m, h or d, e.g. '30s', '5m', '1h30m', '7d')")


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# --- environment expansion ---------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; '$$' is a literal '$'."""
    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if value:  # like the shell's :-, an empty value takes the default too
            return value
        if default is not None:
            return default
        if value is not None:
            return value
        raise LookupError(f"environment variable {name} is not set and has no "
                          f"default (write ${{{name}:-default}} to give one)")
    return _ENV_REF.sub(substitute, text)


# --- reading YAML with line numbers ------------------------------------------

KeyPath = tuple  # a key path inside the document, e.g. ("jobs", 0, "retry")


def _read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found (pass -c PATH or set "
                          f"${CONFIG_ENV_VAR})", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path=path) from None
    loader = yaml.SafeLoader(text)
    lines: dict[KeyPath, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            # Before constructing: construction flattens merge keys (<<: *base)
            # in place, which would look like duplicate keys.
            _index_lines(node, (), lines, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        if "\t" in text and "'\\t'" in problem:
            problem += " (YAML does not allow tabs for indentation; use spaces)"
        raise ConfigError(f"invalid YAML: {problem}", path=path,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    finally:
        loader.dispose()
    return data, lines


QUOTED = ("<quoted>",)   # key in the line index: the paths of quoted scalars


def _index_lines(node: yaml.Node, at: KeyPath, lines: dict, path: Path,
                 stack: frozenset = frozenset(), job: str | None = None) -> None:
    if id(node) in stack:
        raise ConfigError("invalid YAML: an alias refers to a node that contains it",
                          path=path, key=_dotted(at) or None,
                          line=node.start_mark.line + 1)
    stack = stack | {id(node)}
    lines.setdefault(at, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
        lines.setdefault(QUOTED, set()).add(at)   # quoted: `${VAR}` stays a string
    if isinstance(node, yaml.MappingNode):
        if len(at) == 2 and at[0] == "jobs":
            job = next((v.value for k, v in node.value if k.value == "name"
                        and isinstance(v, yaml.ScalarNode)), None)
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if isinstance(key, str) and key in seen:
                where = at[2:] if job is not None else at
                raise ConfigError(f"duplicate key {key!r} in the same mapping",
                                  path=path, job=job, key=_dotted(where + (key,)),
                                  line=key_node.start_mark.line + 1)
            seen.add(key)
            lines[at + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, at + (key,), lines, path, stack, job)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, at + (index,), lines, path, stack, job)


def _dotted(at: KeyPath) -> str:
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- validation ----------------------------------------------------------------

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
            key = _dotted(at[2:]) or None
        else:
            key = _dotted(at) or None
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
    return f"{kind} ({value!r})" if not isinstance(value, (list, dict)) else kind


TOP_KEYS = ("database", "worker", "retry", "jobs", "cluster", "metrics", "hooks")
CLUSTER_KEYS = ("url", "node", "lease", "heartbeat", "keep_history", "batch_slot")
DATABASE_KEYS = ("url", "pool_size", "max_overflow", "pool_timeout", "pool_recycle",
                 "pool_pre_ping", "connect_args")
WORKER_KEYS = ("max_workers", "timezone", "misfire_grace_time", "shutdown_timeout",
               "lock_dir")
RETRY_KEYS = ("attempts", "wait_initial", "wait_max", "on_timeout")
JOB_KEYS = ("name", "call", "kwargs", "timeout", "every", "cron", "retry", "enabled",
            "idempotent", "hooks")


_WHOLE_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


def _expand_tree(value: Any, at: KeyPath, check: _Checker, environ) -> Any:
    if isinstance(value, str):
        try:
            expanded = expand_env(value, environ)
        except LookupError as exc:
            raise check.fail(str(exc), at, check.job_name_at(at)) from None
        if expanded != value and _WHOLE_ENV_REF.fullmatch(value.strip()) and \
                at not in check.lines.get(QUOTED, ()):
            # An unquoted value that is only `${VAR}` is typed as YAML would type it,
            # so that `max_workers: ${WORKERS:-4}` is a number and `enabled: ${ON}` a
            # bool; quote it ("${PASSWORD}") to keep it a string.
            return _yaml_scalar(expanded)
        return expanded
    if isinstance(value, dict):
        return {k: _expand_tree(v, at + (k,), check, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_tree(v, at + (i,), check, environ) for i, v in enumerate(value)]
    return value


EXTRA_CODE_KEYS = ("transient_codes", "permanent_codes")  # top-level retry section only
_SQLSTATE_CODE = re.compile(r"[0-9A-Z]{5}")


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
            elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
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


def _yaml_scalar(text: str) -> Any:
    try:
        typed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return typed if isinstance(typed, (bool, int, float)) else text


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


def _job(raw: Any, index: int, defaults: RetryPolicy, check: _Checker,
         cron_is_valid: Callable[[str], bool]) -> JobSpec:
    at: KeyPath = ("jobs", index)
    if not isinstance(raw, dict):
        raise check.fail(f"each job must be a mapping with at least 'name' and 'call', "
                         f"got {_describe(raw)}", at)
    name_value = raw.get("name")
    if name_value is None:
        raise check.fail("job has no 'name'", at)
    name = check.string(name_value, at + ("name",)).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
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
    if raw.get("cron") is not None:
        cron = check.string(raw["cron"], at + ("cron",), name).strip()
        if not cron_is_valid(cron):
            raise check.fail(f"not a valid cron expression: {cron!r} (e.g. '*/5 * * * *': "
                             "minute hour day-of-month month day-of-week; or @hourly, "
                             "@daily, @weekly, @monthly)",
                             at + ("cron",), name)
    retry = _retry_policy(raw.get("retry"), at + ("retry",), defaults, check, name)
    enabled = check.boolean(raw.get("enabled", True), at + ("enabled",), name)
    idempotent = check.boolean(raw.get("idempotent", False), at + ("idempotent",), name)
    return JobSpec(name=name, call=call, kwargs=dict(kwargs), timeout=timeout,
                   every=every, cron=cron, retry=retry, enabled=enabled,
                   idempotent=idempotent, line=check.lines.get(at),
                   hooks=job_hooks(raw.get("hooks"), at, check, name))


def _cron_is_valid(expression: str) -> bool:
    from croniter import croniter  # imported only when a config uses cron
    return bool(croniter.is_valid(expression))


def load(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError on the first problem."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    data, lines = _read_yaml(path)
    check = _Checker(path, lines)
    if data is None:
        raise check.fail("the file is empty; it needs 'database' and 'jobs'", ())
    if isinstance(data, dict):   # `x-...` keys hold YAML anchors for the jobs to share
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    top = check.mapping(data, (), TOP_KEYS)
    if isinstance(top.get("jobs"), list):
        check.jobs_raw = top["jobs"]
    top = _expand_tree(top, (), check, environ)

    worker_raw = check.mapping(top.get("worker"), ("worker",), WORKER_KEYS)
    max_workers = check.integer(worker_raw.get("max_workers", 4),
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
    for index, raw in enumerate(jobs_raw):
        spec = _job(raw, index, retry, check, _cron_is_valid)
        if spec.name in seen:
            raise check.fail(f"duplicate job name (first defined at line "
                             f"{seen[spec.name]})", ("jobs", index, "name"), spec.name)
        seen[spec.name] = spec.line or 0
        jobs.append(spec)
    cluster = _cluster(top["cluster"], check) if "cluster" in top else None
    metrics = metrics_settings(top["metrics"], check) if "metrics" in top else None
    hooks = hooks_settings(top["hooks"], check) if "hooks" in top else None
    return Config(path=path, database=database, worker=worker, retry=retry,
                  extra_codes=extra_codes, cluster=cluster,
                  jobs=tuple(jobs), metrics=metrics, hooks=hooks)


def _cluster(raw: Any, check: _Checker) -> ClusterSettings:
    at: KeyPath = ("cluster",)
    raw = check.mapping(raw, at, CLUSTER_KEYS)
    url = node = None
    if raw.get("url") is not None:
        url = check.string(raw["url"], at + ("url",)).strip()
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            make_url(url)
        except (ArgumentError, ValueError):
            raise check.fail("not a valid SQLAlchemy URL", at + ("url",)) from None
    if raw.get("node") is not None:
        node = check.string(str(raw["node"]), at + ("node",)).strip()
    defaults = ClusterSettings()
    lease = check.duration(raw.get("lease", defaults.lease), at + ("lease",))
    heartbeat = check.duration(raw.get("heartbeat", defaults.heartbeat), at + ("heartbeat",))
    if heartbeat * 2 > lease:
        raise check.fail(f"heartbeat ({format_duration(heartbeat)}) must be at most half "
                         f"the lease ({format_duration(lease)}), or one late heartbeat "
                         f"would have a live node's runs marked abandoned",
                         at + ("heartbeat",))
    return ClusterSettings(
        url=url, node=node, lease=lease, heartbeat=heartbeat,
        keep_history=check.duration(raw.get("keep_history", defaults.keep_history),
                                    at + ("keep_history",)),
        batch_slot=check.duration(raw.get("batch_slot", defaults.batch_slot),
                                  at + ("batch_slot",)))


def _worker(raw: dict, max_workers: int, check: _Checker) -> WorkerSettings:
    at: KeyPath = ("worker",)
    zone = raw.get("timezone")
    if zone is not None:
        zone = check.string(zone, at + ("timezone",)).strip()
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise check.fail(f"unknown time zone {zone!r} (use an IANA name such as "
                             f"'Europe/Berlin' or 'UTC')", at + ("timezone",)) from None
    lock_dir = raw.get("lock_dir")
    if lock_dir is not None:
        lock_dir = check.string(lock_dir, at + ("lock_dir",)).strip()
    return WorkerSettings(
        max_workers=max_workers,
        timezone=zone,
        misfire_grace_time=check.duration(raw.get("misfire_grace_time", 60),
                                          at + ("misfire_grace_time",)),
        shutdown_timeout=check.duration(raw.get("shutdown_timeout", 30),
                                        at + ("shutdown_timeout",), positive=False),
        lock_dir=lock_dir,
    )


def _database(raw: dict, worker: WorkerSettings, check: _Checker) -> DatabaseSettings:
    at: KeyPath = ("database",)
    if "url" not in raw:
        raise check.fail("missing key 'url' (an SQLAlchemy URL, e.g. "
                         "sqlite:///worker.db)", at + ("url",))
    url = check.string(raw["url"], at + ("url",)).strip()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise check.fail("not a valid SQLAlchemy URL (expected "
                         "dialect+driver://user:password@host/database)",
                         at + ("url",)) from None
    if parsed.get_driver_name() == "pyodbc" and parsed.get_backend_name() in (
            "mysql", "mariadb") and parsed.port is not None:
        # field-notes §2: this becomes Server=host,port, which MariaDB's ODBC driver
        # ignores: it would silently connect to 3306.
        raise check.fail(f"MariaDB/MySQL ODBC drivers ignore the port in host:port "
                         f"(it would silently connect to 3306); drop ':{parsed.port}' "
                         f"and add '&Port={parsed.port}' to the query string",
                         at + ("url",))
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise check.fail("an in-memory SQLite database cannot be shared by job threads; "
                         "use a file, e.g. sqlite:///worker.db", at + ("url",))
    pool_size = check.integer(raw.get("pool_size", worker.max_workers),
                              at + ("pool_size",), 1)
    max_overflow = check.integer(raw.get("max_overflow", 0), at + ("max_overflow",), 0)
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
        pool_timeout=check.duration(raw.get("pool_timeout", 30), at + ("pool_timeout",)),
        pool_recycle=check.duration(raw.get("pool_recycle", 3600), at + ("pool_recycle",),
                                    allow_never=True),
        pool_pre_ping=check.boolean(raw.get("pool_pre_ping", False),
                                    at + ("pool_pre_ping",)),
        connect_args=dict(connect_args),
    )


def masked_url(url: str) -> str:
    """The URL as it may be shown: password replaced by ***."""
    from sqlalchemy.engine import make_url
    try:
        parsed = make_url(url)
        if parsed.query:  # e.g. mssql+pyodbc:///?odbc_connect=...;PWD=secret
            parsed = parsed.update_query_dict(
                {k: mask_secrets(v) if isinstance(v, str) else [mask_secrets(i) for i in v]
                 for k, v in parsed.query.items()})
        return parsed.render_as_string(hide_password=True)
    except Exception:  # never echo an unparsable URL: it may hold a password
        return "<unparsable URL>"
