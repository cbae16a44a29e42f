"""Hooks (worker.monitoring.hooks): on_start, the run_id a run's hooks share, the
failure's exception, their order; and the recipes of docs/monitoring.md run
against a local HTTP server standing in for Sentry and healthchecks.io."""
from __future__ import annotations

import os
import re
import textwrap
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT
from tests.test_cli import worker


def write_config(tmp_path, hooks: str, jobs: str):
    path = tmp_path / "jobs.yaml"
    path.write_text(f'database:\n  url: "sqlite:///{tmp_path / "h.db"}"\n'
                    f"worker:\n  lock_dir: {tmp_path / 'locks'}\n"
                    "retry:\n  attempts: 1\n"
                    f"hooks:\n{textwrap.indent(textwrap.dedent(hooks), '  ')}"
                    f"jobs:\n{textwrap.indent(textwrap.dedent(jobs), '  ')}")
    return path


def test_start_then_failure_hook_with_the_exception_and_one_run_id(tmp_path):
    out = tmp_path / "hooks.out"
    config = write_config(tmp_path, """\
        on_start: tests.jobfuncs:start_hook
        on_failure: tests.jobfuncs:end_hook
        on_success: tests.jobfuncs:end_hook
        """, """\
        - {name: bad, call: 'tests.jobfuncs:fail_with_value_error'}
        - {name: good, call: 'tests.jobfuncs:noop'}
        """)
    done = worker("-c", str(config), "--once", env={"HOOK_OUT": str(out)})
    assert done.returncode == 1, done.stderr
    lines = out.read_text().splitlines()
    for job, outcome, exception in (("bad", "failed", "ValueError"),
                                    ("good", "success", "-")):
        mine = [line.split(" ", 4) for line in lines if line.split()[1] == job]
        # The start hook sleeps 0.3 s: the end hook waited for it.
        assert [fields[0] for fields in mine] == ["start", outcome], lines
        assert mine[0][2] == mine[1][2] and uuid.UUID(mine[0][2]), lines
        assert mine[1][3] == exception, lines
    assert len({line.split()[2] for line in lines}) == 2      # one run_id per run


def test_a_job_own_on_start_hook_and_check_rejects_a_bad_one(tmp_path):
    out = tmp_path / "hooks.out"
    config = write_config(tmp_path, "timeout: 5s\n", """\
        - name: good
          call: tests.jobfuncs:noop
          hooks: {on_start: 'tests.jobfuncs:start_hook'}
        """)
    done = worker("-c", str(config), "--once", env={"HOOK_OUT": str(out)})
    assert done.returncode == 0, done.stderr
    assert out.read_text().startswith("start good ")
    config.write_text(config.read_text().replace("start_hook", "hook_with_two_args"))
    checked = worker("-c", str(config), "--check")
    assert checked.returncode == 78
    assert "hooks.on_start" in checked.stderr


class _Recorder(BaseHTTPRequestHandler):
    """Records each request: (method, path with query, body)."""

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path,
                                     self.rfile.read(length).decode()))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST = _record

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def service():
    """A local HTTP server standing in for Sentry or healthchecks.io."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def recipe(module: str) -> str:
    """The Python block of docs/monitoring.md that starts with `# <module>.py`."""
    text = (ROOT / "docs" / "monitoring.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(block for block in blocks if block.startswith(f"# {module}.py"))


def run_recipe(tmp_path, module: str, kinds: dict, env: dict) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / f"{module}.py").write_text(recipe(module))
    hooks = "".join(f"{kind}: {module}:{function}\n" for kind, function in kinds.items())
    config = write_config(tmp_path, hooks, """\
        - {name: bad, call: 'tests.jobfuncs:fail_with_value_error'}
        - {name: good, call: 'tests.jobfuncs:noop'}
        """)
    done = worker("-c", str(config), "--once", env={
        **env, "PYTHONPATH": os.pathsep.join([str(tmp_path / "recipes"), str(ROOT)])})
    assert done.returncode == 1, done.stderr
    assert " raised " not in done.stderr and "] hooks: " not in done.stderr, done.stderr


def test_the_healthchecks_recipe_pings_start_then_success_or_fail_with_rid(
        tmp_path, service):
    run_recipe(tmp_path, "healthchecks", {"on_start": "start", "on_success": "success",
                                          "on_failure": "fail"},
               {"HEALTHCHECKS_PING_URL": f"http://127.0.0.1:{service.server_port}/key"})
    for job, end in (("good", ""), ("bad", "/fail")):
        mine = [r for r in service.requests if r[1].startswith(f"/key/{job}")]
        assert [r[1].split("?")[0] for r in mine] == [f"/key/{job}/start", f"/key/{job}{end}"]
        rids = {re.search(r"rid=([0-9a-f-]+)", r[1]).group(1) for r in mine}
        assert len(rids) == 1 and uuid.UUID(rids.pop())
    fail = next(r for r in service.requests if r[1].startswith("/key/bad/fail"))
    assert fail[0] == "POST" and "ValueError" in fail[2]


def test_the_sentry_recipe_checks_in_progress_then_ok_or_error_with_one_id(
        tmp_path, service):
    url = f"http://127.0.0.1:{service.server_port}/api/7/cron/{{monitor}}/publickey/"
    run_recipe(tmp_path, "sentry_cron", {"on_start": "start", "on_success": "ok",
                                         "on_failure": "error"},
               {"SENTRY_CRONS_URL": url})
    for job, end in (("good", "ok"), ("bad", "error")):
        mine = [r for r in service.requests if r[1].startswith(f"/api/7/cron/{job}/")]
        assert [re.search(r"status=(\w+)", r[1]).group(1) for r in mine] == \
            ["in_progress", end]
        ids = {re.search(r"check_in_id=([0-9a-f-]+)", r[1]).group(1) for r in mine}
        assert len(ids) == 1 and uuid.UUID(ids.pop())
