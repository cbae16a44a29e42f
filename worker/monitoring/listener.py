"""A small HTTP/1.1 listener that no client can starve: one event-loop thread reads
requests (asyncio), a few threads answer them.

Why not http.server: its ThreadingHTTPServer keeps a thread and a descriptor per
connection, with no timeout, for as long as the client likes (300 idle
connections held: 305 threads; under `ulimit -n 200` the jobs then could not open
their database). prometheus-client's own server is the same server underneath.
Here an idle or slow connection costs a descriptor and no thread, for at most
READ_TIMEOUT; past MAX_CONNECTIONS the one that has waited longest for its request
is dropped, so a new request is always read. One request per connection
(`Connection: close`), GET and HEAD only. Errors go to the log, throttled.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Callable

log = logging.getLogger("worker.monitor")

READ_TIMEOUT = 5.0        # seconds a client gets to send its request line and headers
WRITE_TIMEOUT = 10.0      # seconds a client gets to take the answer
MAX_CONNECTIONS = 64      # open at once; past it the oldest still reading is dropped
MAX_HEADER_BYTES = 16384  # request line and headers
ANSWER_THREADS = 4        # threads that build answers (a scrape, the status page)
ERROR_LOG_EVERY = 60.0    # seconds between two log lines about the same kind of error

# (status, content type, body) for (method, target): target is the path and query
Responder = Callable[[str, str], "tuple[int, str, bytes]"]


class ThrottledLog:
    """At most one line per kind every ERROR_LOG_EVERY seconds, with the count of
    those left out since: a flood of bad clients cannot flood the log."""

    def __init__(self, every: float = ERROR_LOG_EVERY) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}   # kind -> (logged at, left out)
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            logged_at, left_out = self._last.get(kind, (float("-inf"), 0))
            if now - logged_at < self.every:
                self._last[kind] = (logged_at, left_out + 1)
                return
            self._last[kind] = (now, 0)
        suffix = f" ({left_out} more like it since the last line)" if left_out else ""
        log.warning("monitoring listener: " + message + suffix, *args)


class Listener:
    """Bound at construction (OSError), served from its own thread after start()."""

    def __init__(self, address: str, port: int, respond: Responder) -> None:
        self.respond = respond
        self._socket = socket.create_server((address, port), backlog=128)
        self.port = self._socket.getsockname()[1]
        self._errors = ThrottledLog()
        self._answers = ThreadPoolExecutor(ANSWER_THREADS, thread_name_prefix="monitor-http")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading: dict[asyncio.StreamWriter, None] = {}   # oldest first
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-listener",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def close(self) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)
        self._socket.close()
        self._answers.shutdown(wait=False, cancel_futures=True)

    # --- the event loop's thread ---------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_error)
        try:
            server = loop.run_until_complete(asyncio.start_server(
                self._serve, sock=self._socket, limit=MAX_HEADER_BYTES))
            self._ready.set()
            loop.run_forever()
            server.close()
            for writer in list(self._reading):
                writer.transport.abort()
            # Connections still open end here, not as "destroyed but pending" later.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks))
        except Exception:  # to the log (JSON in json mode), not a raw thread traceback
            log.exception("monitoring listener stopped")
        finally:
            self._ready.set()
            loop.close()

    def _loop_error(self, loop, context: dict) -> None:
        error = context.get("exception")
        self._errors.warning("loop", "%s", f"{type(error).__name__}: {error}"
                             if error is not None else context.get("message"))

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self._reading[writer] = None
        if len(self._reading) > MAX_CONNECTIONS:     # drop the longest waiting
            oldest = next(iter(self._reading))
            self._reading.pop(oldest, None)
            oldest.transport.abort()
            self._errors.warning("full", "more than %d connections open: dropped the one "
                                 "waiting longest for its request", MAX_CONNECTIONS)
        clean = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return                               # idle, slow or gone: nothing to say
            except asyncio.LimitOverrunError:
                await self._write(writer, *_plain(431, "request headers too large"),
                                  head_only=False)
                clean = True
                return
            finally:
                self._reading.pop(writer, None)
            method, path = _request_line(head)
            if method is None:
                await self._write(writer, *_plain(400, "bad request"), head_only=False)
                clean = True
                return
            if method not in ("GET", "HEAD"):
                await self._write(writer, *_plain(405, "method not allowed"),
                                  head_only=False, allow=True)
                clean = True
                return
            try:
                answer = await asyncio.get_running_loop().run_in_executor(
                    self._answers, self.respond, method, path)
            except Exception as exc:  # an answer that fails is a 500, logged
                self._errors.warning("answer", "answering %s %s failed: %s", method,
                                     path.split("?", 1)[0], f"{type(exc).__name__}: {exc}")
                answer = _plain(500, "internal error")
            await self._write(writer, *answer, head_only=method == "HEAD")
            clean = True
        except (ConnectionError, asyncio.TimeoutError):
            pass                                     # the client left or stopped reading
        finally:
            self._reading.pop(writer, None)
            if clean:
                writer.close()
            else:          # nothing left worth sending: never wait for a silent client
                writer.transport.abort()

    async def _write(self, writer: asyncio.StreamWriter, status: int, content_type: str,
                     body: bytes, *, head_only: bool, allow: bool = False) -> None:
        reason = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}", "Server: run-worker",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 "Cache-Control: no-store", "Connection: close"]
        if allow:
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _request_line(head: bytes) -> tuple[str | None, str]:
    """(method, target) from "GET /?open=a HTTP/1.1"; (None, "") when it is not one."""
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None, ""
    return parts[0], parts[1]


def _plain(status: int, text: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (text + "\n").encode()
