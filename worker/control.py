"""Commands to a running daemon: `--run-now NAME`, `--pause NAME`, `--resume NAME`,
`--status`, and the daemon's own next run times for `--list`.

On one host the daemon listens on a Unix socket in its lock directory
(`worker.lock_dir`, else the user's default lock directory), named after the job
database like the lock file, so that two daemons on two databases do not meet.
The socket is the service user's, mode 0600, and each caller's peer credentials
(SO_PEERCRED) are checked: the daemon's user or root, else refused (77). It is
bound and reached through the directory's descriptor (/proc/self/fd/N/name), so
a deep lock directory does not run into the 108-byte limit of socket paths.
Never through the HTTP listener: that one has no authentication.

The socket's thread only accepts callers; each caller is read on a short-lived
thread of its own (at most MAX_CALLERS at once, each given READ_WITHIN seconds to
send its request), so that a silent caller holds up nobody. The request is handed
to the loop thread (it wakes the loop), which answers it (`ControlServer.answer`)
as it does a signal, so that no command races a run starting or a reload. A
command is acted on only while its caller still waits: once the caller has been
told 69 (the loop gave no answer within the wait) or has hung up, the loop drops
it (`Handoff`), so that an operator told "no answer" never finds it done later.

Paused jobs are kept in a small SQLite file beside the lock file: a pause holds
across restarts and reloads until resumed; a reload that moves the lock directory
moves the socket and the file (`Control.follow`).

In cluster mode there is no socket: the commands go through the cluster's
database, from any host (worker.control_cluster).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import sqlite3
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from .exitcodes import (EXIT_ALL_SKIPPED, EXIT_INTERRUPTED, EXIT_NOT_ALLOWED, EXIT_OK,
                        EXIT_UNAVAILABLE, EXIT_USAGE)

log = logging.getLogger("worker.control")

ANSWER_WITHIN = 10.0      # seconds a caller waits for the loop thread's answer
# The daemon's environment may shorten (or lengthen) that wait, in seconds.
ANSWER_WITHIN_ENV = "RUN_WORKER_CONTROL_WAIT"
MAX_REQUEST = 64 * 1024   # bytes: a request is one short JSON line
MAX_ANSWER = 256 * 1024 * 1024   # bytes: --status of 100,000 jobs is about 25 MB
READ_WITHIN = 5.0         # seconds a caller has to send its whole request
INTERRUPT_READ = 2.0      # seconds a caller interrupted reads an answer already given
PAUSES_WAIT = 5.0         # seconds to wait for the paused-jobs file when it is busy
PAUSES_RETRY = 1.0        # seconds between reads of a paused-jobs file not read at start
MAX_CALLERS = 16          # conversations at once; more are told 69 (busy) at once
BACKLOG = 64              # connections the kernel queues before accept
CONNECT_BUSY_WAIT = 2.0   # seconds a caller retries a socket whose backlog is full
COMMANDS = ("run-now", "pause", "resume", "status")


def _describe(exc: BaseException) -> str:
    from .errors import describe
    return describe(exc)


def control_files(config) -> tuple[Path, str, str]:
    """(lock directory, socket name, paused-jobs file name) for a config."""
    from .locks import database_scope, default_lock_dir
    directory = Path(config.worker.lock_dir) if config.worker.lock_dir \
        else default_lock_dir()
    scope = database_scope(config.database.url)
    return directory, f"{scope}.control", f"{scope}.paused.sqlite"


def _through(dir_fd: int, name: str) -> str:
    """A short path to `name` in the directory open as `dir_fd`."""
    return f"/proc/self/fd/{dir_fd}/{name}"


# --- paused jobs -------------------------------------------------------------------------

class PausedNames:
    """The paused job names as a container, answered from memory (by the loop and
    the metrics thread); `set` keeps the memory and the store in step."""
    _names: frozenset[str] = frozenset()
    known = True    # False: not read yet, any job may be paused (ClusterPausedJobs)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _remember(self, name: str, paused: bool) -> None:
        self._names = self._names | {name} if paused else self._names - {name}


class PausedJobs(PausedNames):
    """One host: the paused job names in a SQLite file, read once at start, written
    at each pause and resume."""

    def __init__(self, path: Path, wait: float = PAUSES_WAIT) -> None:
        """sqlite3.Error or OSError when the file cannot be used (`wait`: seconds
        for it while another process holds it)."""
        self.path = path
        # Created 0600 (by the service user, in its 0700 lock directory).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600))
        with sqlite3.connect(path, timeout=wait, isolation_level=None) as db:
            db.execute("CREATE TABLE IF NOT EXISTS paused_jobs "
                       "(name TEXT PRIMARY KEY, since REAL NOT NULL)")
            self._names = frozenset(row[0] for row in db.execute(
                "SELECT name FROM paused_jobs"))

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=PAUSES_WAIT, isolation_level=None)

    def replace(self, names) -> None:
        """Exactly these names paused (a reload moved the file here)."""
        with self._connect() as db:
            db.execute("DELETE FROM paused_jobs")
            db.executemany("INSERT INTO paused_jobs (name, since) VALUES (?, ?)",
                           [(name, time.time()) for name in names])
        self._names = frozenset(names)

    def set(self, name: str, paused: bool) -> None:
        with self._connect() as db:
            if paused:
                db.execute("INSERT OR REPLACE INTO paused_jobs (name, since) VALUES (?, ?)",
                           (name, time.time()))
            else:
                db.execute("DELETE FROM paused_jobs WHERE name = ?", (name,))
        self._remember(name, paused)


class UnreadPausedJobs(PausedNames):
    """One host: the paused-jobs file could not be read at start (held by another
    process past PAUSES_WAIT, an I/O error). Not `known`: which jobs are paused is
    not, so no scheduled run starts (ScheduleSource) until the loop thread reads
    it (`Control.answer`, every PAUSES_RETRY), rather than run a paused job."""
    known = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, name: str, paused: bool) -> None:
        raise OSError(f"the paused jobs in {self.path} could not be read yet")


# --- the daemon's side ----------------------------------------------------------------

class Control:
    """A daemon's commands: its paused jobs (set on the runtime), its control socket
    and, in cluster mode, its part in the cluster's commands (a
    worker.control_cluster.ClusterNode, whose database I/O has a thread of its
    own). Built on the main thread at start, before the daemon says it is ready;
    both turned by the loop thread (`loop.on_turn`), moved by a reload that changes
    the lock directory (`follow`), closed at the stop."""

    def __init__(self, loop, config) -> None:
        """OSError, sqlite3.Error or a DBAPIError when the pauses cannot be had."""
        self.files = control_files(config)
        directory, socket_name, paused_name = self.files
        runtime = loop.runtime
        self.clustered = runtime.cluster is not None
        self.server: ControlServer | None = None
        self.node = None
        if self.clustered:     # the commands come through the database, not a socket
            from .control_cluster import ClusterNode
            self.node = ClusterNode(loop)
            runtime.paused = self.node.paused
            loop.on_turn.append(self.node.turn)
        if self.clustered:      # logged by ClusterPausedJobs once it has read them
            return
        self._pauses_read_at = time.monotonic()
        try:
            runtime.paused = PausedJobs(directory / paused_name)
        except (OSError, sqlite3.Error) as exc:
            # The socket opens all the same: --status answers meanwhile.
            runtime.paused = UnreadPausedJobs(directory / paused_name)
            log.error("cannot read the paused jobs in %s: %s; no scheduled run starts "
                      "until they can be read", directory / paused_name, _describe(exc))
        if runtime.paused:
            log.info("paused jobs (until --resume): %s", ", ".join(sorted(runtime.paused)))
        try:
            self.server = ControlServer(directory, socket_name, loop.wake)
        except OSError as exc:
            log.error("no control socket in %s: %s; --run-now, --pause, --resume and "
                      "--status cannot reach this daemon", directory, exc)
        loop.on_turn.append(self.answer)

    def answer(self, loop) -> None:
        if not getattr(loop.runtime.paused, "known", True) and \
                time.monotonic() - self._pauses_read_at >= PAUSES_RETRY:
            self._read_pauses(loop.runtime)
        if self.server is not None:
            self.server.answer(loop)

    def _read_pauses(self, runtime) -> None:
        """On the loop thread: the paused-jobs file not read at start, again; held
        for a moment at most when another process still holds it."""
        self._pauses_read_at = time.monotonic()
        path = runtime.paused.path
        try:
            runtime.paused = PausedJobs(path, wait=0.05)
        except (OSError, sqlite3.Error) as exc:
            log.debug("paused jobs in %s still not read: %s", path, _describe(exc))
            return
        log.info("paused jobs read from %s: scheduled runs start again", path)
        if runtime.paused:
            log.info("paused jobs (until --resume): %s", ", ".join(sorted(runtime.paused)))

    def follow(self, loop, runtime) -> None:
        """After a reload, on the loop thread: when the new config's control files
        are elsewhere (a new lock_dir, or database), the socket is bound there and
        the paused-jobs file moved there, its pauses kept. If that fails, both stay
        where they were and the log says why."""
        if (runtime.cluster is not None) != self.clustered:
            log.warning("the reload %s a cluster section: the commands still go %s until "
                        "the daemon restarts", "removed" if self.clustered else "added",
                        "through the database" if self.clustered else "through the socket")
        if self.node is not None and runtime.cluster is not None \
                and runtime.cluster is not self.node.cluster:
            self.node.cluster_replaced(runtime.cluster)
        files = control_files(runtime.config)
        if self.clustered or files == self.files:
            return
        directory, socket_name, paused_name = files
        try:
            server = ControlServer(directory, socket_name, loop.wake)
        except OSError as exc:
            log.error("cannot move the control socket to %s: %s; it stays in %s",
                      directory, exc, self.files[0])
            return
        if not getattr(runtime.paused, "known", True):   # moving: "none paused" there
            server.close()
            log.error("cannot move the control socket to %s: the paused jobs in %s are "
                      "not read yet; both stay in %s", directory, runtime.paused.path,
                      self.files[0])
            return
        old_file = getattr(runtime.paused, "path", None)
        if old_file is not None:        # one host: the pauses move with the socket
            try:
                moved = PausedJobs(directory / paused_name)
                moved.replace(list(runtime.paused))
            except (OSError, sqlite3.Error) as exc:
                server.close()
                log.error("cannot move the paused jobs to %s: %s; they and the control "
                          "socket stay in %s", directory, exc, self.files[0])
                return
            runtime.paused = moved
            old_file.unlink(missing_ok=True)
        old, self.server, self.files = self.server, server, files
        if old is not None:
            old.answer(loop)        # what it was asked before the move
            # Closed off the loop thread: its close waits for a caller's read.
            threading.Thread(target=old.close, name="control-close", daemon=True).start()
        log.info("control socket%s moved to %s", " and paused jobs" if old_file else "",
                 directory)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.node is not None:
            self.node.close()


class Handoff:
    """Work handed to the loop thread by a thread that waits for its answer, done
    only while that thread still waits: the waiter gives up (`give_up`) and the
    loop acts (`settle`) under one lock, so that exactly one of them wins. Used for
    the socket's requests and for the cluster's run-now requests.

    `deadline` (monotonic): the loop does not act after it, even when the waiter
    has not given up yet. A process stopped (SIGSTOP) past it resumes all its
    threads at once, and the loop thread may come to `settle` before the waiter's
    own timed wait returns: the deadline, not that race, decides."""

    def __init__(self, deadline: float | None = None) -> None:
        self.lock = threading.Lock()
        self.answered = threading.Event()
        self.answer = None
        self.given_up = False
        self.deadline = deadline

    def waited_for(self) -> bool:
        """Whether the waiter can still be waiting for the answer (under the lock)."""
        return self.deadline is None or time.monotonic() < self.deadline

    def give_up(self) -> bool:
        """The waiter stops waiting: True when nothing was done (and now nothing will
        be); False when the answer came meanwhile (`answer` holds it)."""
        with self.lock:
            if self.answered.is_set():
                return False
            self.given_up = True
            return True

    def settle(self, act: Callable[[], object]) -> bool:
        """On the loop thread: `act()` and its result as the answer, unless the
        waiter gave up or cannot be waiting any more (False: nothing done)."""
        with self.lock:
            if self.given_up or not self.waited_for():
                self.given_up = True
                return False
            self.answer = act()
            self.answered.set()
            return True


class Request(Handoff):
    """A caller's request on the socket: acted on only while its caller is still
    connected, within the daemon's wait."""

    def __init__(self, command: str, job: str | None, connection: socket.socket,
                 deadline: float) -> None:
        super().__init__(deadline)
        self.command = command
        self.job = job
        self.connection = connection

    def waited_for(self) -> bool:
        # The caller's own thread looks for a hang-up only every 0.2 s; a daemon
        # stopped (SIGSTOP) while a caller waited reads the request the kernel kept
        # for it after that caller was told 69 and hung up: the loop looks too.
        return super().waited_for() and not _caller_left(self.connection)

    def __str__(self) -> str:
        return self.command + (f" {self.job}" if self.job is not None else "")


