"""The `metrics` and `hooks` sections of the config (and a job's own `hooks`).

Kept apart from the rest of the schema: these sections only say how the worker is
watched, never what it runs. Each function takes the raw (env-expanded) value and
the config's checker, so that errors name the file, the key and the line like any
other config error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

METRICS_KEYS = ("address", "port", "textfile", "stall_after")
HOOKS_KEYS = ("on_start", "on_failure", "on_success", "timeout")
JOB_HOOKS_KEYS = ("on_start", "on_failure", "on_success")
HOOK_KINDS = ("on_start", "on_failure", "on_success")

_CALL = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class MetricsSettings:
    address: str = "127.0.0.1"     # 0.0.0.0 only when asked
    port: int = 9464               # 0: any free port (the log line says which)
    textfile: str | None = None    # --once: node-exporter textfile, written at the end
    stall_after: float = 30.0      # /healthz is 503 when the loop has not turned for this long


@dataclass(frozen=True)
class HookCalls:
    on_failure: str | None = None  # "package.module:function", called as fn(result)
    on_success: str | None = None
    on_start: str | None = None    # called when a run starts (RunStart)

    def get(self, kind: str) -> str | None:
        return getattr(self, kind)


@dataclass(frozen=True)
class HooksSettings(HookCalls):
    timeout: float = 10.0          # a hook still running after this is abandoned


def metrics_settings(raw: Any, check) -> MetricsSettings:
    at = ("metrics",)
    raw = check.mapping(raw, at, METRICS_KEYS)
    try:
        import prometheus_client  # noqa: F401  only when the section asks for metrics
    except ImportError:
        raise check.fail("the metrics section needs prometheus-client: install it with "
                         "pip install 'db-job-worker[metrics]'", at) from None
    defaults = MetricsSettings()
    address = check.string(raw.get("address", defaults.address), at + ("address",)).strip()
    port = check.integer(raw.get("port", defaults.port), at + ("port",), 0)
    if port > 65535:
        raise check.fail(f"must be a TCP port (0 to 65535), got {port}", at + ("port",))
    textfile = None
    if raw.get("textfile") is not None:
        textfile = check.string(raw["textfile"], at + ("textfile",)).strip()
    stall_after = check.duration(raw.get("stall_after", defaults.stall_after),
                                 at + ("stall_after",))
    return MetricsSettings(address, port, textfile, stall_after)


def hooks_settings(raw: Any, check) -> HooksSettings:
    at = ("hooks",)
    raw = check.mapping(raw, at, HOOKS_KEYS)
    calls = _calls(raw, at, check, None)
    timeout = check.duration(raw.get("timeout", HooksSettings.timeout), at + ("timeout",))
    return HooksSettings(calls.on_failure, calls.on_success, calls.on_start, timeout)


def job_hooks(raw: Any, at: tuple, check, job: str) -> HookCalls | None:
    """A job's own `hooks` (at = the job's key path); None when it has none."""
    if raw is None:
        return None
    raw = check.mapping(raw, at + ("hooks",), JOB_HOOKS_KEYS, job)
    return _calls(raw, at + ("hooks",), check, job)


def _calls(raw: dict, at: tuple, check, job: str | None) -> HookCalls:
    found = {}
    for kind in HOOK_KINDS:
        if raw.get(kind) is None:
            continue
        call = check.string(raw[kind], at + (kind,), job).strip()
        if not _CALL.fullmatch(call):
            raise check.fail(f"must be 'package.module:function', got {call!r}",
                             at + (kind,), job)
        found[kind] = call
    return HookCalls(**found)
