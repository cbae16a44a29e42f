"""Logging set-up: a text format for people and one JSON object per line for
journald and log shippers. The JSON formatter takes `job`, `attempt` and
`attempts` from the structured fields a log call passes with `extra=`, never from
the message text. Whatever is printed passes through the secret masking.

Lines are written in batches (BatchingHandler): warnings and errors at once, and
lines logged with `extra=WRITE_AT_ONCE` (the start-up line); other INFO and DEBUG
lines at most FLUSH_AFTER seconds later. An exception that ends a thread, or the
process, is logged through the same handler (JSON in json mode), and the same one
repeated is written at most once per THROTTLE_SECONDS with the count of those
left out."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import weakref
from datetime import datetime
from typing import TextIO

from .config import mask_secrets

STRUCTURED_FIELDS = ("job", "attempt", "attempts")
FLUSH_AFTER = 0.1            # seconds an INFO or DEBUG line may wait to be written
FLUSH_BYTES = 64 * 1024      # written at once when this much is waiting
THROTTLE_SECONDS = 10.0     # one line per kind of uncaught exception this often
KINDS_KEPT = 1000           # kinds of uncaught exception the throttle remembers at most
WRITE_AT_ONCE = {"write_at_once": True}   # extra= of an INFO line that must not wait
TEXT_FORMAT = "%(asctime)s %(levelname)s pid=%(process)d [%(threadName)s] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; time with its UTC offset."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created).astimezone()
                 .isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "pid": record.process, "thread": record.threadName,
                 "message": mask_secrets(record.getMessage())}
        for name in STRUCTURED_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class BatchingHandler(logging.Handler):
    """Writes formatted lines to a stream, many per write.

    Why: a line per run, each its own write, cost a 3,000-job batch a quarter of
    its time on SQLite (benchmarks: `--log-level WARNING` against INFO): every
    write lets go of the interpreter lock, and the job thread then waits among
    the others to get it back. So a line is formatted in the thread that logs it
    (outside any lock) and appended to a buffer; a line at WARNING or above
    writes the buffer at once, in order, itself last, from the thread that logged
    it; lines below wait at most FLUSH_AFTER, written by a flusher thread (or
    sooner once FLUSH_BYTES are waiting). What is waiting is written by `flush()`:
    at exit (logging.shutdown), before a summary is printed, before os._exit.
    A process killed outright (SIGKILL, a segfault) loses at most FLUSH_AFTER of
    INFO lines. A child forked by a job drops its copy of the parent's waiting
    lines and writes its own at once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._waiting = threading.Condition(threading.Lock())   # guards the buffer
        self._writing = threading.Lock()    # one write at a time, in buffer order
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._direct = False     # a forked child writes each line at once
        os.register_at_fork(after_in_child=_fork_hook(self, BatchingHandler._forget))

    def handle(self, record: logging.LogRecord):
        passed = self.filter(record)
        if passed:
            self.emit(record)
        return passed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        with self._waiting:
            self._lines.append(line)
            self._size += len(line)
            urgent = (record.levelno >= logging.WARNING or self._size >= FLUSH_BYTES
                      or self._closed or self._direct
                      or getattr(record, "write_at_once", False))
            if not urgent and len(self._lines) == 1:
                self._wake_flusher()
        if urgent:
            self.flush()

    def _wake_flusher(self) -> None:
        """Called with the buffer's lock held, for the first line of a batch."""
        if self._flusher is None and not self._closed:
            self._flusher = threading.Thread(target=self._flush_loop, name="log-flusher",
                                             daemon=True)
            self._flusher.start()
        self._waiting.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._waiting:
                while not self._lines and not self._closed:
                    self._waiting.wait()
                if self._closed:
                    return
                # Let the lines of the next FLUSH_AFTER join this one in one write.
                self._waiting.wait(FLUSH_AFTER)
            self.flush()

    def flush(self) -> None:
        with self._writing:
            with self._waiting:
                lines, self._lines, self._size = self._lines, [], 0
            if not lines:
                return
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except RecursionError:
                raise
            except Exception:   # a closed or broken stream: as logging does, report it
                self.handleError(logging.makeLogRecord({"msg": lines[-1].rstrip()}))

    def close(self) -> None:
        self.flush()
        with self._waiting:
            self._closed = True
            self._waiting.notify_all()
        super().close()

    def _forget(self) -> None:
        """In a forked child: the waiting lines are the parent's to write, and the
        flusher thread did not come along. The child's own lines are written at
        once: a child leaves by os._exit (multiprocessing does), which runs no
        flush, so a batched line would be lost."""
        self._lines, self._size, self._flusher = [], 0, None
        self._direct = True
        self._waiting = threading.Condition(threading.Lock())
        self._writing = threading.Lock()


