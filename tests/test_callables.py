"""`call: "module:function"` is resolved and its arguments checked at load time."""
from __future__ import annotations

import os.path
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import jobfuncs
from tests.conftest import ROOT
from worker.callables import (CallableError, check_arguments, check_runs_body, resolve,
                              resolve_jobs)
from worker.config import Config, ConfigError, JobSpec, load


# --- resolve -----------------------------------------------------------------------

@pytest.mark.parametrize("call, expected", [
    ("tests.jobfuncs:touch", jobfuncs.touch),
    ("tests.jobfuncs:needs_two_args", jobfuncs.needs_two_args),
    ("os.path:join", os.path.join),                 # dotted module
    ("os:path.join", os.path.join),                 # dotted attribute
    ("pathlib:PurePath.with_name", pathlib.PurePath.with_name),  # attribute of a class
    ("tests.jobfuncs:Path", Path),                  # a class is callable too
], ids=["function", "function-2", "dotted-module", "dotted-attribute",
        "class-attribute", "class"])
def test_resolve(call, expected):
    assert resolve(call) is expected


@pytest.mark.parametrize("call, module", [
    ("tests.no_such_module:run", "tests.no_such_module"),
    ("no_such_package_xyz:run", "no_such_package_xyz"),
    ("no_such_package_xyz.sub.mod:run", "no_such_package_xyz"),
])
def test_resolve_missing_module(call, module):
    with pytest.raises(CallableError) as info:
        resolve(call)
    message = str(info.value)
    assert message.startswith(f"no module named {module!r}")
    assert "Python path" in message


BROKEN_MODULES = [
    # (id, source of the module, expected part of the message)
    ("missing-dependency", "import no_such_dependency_xyz\n",
     "failed: No module named 'no_such_dependency_xyz'"),
    ("raises", "raise RuntimeError('boom at import')\n",
     "failed: RuntimeError: boom at import"),
    ("syntax-error", "def broken(:\n", "failed: SyntaxError"),
    ("exits", "import sys\nsys.exit(3)\n", "failed: SystemExit: 3"),
]


@pytest.mark.parametrize("source, fragment", [(s, f) for _, s, f in BROKEN_MODULES],
                         ids=[i for i, _, _ in BROKEN_MODULES])
def test_a_module_whose_own_import_fails_is_not_reported_as_missing(
        source, fragment, tmp_path, monkeypatch):
    (tmp_path / "broken_jobs_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_jobs_module", raising=False)
    with pytest.raises(CallableError) as info:
        resolve("broken_jobs_module:run")
    message = str(info.value)
    assert message.startswith("importing 'broken_jobs_module' ")
    assert fragment in message
    assert "no module named 'broken_jobs_module'" not in message
    assert "broken_jobs_module" not in sys.modules


