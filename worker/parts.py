"""Who closes what: the one owner of the parts runtimes run on.

A runtime (worker.app.Runtime) holds an engine with its Session registry, a pool,
host locks and perhaps the cluster's membership with its heartbeat. A reload
builds a new runtime that shares the parts whose settings did not change, while
runs in flight finish on the runtime they started on: one part may then serve
the current runtime and any number of retired ones. So no runtime closes a part:
each uses it (`use`) and lets go of it (`release`), and the owner closes a part
when its last user has let go. Closing happens on the owner's own thread, never
on the loop's: a pool's shutdown or a heartbeat's end may take seconds, and the
loop must keep answering signals and the watchdog meanwhile.

The metrics listener is not a part: it is the process's (worker.monitoring).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from .errors import describe

log = logging.getLogger("worker.parts")

CLOSE_TIMEOUT = 2.0   # seconds the end of the process waits for parts to close


class PartOwner:
    """Counts each part's users and closes it, off the caller's thread, at zero."""

    def __init__(self) -> None:
        self._users: dict[int, list] = {}     # id(part) -> [part, close, users, what]
        self._guard = threading.Lock()
        self._closing: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[str] = []         # parts handed to the closer, not closed
        self._idle = threading.Condition(self._guard)
        self._closer: threading.Thread | None = None

    def use(self, part, close: Callable[[], None], what: str):
        """One more user of `part`; `close()` ends it once nobody uses it."""
        with self._guard:
            entry = self._users.get(id(part))
            if entry is None:
                self._users[id(part)] = [part, close, 1, what]
            else:
                entry[2] += 1
        return part

    def share(self, part) -> None:
        """One more user of a part already in use (a run that holds a lock in it)."""
        with self._guard:
            entry = self._users.get(id(part))
            if entry is not None:
                entry[2] += 1

    def users(self, part) -> int:
        with self._guard:
            entry = self._users.get(id(part))
            return entry[2] if entry is not None else 0

    def release(self, part, announce: bool = False) -> None:
        """One user fewer; at none the part is closed on the closer thread (and,
        with `announce`, an INFO line says so: a reload replaced it)."""
        with self._guard:
            entry = self._users.get(id(part))
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del self._users[id(part)]
            self._pending.append(entry[3])
            if self._closer is None:
                self._closer = threading.Thread(target=self._close_loop, daemon=True,
                                                name="part-closer")
                self._closer.start()
        self._closing.put((entry[1], entry[3], announce))

    def _close_loop(self) -> None:
        while True:
            close, what, announce = self._closing.get()
            try:
                close()
                if announce:
                    log.info("closed the previous %s", what)
                else:
                    log.debug("closed the %s", what)
            except Exception as exc:  # one part's failure must not keep others open
                log.warning("could not close the %s: %s", what, describe(exc))
            with self._idle:
                self._pending.remove(what)
                self._idle.notify_all()

    def wait_closed(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Wait (bounded) until every part let go of has been closed; False, with
        one line naming them, if some did not close in time."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("not closed within %.0fs, exiting without: %s", timeout,
                                ", ".join(self._pending))
                    return False
                self._idle.wait(left)
        return True
