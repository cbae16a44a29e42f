"""The lock manager: row, key, range, object and application locks in SQL Server's
modes, blocking waits, lock timeouts and a deadlock monitor over the wait-for graph.

Every method is called with the storage's condition held (storage.py): granting,
waiting and finding a cycle are one critical section, and a wait releases it.

Modes: S (shared), U (update: compatible with S only), X (exclusive). A range
resource (a table read under HOLDLOCK or SERIALIZABLE) is also checked, never held, by
an INSERT's insert intention (I), which only S, U and X held by others refuse.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("tds.locks")

STRENGTH = {"S": 1, "U": 2, "X": 3}
# (held, requested) pairs that do not conflict
COMPATIBLE = {("S", "S"), ("S", "U"), ("U", "S")}
# How long a lock lasts: the statement (READ COMMITTED's shared locks), the
# transaction, or the session (sp_getapplock's @LockOwner = 'Session').
STATEMENT, TRANSACTION, SESSION = "statement", "transaction", "session"


class LockWaitEnded(Exception):
    """A lock wait ended without the lock: `reason` is deadlock, timeout or cancel."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Owner:
    """What holds and waits for locks: one connection (its transaction, its session)."""
    spid: int
    deadlock_priority: int = 0          # SET DEADLOCK_PRIORITY: LOW -5, NORMAL 0, HIGH 5
    lock_timeout_ms: int = -1           # SET LOCK_TIMEOUT: -1 waits for ever
    held: dict = field(default_factory=dict)   # resource -> (mode, duration)
    waiting_for: frozenset = frozenset()       # owners it waits for, while it waits
    victim: bool = False
    rollback_cost: int = 0              # what the monitor compares: undo entries


def _stronger(a: str, b: str) -> str:
    return a if STRENGTH[a] >= STRENGTH[b] else b


def _longer(a: str, b: str) -> str:
    order = (STATEMENT, TRANSACTION, SESSION)
    return a if order.index(a) >= order.index(b) else b


class LockManager:
    def __init__(self, condition, counters) -> None:
        self.condition = condition
        self.count = counters            # count(name): the server's counters
        self.granted: dict[tuple, dict[Owner, str]] = {}   # resource -> owner -> mode
        self.writers: dict[str, set[Owner]] = {}   # table -> owners holding X on its rows

    # --- granting -----------------------------------------------------------------

    def blockers(self, owner: Owner, resource: tuple, mode: str) -> set[Owner]:
        """The other owners whose locks on the resource refuse this mode."""
        holders = self.granted.get(resource)
        if not holders:
            return set()
        return {other for other, held in holders.items()
                if other is not owner and (held, mode) not in COMPATIBLE}

    def try_acquire(self, owner: Owner, resource: tuple, mode: str, duration: str) -> set[Owner]:
        """Grant the lock and return an empty set, or return who blocks it."""
        blocking = self.blockers(owner, resource, mode)
        if blocking:
            return blocking
        self._grant(owner, resource, mode, duration)
        return blocking

    def _grant(self, owner: Owner, resource: tuple, mode: str, duration: str) -> None:
        holders = self.granted.setdefault(resource, {})
        held = owner.held.get(resource)
        if held is not None:
            mode, duration = _stronger(held[0], mode), _longer(held[1], duration)
        holders[owner] = mode
        owner.held[resource] = (mode, duration)
        if mode == "X" and resource[0] in ("row", "key"):
            self.writers.setdefault(resource[1], set()).add(owner)

    def acquire(self, owner: Owner, resource: tuple, mode: str, duration: str,
                cancelled, timeout_ms: int | None = None) -> bool:
        """Take the lock, waiting as long as the owner's LOCK_TIMEOUT allows (or
        timeout_ms). True if it had to wait; LockWaitEnded if it never got it."""
        blocking = self.try_acquire(owner, resource, mode, duration)
        if not blocking:
            return False
        self.count("lock_waits")
        log.debug("spid %d waits for %s %s held by spid %s", owner.spid, mode, resource,
                  ", ".join(str(other.spid) for other in blocking))
        started = time.monotonic()
        limit = owner.lock_timeout_ms if timeout_ms is None else timeout_ms
        deadline = None if limit < 0 else time.monotonic() + limit / 1000
        try:
            while blocking:
                owner.waiting_for = frozenset(blocking)
                self._find_deadlock(owner)
                if owner.victim:
                    owner.victim = False
                    self.count("deadlock_victims")
                    raise LockWaitEnded("deadlock")
                if cancelled():
                    raise LockWaitEnded("cancel")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.count("lock_timeouts")
                    raise LockWaitEnded("timeout")
                # Woken by every release, by an ATTENTION and by the monitor; the
                # slice only bounds how late a timeout is noticed.
                self.condition.wait(0.5 if left is None else min(left, 0.5))
                blocking = self.try_acquire(owner, resource, mode, duration)
        finally:
            owner.waiting_for = frozenset()
            owner.victim = False      # chosen as its lock came free: the cycle is gone
            log.debug("spid %d waited %.3fs for %s", owner.spid, time.monotonic() - started,
                      resource)
        return True

    # --- releasing --------------------------------------------------------------------

    def release(self, owner: Owner, durations: tuple[str, ...]) -> None:
        """Release the owner's locks that last no longer than these durations."""
        released = False
        for resource, (_, duration) in list(owner.held.items()):
            if duration not in durations:
                continue
            del owner.held[resource]
            holders = self.granted.get(resource)
            if holders is not None:
                holders.pop(owner, None)
                if not holders:
                    del self.granted[resource]
            released = True
        if released:
            still = {r[1] for r, (m, _) in owner.held.items() if m == "X" and r[0] in ("row", "key")}
            for table, owners in self.writers.items():
                if table not in still:
                    owners.discard(owner)
            self.condition.notify_all()

    def release_one(self, owner: Owner, resource: tuple) -> bool:
        if resource not in owner.held:
            return False
        del owner.held[resource]
        holders = self.granted.get(resource, {})
        holders.pop(owner, None)
        if not holders:
            self.granted.pop(resource, None)
        self.condition.notify_all()
        return True

    def others_write(self, owner: Owner, table: str) -> bool:
        """Does another owner hold an exclusive lock on a row or key of the table?"""
        return any(other is not owner for other in self.writers.get(table, ()))

    # --- the deadlock monitor ----------------------------------------------------------

    def _find_deadlock(self, start: Owner) -> None:
        """A cycle in the wait-for graph through `start`: its victim is the lowest
        DEADLOCK_PRIORITY, then the cheapest to roll back, as SQL Server chooses."""
        path: list[Owner] = []
        on_path: set[Owner] = set()
        seen: set[Owner] = set()

        def visit(node: Owner) -> list[Owner] | None:
            if node in on_path:
                return path[path.index(node):]
            if node in seen or not node.waiting_for:
                return None
            seen.add(node)
            path.append(node)
            on_path.add(node)
            for nxt in node.waiting_for:
                cycle = visit(nxt)
                if cycle:
                    return cycle
            path.pop()
            on_path.discard(node)
            return None

        cycle = visit(start)
        if not cycle or start not in cycle or any(member.victim for member in cycle):
            return
        victim = min(cycle, key=lambda o: (o.deadlock_priority, o.rollback_cost, -o.spid))
        victim.victim = True
        self.count("deadlocks")
        log.debug("deadlock: spids %s; victim spid %d", [member.spid for member in cycle],
                  victim.spid)
        self.condition.notify_all()