def _fork_hook(handler: BatchingHandler, method):
    """A fork hook that does not keep a replaced handler alive."""
    ref = weakref.ref(handler)

    def hook() -> None:
        target = ref()
        if target is not None:
            method(target)
    return hook


def flush_logs() -> None:
    """Write every waiting log line now (before printing outside the log, before
    os._exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    for old in logging.getLogger().handlers:
        if isinstance(old, BatchingHandler):   # a replaced one writes what it holds
            old.close()
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if fmt == "json":
        # Every line on stderr is JSON: Python's warnings too, not only our own calls.
        logging.captureWarnings(True)
    # An uncaught exception, in the main thread or another (the cluster heartbeat's),
    # goes through the log: JSON in json mode, and throttled when it repeats.
    throttle = ErrorThrottle()
    sys.excepthook = lambda kind, value, tb: _log_uncaught(throttle, kind, value, tb, None)
    threading.excepthook = lambda args: _log_uncaught(
        throttle, args.exc_type, args.exc_value, args.exc_traceback, args.thread)


class ErrorThrottle:
    """At most one line per kind per THROTTLE_SECONDS; counts the ones left out."""

    def __init__(self, clock=None) -> None:
        import time
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._kinds: dict[tuple, list] = {}     # kind -> [last written, left out since]

    def admit(self, kind: tuple) -> int | None:
        """None: leave this one out; else the number left out before it."""
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < THROTTLE_SECONDS:
                seen[1] += 1
                return None
            left_out = seen[1] if seen is not None else 0
            if seen is None and len(self._kinds) >= KINDS_KEPT:
                self._forget_quiet(now)
            self._kinds[kind] = [now, 0]
            return left_out

    def _forget_quiet(self, now: float) -> None:
        """Drop the kinds not written for THROTTLE_SECONDS: a long-running daemon
        meeting ever new kinds keeps a bounded table."""
        for kind, (written, _) in list(self._kinds.items()):
            if now - written >= THROTTLE_SECONDS:
                del self._kinds[kind]

    def kinds_kept(self) -> int:
        with self._lock:
            return len(self._kinds)


def _log_uncaught(throttle: ErrorThrottle, kind, value, traceback, thread) -> None:
    if kind is SystemExit:
        return      # threading's own rule: a thread ending by SystemExit says nothing
    where = ""
    frame = traceback
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is not None:
        where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}"
    name = thread.name if thread is not None else "main thread"
    # The kind is what failed and where, not the thread: a job may name each
    # thread of its own (helper-<uuid>), and every one would be a new kind.
    left_out = throttle.admit((kind, where))
    if left_out is None:
        return
    repeated = (f" ({left_out} more like it in the last {THROTTLE_SECONDS:g}s not shown)"
                if left_out else "")
    logging.getLogger("worker").critical(
        "uncaught exception in %s: %s%s", name, kind.__name__, repeated,
        exc_info=(kind, value, traceback))


def json_chosen() -> bool:
    return any(isinstance(handler.formatter, JsonFormatter)
               for handler in logging.getLogger().handlers)


def command_error(message: str) -> None:
    """An error of the command itself (bad config, unknown job...), one line: as
    "run-worker: MESSAGE" for people, or a JSON entry with --log-format json, so
    that a log shipper never gets a line that is not JSON."""
    if json_chosen():
        logging.getLogger("worker").error(message)
    else:
        flush_logs()    # after the log lines that came before it
        print(f"run-worker: {mask_secrets(message)}", file=sys.stderr)


def job_fields(job: str, attempt: int | None = None, attempts: int | None = None) -> dict:
    """The `extra=` of a log line about a job (and one of its attempts)."""
    fields: dict = {"job": job}
    if attempt is not None:
        fields["attempt"], fields["attempts"] = attempt, attempts
    return fields
