"""systemd's notify protocol (sd_notify), written against its documented wire
format: datagrams of KEY=VALUE lines sent to the Unix socket in $NOTIFY_SOCKET.
Outside systemd (no NOTIFY_SOCKET) every call does nothing."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("worker.systemd")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):          # abstract namespace
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2   # ping twice per period

    def send(self, **fields: str) -> None:
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal for the worker
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def extend_start(self, seconds: float) -> None:
        """Before READY: push systemd's start timeout (TimeoutStartSec=, 90 s by
        default) to `seconds` from now, so that a daemon waiting for its database
        is not killed as a failed start (EXTEND_TIMEOUT_USEC, systemd 236+)."""
        self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1_000_000)))

    def reloading(self) -> None:
        # Type=notify-reload wants the monotonic time with RELOADING=1.
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000), STATUS="reloading the configuration")

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
