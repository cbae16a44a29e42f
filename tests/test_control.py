"""Controlling a running daemon through the CLI (worker.control): --run-now, --pause,
--resume, --status and --list, with real daemons, a real Unix socket and another
real uid."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_app import silent_database  # noqa: F401  (a fixture)
from tests.test_daemon import write_config

NOBODY = 65534


def cli(config: Path, *args: str, as_uid: int | None = None) -> subprocess.CompletedProcess:
    if as_uid is not None:
        return _cli_as(as_uid, config, *args)
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def interrupted(config: Path, args: list[str], waits, env: dict | None = None) -> \
        tuple[int, str]:
    """Ctrl-C on the command line once `waits()` says it waits for its answer: its
    exit code and stderr."""
    caller = subprocess.Popen([sys.executable, str(ROOT / "run_worker.py"), "-c", str(config),
                               *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert waits(), "the command did not come to wait"
        caller.send_signal(signal.SIGINT)
        _, err = caller.communicate(timeout=20)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    return caller.returncode, err


def yearly_jobs(name: str, seconds: float | None = None) -> str:
    """A job `yearly` (not due for months) recording its runs under `name`."""
    extra = f", seconds: {seconds}" if seconds is not None else ""
    return f"""\
        - {{name: yearly, call: 'tests.jobfuncs:record_control_run', cron: '0 0 1 1 *',
            kwargs: {{name: {name}{extra}}}}}
        """


def _cli_as(uid: int, config: Path, *args: str) -> subprocess.CompletedProcess:
    """The command line run as `uid` in a forked child of this process: the
    checkout and its virtual environment may sit where another uid cannot read
    (a 0700 folder), so the child runs on the code this process has imported."""
    import importlib
    import io
    import pkgutil
    import worker
    import worker.cli as worker_cli
    from worker.app import load_config
    for module in pkgutil.walk_packages(worker.__path__, "worker."):  # all in memory
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    load_config(str(config))
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:        # the child: never returns into pytest
        code = 70
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", 0), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", 0), write_through=True)
            code = worker_cli.main(["-c", str(config), *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: B036  anything, as a nonzero exit
            import traceback
            traceback.print_exc()
        finally:
            from worker.logs import flush_logs
            flush_logs()
            os._exit(code)
    os.close(out_write)
    os.close(err_write)
    with os.fdopen(out_read) as out, os.fdopen(err_read) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), stdout,
                                       stderr)


def runs(url: str, name: str, after: float = 0.0) -> list[float]:
    """When the runs of tests.jobfuncs:record_control_run named `name` started."""
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(text(
                "SELECT at FROM worker_test_control_runs WHERE name = :n AND at >= :t "
                "ORDER BY at"), {"n": name, "t": after})]
    finally:
        engine.dispose()


@pytest.fixture
def control_runs(db_url):
    """db_url, with the runs table of these tests."""
    from sqlalchemy import create_engine, text
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS worker_test_control_runs"))
        connection.execute(text("CREATE TABLE worker_test_control_runs "
                                "(name VARCHAR(64) NOT NULL, at DOUBLE PRECISION NOT NULL)"))
    engine.dispose()
    return db_url


def token() -> str:
    """A name for the runs of one test: other helpers' tests share the runs table."""
    return f"ctl-{uuid.uuid4().hex[:10]}"


def test_run_now_runs_once_and_is_refused_with_75_while_its_run_goes_on(
        control_runs, tmp_path, daemons):
    db_url = control_runs
    name = token()
    config = write_config(tmp_path / "jobs.yaml", db_url, yearly_jobs(name, seconds=8))
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    time.sleep(0.5)
    assert runs(db_url, name) == []             # not due for months
    started = cli(config, "--run-now", "yearly")
    assert started.returncode == 0, started.stderr
    assert "run started" in started.stdout
    again = cli(config, "--run-now", "yearly")  # the first run is in its 8 s
    assert again.returncode == 75, again.stderr
    assert "in progress" in again.stderr
    status = cli(config, "--status")
    assert status.returncode == 0, status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()
            if line.startswith("yearly")] == [["yearly", "running"]]
    daemon.wait_for("job=yearly attempt=1/3 succeeded")
    assert len(runs(db_url, name)) == 1
    assert cli(config, "--run-now", "yearly").returncode == 0     # free again
    daemon.wait_for("job=yearly attempt=1/3 succeeded", count=2)
    assert len(runs(db_url, name)) == 2
    status = cli(config, "--status")
    assert "yearly  idle" in status.stdout and "success at" in status.stdout
    assert daemon.stop() == 0