def test_a_good_temporary_module_resolves(tmp_path, monkeypatch):
    """The control for the broken modules above: same place, same name pattern."""
    (tmp_path / "good_jobs_module.py").write_text("def run(session):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        function = resolve("good_jobs_module:run")
        assert function(None) == 1
    finally:
        sys.modules.pop("good_jobs_module", None)


@pytest.mark.parametrize("call, fragment", [
    ("tests.jobfuncs:no_such_function",
     "module 'tests.jobfuncs' has no attribute 'no_such_function'"),
    ("os:path.no_such_function", "module 'os' has no attribute 'path.no_such_function'"),
])
def test_resolve_missing_attribute(call, fragment):
    with pytest.raises(CallableError, match="has no attribute") as info:
        resolve(call)
    assert str(info.value) == fragment


def test_resolve_not_callable():
    with pytest.raises(CallableError) as info:
        resolve("tests.jobfuncs:NOT_CALLABLE")
    assert str(info.value) == "'tests.jobfuncs:NOT_CALLABLE' is an int, not a function"


# --- check_arguments: the worker calls fn(session, **kwargs) ---------------------------

def only_session(session): ...
def with_defaults(session, a, b=2): ...
def any_kwargs(session, **kwargs): ...
def anything(*args, **kwargs): ...
def keyword_only(session, *, a): ...
def positional_only_session(session, /, a): ...
def no_session(): ...
def session_keyword_only(*, session): ...
def two_sessions(session, other): ...


class CallableObject:
    def __call__(self, session, limit=10): ...


ACCEPTED = [
    ("only-session", only_session, {}),
    ("required-kwarg", with_defaults, {"a": 1}),
    ("all-kwargs", with_defaults, {"a": 1, "b": 3}),
    ("var-kwargs-empty", any_kwargs, {}),
    ("var-kwargs", any_kwargs, {"x": 1, "y": 2}),
    ("var-args", anything, {"z": 1}),
    ("keyword-only", keyword_only, {"a": 1}),
    ("positional-only-session", positional_only_session, {"a": 1}),
    ("callable-object", CallableObject(), {"limit": 5}),
    ("lambda", lambda session, n=1: None, {"n": 2}),
    ("jobfuncs-touch", jobfuncs.touch, {"path": "/tmp/x"}),
    ("jobfuncs-two-args", jobfuncs.needs_two_args, {"a": 1, "b": 2}),
    ("builtin-without-signature", max, {}),   # nothing to check: let it be
]

REJECTED = [
    # (id, function, kwargs, expected part of the message)
    ("missing-kwarg", jobfuncs.needs_two_args, {"a": 1}, "missing a required argument: 'b'"),
    ("unexpected-kwarg", only_session, {"a": 1}, "unexpected keyword argument 'a'"),
    ("no-session-parameter", no_session, {}, "too many positional arguments"),
    ("session-keyword-only", session_keyword_only, {}, "too many positional arguments"),
    ("kwarg-is-the-session-parameter", with_defaults, {"session": 1, "a": 1},
     "multiple values for argument 'session'"),
    ("wrong-name", with_defaults, {"c": 1}, "missing a required argument: 'a'"),
    ("positional-only-by-name", positional_only_session, {"session": 1, "a": 1},
     "session"),
    ("two-positionals", two_sessions, {}, "missing a required argument: 'other'"),
]


@pytest.mark.parametrize("function, kwargs", [(f, k) for _, f, k in ACCEPTED],
                         ids=[i for i, _, _ in ACCEPTED])
def test_check_arguments_accepts(function, kwargs):
    check_arguments(function, kwargs)   # no exception


@pytest.mark.parametrize("function, kwargs, fragment", [(f, k, m) for _, f, k, m in REJECTED],
                         ids=[i for i, _, _, _ in REJECTED])
def test_check_arguments_rejects(function, kwargs, fragment):
    with pytest.raises(CallableError) as info:
        check_arguments(function, kwargs)
    message = str(info.value)
    assert message.startswith(f"cannot be called as fn(session, **kwargs) with kwargs "
                              f"{sorted(kwargs)}: ")
    assert fragment in message


# --- resolve_jobs ------------------------------------------------------------------------

def write(tmp_path: Path, jobs: str) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text("database:\n  url: sqlite:///w.db\njobs:\n" + textwrap.dedent(jobs))
    return path


def test_resolve_jobs_returns_every_function_by_job_name(tmp_path):
    config = load(write(tmp_path, """\
        - name: a
          call: tests.jobfuncs:touch
          kwargs: {path: /tmp/x}
        - name: b
          call: tests.jobfuncs:noop
          enabled: false
        """), environ={})
    assert resolve_jobs(config) == {"a": jobfuncs.touch, "b": jobfuncs.noop}


@pytest.mark.parametrize("call, kwargs, fragment", [
    ("tests.no_such_module:run", "{}", "no module named 'tests.no_such_module'"),
    ("tests.jobfuncs:nope", "{}", "has no attribute 'nope'"),
    ("tests.jobfuncs:NOT_CALLABLE", "{}", "not a function"),
    ("tests.jobfuncs:needs_two_args", "{a: 1}", "missing a required argument: 'b'"),
], ids=["missing-module", "missing-attribute", "not-callable", "bad-kwargs"])
def test_resolve_jobs_names_the_job_and_key_call(call, kwargs, fragment, tmp_path):
    path = write(tmp_path, f"""\
        - name: good
          call: tests.jobfuncs:noop
        - name: bad
          call: {call}
          kwargs: {kwargs}
        - name: also-bad
          call: tests.no_such_module_either:run
        """)
    config = load(path, environ={})
    with pytest.raises(ConfigError) as info:
        resolve_jobs(config)
    error = info.value
    assert (error.path, error.job, error.key, error.line) == (str(path), "bad", "call", 6)
    assert error.message.startswith(f"{call}: ")
    assert fragment in error.message
    assert str(error).startswith(f"{path}:6: job 'bad': key 'call': {call}: ")


def test_resolve_jobs_on_a_config_built_in_code():
    config = Config(path=Path("built.yaml"), database=None, worker=None, retry=None,
                    jobs=(JobSpec(name="x", call="tests.jobfuncs:nope"),))
    with pytest.raises(ConfigError) as info:
        resolve_jobs(config)
    assert str(info.value) == ("built.yaml: job 'x': key 'call': tests.jobfuncs:nope: "
                               "module 'tests.jobfuncs' has no attribute 'nope'")


def test_resolve_jobs_resolves_and_checks_each_distinct_call_once(tmp_path, monkeypatch):
    """A file of many jobs names a few functions many times: each is imported
    and its arguments checked once, and a bad argument set is still caught."""
    import worker.callables as callables
    resolved, checked = [], []
    real_resolve, real_check = callables.resolve, callables.check_arguments
    monkeypatch.setattr(callables, "resolve",
                        lambda call: resolved.append(call) or real_resolve(call))
    monkeypatch.setattr(callables, "check_arguments",
                        lambda f, kwargs: checked.append(sorted(kwargs)) or
                        real_check(f, kwargs))
    jobs = "".join(f"- name: touch-{i}\n  call: tests.jobfuncs:touch\n"
                   f"  kwargs: {{path: /tmp/{i}}}\n" for i in range(50))
    jobs += "".join(f"- name: noop-{i}\n  call: tests.jobfuncs:noop\n" for i in range(50))
    functions = resolve_jobs(load(write(tmp_path, jobs), environ={}))
    assert len(functions) == 100
    assert functions["touch-49"] is jobfuncs.touch and functions["noop-0"] is jobfuncs.noop
    assert resolved == ["tests.jobfuncs:touch", "tests.jobfuncs:noop"]
    assert checked == [["path"], []]

    jobs += "- name: bad\n  call: tests.jobfuncs:touch\n  kwargs: {paht: /tmp/x}\n"
    with pytest.raises(ConfigError, match=r"with kwargs \['paht'\]") as info:
        resolve_jobs(load(write(tmp_path, jobs), environ={}))
    assert info.value.job == "bad"


# --- Functions whose call does not run their body are refused (issue 10, item 3) ---------
# A generator function or a coroutine function, called as fn(session), returns a
# generator or a coroutine without running a line of its body: the worker saw the run
# "succeed" and nothing happened. `--check` (and every start) must refuse them with 78.

GENERATOR_REASON = ("is a generator function: the worker would get a generator back "
                    "and its body would never run")
COROUTINE_REASON = "is a coroutine function (async def)"
ASYNC_GENERATOR_REASON = "is an async generator function"

NOT_RUN_BY_A_CALL = [
    # (call, expected part of the message)
    ("tests.jobfuncs:generator_job", GENERATOR_REASON),
    ("tests.jobfuncs:async_job", COROUTINE_REASON),
    ("tests.jobfuncs:async_generator_job", ASYNC_GENERATOR_REASON),
    ("tests.jobfuncs:ASYNC_CALLABLE", COROUTINE_REASON),
    ("tests.jobfuncs:GENERATOR_CALLABLE", GENERATOR_REASON),
    ("tests.jobfuncs:GENERATOR_CALLABLE.__call__", GENERATOR_REASON),   # bound method
    ("tests.jobfuncs:PARTIAL_OF_GENERATOR", GENERATOR_REASON),
    ("tests.jobfuncs:PARTIAL_OF_ASYNC", COROUTINE_REASON),
    ("tests.jobfuncs:PARTIAL_OF_PARTIAL_OF_ASYNC_CALLABLE", COROUTINE_REASON),
]


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def write_job(tmp_path: Path, call: str) -> Path:
    return write(tmp_path, f"""\
        - name: good
          call: tests.jobfuncs:noop
        - name: bad
          call: "{call}"
          kwargs: {{path: "{tmp_path / 'ran'}"}}
        """)


@pytest.mark.parametrize("call, reason", NOT_RUN_BY_A_CALL,
                         ids=[c.split(":")[1] for c, _ in NOT_RUN_BY_A_CALL])
def test_check_refuses_a_job_whose_call_would_not_run_its_body(call, reason, tmp_path):
    path = write_job(tmp_path, call)
    done = run_worker("--check", "-c", str(path))
    assert done.returncode == 78, (done.stdout, done.stderr)
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"{path}:6: job 'bad': key 'call': {call}: " in done.stderr
    assert reason in done.stderr
    assert "OK" not in done.stdout


@pytest.mark.parametrize("call", ["tests.jobfuncs:generator_job", "tests.jobfuncs:async_job"])
def test_once_refuses_them_before_anything_runs(call, tmp_path):
    """Before the fix: exit 0, the job "succeeded", and its body never ran."""
    done = run_worker("--once", "-c", str(write_job(tmp_path, call)))
    assert done.returncode == 78, (done.stdout, done.stderr)
    assert "success" not in done.stdout
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("call", ["tests.jobfuncs:PLAIN_CALLABLE",
                                  "tests.jobfuncs:PARTIAL_OF_TOUCH"])
def test_a_plain_callable_object_and_a_partial_still_run(call, tmp_path):
    """The control: the same shapes around an ordinary function are accepted and run."""
    path = write_job(tmp_path, call)
    done = run_worker("--check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    done = run_worker("--once", "--job", "bad", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ran").read_text() == "ran"


@pytest.mark.parametrize("call, reason", NOT_RUN_BY_A_CALL,
                         ids=[c.split(":")[1] for c, _ in NOT_RUN_BY_A_CALL])
def test_check_runs_body_names_the_kind(call, reason):
    with pytest.raises(CallableError) as info:
        check_runs_body(resolve(call))
    assert str(info.value).startswith(reason)


def test_check_runs_body_lets_classes_builtins_and_plain_functions_be():
    for function in (jobfuncs.touch, jobfuncs.PLAIN_CALLABLE, jobfuncs.PARTIAL_OF_TOUCH,
                     jobfuncs.PlainCallable, Path, max, os.path.join):
        check_runs_body(function)   # no exception
