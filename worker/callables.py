"""Resolve "package.module:function" to the function, at load time.

A typo in a job's `call` must stop the worker before the first job starts, not
surface at 3 a.m. when that job first comes due.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping

from .config import Config

JobFunction = Callable[..., Any]


# How many partial / __call__ layers to look through: far more than any real job has.
_MAX_UNWRAP = 32


class CallableError(Exception):
    """`call` does not name a usable job function."""


def resolve(call: str) -> JobFunction:
    module_name, _, attr_path = call.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CallableError(f"no module named {exc.name!r} (is the package on "
                                f"the Python path? the worker adds the current "
                                f"directory)") from None
        raise CallableError(f"importing {module_name!r} failed: {exc}") from None
    except (Exception, SystemExit) as exc:  # the module itself is broken: show why
        # (SystemExit: a script's sys.exit() or argparse at import time must not
        # end the worker with the script's exit code instead of 78)
        raise CallableError(f"importing {module_name!r} failed: "
                            f"{type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CallableError(f"module {module_name!r} has no attribute "
                                f"{attr_path!r}") from None
    if not callable(target):
        kind = type(target).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise CallableError(f"{call!r} is {article} {kind}, not a function")
    return target


def check_arguments(function: JobFunction, kwargs: Mapping[str, Any]) -> None:
    """The worker calls function(session, **kwargs): make sure that call can bind."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature; let them be
    try:
        signature.bind(object(), **kwargs)
    except TypeError as exc:
        raise CallableError(f"cannot be called as fn(session, **kwargs) with kwargs "
                            f"{sorted(kwargs)}: {exc}") from None


def _called_function(function: JobFunction) -> Any:
    """What actually runs when the worker calls `function`: through partials (nested
    ones too) and into the __call__ of a callable object. A class is left as it is:
    calling it runs its constructor, which is an ordinary function."""
    for _ in range(_MAX_UNWRAP):   # bounded: a __call__ can be an odd object
        if isinstance(function, functools.partial):
            function = function.func
        elif (not inspect.isroutine(function) and not inspect.isclass(function)
              and callable(function)):
            function = type(function).__call__
        else:
            break
    return function


def check_runs_body(function: JobFunction) -> None:
    """Refuse a function whose call returns without running its body.

    The worker calls fn(session, **kwargs) and takes the return as the job's success.
    A generator or coroutine function returns a generator or coroutine object at once;
    nobody iterates or awaits it, so the job "succeeds" and nothing was done.
    (inspect's checks see through bound methods; `_called_function` adds partials and
    callable objects.)
    """
    called = _called_function(function)
    if inspect.isasyncgenfunction(called):
        raise CallableError("is an async generator function (async def with yield): the "
                            "worker would get an async generator back and its body would "
                            "never run; the worker calls jobs synchronously")
    if inspect.iscoroutinefunction(called):
        raise CallableError("is a coroutine function (async def): the worker would get a "
                            "coroutine back and its body would never run; the worker "
                            "calls jobs synchronously (wrap it: asyncio.run(...) in a "
                            "plain function)")
    if inspect.isgeneratorfunction(called):
        raise CallableError("is a generator function: the worker would get a generator "
                            "back and its body would never run")


def resolve_jobs(config: Config) -> dict[str, JobFunction]:
    """Every job's function, by job name; ConfigError on the first that fails.

    Each distinct `call` is resolved once, and each distinct (call, argument
    names) checked once: a file of many jobs names a few functions many times."""
    functions: dict[str, JobFunction] = {}
    resolved: dict[str, JobFunction] = {}
    checked: set[tuple[str, tuple[str, ...]]] = set()
    for job in config.jobs:
        try:
            function = resolved.get(job.call)
            if function is None:
                function = resolve(job.call)
                check_runs_body(function)
                resolved[job.call] = function
            arguments = (job.call, tuple(sorted(job.kwargs)))
            if arguments not in checked:
                check_arguments(function, job.kwargs)
                checked.add(arguments)
        except CallableError as exc:
            raise config.error(f"{job.call}: {exc}", job=job, key="call") from None
        functions[job.name] = function
    return functions