def test_pause_holds_across_a_reload_and_a_restart_until_resumed(control_runs, tmp_path,
                                                                  daemons):
    db_url = control_runs
    name = token()
    config = write_config(tmp_path / "jobs.yaml", db_url, f"""\
        - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
            kwargs: {{name: {name}}}}}
        """)
    config.write_text(config.read_text() + "metrics:\n  port: 0\n")
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    daemon.wait_for("job=tick attempt=1/3 succeeded")
    paused = cli(config, "--pause", "tick")
    assert paused.returncode == 0, paused.stderr
    since = time.time() + 1.0                  # a pause takes effect within 1 s
    time.sleep(2.5)
    assert runs(db_url, name, after=since) == []
    listed = cli(config, "--list")
    assert "from the running daemon" in listed.stderr
    assert "paused" in [line for line in listed.stdout.splitlines()
                        if line.startswith("tick")][0]
    port = int(daemon.log.split("monitoring on http://127.0.0.1:")[1].split("/")[0])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'run_worker_job_paused{job_name="tick"} 1.0' in metrics
    status_page = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
    assert ">paused</span>" in status_page

    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded")
    time.sleep(2)
    assert runs(db_url, name, after=since) == []
    assert daemon.stop() == 0

    daemon = daemons(config)
    daemon.wait_for("daemon started")
    # Logged once the control socket is up, just after the start-up line (which is
    # written at once, the INFO lines after it within 0.1 s).
    daemon.wait_for("paused jobs (until --resume): tick")
    time.sleep(2)
    assert runs(db_url, name, after=since) == []
    status = cli(config, "--status")
    assert "tick  paused" in status.stdout, status.stdout
    resumed = cli(config, "--resume", "tick")
    assert resumed.returncode == 0, resumed.stderr
    back = time.time()
    time.sleep(2.5)
    assert len(runs(db_url, name, after=back)) >= 1
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_daemon_is_69_and_an_unknown_job_is_2(db_url, tmp_path, daemons):
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        - {name: other, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    for args in (["--status"], ["--run-now", "tick"], ["--pause", "tick"]):
        done = cli(config, *args)
        assert done.returncode == 69, (args, done.stderr)
        assert "no daemon answers" in done.stderr
    assert "computed now (no daemon answers" in cli(config, "--list").stderr
    assert cli(config, "--run-now", "nope").returncode == 2
    daemon = daemons(config, "--job", "tick")
    daemon.wait_for("daemon started")
    assert cli(config, "--pause", "nope").returncode == 2
    outside = cli(config, "--run-now", "other")     # in the config, not this daemon's
    assert outside.returncode == 2 and "not one of its --job" in outside.stderr
    assert daemon.stop() == 0
    # A socket left behind by a daemon that died is taken over by the next one.
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    daemon.process.kill()
    daemon.wait()
    assert cli(config, "--status").returncode == 69
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--status").returncode == 0
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_another_uid_is_refused_with_77_even_through_a_loosened_socket(backend):
    """The client runs as `nobody` (we are root): refused by the socket's mode, and,
    with the mode loosened by hand, by the daemon's peer-credential check."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    # Readable by nobody (pytest's tmp_path is not, nor maybe the checkout's
    # folder); a lock dir path beyond the 108 bytes a socket path may have.
    base = Path(tempfile.mkdtemp(prefix="control-test-"))
    try:
        os.chmod(base, 0o755)
        lock_dir = base / ("d" * 60) / ("e" * 60)
        config = write_config(base / "jobs.yaml", f"sqlite:///{base / 'd.db'}", """\
            - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
            """, lock_dir=str(lock_dir))
        os.chmod(config, 0o644)
        from tests.processes import Daemon
        daemon = Daemon(config)
        try:
            daemon.wait_for("daemon started")
            # The socket is bound just after that line: wait for it, not a race.
            deadline = time.monotonic() + 30
            while not (sockets := [p for p in lock_dir.iterdir()
                                   if p.name.endswith(".control")]) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(sockets) == 1 and len(str(sockets[0])) > 108
            info = sockets[0].lstat()
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_uid == os.geteuid()
            assert cli(config, "--status").returncode == 0     # root: allowed
            for path in (lock_dir.parent, lock_dir):
                os.chmod(path, 0o711)
            refused = cli(config, "--pause", "tick", as_uid=NOBODY)
            assert refused.returncode == 77, refused.stderr
            os.chmod(sockets[0], 0o666)
            for _ in range(3):      # the daemon refuses at once: the caller reads why
                refused = cli(config, "--pause", "tick", as_uid=NOBODY)
                assert refused.returncode == 77, refused.stderr
                assert "only the daemon's user or root" in refused.stderr
            assert "refused a caller with uid 65534" in daemon.log
            status = cli(config, "--status")
            assert "tick  idle" in status.stdout     # the pause did not happen
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base)


# --- the socket under stress: callers that give up, floods, silence, failures ----------

def control_paths(config: Path) -> tuple[Path, str, str]:
    """(lock directory, socket name, paused-jobs file name) of `config`'s daemon."""
    from worker.app import load_config
    from worker.control import control_files
    return control_files(load_config(str(config))[0])


class RawCaller:
    """A caller on the daemon's socket without the command line: connects through
    the lock directory's descriptor (the path may be too long for a socket)."""

    def __init__(self, config: Path) -> None:
        directory, self.name, _ = control_paths(config)
        self.dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        self.opened: list[socket.socket] = []

    def connect(self, blocking: bool = True) -> socket.socket:
        caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        caller.setblocking(blocking)
        if blocking:
            caller.settimeout(20)
        caller.connect(f"/proc/self/fd/{self.dir_fd}/{self.name}")
        self.opened.append(caller)
        return caller

    def fill_backlog(self) -> None:
        """Connect until the socket's queue is full (the daemon stopped: nobody
        accepts)."""
        for _ in range(2000):
            try:
                self.connect(blocking=False)
            except BlockingIOError:
                return
        pytest.fail("the backlog never filled")

    def ask(self, command: str, job: str | None = None) -> dict:
        caller = self.connect()
        caller.sendall(json.dumps({"command": command, "job": job}).encode() + b"\n")
        return json.loads(caller.makefile("rb").readline())

    def close(self) -> None:
        for caller in self.opened:
            caller.close()
        os.close(self.dir_fd)


def still_open(connection: socket.socket) -> bool:
    """The daemon has not closed its side of `connection` (nor sent anything)."""
    connection.setblocking(False)
    try:
        return connection.recv(1) != b""
    except BlockingIOError:
        return True


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_run_now_whose_caller_was_told_69_never_runs(control_runs, tmp_path, daemons,
                                                       silent_database):
    """The loop thread is held by a reload whose new database never answers; the
    caller is told 69 after the daemon's wait (1 s here). Before: the request stayed
    queued and the loop started the run once the reload gave up; an operator told
    "no daemon answers" found the run had happened."""
    db_url = control_runs
    name = token()
    jobs = yearly_jobs(name)
    config = write_config(tmp_path / "jobs.yaml", db_url, jobs)
    original = config.read_text()
    daemon = daemons(config, env={"RUN_WORKER_CONTROL_WAIT": "1"})
    daemon.wait_for("daemon started")
    url, silent = silent_database
    write_config(config, url, jobs)
    daemon.signal(signal.SIGHUP)
    held, _ = silent.accept()             # the loop waits in the reload's check
    config.write_text(original)           # the command line reads this one
    try:
        told = cli(config, "--run-now", "yearly")
        assert told.returncode == 69, told.stderr
        assert "nothing was done" in told.stderr
    finally:
        held.close()                      # the check fails: the loop turns again
    daemon.wait_for("reload rejected")
    daemon.wait_for("control command run-now yearly not carried out: its caller "
                    "stopped waiting")
    status = cli(config, "--status")      # a turn of the loop after the reload
    assert status.returncode == 0, status.stderr
    assert runs(db_url, name) == []
    assert "run-now: started" not in daemon.log
    assert cli(config, "--run-now", "yearly").returncode == 0    # the daemon is fine
    daemon.wait_for("job=yearly attempt=1/3 succeeded")
    assert len(runs(db_url, name)) == 1
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_full_backlog_is_69_and_a_clear_message_not_a_traceback(db_url, tmp_path,
                                                                  daemons):
    """The daemon stopped (SIGSTOP) while callers fill its socket's backlog: the
    next caller is told 69. Before: a BlockingIOError traceback, exit 1."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    raw = RawCaller(config)
    daemon.signal(signal.SIGSTOP)
    try:
        raw.fill_backlog()
        done = cli(config, "--status")
        assert done.returncode == 69, done.stderr
        assert "Traceback" not in done.stderr
        assert "no daemon answers" in done.stderr and "busy" in done.stderr, done.stderr
    finally:
        raw.close()
        daemon.signal(signal.SIGCONT)
    status = cli(config, "--status")
    assert status.returncode == 0, status.stderr
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_silent_caller_holds_up_no_other(db_url, tmp_path, daemons):
    """A caller that connects and sends nothing: another is answered meanwhile.
    Before: the one socket thread read the silent caller until its 5 s timeout, and
    only then the next (the silent one was closed by then)."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    raw = RawCaller(config)
    try:
        silent = [raw.connect() for _ in range(3)]
        answer = raw.ask("status")
        assert answer["code"] == 0 and answer["jobs"][0]["name"] == "tick"
        assert all(still_open(connection) for connection in silent)
        status = cli(config, "--status")
        assert status.returncode == 0, status.stderr
    finally:
        raw.close()
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_command_failing_in_the_daemon_is_one_log_line_and_69(db_url, tmp_path,
                                                               daemons):
    """The paused-jobs file cannot be written (a directory stands in its place):
    --pause fails in the daemon. Before: a traceback in the daemon's log."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    directory, _, paused_name = control_paths(config)
    (directory / paused_name).unlink()
    (directory / paused_name).mkdir()
    done = cli(config, "--pause", "tick")
    assert done.returncode == 69, done.stderr
    assert "the daemon could not carry out pause tick: OperationalError" in done.stderr
    assert "Traceback" not in done.stderr
    failed = [line for line in daemon.log.splitlines() if "control command" in line]
    assert len(failed) == 1 and "control command pause tick failed: OperationalError" \
        in failed[0], daemon.log
    assert "Traceback" not in daemon.log
    assert "tick  idle" in cli(config, "--status").stdout
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_socket_answers_as_soon_as_the_daemon_says_it_started(db_url, tmp_path,
                                                                  daemons):
    """The paused-jobs file is held by another process for a while at start-up.
    Before: "daemon started" (and READY) came first, the socket only once the file
    could be read, so a caller right after start-up was told 69."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    directory, _, paused_name = control_paths(config)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    holder = sqlite3.connect(directory / paused_name, isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        holder.rollback()
        holder.close()

    # Let go of within the daemon's 5 s wait for the file, after its start-up.
    releaser = threading.Timer(3, release)
    daemon = daemons(config)
    releaser.start()
    try:
        daemon.wait_for("daemon started")
        status = cli(config, "--status")
    finally:
        releaser.join()
    assert status.returncode == 0, status.stderr
    assert "tick  idle" in status.stdout
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_run_now_sent_to_a_stopped_daemon_never_runs_once_its_caller_gave_up(
        control_runs, tmp_path, daemons):
    """The daemon is stopped (SIGSTOP) while a --run-now waits: the kernel keeps the
    connection and the request for it, the caller gives up (69, 15 s) and hangs up.
    At SIGCONT the daemon reads the request. Before: the loop started the run at
    once (its caller's thread looked for the hang-up only after 0.2 s), a run an
    operator had been told did not happen."""
    db_url = control_runs
    name = token()
    config = write_config(tmp_path / "jobs.yaml", db_url, yearly_jobs(name))
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--status").returncode == 0
    daemon.signal(signal.SIGSTOP)
    try:
        told = cli(config, "--run-now", "yearly")
    finally:
        daemon.signal(signal.SIGCONT)
    assert told.returncode == 69, told.stderr
    assert "Traceback" not in told.stderr
    daemon.wait_for("control command run-now yearly not carried out: its caller "
                    "stopped waiting")
    assert cli(config, "--status").returncode == 0      # a turn of the loop since
    assert runs(db_url, name) == []
    assert "run-now: started" not in daemon.log
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_malformed_request_is_2_and_no_traceback(db_url, tmp_path, daemons):
    """Requests from the daemon's own user that are not what the command line sends:
    deeply nested JSON, not UTF-8, JSON of the wrong shape. Before: the nested one
    raised RecursionError on the caller's thread, a CRITICAL line and a traceback
    in the log, and the caller's connection reset."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--status").returncode == 0
    raw = RawCaller(config)
    try:
        for request in (b"[" * 50_000 + b"\n", b"\xff\xfe\n", b'"status"\n', b"[1]\n",
                        b'{"job": "tick"}\n'):
            caller = raw.connect()
            caller.sendall(request)
            answer = json.loads(caller.makefile("rb").readline())
            assert answer == {"code": 2, "message": "not a request"}, request[:20]
        assert raw.ask("status")["code"] == 0
    finally:
        raw.close()
    assert "Traceback" not in daemon.log and "CRITICAL" not in daemon.log, daemon.log
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_ctrl_c_while_a_command_waits_is_130_one_line_and_nothing_done(
        control_runs, tmp_path, daemons):
    """Ctrl-C on a --run-now waiting for a stopped daemon. Before: a KeyboardInterrupt
    traceback and exit 1."""
    db_url = control_runs
    name = token()
    config = write_config(tmp_path / "jobs.yaml", db_url, yearly_jobs(name))
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--status").returncode == 0
    daemon.signal(signal.SIGSTOP)
    try:
        # After 2 s: connected, sent, waiting for the answer.
        code, err = interrupted(config, ["--run-now", "yearly"], lambda: time.sleep(2) or True)
    finally:
        daemon.signal(signal.SIGCONT)
    assert code == 130, err
    assert err.startswith("run-worker: interrupted") and len(err.splitlines()) == 1, err
    daemon.wait_for("control command run-now yearly not carried out")
    assert cli(config, "--status").returncode == 0
    assert runs(db_url, name) == []
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_second_daemon_starts_beside_a_stopped_one_whose_socket_queue_is_full(
        db_url, tmp_path, daemons):
    """Daemon A is stopped (SIGSTOP) with its socket's queue of callers full; B starts
    for the same config. Before: B's check for a stale socket (a blocking connect)
    waited for room in A's queue: B hung before 'daemon started', deaf to SIGTERM,
    until A ran again."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}
        """)
    first = daemons(config)
    first.wait_for("daemon started")
    assert cli(config, "--status").returncode == 0
    raw = RawCaller(config)
    first.signal(signal.SIGSTOP)
    try:
        raw.fill_backlog()
        second = daemons(config)
        second.wait_for("daemon started", timeout=20)
        assert "another daemon answers on its control socket" in second.log
        assert second.stop() == 0
    finally:
        raw.close()
        first.signal(signal.SIGCONT)
    assert cli(config, "--status").returncode == 0      # A's socket stayed
    assert first.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_pause_holds_at_start_up_while_the_paused_jobs_file_cannot_be_read(
        control_runs, tmp_path, daemons):
    """The paused-jobs file is held by another process (an exclusive transaction)
    for longer than the daemon's 5 s wait for it at start-up. Before: the daemon
    ran without pauses and without a control socket for its whole life ('no control
    socket or paused jobs'): the paused job ran every second."""
    db_url = control_runs
    name = token()
    config = write_config(tmp_path / "jobs.yaml", db_url, f"""\
        - {{name: tick, call: 'tests.jobfuncs:record_control_run', every: 1s,
            kwargs: {{name: {name}}}}}
        """)
    daemon = daemons(config)
    daemon.wait_for("daemon started")
    assert cli(config, "--pause", "tick").returncode == 0
    assert daemon.stop() == 0
    directory, _, paused_name = control_paths(config)
    holder = sqlite3.connect(directory / paused_name, isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        since = time.time()
        daemon = daemons(config)
        daemon.wait_for("daemon started", timeout=30)
        time.sleep(8)
        status = cli(config, "--status")         # the socket answers meanwhile
        assert status.returncode == 0, status.stderr
        # ...and says that the scheduled runs are held (before: nothing did, and
        # /readyz said ok: test_monitoring).
        assert "held: the paused jobs in" in status.stdout, status.stdout
        assert "no scheduled run starts" in status.stdout
        until = time.time()
    finally:
        holder.rollback()
        holder.close()
    assert runs(db_url, name, after=since) == [], daemon.log
    daemon.wait_for("paused jobs (until --resume): tick")
    assert "tick  paused" in cli(config, "--status").stdout
    time.sleep(1.5)
    assert runs(db_url, name, after=since) == []
    assert cli(config, "--resume", "tick").returncode == 0
    back = time.time()
    time.sleep(2.5)
    assert runs(db_url, name, after=back)
    assert until > since
    assert daemon.stop() == 0


def test_a_default_lock_directory_made_by_another_user_is_not_talked_to(tmp_path,
                                                                          monkeypatch):
    """Another local user (uid 12345 here) made the default lock directory of the
    caller (nobody: no lock_dir in the config, XDG_RUNTIME_DIR a shared folder, as
    /tmp is) and listens there. Before: the caller sent it its command and printed
    its answer, 'job tick paused', exit 0, with nothing paused anywhere."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    from worker.app import load_config
    from worker.control import control_files
    base = Path(tempfile.mkdtemp(prefix="control-test-"))
    try:
        os.chmod(base, 0o1777)                  # a shared folder, as /tmp
        config = base / "jobs.yaml"
        config.write_text(f'database:\n  url: "sqlite:///{base / "d.db"}"\njobs:\n'
                          "  - {name: tick, call: 'tests.jobfuncs:noop', every: 1h}\n")
        os.chmod(config, 0o644)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
        planted = base / f"run-worker-{NOBODY}"
        planted.mkdir(mode=0o755)
        name = control_files(load_config(str(config))[0])[1]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(planted / name))
        os.chmod(planted / name, 0o777)
        os.chown(planted / name, 12345, 12345)
        os.chown(planted, 12345, 12345)
        listener.listen(5)
        listener.settimeout(0.2)
        asked: list[bytes] = []

        def answer() -> None:       # as a daemon would, for anyone
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not asked[-1:] == [b"stop"]:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                with connection:
                    asked.append(connection.recv(1000))
                    connection.sendall(b'{"code": 0, "message": "job tick paused"}\n')

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        try:
            done = cli(config, "--pause", "tick", as_uid=NOBODY)
        finally:
            asked.append(b"stop")
            server.join(5)
            listener.close()
        assert done.returncode == 69, (done.stdout, done.stderr)
        assert "paused" not in done.stdout
        assert "owned by uid 12345" in done.stderr and "refusing" in done.stderr, \
            done.stderr
        assert asked == [b"stop"]               # it was told nothing
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_status_and_list_of_a_daemon_with_many_jobs(db_url, tmp_path, daemons):
    """600 jobs: the daemon's --status answer is about 130 KB. Before: the command
    line read at most 64 KiB of it (the bound of a request) and died on the cut
    JSON, a traceback and exit 1, for --status and --list alike."""
    config = write_config(tmp_path / "jobs.yaml", db_url, "".join(
        f"- {{name: job-{i:04d}, call: 'tests.jobfuncs:noop', every: 1h}}\n"
        for i in range(600)))
    daemon = daemons(config)
    daemon.wait_for("daemon started", timeout=60)
    status = cli(config, "--status")
    assert status.returncode == 0, status.stderr[-2000:]
    assert len([line for line in status.stdout.splitlines()
                if line.startswith("job-")]) == 600
    listed = cli(config, "--list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "from the running daemon" in listed.stderr
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_ctrl_c_while_the_daemons_answer_is_in_flight_tells_that_the_run_started(
        db_url, tmp_path):
    """Ctrl-C on a --run-now just as the daemon starts the run (it acted while its
    caller was still connected; its answer is on the way). A stand-in for the daemon
    answers 1 s after the request, the Ctrl-C comes at 0.5 s. Before: the command
    closed the socket and said 'run-now yearly is not carried out unless it was
    already', never reading the answer: the run had started, the caller was not
    told. Now it hangs up its side (the daemon acts on nothing more) and reads what
    the daemon had already answered."""
    config = write_config(tmp_path / "jobs.yaml", db_url, """\
        - {name: yearly, call: 'tests.jobfuncs:noop', cron: '0 0 1 1 *'}
        """)
    directory, name, _ = control_paths(config)
    directory.mkdir(mode=0o700, exist_ok=True)
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"/proc/self/fd/{dir_fd}/{name}")
    listener.listen(1)
    listener.settimeout(30)
    requests = []

    def stand_in():
        connection, _ = listener.accept()
        with connection:
            requests.append(connection.recv(4096))
            time.sleep(1.0)                 # the run started: the answer follows
            connection.sendall(b'{"code": 0, "message": "job yearly: run started"}\n')
            connection.settimeout(10)
            connection.recv(1)              # until the caller closes

    daemon = threading.Thread(target=stand_in, daemon=True)
    daemon.start()
    try:
        code, err = interrupted(config, ["--run-now", "yearly"],
                                lambda: wait_until_true(lambda: requests, 20)
                                and not time.sleep(0.3))
        daemon.join(20)
    finally:
        listener.close()
        os.close(dir_fd)
    assert code == 130, err
    assert len(err.splitlines()) == 1, err
    assert "interrupted" in err and "job yearly: run started" in err, err


def wait_until_true(condition, timeout: float) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if condition():
            return True
        time.sleep(0.02)
    return False
