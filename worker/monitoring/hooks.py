"""Start, failure and success hooks: `hooks: {on_start: "pkg.mod:fn", on_failure: ...,
on_success: ...}` at the top level and per job (a job's own hook replaces the
global one of its kind).

A hook is called as fn(result): on_start with a RunStart when the run is handed to
a thread, the others with the run's JobResult after its Session is gone (on
failure `result.exception` is the exception object); both carry the run's
`run_id`. Each call runs on a thread of its own, a job's hooks in order (a call
waits for the job's previous one, up to `hooks.timeout`): a hook that raises is
logged, one still running after `hooks.timeout` is logged and abandoned; neither
touches the run's outcome or the loop. Hooks are resolved and checked when the config is loaded (so --check
finds a typo), like job callables.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from ..config import Config
from .observe import NoObserver
from .settings import HOOK_KINDS, HooksSettings

log = logging.getLogger("worker.hooks")

FAILED_OUTCOMES = ("failed", "timeout")


def hook_calls(config: Config) -> list[tuple[str, str, object]]:
    """Every hook of the config: (kind, call, job or None)."""
    calls = []
    for kind in HOOK_KINDS:
        if config.hooks is not None and config.hooks.get(kind):
            calls.append((kind, config.hooks.get(kind), None))
        for job in config.jobs:
            if job.hooks is not None and job.hooks.get(kind):
                calls.append((kind, job.hooks.get(kind), job))
    return calls


def resolve_hooks(config: Config) -> dict[str, Callable]:
    """Each hook's function by its `call`; ConfigError on the first that fails."""
    from ..callables import CallableError, check_runs_body, resolve
    functions: dict[str, Callable] = {}
    for kind, call, job in hook_calls(config):
        if call in functions:
            continue
        try:
            function = resolve(call)
            check_runs_body(function)
            _check_one_argument(function)
        except CallableError as exc:
            raise config.error(f"{call}: {exc}", job=job,
                               key=f"hooks.{kind}") from None
        functions[call] = function
    return functions


def _check_one_argument(function: Callable) -> None:
    from ..callables import CallableError
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(object())
    except TypeError as exc:
        raise CallableError(f"a hook is called as fn(result): {exc}") from None


@dataclass(frozen=True)
class RunStart:
    """What an on_start hook is called with."""
    job: str
    run_id: str
    scheduled: str      # the occurrence the run is for, or "now" for a run-now or --once


@dataclass
class _Call:
    thread: threading.Thread
    started: float
    what: str
    job: str


class HookRunner(NoObserver):
    """An observer: calls the run's hook when a run ends. The loop thread only
    starts hook threads and, on each tick, gives up on those past the bound."""

    def __init__(self) -> None:
        self._settings = HooksSettings()
        self._functions: Mapping[str, Callable] = {}
        self._pending: list[_Call] = []
        self._last: dict[str, threading.Thread] = {}   # each job's latest hook call

    def configure(self, config: Config, functions: Mapping[str, Callable]) -> None:
        """This config's hooks (functions: resolve_hooks(config)) from now on: at
        start-up and at each applied reload."""
        self._functions = functions
        self._settings = config.hooks or HooksSettings()

    def _hook_for(self, job, kind: str) -> str | None:
        own = job.hooks.get(kind) if job is not None and job.hooks is not None else None
        return own or self._settings.get(kind)

    # --- the observer ----------------------------------------------------------

    def run_started(self, run, runtime) -> None:
        self._call(run.job, "on_start", RunStart(run.job.name, run.run_id, run.scheduled))

    def run_finished(self, run, result) -> None:
        outcome = result.outcome.value
        kind = "on_success" if outcome == "success" else \
            "on_failure" if outcome in FAILED_OUTCOMES else None
        if kind is not None:
            self._call(run.job if run is not None else None, kind, result)

    def _call(self, job, kind: str, result) -> None:
        call = self._hook_for(job, kind)
        function = self._functions.get(call) if call else None
        if function is None:
            return
        what = f"job={result.job} hook {kind} {call}"
        previous = self._last.get(result.job)
        thread = threading.Thread(target=_call_hook,
                                  args=(function, result, what, previous,
                                        self._settings.timeout),
                                  name=f"hook-{result.job}", daemon=True)
        thread.start()
        self._last[result.job] = thread
        self._pending.append(_Call(thread, time.monotonic(), what, result.job))

    def tick(self) -> None:
        self._give_up_late(time.monotonic())

    def _give_up_late(self, now: float) -> None:
        still = []
        for call in self._pending:
            if not call.thread.is_alive():
                continue
            if now - call.started > self._settings.timeout:
                log.error("%s still running after %gs (hooks.timeout): abandoned; the "
                          "run's outcome stands", call.what, self._settings.timeout,
                          extra={"job": call.job})
            else:
                still.append(call)
        self._pending = still

    def wait(self) -> None:
        """Before exit: let running hooks finish, each up to the bound."""
        for call in list(self._pending):
            left = call.started + self._settings.timeout - time.monotonic()
            if left > 0:
                call.thread.join(left)
        self._give_up_late(time.monotonic() + self._settings.timeout + 1)


def _call_hook(function: Callable, result, what: str,
               previous: threading.Thread | None, bound: float) -> None:
    if previous is not None:    # the job's hooks in order: its start hook first
        previous.join(bound)
    try:
        function(result)
    except BaseException as exc:  # a hook's failure is only logged (SystemExit too)
        log.error("%s raised %s: %s; the run's outcome stands", what,
                  type(exc).__name__, exc, exc_info=exc, extra={"job": result.job})