def answer_within() -> float:
    """How long a caller's request waits for the loop thread: ANSWER_WITHIN, or the
    daemon's RUN_WORKER_CONTROL_WAIT (seconds)."""
    text = os.environ.get(ANSWER_WITHIN_ENV)
    if not text:
        return ANSWER_WITHIN
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 3600:
        log.warning("%s=%r is not a number of seconds (0-3600): the control socket "
                    "waits %gs", ANSWER_WITHIN_ENV, text, ANSWER_WITHIN)
        return ANSWER_WITHIN
    return seconds


class ControlServer:
    """The daemon's control socket. Built and closed on the main thread (at start,
    and by a reload that moves it); its thread accepts callers, each read on a
    thread of its own; the loop thread answers them."""

    def __init__(self, directory: Path, name: str, wake: Callable[[], None]) -> None:
        from .locks import open_lock_directory
        self.path = directory / name
        self._name = name
        self._wake = wake
        self._wait = answer_within()
        self._requests: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._callers = threading.BoundedSemaphore(MAX_CALLERS)
        self._dir_fd = open_lock_directory(directory)
        try:
            self._socket = self._bind()
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        where = _through(self._dir_fd, self._name)
        _remove_stale(where, self._dir_fd, self._name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(where)
            # Before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(self._name, 0o600, dir_fd=self._dir_fd)
            listener.listen(BACKLOG)
            listener.settimeout(0.5)      # to see `_closing` between connections
        except BaseException:
            listener.close()
            raise
        return listener

    def close(self) -> None:
        self._closing.set()
        self._thread.join(10)     # it sees `_closing` within 0.5 s
        self._socket.close()
        try:
            os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        os.close(self._dir_fd)

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("control socket %s: %s", self.path, exc)
                time.sleep(0.5)
                continue
            if not self._callers.acquire(blocking=False):
                # Told at once, never queued: a flood of callers holds up nobody.
                with connection:
                    try:
                        connection.settimeout(0.5)
                        _send(connection, {"code": EXIT_UNAVAILABLE, "message":
                                           f"the daemon is busy: more than {MAX_CALLERS} "
                                           f"callers at once on {self.path}; try again"})
                    except OSError as exc:
                        log.debug("control socket %s: %s", self.path, exc)
                continue
            try:
                threading.Thread(target=self._caller, args=(connection,),
                                 name="control-caller", daemon=True).start()
            except RuntimeError as exc:   # no thread to be had: the caller is told 69
                self._callers.release()
                connection.close()
                log.warning("control socket %s: %s", self.path, exc)

    def _caller(self, connection: socket.socket) -> None:
        try:
            with connection:
                self._converse(connection)
        except OSError as exc:     # the caller left, or sent nothing in time
            log.debug("control socket %s: %s", self.path, exc)
        finally:
            self._callers.release()

    def _converse(self, connection: socket.socket) -> None:
        uid = struct.unpack("3i", connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        # First: a caller refused still reads why. Bounded as a whole, so that a
        # caller sending a byte at a time cannot hold its thread either.
        line = _read_line(connection, time.monotonic() + READ_WITHIN)
        connection.settimeout(5)
        if uid not in (0, os.geteuid()):
            log.warning("control socket %s: refused a caller with uid %d", self.path, uid)
            _send(connection, {"code": EXIT_NOT_ALLOWED, "message": "not allowed: only "
                               "the daemon's user or root may control it"})
            return
        try:
            message = json.loads(line)
            request = Request(str(message["command"]), message.get("job"), connection,
                              time.monotonic() + self._wait)
        # RecursionError: JSON nested deeper than the parser's stack (not what the
        # command line sends, but the daemon's own user may send anything).
        except (ValueError, KeyError, TypeError, RecursionError):
            _send(connection, {"code": EXIT_USAGE, "message": "not a request"})
            return
        self._requests.put(request)
        self._wake()
        answer = self._answer_of(request, connection)
        if answer is not None:
            _send(connection, answer)

    def _answer_of(self, request: Request, connection: socket.socket) -> dict | None:
        """The loop thread's answer; 69 if it gives none in time, or the daemon is
        stopping (its loop has ended: a stop is not held up by a caller); None when
        the caller hung up. In the last cases the request is given up: the loop
        will not act on it."""
        deadline = time.monotonic() + self._wait
        while not request.answered.wait(0.2):
            left = _caller_left(connection)
            if not (left or self._closing.is_set() or time.monotonic() > deadline):
                continue
            if not request.give_up():
                break       # answered just now: that answer stands
            if left:
                return None
            return {"code": EXIT_UNAVAILABLE, "message": "the daemon did not answer "
                    f"(stopping, or busy for more than {self._wait:g}s); nothing was "
                    "done"}
        return request.answer

    def answer(self, loop) -> None:
        """On the loop thread: answer every request whose caller still waits."""
        from .errors import describe
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return

            def act(request=request) -> dict:
                try:
                    return _answer(loop, request)
                except Exception as exc:  # a command must never stop the loop
                    # One line: the command and why (describe: never SQL parameters).
                    log.error("control command %s failed: %s", request, describe(exc))
                    return {"code": EXIT_UNAVAILABLE, "message": f"the daemon could not "
                            f"carry out {request}: {describe(exc)}"}

            if not request.settle(act) and request.command != "status":
                log.warning("control command %s not carried out: its caller stopped "
                            "waiting for the answer", request)


def _caller_left(connection: socket.socket) -> bool:
    """The caller hung up (it sends nothing after its request: readable is EOF).
    Called from the caller's thread and from the loop thread: it only peeks, and
    leaves the connection's timeout alone (MSG_DONTWAIT instead)."""
    poll = select.poll()
    poll.register(connection, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    if not poll.poll(0):
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _remove_stale(where: str, dir_fd: int, name: str) -> None:
    """A socket left by a daemon that died is removed; one that answers is another
    daemon's, and stays (OSError: this one cannot listen there)."""
    # Non-blocking: a blocking connect to a listener whose queue is full (a daemon
    # stopped with SIGSTOP) waits for room, here on the main thread at start-up or
    # the loop thread in a reload, deaf to signals. EAGAIN means someone listens.
    probe = socket.socket(socket.AF_UNIX,
                          socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(where)
    except FileNotFoundError:
        return
    except ConnectionRefusedError:
        os.unlink(name, dir_fd=dir_fd)
        return
    except BlockingIOError:
        pass
    finally:
        probe.close()
    raise OSError("another daemon answers on its control socket")


def _answer(loop, request: Request) -> dict:
    runtime = loop.runtime
    if request.command == "status":
        answer = {"code": EXIT_OK, "pid": os.getpid(), "config": str(runtime.config.path),
                  "jobs": job_states(loop)}
        if not getattr(runtime.paused, "known", True):
            answer["held"] = f"the paused jobs in {runtime.paused.path} are not read yet: " \
                             f"no scheduled run starts until they can be read (see the log)"
        return answer
    if request.command not in COMMANDS:
        return {"code": EXIT_USAGE, "message": f"unknown command {request.command!r}"}
    job = next((j for j in runtime.config.jobs if j.name == request.job), None)
    if job is None:
        return {"code": EXIT_USAGE, "message": f"unknown job {request.job!r}; the "
                f"daemon's jobs are: {', '.join(runtime.config.job_names())}"}
    if request.command == "run-now":
        if job not in runtime.jobs:
            return {"code": EXIT_USAGE, "message": f"job {job.name} is not run by this "
                    "daemon (not one of its --job)"}
        if not loop.start_now(job):
            return {"code": EXIT_ALL_SKIPPED, "message": f"job {job.name} has a run in "
                    "progress (or the daemon is stopping): nothing started"}
        log.info("job=%s run-now: started", job.name, extra={"job": job.name})
        return {"code": EXIT_OK, "message": f"job {job.name}: run started"}
    paused = request.command == "pause"
    runtime.paused.set(job.name, paused)
    log.info("job=%s %s", job.name, "paused: no scheduled run starts until it is "
             "resumed" if paused else "resumed", extra={"job": job.name})
    return {"code": EXIT_OK, "message": f"job {job.name} {request.command}d"}


def job_states(loop) -> list[dict]:
    """Each job of the daemon's config: state, next run, last outcome."""
    runtime = loop.runtime
    scheduler = runtime.scheduler
    scheduled = {job.name for job in scheduler.jobs} if scheduler is not None else set()
    running = loop.running_jobs()
    last = getattr(loop.source, "last", {})
    states = []
    for job in runtime.config.jobs:
        outcome, when = last.get(job.name, (None, None))
        states.append({
            "name": job.name,
            "schedule": job.schedule,
            "enabled": job.enabled,
            "state": "running" if job.name in running else
                     "paused" if job.name in runtime.paused else "idle",
            "paused": job.name in runtime.paused,
            "next_run": scheduler.next_run(job.name) if job.name in scheduled else None,
            "last": {"outcome": outcome, "at": when} if outcome else None,
        })
    return states


def _read_line(connection: socket.socket, deadline: float | None = None,
               limit: int = MAX_REQUEST) -> bytes:
    """One line, cut at about `limit` bytes; TimeoutError once `deadline`
    (monotonic) passes. A request is short; an answer (`--status` of many jobs)
    may be megabytes: read into one buffer, looking for the end in each chunk."""
    data = bytearray()
    while len(data) < limit:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the caller did not send its request in time")
            connection.settimeout(left)
        chunk = connection.recv(65536)
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            data += chunk[:end]
            break
        data += chunk
    return bytes(data)


def _send(connection: socket.socket, answer: dict) -> None:
    connection.sendall(json.dumps(answer).encode() + b"\n")


# --- the caller's side -----------------------------------------------------------------

class NoDaemon(Exception):
    """No daemon answers on the control socket (exit 69)."""


class NotAllowed(Exception):
    """The socket refuses this user (exit 77)."""


def ask(config, command: str, job: str | None = None) -> dict:
    """Send one command to the daemon of `config` and return its answer (a dict with
    `code`). NoDaemon, NotAllowed."""
    directory, name, _ = control_files(config)
    try:
        # O_PATH: only search permission is needed, as for the path itself.
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError as exc:
        raise NotAllowed(f"cannot reach {directory}: {exc.strerror}") from None
    except OSError:
        raise NoDaemon(f"no daemon answers: lock directory {directory} does not "
                       f"exist") from None
    path = directory / name
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _check_directory(dir_fd, directory, default=not config.worker.lock_dir)
        caller.settimeout(ANSWER_WITHIN + 5)
        _connect(caller, _through(dir_fd, name), path)
        try:
            _send(caller, {"command": command, "job": job})
        except BrokenPipeError:   # it answered and closed at once: read why
            pass
        try:
            line = _read_line(caller, limit=MAX_ANSWER)
        except KeyboardInterrupt:
            if command == "status":     # nothing done: nothing to tell
                raise
            raise Interrupted(_answer_after_interrupt(caller)) from None
    except OSError as exc:      # a timeout, a reset: whatever it did is unknown
        raise NoDaemon(f"no answer on {path}: {exc}") from None
    finally:
        caller.close()
        os.close(dir_fd)
    if not line:
        raise NoDaemon(f"the daemon on {path} closed the connection without answering")
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise NoDaemon(f"the answer on {path} could not be read ({len(line)} bytes, not "
                       f"one JSON object)")
    return answer


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a command waited for the daemon's answer: `answer`, the one the
    daemon had already given (it acted before it saw the hang-up), else None."""

    def __init__(self, answer: dict | None) -> None:
        super().__init__()
        self.answer = answer


def _answer_after_interrupt(caller: socket.socket) -> dict | None:
    """Ctrl-C while waiting for the answer: hang up this side, so that the daemon
    acts on nothing more (it looks for the hang-up before it acts, and every 0.2 s
    while it waits), then read the answer it may have given already: a run started
    just before the hang-up is told, not reported as not carried out."""
    try:
        caller.shutdown(socket.SHUT_WR)
        line = _read_line(caller, time.monotonic() + INTERRUPT_READ, limit=MAX_ANSWER)
        answer = json.loads(line) if line else None
    except (OSError, ValueError, RecursionError):
        return None
    return answer if isinstance(answer, dict) and "code" in answer else None


def _check_directory(dir_fd: int, directory: Path, default: bool) -> None:
    """NoDaemon when the lock directory is one the daemon itself refuses (writable
    by its group or others), or, the default one (named after this user, in /tmp
    when XDG_RUNTIME_DIR is unset), is not this user's: another local user could
    have made it and put a socket of theirs in it, to answer in the daemon's place
    ("job tick paused", exit 0, with nothing paused)."""
    from .locks import _user
    info = os.fstat(dir_fd)
    problem = None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by its group or others (mode {stat.S_IMODE(info.st_mode):o})"
    elif default and info.st_uid != os.geteuid():
        problem = f"(this user's default one) is owned by {_user(info.st_uid)}"
    if problem is not None:
        raise NoDaemon(f"no daemon of this config can listen in {directory}: it {problem}; "
                       f"refusing to talk to a socket there (another user could have "
                       f"put it there)")


def _connect(caller: socket.socket, where: str, path: Path) -> None:
    """Connect, retrying a while when the socket's backlog is full (EAGAIN: many
    callers at once, or a daemon that does not accept); NoDaemon, NotAllowed."""
    busy_until = time.monotonic() + CONNECT_BUSY_WAIT
    while True:
        try:
            caller.connect(where)
            return
        except PermissionError as exc:
            raise NotAllowed(f"control socket {path}: {exc.strerror}") from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no daemon answers on {path}") from None
        except BlockingIOError:
            if time.monotonic() > busy_until:
                raise NoDaemon(f"no daemon answers on {path}: it is busy (its queue of "
                               f"callers stayed full for {CONNECT_BUSY_WAIT:g}s); try "
                               f"again") from None
            time.sleep(0.1)
        except OSError as exc:
            raise NoDaemon(f"no daemon answers on {path}: {exc.strerror or exc}") from None


def command(config, name: str, job: str | None = None) -> int:
    """The CLI's --run-now, --pause, --resume and --status: ask, print, exit code.
    In cluster mode through the database instead (worker.control_cluster).
    Ctrl-C while it waits: one line, 130 (the daemon, or the nodes, then drop a
    command not carried out yet: its caller hung up, or withdrew its request)."""
    from .logs import command_error
    try:
        return _command(config, name, job)
    except KeyboardInterrupt as exc:
        answer = getattr(exc, "answer", None)
        if answer is not None:      # the daemon had acted already
            told = answer.get("message", "refused")
            command_error(f"interrupted: {told}" + (" (carried out before the interrupt)"
                                                    if answer["code"] == EXIT_OK else ""))
        else:
            command_error(f"interrupted: {name}{f' {job}' if job else ''} is not carried "
                          "out unless it was already; see --status")
        return EXIT_INTERRUPTED


def _command(config, name: str, job: str | None) -> int:
    if config.cluster is not None:
        from .control_cluster import command as cluster_command
        return cluster_command(config, name, job)
    from .logs import command_error
    try:
        answer = ask(config, name, job)
    except NoDaemon as exc:
        command_error(str(exc))
        return EXIT_UNAVAILABLE
    except NotAllowed as exc:
        command_error(f"not allowed: {exc} (only the daemon's user or root may "
                      f"control it)")
        return EXIT_NOT_ALLOWED
    code = answer.get("code", EXIT_UNAVAILABLE)
    if code != EXIT_OK:
        command_error(answer.get("message", "refused"))
        return code
    if name != "status":
        print(answer["message"])
        return code
    from .reports import print_table
    print(f"daemon pid {answer['pid']}, config {answer['config']}")
    if answer.get("held"):
        print(f"held: {answer['held']}")
    print_table(["job", "state", "next run", "last run"], [
        [job["name"], job["state"], _next_run_text(job),
         f"{job['last']['outcome']} at {_local_time(job['last']['at'])}"
         if job["last"] else "none since the daemon started"]
        for job in answer["jobs"]])
    return code


def _next_run_text(job: dict) -> str:
    if job["paused"]:
        return "paused" + (f" (was due {job['next_run']})" if job["next_run"] else "")
    if not job["enabled"]:
        return "disabled"
    return job["next_run"] or "no schedule: runs only with --once"


def _local_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def daemon_next_runs(config) -> tuple[str, dict[str, str]] | None:
    """--list: (where from, each job's next run as the daemon has it), or None when
    no daemon for this config answers (or it refuses this user). In cluster mode,
    as the live nodes have them (worker.control_cluster)."""
    if config.cluster is not None:
        from .control_cluster import cluster_next_runs
        return cluster_next_runs(config)
    try:
        answer = ask(config, "status")
    except (NoDaemon, NotAllowed):
        return None
    if answer.get("code") != EXIT_OK:
        return None
    return f"the running daemon (pid {answer['pid']})", {
        job["name"]: _next_run_text(job) for job in answer["jobs"]}
