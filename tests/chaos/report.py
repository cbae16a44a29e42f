"""What a chaos run prints: one line per invariant, then either the final count or,
for each violation, the seed, the invariant and the events that led to it."""
from __future__ import annotations

from datetime import datetime
from typing import TextIO

from .invariants import SUMMARY, History, Violation, scope

EVENTS_SHOWN = 8       # events before a violation that are printed with it


def report(history: History, results: dict[str, list[Violation]], command: str,
           out: TextIO) -> int:
    """Print the result; the exit code: 0 without violations, else 1."""
    total = sum(len(v) for v in results.values())
    runs = runs_started(history)
    looked_at = scope(history)
    for name, violations in results.items():
        verdict = "ok" if not violations else f"{len(violations)} violation(s)"
        print(f"{name}: {verdict} ({looked_at[name]})", file=out)
    for violation in (v for vs in results.values() for v in vs):
        print(f"\nVIOLATION (seed {history.seed}) {violation.invariant}: "
              f"{violation.message}", file=out)
        print("  events that led to it:", file=out)
        before = [(at, event) for at, event in history.events if at <= violation.at + 1]
        for at, event in before[-EVENTS_SHOWN:]:
            print(f"    {_clock(at)} (+{at - history.start:6.1f}s) {event.describe()}",
                  file=out)
        if not before:
            print("    (none: it happened before the first event)", file=out)
    if total:
        print(f"\nchaos: {len(history.events)} events, {runs} runs, {total} violations "
              f"(seed {history.seed}); repeat with: {command}", file=out)
        return 1
    print(f"chaos: {len(history.events)} events, {runs} runs, 0 violations "
          f"(seed {history.seed})", file=out)
    return 0


def runs_started(history: History) -> int:
    """Daemon runs started (their start lines) and --once runs that were not skipped."""
    daemon = sum(1 for proc in history.procs if proc.kind == "daemon"
                 for line in proc.lines if "starting the run due at" in line)
    once = 0
    for proc in history.procs:
        summary = SUMMARY.search(proc.stdout) if proc.kind == "once" else None
        if summary:
            once += int(summary.group(2)) + int(summary.group(3))
    return daemon + once


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]
