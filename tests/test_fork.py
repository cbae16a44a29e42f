"""Issue 10 item 4: a job that calls os.fork(). The child must not run the worker's
signal handlers nor use the parent's pooled connections; the parent's connections
and pool go on working. Real forks, in the real worker (`--once`), on SQLite and
MariaDB."""
from __future__ import annotations

import json
import textwrap

from sqlalchemy import create_engine, text

from tests.test_cli import worker


def write_config(tmp_path, url: str, jobs: str):
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(f"""\
        database:
          url: "{url}"
          pool_size: 2
        worker:
          max_workers: 2
          lock_dir: "{tmp_path / 'locks'}"
        retry:
          attempts: 1
        jobs:
        """) + textwrap.indent(textwrap.dedent(jobs), "  "))
    return path


def counters(url: str) -> list[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(
                text("SELECT value FROM worker_test_counters ORDER BY value"))]
    finally:
        engine.dispose()


def drop_counters(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_counters"))
    engine.dispose()


def test_a_forked_child_ends_on_sigterm_and_never_uses_the_parents_connection(
        db_url, tmp_path):
    drop_counters(db_url)
    report = tmp_path / "fork"
    config = write_config(tmp_path, db_url, f"""\
        - {{name: forker, call: 'tests.jobfuncs:fork_child', kwargs: {{report: "{report}"}}}}
        - name: later
          call: tests.jobfuncs:wait_then_insert
          kwargs: {{path: "{report}.parent", value: 2}}
        """)
    try:
        done = worker("-c", str(config), "--once")
        assert done.returncode == 0, done.stderr
        child = json.loads((tmp_path / "fork.child").read_text())
        parent = json.loads((tmp_path / "fork.parent").read_text())
        print(f"\nchild {child}\nparent {parent}")
        assert child["new_session"] != parent["before"]      # the child's own connection
        assert child["parent_session"].startswith("refused: ParentConnection")
        assert parent["child"] == "signal 15"                 # SIGTERM ended the child
        assert parent["ended_in"] < 5
        assert parent["after"] == parent["before"]            # the parent's still works
        assert counters(db_url) == [1, 2]                     # and commits; so does the pool
        assert done.stdout.count("job(s):") == 1
        assert "2 job(s): 2 succeeded, 0 failed" in done.stdout
    finally:
        drop_counters(db_url)


def test_a_forked_child_that_returns_into_the_worker_ends_there(db_url, tmp_path):
    drop_counters(db_url)
    report = tmp_path / "fork"
    config = write_config(tmp_path, db_url, f"""\
        - name: forker
          call: tests.jobfuncs:fork_child
          kwargs: {{report: "{report}", child_returns: true}}
        """)
    try:
        done = worker("-c", str(config), "--once")
        assert done.returncode == 0, done.stderr
        parent = json.loads((tmp_path / "fork.parent").read_text())
        child = json.loads((tmp_path / "fork.child").read_text())
        assert parent["child"] == "exit 0"
        assert parent["after"] == parent["before"]
        assert f"a process the job forked (pid {child['pid']}) returned into the worker" \
            in done.stderr
        assert done.stdout.count("job(s):") == 1              # no second worker
        assert counters(db_url) == [1]                        # committed once, by the parent
    finally:
        drop_counters(db_url)
