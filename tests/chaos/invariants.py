"""What a chaos run must not show, checked on what it recorded (`History`).

Every check is a pure function of the history: what the jobs committed (one row per
execution, `Execution`), the cluster's run table (`RunRow`), each process's stderr,
exit code and samples, and the events as applied. A violation names a real defect:
where the record cannot decide (a process killed before its log reached the file, a
node whose configuration is not known), the check judges nothing rather than guess.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from .events import Event, Plan

SLACK = 2.5            # seconds: a late loop turn on two busy cores, buffered log lines
STOP_GRACE = 5.0       # worker.loop.CANCEL_GRACE: what a cancelled job gets
STOP_SLACK = 2.0       # one loop turn, a driver answering a cancel
SETTLE = 10.0          # resources are counted from 10 s after a process's start
# What a `metrics` section turned on by a reload adds (its HTTP listener: the
# listening socket, asyncio's epoll and self-pipe sockets; its reader and answer
# threads), measured: 12 -> 16 files, 5 -> 7 threads.
MONITORING_FILES, MONITORING_THREADS = 4, 3


@dataclass
class Proc:
    """One worker process: a daemon incarnation of a node, or a `--once` run."""
    name: str                    # "n1#2" (node 1, second start) or "once#3"
    host: str                    # "n1": the host it stands for (its lock directories)
    kind: str                    # "daemon" or "once"
    node: str                    # cluster node name (or the host, with one node)
    pid: int
    started: float               # wall clock
    ended: float | None = None
    returncode: int | None = None
    term_at: float | None = None
    kill_at: float | None = None
    lines: list[str] = field(default_factory=list)      # stderr, one JSON object each
    stdout: str = ""
    versions: list[tuple[float, Plan]] = field(default_factory=list)  # in force from
    config_unknown_from: float | None = None
    paused: list[tuple[float, float]] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # t, threads, fds
    unanswered_hups: list[float] = field(default_factory=list)

    def entries(self) -> list[dict]:
        out = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "time" in entry:
                entry["t"] = datetime.fromisoformat(entry["time"]).timestamp()
                out.append(entry)
        return out

    def plan_at(self, t: float) -> Plan | None:
        if self.config_unknown_from is not None and t >= self.config_unknown_from:
            return None
        current = None
        for since, plan in self.versions:
            if since <= t:
                current = plan
        return current

    def paused_during(self, start: float, end: float) -> bool:
        return any(a < end and start < b for a, b in self.paused)

    @property
    def stopped_at(self) -> float | None:
        """When it was told to end (SIGTERM or SIGKILL), else when it ended."""
        told = [t for t in (self.term_at, self.kill_at) if t is not None]
        return min(told) if told else self.ended


@dataclass(frozen=True)
class Execution:
    job: str
    host: str
    node: str
    lock: str
    idempotent: bool
    pid: int
    slot_ms: int | None
    started: float
    ended: float


@dataclass(frozen=True)
class RunRow:
    job: str
    slot_ms: int
    node: str
    started_ms: int
    ended_ms: int | None
    outcome: str
    recovered: int


@dataclass
class History:
    seed: int
    backend: str
    nodes: int
    start: float                                     # wall clock of the run's start
    events: list[tuple[float, Event]] = field(default_factory=list)   # applied at
    procs: list[Proc] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
    run_rows: list[RunRow] = field(default_factory=list)
    outages: list[tuple[int, float, float]] = field(default_factory=list)  # node, from, to
    locks: list[tuple[float, float]] = field(default_factory=list)

    @property
    def cluster(self) -> bool:
        return self.nodes > 1


@dataclass(frozen=True)
class Violation:
    invariant: str
    at: float          # wall clock: the events up to here led to it
    message: str


# --- the log lines the checks read ------------------------------------------------
# A change to one of these messages in worker/ must change its pattern here too: a
# line no longer recognised shows up as a violation (a stop line missing, runs
# missing), never as a silent pass. Also read: "daemon started:", "reloaded ",
# "reload rejected", "received SIGHUP", "cluster heartbeat failed", "cluster heartbeat
# works again", "cluster: the run table is out of reach", "work loop stopped:".

START = re.compile(r"^job=(\S+) starting the run due at (\S+) \(([\d.]+)s late"
                   r"(?:, (\d+) missed runs coalesced)?\)")
OVERLAP_FIRST = re.compile(r"^job=(\S+) run due at \S+ skipped: the previous run is "
                           r"still going")
OVERLAP_COUNT = re.compile(r"^job=(\S+) (\d+) (?:more )?run\(s\) (?:were )?skipped")
MISFIRE = re.compile(r"^job=(\S+) missed (\d+) run\(s\), the latest at (\S+),")
COALESCED = re.compile(r"^job=(\S+) missed (\d+) run\(s\) since the last report")
NOT_STARTED = re.compile(r"^job=(\S+) run due at (\S+) not started: the worker was "
                         r"stopping")
REFUSED = re.compile(r"^job=(\S+) (?:skipped|failed): ")
CLAIM_LOST = re.compile(r"^job=(\S+):? (?:could not claim its run|whether its claim "
                        r"was recorded is unknown)")
STOPPED = re.compile(r"work loop stopped: .*\((\d+) run\(s\) finished, (\d+) cancelled, "
                     r"(\d+) abandoned\)")
SUMMARY = re.compile(r"^(\d+) job\(s\): (\d+) succeeded, (\d+) failed(?:, (\d+) skipped)?",
                     re.M)


def _wall(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- 1. no occurrence of a non-idempotent job ran twice ------------------------------

def double_runs(history: History) -> list[Violation]:
    """Non-idempotent jobs only. (a) cluster: at most one committed execution per
    (job, slot); (b) one host: two executions of one job name under the same lock
    directory never overlap in time (the host lock); (c) one node: within one process
    and one unchanged schedule (name, every, enabled), runs start at least one
    interval apart: a rename, a restart or a changed schedule starts a new one."""
    out: list[Violation] = []
    once = [e for e in history.executions if not e.idempotent]
    by_slot: dict[tuple[str, int], list[Execution]] = {}
    for e in once:
        if e.slot_ms is not None:
            by_slot.setdefault((e.job, e.slot_ms), []).append(e)
    for (job, slot_ms), runs in sorted(by_slot.items()):
        if len(runs) > 1:
            out.append(Violation("no double run", max(r.started for r in runs),
                                 f"job {job} slot {_ms(slot_ms)} committed {len(runs)} "
                                 f"times: " + "; ".join(_execution(r) for r in runs)))
    by_lock: dict[tuple[str, str, str], list[Execution]] = {}
    for e in once:
        by_lock.setdefault((e.job, e.host, e.lock), []).append(e)
    for (job, host, lock), runs in sorted(by_lock.items()):
        runs.sort(key=lambda r: r.started)
        for first, second in zip(runs, runs[1:]):
            if second.started < first.ended - 0.05:
                out.append(Violation("no double run", second.started,
                                     f"job {job} ran twice at once on host {host} under "
                                     f"lock directory {lock}: {_execution(first)} and "
                                     f"{_execution(second)}"))
    if not history.cluster:
        for proc in history.procs:
            if proc.kind == "daemon":
                out.extend(_off_grid(proc))
    return out


def _off_grid(proc: Proc) -> list[Violation]:
    out = []
    for job, epoch_starts in _epochs(proc).items():
        for every, idempotent, starts in epoch_starts:
            if idempotent:
                continue
            for (slot, _), (later, _) in zip(starts, starts[1:]):
                if later - slot < every - 0.25:
                    out.append(Violation(
                        "no double run", later,
                        f"job {job} (every {every}s, schedule unchanged) started its run "
                        f"due at {_clock(later)} only {later - slot:.2f}s after the one "
                        f"due at {_clock(slot)} in process {proc.name} (pid {proc.pid})"))
    return out


def _starts(proc: Proc) -> dict[str, list[tuple[float, int, float]]]:
    """job -> [(slot as wall time, runs coalesced, line time)] from the start lines."""
    out: dict[str, list[tuple[float, int, float]]] = {}
    for entry in proc.entries():
        match = START.match(entry["message"])
        if match:
            slot = entry["t"] - float(match.group(3))
            out.setdefault(match.group(1), []).append(
                (slot, int(match.group(4) or 1), entry["t"]))
    return out


def _epochs(proc: Proc) -> dict[str, list[tuple[int, bool, list[tuple[float, int]]]]]:
    """job -> [(every, idempotent, [(slot, coalesced)])] per stretch of time in which
    the process ran the job on one unchanged schedule (its config known)."""
    starts = _starts(proc)
    out: dict[str, list] = {}
    for job, seen in starts.items():
        for begin, end, plan_job in _schedule_stretches(proc, job):
            inside = sorted((slot, count) for slot, count, t in seen if begin <= t < end)
            out.setdefault(job, []).append((plan_job.every, plan_job.idempotent, inside))
    return out


def _schedule_stretches(proc: Proc, job: str):
    """(from, to, JobPlan) for each stretch with one schedule of `job` in `proc`."""
    end_of_knowledge = min(t for t in (proc.config_unknown_from, proc.stopped_at,
                                       proc.ended, float("inf")) if t is not None)
    stretches = []
    current = None       # (from, key, plan job)
    for since, plan in proc.versions:
        plan_job = plan.job(job)
        key = (plan_job.every, plan_job.enabled) if plan_job and plan_job.enabled else None
        if current is not None and current[1] != key:
            stretches.append((current[0], since, current[2]))
            current = None
        if current is None and key is not None:
            current = (since, key, plan_job)
    if current is not None:
        stretches.append((current[0], end_of_knowledge, current[2]))
    return [s for s in stretches if s[0] < s[1]]


# --- 2. every occurrence due while a node was up ran or is accounted for -------------

def lost_runs(history: History) -> list[Violation]:
    """Cluster: each occurrence (job, slot) on the epoch grid that came due while some
    daemon had the job scheduled and could claim it (up for a while, not paused,
    its database reachable, the run table not locked, not stopping, its previous
    run of the job over) has a row in the run table, or is accounted for:
    coalesced into a later run, misfired, or refused with its log line. One node: in
    each process stopped by SIGTERM, the occurrences missing between its runs of a
    job (name and schedule unchanged) are at most the skips it logged for the job."""
    if history.cluster:
        return _lost_in_cluster(history)
    return [v for proc in _judged_processes(history) for v in _lost_on_one_node(proc)]


def _accounted_counts(proc: Proc) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in proc.entries():
        message = entry["message"]
        # A coalescing line may repeat what a start line said ("N missed runs
        # coalesced"): counted again, it can only hide a loss, never invent one.
        for pattern, amount in ((OVERLAP_FIRST, None), (OVERLAP_COUNT, 2), (MISFIRE, 2),
                                (COALESCED, 2), (REFUSED, None), (CLAIM_LOST, None)):
            match = pattern.match(message)
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + \
                    (int(match.group(amount)) if amount else 1)
                break
    return counts


def _lost_on_one_node(proc: Proc) -> list[Violation]:
    accounted = _accounted_counts(proc)
    starts = _starts(proc)
    out = []
    for job in {j.name for _, plan in proc.versions for j in plan.jobs}:
        seen = starts.get(job, [])
        missing, first_missing = 0, None
        for begin, end, plan_job in _schedule_stretches(proc, job):
            every = plan_job.every
            inside = sorted((slot, count) for slot, count, t in seen if begin <= t < end)
            expected_until = end - SLACK
            if not inside:
                if expected_until - begin > SLACK and not proc.paused_during(begin, end):
                    missing += 1
                    first_missing = first_missing or begin
                continue
            for (slot, _), (later, coalesced) in zip(inside, inside[1:]):
                steps = round((later - slot) / every)
                if steps > coalesced:
                    missing += steps - coalesced
                    first_missing = first_missing or slot + every
            last = inside[-1][0]
            tail = int((expected_until - last) // every) if expected_until > last else 0
            if tail > 0 and not proc.paused_during(last, end):
                missing += tail
                first_missing = first_missing or last + every
        if missing > accounted.get(job, 0):
            out.append(Violation(
                "no lost run", first_missing,
                f"job {job}: {missing} occurrence(s) due in process {proc.name} (pid "
                f"{proc.pid}) did not run, only {accounted.get(job, 0)} accounted for "
                f"by a skip, misfire or refusal line (first missing due at "
                f"{_clock(first_missing)})"))
    return out


def _judged_slots(history: History) -> dict[tuple[str, int], Proc]:
    """(job, slot_ms) -> a daemon that had it scheduled and could claim it."""
    by_node: dict[str, list[RunRow]] = {}
    for row in history.run_rows:
        by_node.setdefault(row.node, []).append(row)
    # After an outage a node claims again once a heartbeat succeeds.
    beat = max([p.heartbeat for proc in history.procs for _, p in proc.versions] or [0.0])
    blocked = [(start - 2, end + beat + 3, node) for node, start, end in history.outages]
    blocked += [(start - 2, end + 3, None) for start, end in history.locks]
    judged: dict[tuple[str, int], Proc] = {}
    for proc in history.procs:
        if proc.kind != "daemon":
            continue
        ready = _first(proc, "daemon started:")
        if ready is None:
            continue
        quiet = _unsettled(proc)
        host_index = int(proc.host[1:]) - 1
        for job in {j.name for _, plan in proc.versions for j in plan.jobs}:
            for begin, end, plan_job in _schedule_stretches(proc, job):
                every = plan_job.every
                slot = (int(max(begin, ready) + 2) // every + 1) * every
                while slot <= end - 3:
                    window = (slot - 2, slot + 3)
                    if not proc.paused_during(*window) \
                            and not any(a < window[1] and window[0] < b and
                                        (node is None or node == host_index)
                                        for a, b, node in blocked) \
                            and not any(a < window[1] and window[0] < b for a, b in quiet) \
                            and not _busy(by_node.get(proc.node, []), job, slot):
                        judged.setdefault((job, slot * 1000), proc)
                    slot += every
    return judged


def _lost_in_cluster(history: History) -> list[Violation]:
    rows = {(r.job, r.slot_ms) for r in history.run_rows}
    accounted = _accounted_slots(history)
    judged = _judged_slots(history)
    out = []
    for (job, slot_ms), proc in sorted(judged.items()):
        if (job, slot_ms) in rows or (job, slot_ms) in accounted:
            continue
        out.append(Violation("no lost run", slot_ms / 1000,
                             f"job {job}: the occurrence due at {_ms(slot_ms)} has no row "
                             f"in the run table and no log line accounts for it, although "
                             f"node {proc.name} (pid {proc.pid}) had it scheduled, was up, "
                             f"reachable and not running the job"))
    return out


def _busy(rows: list[RunRow], job: str, slot: float) -> bool:
    """The node had a run of the job going around the slot (an overlap skip)."""
    ms = slot * 1000
    return any(r.job == job and r.started_ms <= ms + 500 and
               (r.ended_ms is None or r.ended_ms >= ms - 500) for r in rows)


def _unsettled(proc: Proc) -> list[tuple[float, float]]:
    """Stretches in which a node may rightly not claim: while its heartbeat failed,
    and from its stop on. (A reload is not one: runs it delays start late or are
    coalesced or misfired with their line; a changed schedule starts a new stretch.)"""
    out = []
    failing_since = None
    for entry in proc.entries():
        message = entry["message"]
        if message.startswith(("cluster heartbeat failed", "cluster: the run table is "
                                 "out of reach")):
            failing_since = failing_since or entry["t"] - 2
        elif message.startswith("cluster heartbeat works again") and failing_since:
            out.append((failing_since, entry["t"] + 2))
            failing_since = None
    if failing_since is not None:
        out.append((failing_since, float("inf")))
    stop = proc.stopped_at
    if stop is not None:
        out.append((stop - 1, float("inf")))
    return out


def _accounted_slots(history: History) -> set[tuple[str, int]]:
    """(job, slot_ms) accounted for by a log line of any process: coalesced into a
    later run, misfired (the line gives the latest and the count) or refused."""
    out: set[tuple[str, int]] = set()
    for proc in history.procs:
        for entry in proc.entries():
            message = entry["message"]
            start = START.match(message)
            if start:
                slot = round(entry["t"] - float(start.group(3)))
                plan = proc.plan_at(entry["t"])
                job = plan.job(start.group(1)) if plan else None
                every = job.every if job else None
                for back in range(1, int(start.group(4) or 1)):
                    if every:
                        out.add((start.group(1), (slot - back * every) * 1000))
                continue
            misfire = MISFIRE.match(message)
            if misfire:
                latest = round(_wall(misfire.group(3)))
                plan = proc.plan_at(entry["t"])
                job = plan.job(misfire.group(1)) if plan else None
                for back in range(int(misfire.group(2))):
                    if job:
                        out.add((misfire.group(1), (latest - back * job.every) * 1000))
                continue
            not_started = NOT_STARTED.match(message)
            if not_started:     # claimed here, cancelled by the stop before it began
                out.add((not_started.group(1),
                         round(_wall(not_started.group(2))) * 1000))
                continue
            refused = REFUSED.match(message) or CLAIM_LOST.match(message)
            if refused:
                # The run it refused is the one due just before the line.
                plan = proc.plan_at(entry["t"])
                job = plan.job(refused.group(1)) if plan else None
                if job:
                    slot = int(entry["t"] // job.every) * job.every
                    for candidate in (slot, slot - job.every):
                        out.add((refused.group(1), candidate * 1000))
    return out


# --- 3. stops, exit codes, resources, logs -----------------------------------------

def stops_in_time(history: History) -> list[Violation]:
    """After SIGTERM a process ends within shutdown_timeout + 5 s (cancelled jobs'
    grace) + 2 s (a loop turn, a driver's cancel); a SIGHUP is answered by a reload
    line within 15 s."""
    out = []
    for proc in history.procs:
        if proc.term_at is not None:
            timeout = max([p.shutdown_timeout for _, p in proc.versions] or [30.0])
            bound = timeout + STOP_GRACE + STOP_SLACK
            ended = proc.ended if proc.kill_at is None or proc.ended is None \
                or proc.ended < proc.kill_at else None
            took = (ended if ended is not None else float("inf")) - proc.term_at
            if took > bound:
                out.append(Violation(
                    "stops in time", proc.term_at + bound,
                    f"{proc.name} (pid {proc.pid}) did not stop within {bound:.0f}s of "
                    f"SIGTERM (shutdown_timeout {timeout:g}s + {STOP_GRACE:g}s + "
                    f"{STOP_SLACK:g}s): " + ("it had to be killed" if ended is None
                                              else f"it took {took:.1f}s")))
        for sent in proc.unanswered_hups:
            out.append(Violation("stops in time", sent + 15,
                                 f"{proc.name} (pid {proc.pid}) did not answer SIGHUP "
                                 f"within 15s (no reload line)"))
    return out


def exit_codes(history: History) -> list[Violation]:
    """Daemon: SIGKILL -> -9; SIGTERM -> 1 when its stop line counts a cancelled or
    abandoned run or it said a run's end could not be written, else 0 (before it was ready: 0, or -15 when the signal came before
    its handlers); never an exit of its own. --once: 75 when every job was skipped,
    1 when one failed (or a run's end could not be written), 69 when the cluster's
    run table could not be used at start, else 0, with its summary printed (or -15 for a SIGTERM that
    came after its loop had stopped)."""
    out = []
    for proc in history.procs:
        if proc.returncode is None:
            continue
        code, expected = proc.returncode, None
        if proc.kill_at is not None and (proc.ended is None or proc.ended >= proc.kill_at):
            expected = {-9}
        elif proc.kind == "daemon":
            stop = _stop_line(proc)
            if proc.term_at is None:
                expected = set()
            elif stop is not None:
                failed = int(stop.group(2)) + int(stop.group(3)) or _said(proc, UNWRITTEN)
                expected = {1 if failed else 0}
            elif _first(proc, "daemon started:") is None:
                expected = {0, -15}
            else:
                expected = set()
        else:
            summary = SUMMARY.search(proc.stdout)
            if summary is None:
                expected = {-15} if proc.term_at is not None else set()
            else:
                total, failed = int(summary.group(1)), int(summary.group(3))
                skipped = int(summary.group(4) or 0)
                expected = {75} if total and skipped == total else {1} if failed else {0}
                if _said(proc, UNWRITTEN):
                    expected = {1}     # a run's end never reached the run table
                if _said(proc, RUN_TABLE_UNUSABLE):
                    expected = {69}    # cluster --once without its run table
                stopped = _first(proc, "work loop stopped:")
                if proc.term_at is not None and stopped is not None and \
                        stopped <= proc.term_at:
                    expected.add(-15)   # the work was over: SIGTERM met the exit itself
        if code not in expected:
            why = (f"expected {' or '.join(map(str, sorted(expected)))}" if expected
                   else "it was not asked to stop" if proc.kind == "daemon"
                   else "it printed no summary")
            out.append(Violation("exit codes", proc.ended or proc.started,
                                 f"{proc.name} (pid {proc.pid}) exited {code}: {why}"
                                 + _last_lines(proc)))
    return out


def resources(history: History) -> list[Violation]:
    """Threads and open files at a process's end are at most those 10 s after its
    start + max_workers + 5 (max_workers: the largest it ran with), + what the
    monitoring listener holds when a reload turned `metrics` on after that."""
    out = []
    for proc in history.procs:
        end = proc.stopped_at or float("inf")
        base = next((s for s in proc.samples if s[0] >= proc.started + SETTLE), None)
        last = [s for s in proc.samples if s[0] < end]
        if base is None or not last or last[-1][0] <= base[0]:
            continue
        workers = max(p.max_workers for _, p in proc.versions)
        at_base = proc.plan_at(base[0])
        listener = at_base is not None and not at_base.metrics and any(
            plan.metrics for since, plan in proc.versions if since > base[0])
        for index, what, monitoring in ((1, "threads", MONITORING_THREADS),
                                        (2, "open files", MONITORING_FILES)):
            if last[-1][index] > base[index] + workers + 5 + listener * monitoring:
                out.append(Violation("threads and files do not grow", last[-1][0],
                                     f"{proc.name} (pid {proc.pid}): {last[-1][index]} "
                                     f"{what} at its end, {base[index]} at 10s, "
                                     f"max_workers {workers}"))
    return out


def json_logs(history: History) -> list[Violation]:
    """With --log-format json every stderr line is a JSON object."""
    out = []
    for proc in history.procs:
        for number, line in enumerate(proc.lines, 1):
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                out.append(Violation("stderr is JSON", proc.ended or proc.started,
                                     f"{proc.name} (pid {proc.pid}) stderr line {number} "
                                     f"is not a JSON object: {line[:200]!r}"))
                break
    return out


INVARIANTS = (
    ("no double run", double_runs),
    ("no lost run", lost_runs),
    ("stops in time", stops_in_time),
    ("exit codes", exit_codes),
    ("threads and files do not grow", resources),
    ("stderr is JSON", json_logs),
)


def check(history: History) -> dict[str, list[Violation]]:
    return {name: sorted(fn(history), key=lambda v: v.at) for name, fn in INVARIANTS}


def _judged_processes(history: History) -> list[Proc]:
    return [proc for proc in history.procs if proc.kind == "daemon" and proc.term_at
            is not None and proc.kill_at is None and _stop_line(proc) is not None]


def scope(history: History) -> dict[str, str]:
    """What each check looked at, for its line in the report (a check that judged
    nothing proves nothing)."""
    lost = (f"{len(_judged_slots(history))} occurrences judged" if history.cluster else
            f"{len(_judged_processes(history))} processes judged")
    return {
        "no double run": f"{sum(not e.idempotent for e in history.executions)} committed "
                         f"runs of non-idempotent jobs",
        "no lost run": lost,
        "stops in time": f"{sum(p.term_at is not None for p in history.procs)} SIGTERMs",
        "exit codes": f"{sum(p.returncode is not None for p in history.procs)} exits",
        "threads and files do not grow": f"{len(history.procs)} processes",
        "stderr is JSON": f"{sum(len(p.lines) for p in history.procs)} lines",
    }


# --- helpers -----------------------------------------------------------------------

# Lines that change an exit code (worker/cli.py, worker/app.py).
UNWRITTEN = "could not be written to the cluster's run table"
RUN_TABLE_UNUSABLE = "cannot use the cluster's run table"


def _said(proc: Proc, words: str) -> bool:
    return any(words in entry["message"] for entry in proc.entries()) or \
        any(words in line for line in proc.lines)


def _first(proc: Proc, prefix: str) -> float | None:
    return next((e["t"] for e in proc.entries() if e["message"].startswith(prefix)), None)


def _stop_line(proc: Proc):
    for entry in proc.entries():
        match = STOPPED.match(entry["message"])
        if match:
            return match
    return None


def _last_lines(proc: Proc, count: int = 3) -> str:
    tail = [line[:300] for line in proc.lines[-count:]]
    return ("; last stderr lines: " + " | ".join(tail)) if tail else ""


def _execution(e: Execution) -> str:
    return (f"pid {e.pid} on {e.node} {_clock(e.started)}-{_clock(e.ended)}"
            + (f" slot {_ms(e.slot_ms)}" if e.slot_ms is not None else ""))


def _clock(t: float | None) -> str:
    if t is None:
        return "?"
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _ms(ms: int) -> str:
    return _clock(ms / 1000)
