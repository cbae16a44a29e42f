"""Faults from a YAML file, re-read whenever the file changes.

    - match: "update acc_acct"     # case-insensitive substring of the statement text
      times: 2                     # the first 2 matching statements; default: every one
      error: {number: 1205, state: 51, class: 13, message: "... {spid} ..."}
    - match: "select slow"
      delay: 30s                   # hold the answer; an ATTENTION ends it
    - match: "insert into acc_rows"
      disconnect: true             # close the socket instead of answering
    - match: "commit"              # also matches a COMMIT sent as a transaction
      disconnect: after            # manager request: apply it, then close
    - match: "select big"
      disconnect: midway           # send half of the answer, then close (mid-result)
    - login: true                  # at LOGIN7 instead of at a statement
      times: 1
      error: {number: 40613, state: 1, class: 17, message: "..."}

A file that does not parse on a re-read leaves the previous faults in force.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger("tds.faults")


class FaultsError(ValueError):
    """The faults file is not a valid list of faults."""


@dataclass(frozen=True)
class ServerError:
    number: int
    state: int
    severity: int
    message: str


@dataclass
class Fault:
    match: str | None              # lower-cased substring; None for login faults
    login: bool = False
    times: int | None = None       # None: every matching statement
    error: ServerError | None = None
    delay: float = 0.0
    disconnect: str | None = None  # "before" (true), "after" or "midway"
    used: int = field(default=0)

    def applies(self, text: str) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        return self.match is not None and self.match in text.lower()


def parse_duration(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", str(value))
    if not found:
        raise FaultsError(f"not a duration: {value!r}")
    number = float(found.group(1))
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[found.group(2)]


def parse_faults(text: str) -> list[Fault]:
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FaultsError(f"not YAML: {' '.join(str(exc).split())}") from None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FaultsError("the faults file must be a list")
    faults = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise FaultsError(f"fault {number}: not a mapping")
        unknown = set(entry) - {"match", "login", "times", "error", "delay", "disconnect"}
        if unknown:
            raise FaultsError(f"fault {number}: unknown keys {sorted(unknown)}")
        login = bool(entry.get("login", False))
        if not login and not isinstance(entry.get("match"), str):
            raise FaultsError(f"fault {number}: needs match (a string) or login: true")
        error = None
        if "error" in entry:
            spec = entry["error"]
            if not isinstance(spec, dict) or "number" not in spec:
                raise FaultsError(f"fault {number}: error needs a number")
            error = ServerError(int(spec["number"]), int(spec.get("state", 1)),
                                int(spec.get("class", 16)),
                                str(spec.get("message", f"Error {spec['number']}.")))
        disconnect = entry.get("disconnect")
        if disconnect not in (None, False, True, "before", "after", "midway"):
            raise FaultsError(f"fault {number}: disconnect must be true, after or midway")
        times = entry.get("times")
        if times is not None and (not isinstance(times, int) or times < 0):
            raise FaultsError(f"fault {number}: times must be a whole number")
        faults.append(Fault(
            match=None if login else entry["match"].lower(), login=login, times=times,
            error=error, delay=parse_duration(entry.get("delay", 0)),
            disconnect={True: "before", "before": "before", "after": "after",
                        "midway": "midway"}.get(disconnect)))
    return faults


class FaultBook:
    """The faults in force; re-reads the file when its modification time or size
    changes. Thread-safe: every connection asks it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._faults: list[Fault] = []
        self._seen: tuple | None = None
        self._lock = threading.Lock()
        if path is not None:
            self._reload(initial=True)

    def _stamp(self) -> tuple | None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def _reload(self, initial: bool = False) -> None:
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            faults = [] if stamp is None else parse_faults(self.path.read_text())
        except (FaultsError, OSError) as exc:
            if initial:
                raise FaultsError(f"{self.path}: {exc}") from None
            log.error("faults file %s not re-read: %s; the previous faults stay in force",
                      self.path, exc)
            return
        self._faults = faults
        log.info("faults file %s: %d faults", self.path, len(faults))

    def take(self, text: str | None = None, login: bool = False) -> Fault | None:
        """The first fault that applies (counting it as used), or None."""
        if self.path is None:
            return None
        with self._lock:
            self._reload()
            for fault in self._faults:
                if login and fault.login and (fault.times is None or fault.used < fault.times):
                    fault.used += 1
                    return fault
                if not login and not fault.login and fault.applies(text or ""):
                    fault.used += 1
                    return fault
        return None
