"""Commands to a cluster, through its database: `--status`, `--pause`, `--resume`,
`--run-now` and `--list`'s next runs work from any host with the database's
credentials, whether a node runs there or not (the credentials are the permission:
no socket, no exit 77).

Three tables beside the run table (component "control" of `worker_schema`):
A node's I/O on these tables runs on its "cluster-commands" thread, once a
heartbeat (`ClusterNode`), never on its loop thread: a control table locked by
another session holds up the commands, not the scheduled runs.
- `worker_paused`: the paused job names. Every node reads it once a heartbeat
  (`ClusterPausedJobs.refresh`); the loop reads the names from memory.
- `worker_nodes`: one row per running daemon node, written once a heartbeat while
  the cluster's heartbeat works (`NodeRow.beat`) with the database's clock,
  removed at a clean stop. Its `jobs` column is the node's view, published by its
  loop thread once a heartbeat: each job it runs and that job's next run. A node
  is live while its row's heartbeat is within its lease; none live: exit 69.
- `worker_requests`: a run-now. The command line inserts it `waiting` with an
  expiry; a node takes it with one conditional UPDATE (waiting -> taken: exactly
  one node wins on every backend), hands its start to the loop thread, which runs
  it through the run table with a slot of its own (so it runs once and shows in
  the history) if it comes to it within HAND_OVER_WITHIN, and writes `started` or
  `refused`. The command line waits for that; a request nobody took
  by its expiry is withdrawn (one conditional DELETE, racing the take fairly), so
  it never runs late.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import queue
import socket
import threading
import time

from .control import Handoff, PausedNames
from .exitcodes import EXIT_ALL_SKIPPED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE

log = logging.getLogger("worker.control")

# 1: worker_paused. 2: worker_nodes and worker_requests.
CONTROL_COMPONENT, CONTROL_SCHEMA_VERSION = "control", 2
WAITING, TAKEN, STARTED, REFUSED = "waiting", "taken", "started", "refused"
REQUEST_KEPT_MS = 3_600_000   # finished or expired requests older than this are deleted
TAKE_HEARTBEATS = 3           # a request waits this many heartbeats (of the slowest node)...
TAKE_SLACK = 2.0              # ...plus this many seconds before it expires
ANSWER_SLACK = 10.0           # seconds a request taken by a node may take to be answered
POLL = 0.1                    # seconds between the command line's looks at its request
# Seconds from a node's take of a run-now to the latest start of its run (checked by
# the loop thread, well within ANSWER_SLACK: never after its caller gave up).
HAND_OVER_WITHIN = 5.0
# Seconds the start-up waits for the cluster-commands thread's first pass (the control
# tables, the pauses, this node's row), so that a command right after "daemon started"
# finds the node; no longer: a locked control table must not hold up the start-up
# (the scheduled runs wait for the pauses instead: ClusterPausedJobs.known).
FIRST_PASS_WAIT = 2.0


@functools.cache
def control_tables():
    """(metadata, worker_paused, worker_nodes, worker_requests), built on first use."""
    from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text
    metadata = MetaData()
    paused = Table("worker_paused", metadata,
                   Column("job", String(200), primary_key=True),
                   Column("since_ms", BigInteger, nullable=False),   # the cluster's clock
                   Column("node", String(200), nullable=False))       # paused through
    nodes = Table("worker_nodes", metadata,
                  Column("node", String(200), primary_key=True),
                  Column("token", String(32), nullable=False),   # this incarnation's
                  Column("host", String(200), nullable=False),
                  Column("pid", Integer, nullable=False),
                  Column("heartbeat_ms", BigInteger, nullable=False),  # the database's clock
                  Column("lease_ms", BigInteger, nullable=False),
                  Column("interval_ms", BigInteger, nullable=False),   # its heartbeat setting
                  Column("jobs", Text, nullable=True))       # JSON: {job: next run or null}
    requests = Table("worker_requests", metadata,
                     Column("id", Integer, primary_key=True, autoincrement=True),
                     Column("job", String(200), nullable=False),
                     Column("state", String(16), nullable=False),
                     Column("requested_ms", BigInteger, nullable=False),
                     Column("expires_ms", BigInteger, nullable=False),
                     Column("requested_by", String(200), nullable=False),
                     Column("node", String(200), nullable=True),     # the node that took it
                     Column("code", Integer, nullable=True),         # the command's exit code
                     Column("message", String(1000), nullable=True))
    return metadata, paused, nodes, requests


def ensure_control_schema(engine) -> None:
    """Create the control tables if missing and record (or raise) the component's
    version; a version 1 row (worker_paused alone) is raised to 2 once the new
    tables exist (safe when several nodes start at once)."""
    from sqlalchemy import update

    from .cluster import record_schema_version, schema_versions
    from .db import create_tables
    with engine.begin() as connection:
        create_tables(connection, control_tables()[0])
    record_schema_version(engine, CONTROL_COMPONENT, CONTROL_SCHEMA_VERSION)
    with engine.begin() as connection:
        connection.execute(update(schema_versions).where(
            schema_versions.c.component == CONTROL_COMPONENT,
            schema_versions.c.version < CONTROL_SCHEMA_VERSION).values(
            version=CONTROL_SCHEMA_VERSION))


def _describe(exc: BaseException) -> str:
    from .errors import describe
    return describe(exc)


# --- the node's side ---------------------------------------------------------------------

class ClusterPausedJobs(PausedNames):
    """The paused job names of the cluster (worker_paused), answered from memory;
    read once a heartbeat (`refresh`, on the cluster-commands thread), written at
    once by `set`. Not `known` until the first read: a node that cannot read them
    at start-up (a locked table, a database that does not answer) cannot tell a
    paused job from another, and starts no scheduled run until it can (the
    loop's ScheduleSource holds them), instead of running the paused ones."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self._read_at = float("-inf")
        self.known = False
        # A reload's new membership (another database) whose pauses are not read
        # yet: until they are, none is known (the old database's are not its own).
        self.awaited = None

    def await_cluster(self, cluster) -> None:
        """On the loop thread, in a reload that replaces the membership: the
        scheduled runs wait until the new database's pauses are read."""
        self.awaited = cluster
        self.known = False

    def refresh(self, force: bool = False) -> None:
        from sqlalchemy import select
        from sqlalchemy.exc import DBAPIError
        if not force and time.monotonic() - self._read_at < self.cluster.settings.heartbeat:
            return
        self._read_at = time.monotonic()
        table = control_tables()[1]
        try:
            with self.cluster.database.engine.connect() as connection:
                names = frozenset(connection.execute(select(table.c.job)).scalars())
        except DBAPIError as exc:   # the last known pauses stay
            log.warning("cannot read the paused jobs: %s%s", exc.__class__.__name__,
                        "" if self.known else "; no scheduled run starts until they "
                        "can be read")
            return
        for name in sorted(names ^ self._names):
            log.info("job=%s %s (through the cluster)", name, "paused" if name in names
                     else "resumed", extra={"job": name})
        self._names = names
        if self.awaited is not None:
            if self.awaited is not self.cluster:
                return      # the old database's pauses: the new one's are awaited
            self.awaited = None
        if not self.known:
            self.known = True
            if names:
                log.info("paused jobs (until --resume): %s", ", ".join(sorted(names)))

    def set(self, name: str, paused: bool) -> None:
        set_paused(self.cluster, name, paused, self.cluster.node)
        self._remember(name, paused)


def set_paused(cluster, name: str, paused: bool, through: str) -> None:
    from sqlalchemy import delete, insert
    table = control_tables()[1]
    with cluster.database.engine.begin() as connection:
        connection.execute(delete(table).where(table.c.job == name))
        if paused:
            connection.execute(insert(table).values(
                job=name, since_ms=cluster.clock.now_ms(), node=through[:200]))


class NodeRow:
    """This daemon's row in worker_nodes: written once a heartbeat while the
    cluster's heartbeat works (`beat`, on the cluster-commands thread, with the
    clock the heartbeat reads), removed by a clean stop (`leave`, by the cluster's
    stop). `jobs` is published by the loop thread (a reference swap)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.token = os.urandom(8).hex()
        self.jobs: dict[str, str | None] = {}
        self.closed = False      # the stop: not inserted again after its leave

    def beat(self) -> None:
        from sqlalchemy import insert, update
        from sqlalchemy.exc import IntegrityError
        nodes = control_tables()[2]
        cluster = self.cluster
        values = dict(token=self.token, host=socket.gethostname()[:200], pid=os.getpid(),
                      heartbeat_ms=cluster.clock.now_ms(), lease_ms=cluster.lease_ms,
                      interval_ms=int(cluster.settings.heartbeat * 1000),
                      jobs=json.dumps(self.jobs))
        with cluster.database.engine.begin() as connection:
            if connection.execute(update(nodes).where(nodes.c.node == cluster.node)
                                  .values(**values)).rowcount or self.closed:
                return
        try:
            with cluster.database.engine.begin() as connection:
                connection.execute(insert(nodes).values(node=cluster.node, **values))
        except IntegrityError:   # the same name inserted meanwhile: updated next beat
            pass

    def leave(self) -> None:
        from sqlalchemy import delete
        nodes = control_tables()[2]
        try:
            with self.cluster.database.engine.begin() as connection:
                connection.execute(delete(nodes).where(nodes.c.node == self.cluster.node,
                                                       nodes.c.token == self.token))
        except Exception as exc:  # of any kind: the row then ages out of its lease
            log.warning("could not remove this node's row from worker_nodes: %s",
                        _describe(exc))


class RunNow(Handoff):
    """A run-now request taken by this node, handed to the loop thread to start."""

    def __init__(self, name: str, requested_ms: int, deadline: float) -> None:
        super().__init__(deadline)
        self.name = name
        self.requested_ms = requested_ms


class ClusterNode:
    """A daemon's part in cluster commands. Its database I/O runs on a thread of its
    own ("cluster-commands"), once a heartbeat: it reads the pauses (a reference
    swap the loop reads), writes this node's row, and takes the run-now requests
    for its jobs, handing the loop thread only the start of a run (`RunNow`). A
    locked or slow control table then holds up this thread, never the loop and
    its scheduled runs. On the loop thread (`turn`): publish the jobs' next runs,
    start the runs handed over. Follows a reload that replaces the cluster
    membership."""

    def __init__(self, loop) -> None:
        """On the main thread at start-up: no database I/O here (it is the
        thread's first pass, waited for FIRST_PASS_WAIT at most)."""
        runtime = loop.runtime
        self.loop = loop
        self.cluster = runtime.cluster
        self.paused = ClusterPausedJobs(self.cluster)
        self.row = NodeRow(self.cluster)
        self.row.jobs = _next_runs(runtime)
        self._published = time.monotonic()
        self._last_prune = float("-inf")   # not 0: monotonic starts near 0 at boot
        self._schema_ready = False
        self._handed: queue.SimpleQueue[RunNow] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._nudge = threading.Event()     # a pass now, not a heartbeat later
        self._left = None                   # the membership a reload replaced
        self._first_pass = threading.Event()
        self.cluster.membership = self.row      # removed by the cluster's stop
        self._thread = threading.Thread(target=self._serve, name="cluster-commands",
                                        daemon=True)
        self._thread.start()
        self._first_pass.wait(FIRST_PASS_WAIT)

    def _join(self, cluster) -> None:
        try:
            self.row.beat()      # seen at once, not a heartbeat later
        except Exception as exc:  # of any kind: the next heartbeat writes it
            log.warning("could not write this node's row in worker_nodes yet: %s",
                        _describe(exc))
        cluster.membership = self.row      # removed by the cluster's stop

    def close(self) -> None:
        """At the stop, before the cluster's (which removes the row): no more I/O.
        A thread stuck in a statement is left; the row it may still write ages out
        of its lease."""
        self._closing.set()
        self._nudge.set()
        self.row.closed = True
        self._thread.join(5)

    # --- the loop thread ----------------------------------------------------------

    def turn(self, loop) -> None:
        """On the loop thread, each turn: in memory only."""
        if time.monotonic() - self._published >= self.cluster.settings.heartbeat:
            self._published = time.monotonic()
            self.row.jobs = _next_runs(loop.runtime)
        while True:
            try:
                handed = self._handed.get_nowait()
            except queue.Empty:
                return
            if not handed.settle(lambda: self._start(loop, handed)):
                log.warning("job=%s run-now (through the cluster) not started: waited "
                            "for too long", handed.name, extra={"job": handed.name})

    def _start(self, loop, handed: RunNow) -> tuple[int, str]:
        node = self.cluster.node
        job = next((j for j in loop.runtime.jobs if j.name == handed.name), None)
        try:
            if job is None:
                return EXIT_UNAVAILABLE, f"job {handed.name} is no longer run by node " \
                                         f"{node} (reloaded): nothing started"
            slot = off_schedule_slot(job, handed.requested_ms, loop.runtime)
            if loop.start_now(job, slot):
                log.info("job=%s run-now (through the cluster): started", job.name,
                         extra={"job": job.name})
                return EXIT_OK, f"job {job.name}: run started on node {node}"
        except Exception as exc:  # of any kind: never the loop's
            log.error("job=%s run-now (through the cluster) failed: %s", handed.name,
                      _describe(exc), extra={"job": handed.name})
            return EXIT_UNAVAILABLE, f"job {handed.name}: node {node} could not start " \
                                     f"its run: {_describe(exc)}"
        return EXIT_ALL_SKIPPED, f"job {job.name}: node {node} could not start its run " \
                                 f"(one in progress, or the node is stopping): nothing " \
                                 f"started"

    # --- the cluster-commands thread ----------------------------------------------

    def _serve(self) -> None:
        while True:     # the first pass at once (start-up waits for it a little)
            self._nudge.clear()     # before the pass: a nudge during it is not lost
            try:
                self._duties()
            except Exception as exc:  # of any kind: again next heartbeat
                log.warning("cluster commands: %s", _describe(exc))
            finally:
                self._first_pass.set()
            self._nudge.wait(self.cluster.settings.heartbeat)
            if self._closing.is_set():
                return

    def cluster_replaced(self, cluster) -> None:
        """On the loop thread, in a reload whose runtime has another membership (a
        new cluster section): its pauses are read at once, and until they are no
        scheduled run starts (a job paused only in the new database ran once a
        second until the next heartbeat's pass)."""
        self.paused.await_cluster(cluster)
        self._nudge.set()

    def _duties(self) -> None:
        # The awaited membership first: the reload names it before its runtime is
        # the loop's; and not back to the one just left while the loop has not
        # taken the reload's runtime yet.
        cluster = self.paused.awaited or self.loop.runtime.cluster
        if cluster is not None and cluster is not self.cluster and cluster is not self._left:
            self._rebind(cluster)
        if not self._schema_ready:      # raises: tried again next heartbeat
            ensure_control_schema(self.cluster.database.engine)
            self._schema_ready = True
        held = not self.paused.known
        self.paused.refresh(force=True)
        if held and self.paused.known:
            self.loop.wake()    # the scheduled runs it held may start now
        if not self.cluster.healthy or self._closing.is_set():
            return    # a node whose heartbeat fails is not live, and takes nothing
        self.row.beat()
        if not self.loop.stopping:
            self._take_requests()

    def _rebind(self, cluster) -> None:
        """A reload replaced the membership (a new cluster section): the new one
        gets the row and the pauses; the old one's row goes."""
        ensure_control_schema(cluster.database.engine)   # raises: tried again next beat
        old, self.row = self.row, NodeRow(cluster)
        self.row.jobs = old.jobs
        self.cluster.membership = None
        self._left = self.cluster
        self.cluster = self.paused.cluster = cluster
        self._join(cluster)
        old.leave()

    def _take_requests(self) -> None:
        from sqlalchemy import delete, select, update
        requests = control_tables()[3]
        cluster = self.cluster
        now = cluster.clock.now_ms()
        jobs = {job.name for job in self.loop.runtime.jobs}
        with cluster.database.engine.connect() as connection:
            rows = connection.execute(select(requests.c.id, requests.c.job,
                                             requests.c.requested_ms).where(
                requests.c.state == WAITING, requests.c.expires_ms > now,
                requests.c.job.in_(list(jobs))).order_by(requests.c.id).limit(20)).all()
        for row in rows:
            if self._closing.is_set() or self.loop.stopping:
                return     # left waiting: another node takes it, or it expires
            # Read before the take: the run starts within HAND_OVER_WITHIN of it
            # however long this thread is held afterwards (a slow statement, the
            # process stopped), so never after the command line gave up.
            deadline = time.monotonic() + HAND_OVER_WITHIN
            with cluster.database.engine.begin() as connection:
                taken = connection.execute(update(requests).where(
                    requests.c.id == row.id, requests.c.state == WAITING,
                    requests.c.expires_ms > cluster.clock.now_ms()).values(
                    state=TAKEN, node=cluster.node)).rowcount == 1
            if taken:
                self._run_now(row.id, row.job, row.requested_ms, deadline)
        if time.monotonic() - self._last_prune > 600:
            self._last_prune = time.monotonic()
            with cluster.database.engine.begin() as connection:
                connection.execute(delete(requests).where(
                    requests.c.expires_ms < now - REQUEST_KEPT_MS))

    def _run_now(self, request_id: int, name: str, requested_ms: int,
                 deadline: float) -> None:
        """The request is ours: refuse it (75) when a run of the job is in progress
        on any node, else hand its start to the loop thread and write its answer.
        The loop starts it only while this thread waits and before `deadline`
        (HAND_OVER_WITHIN after the take, well within the caller's wait): a run
        never starts after its caller was told that nothing started, or gave up."""
        busy = running_node(self.cluster, name)
        if busy is not None:
            self._answer(request_id, EXIT_ALL_SKIPPED,
                         f"job {name} has a run in progress on node {busy}: nothing started")
            return
        handed = RunNow(name, requested_ms, deadline)
        self._handed.put(handed)
        self.loop.wake()
        if not handed.answered.wait(max(0.0, deadline - time.monotonic())) and \
                handed.give_up():
            code, message = EXIT_UNAVAILABLE, (
                f"node {self.cluster.node} took the run-now of {name}, but could not "
                f"start it within {HAND_OVER_WITHIN:g}s (its loop busy, or the node "
                f"held up): nothing started")
        else:
            code, message = handed.answer
        self._answer(request_id, code, message)

    def _answer(self, request_id: int, code: int, message: str) -> None:
        from sqlalchemy import update
        requests = control_tables()[3]
        with self.cluster.database.engine.begin() as connection:
            connection.execute(update(requests).where(requests.c.id == request_id).values(
                state=STARTED if code == EXIT_OK else REFUSED, code=code, message=message))


def _next_runs(runtime) -> dict[str, str | None]:
    """The jobs this daemon runs and their next runs (None: not scheduled)."""
    scheduler = runtime.scheduler
    return {job.name: scheduler.next_run(job.name) if scheduler is not None else None
            for job in runtime.jobs}


def running_node(cluster, job: str) -> str | None:
    """A node whose run of `job` is in progress (its row running, within its
    lease), or None."""
    from sqlalchemy import func, select

    from .cluster import RUNNING, runs
    lease = func.coalesce(runs.c.lease_ms, cluster.lease_ms)
    with cluster.database.engine.connect() as connection:
        return connection.execute(select(runs.c.node).where(
            runs.c.job == job, runs.c.outcome == RUNNING,
            runs.c.heartbeat_ms + lease >= cluster.clock.now_ms()).limit(1)).scalar()


def off_schedule_slot(job, requested_ms: int, runtime) -> float:
    """The run-now's slot (seconds) in the run table: the request's time, moved by a
    millisecond while it is one of the job's own occurrences (or, without a
    schedule, a `--once` slot), so that it never takes a scheduled run's key."""
    from .scheduler import schedule_for
    cluster = runtime.cluster
    schedule = schedule_for(job, runtime.ledger.zone, cluster.clock.now)
    grid = cluster.settings.batch_slot
    slot = requested_ms
    while True:
        instant = slot / 1000
        occurrence = schedule.previous_at_or_before(instant) if schedule is not None \
            else round(instant / grid) * grid
        if round(occurrence * 1000) != slot:
            return instant
        slot += 1


# --- the caller's side --------------------------------------------------------------------

class NoNode(Exception):
    """No node has heartbeated within its lease (exit 69)."""


class Caller:
    """The command line's view of the cluster: its database (the run table's),
    the database's clock, and the live nodes."""

    def __init__(self, config) -> None:
        from .app import open_cluster
        self.config = config
        self.cluster = open_cluster(config)
        # This command's requests, whatever becomes of their ids: a random part, as
        # a host name and a pid may come back.
        self.tag = f"{socket.gethostname()[:150]}:{os.getpid()}:{os.urandom(4).hex()}"

    def close(self) -> None:
        self.cluster.database.dispose()

    def live_nodes(self) -> list:
        """The nodes whose heartbeat is within their lease and that run a job of this
        config, newest heartbeat first; NoNode when there are none."""
        from sqlalchemy import inspect, select
        nodes = control_tables()[2]
        with self.cluster.database.engine.connect() as connection:
            self.cluster.clock.sync(connection)
            if not inspect(connection).has_table(nodes.name):
                raise NoNode("no node has ever run here (no table worker_nodes)")
            rows = connection.execute(select(nodes).order_by(
                nodes.c.heartbeat_ms.desc())).all()
        now = self.cluster.clock.now_ms()
        names = set(self.config.job_names())
        live = [row for row in rows if row.heartbeat_ms + row.lease_ms >= now
                and names & set(_jobs_of(row))]
        if not live:
            stale = [f"{row.node} ({(now - row.heartbeat_ms) / 1000:.1f}s ago, lease "
                     f"{row.lease_ms / 1000:g}s)" for row in rows
                     if names & set(_jobs_of(row))]
            raise NoNode("no cluster node has heartbeated within its lease" +
                         (f"; last heard: {', '.join(stale)}" if stale else ""))
        return live

    def next_runs(self, live: list) -> dict[str, str]:
        """Each job's next run as the live nodes have it (the earliest)."""
        paused = self.paused()
        shown: dict[str, str] = {}
        for row in live:     # newest heartbeat first: the freshest view of a job wins
            for job, when in _jobs_of(row).items():
                if when is not None:
                    shown.setdefault(job, when)
        for job in self.config.jobs:
            if job.name in paused:
                shown[job.name] = "paused" + (f" (was due {shown[job.name]})"
                                              if job.name in shown else "")
        return shown

    def paused(self) -> frozenset[str]:
        from sqlalchemy import select
        table = control_tables()[1]
        with self.cluster.database.engine.connect() as connection:
            return frozenset(connection.execute(select(table.c.job)).scalars())

    def run_now(self, job: str, live: list) -> tuple[int, str]:
        """Ask the nodes for a run of `job`; (exit code, message)."""
        from sqlalchemy import delete, insert, select
        from sqlalchemy.exc import DBAPIError
        runners = [row for row in live if job in _jobs_of(row)]
        if not runners:
            return EXIT_UNAVAILABLE, f"no live node runs job {job} (not one of their --job)"
        busy = running_node(self.cluster, job)
        if busy is not None:
            return EXIT_ALL_SKIPPED, f"job {job} has a run in progress on node {busy}: " \
                                     f"nothing started"
        within = TAKE_HEARTBEATS * max(row.interval_ms for row in runners) / 1000 + TAKE_SLACK
        requests = control_tables()[3]
        now = self.cluster.clock.now_ms()
        mine = requests.c.requested_by == self.tag
        try:
            with self.cluster.database.engine.begin() as connection:
                connection.execute(insert(requests).values(
                    job=job, state=WAITING, requested_ms=now,
                    expires_ms=now + int(within * 1000), requested_by=self.tag))
            return self._await(mine, job, within)
        except KeyboardInterrupt:
            raise RunNowInterrupted(self._interrupted(mine, job)) from None
        finally:
            # However this ends (answered, or not: Ctrl-C, a connection lost, even
            # an insert committed whose answer never came), a request still waiting
            # is withdrawn, so that no node takes it after its command stopped
            # waiting; an answered one is removed (else pruned in an hour). One
            # taken and not answered yet is left to its node.
            try:
                with self.cluster.database.engine.begin() as connection:
                    connection.execute(delete(requests).where(
                        mine, requests.c.state.in_([WAITING, STARTED, REFUSED])))
            except DBAPIError as exc:
                log.debug("run-now request not withdrawn or removed: %s", _describe(exc))

    def _interrupted(self, mine, job: str) -> str:
        """Ctrl-C while the command waited: a request still waiting is withdrawn;
        one a node has taken is that node's, whose loop starts the run within
        HAND_OVER_WITHIN of the take: its answer is waited for, so that the caller
        is told whether the run started (never left to start after the command
        said it did not)."""
        from sqlalchemy import delete, select
        from sqlalchemy.exc import DBAPIError
        requests = control_tables()[3]
        try:
            with self.cluster.database.engine.begin() as connection:
                if connection.execute(delete(requests).where(
                        mine, requests.c.state == WAITING)).rowcount:
                    return f"the run-now of {job} was withdrawn before any node took it: " \
                           f"it will not run"
        except DBAPIError as exc:
            log.debug("run-now request not withdrawn: %s", _describe(exc))
        told = False
        until = time.monotonic() + HAND_OVER_WITHIN + TAKE_SLACK
        while True:
            row = self._read(select(requests).where(mine))
            if row is None:
                return f"the run-now of {job} was not requested (or was withdrawn): it " \
                       f"will not run"
            if row is not _UNREAD:
                if row.state == STARTED:
                    return f"{row.message} (the run had started before the interrupt)"
                if row.state == REFUSED:
                    return row.message
                if row.state == TAKEN and not told:
                    told = True
                    from .logs import command_error
                    command_error(f"interrupted: node {row.node} has taken the run-now of "
                                  f"{job}; waiting up to {HAND_OVER_WITHIN + TAKE_SLACK:g}s "
                                  f"for whether its run starts")
            if time.monotonic() > until:
                return f"the run-now of {job} was taken by a node that has not answered; " \
                       f"whether its run started is unknown: see --status and --history"
            time.sleep(POLL)

    def _await(self, mine, job: str, within: float) -> tuple[int, str]:
        """The answer to the request `mine`: a node's; or, once it has expired
        untaken, its withdrawal (69: it never runs). Bounded: a node that took it
        and did not answer within ANSWER_SLACK more is reported (69)."""
        from sqlalchemy import delete, select
        requests = control_tables()[3]
        expired = time.monotonic() + within
        while True:
            row = self._read(select(requests).where(mine))
            if row is not _UNREAD and row is not None and row.state in (STARTED, REFUSED):
                return row.code, row.message
            if row is not _UNREAD and time.monotonic() > expired and \
                    (row is None or row.state == WAITING):
                with self.cluster.database.engine.begin() as connection:
                    withdrawn = connection.execute(delete(requests).where(
                        mine, requests.c.state == WAITING)).rowcount == 1
                if withdrawn or row is None:
                    return EXIT_UNAVAILABLE, (f"no node took the run-now of {job} within "
                                              f"{within:g}s; the request was withdrawn: "
                                              f"it will not run")
                # else a node took it just now: its answer follows
            if time.monotonic() > expired + ANSWER_SLACK:
                taker = f"node {row.node} took it" if row not in (_UNREAD, None) and \
                    row.node else "it could not be read"
                return EXIT_UNAVAILABLE, (f"no answer to the run-now of {job} ({taker}); "
                                          f"whether its run started is unknown: see "
                                          f"--status and --history")
            time.sleep(POLL)

    def _read(self, statement):
        """The request's row (None: gone); _UNREAD if it cannot be read this time."""
        from sqlalchemy.exc import DBAPIError
        try:
            with self.cluster.database.engine.connect() as connection:
                return connection.execute(statement).first()
        except DBAPIError as exc:
            log.debug("run-now request not read: %s", _describe(exc))
            return _UNREAD


_UNREAD = object()     # a request's row that could not be read this time


class RunNowInterrupted(KeyboardInterrupt):
    """Ctrl-C during a cluster --run-now: what became of its request."""


def _jobs_of(row) -> dict[str, str | None]:
    try:
        jobs = json.loads(row.jobs or "{}")
    except ValueError:
        return {}
    return jobs if isinstance(jobs, dict) else {}


def command(config, name: str, job: str | None) -> int:
    """The CLI's --run-now, --pause, --resume and --status in cluster mode."""
    from .logs import command_error
    caller = Caller(config)
    try:
        try:
            live = caller.live_nodes()
        except NoNode as exc:
            command_error(str(exc))
            return EXIT_UNAVAILABLE
        if name == "status":
            _print_status(caller, live)
            return EXIT_OK
        if name == "run-now":
            try:
                code, message = caller.run_now(job, live)
            except RunNowInterrupted as exc:
                command_error(f"interrupted: {exc}")
                return EXIT_INTERRUPTED
            if code != EXIT_OK:
                command_error(message)
                return code
            print(message)
            return code
        set_paused(caller.cluster, job, name == "pause",
                   f"{socket.gethostname()} (command line)")
        heartbeat = max(row.interval_ms for row in live) / 1000
        print(f"job {job} {name}d: every node of the cluster "
              f"{'skips its scheduled runs' if name == 'pause' else 'schedules it again'} "
              f"within one heartbeat ({heartbeat:g}s)")
        return EXIT_OK
    except Exception as exc:  # of any kind: the database refused, or is out of reach
        command_error(f"cannot use the cluster's database at "
                      f"{caller.cluster.database.display_url}: {_describe(exc)}")
        return EXIT_UNAVAILABLE
    finally:
        caller.close()


def _print_status(caller: Caller, live: list) -> None:
    from .control import _next_run_text
    from .reports import _ms_to_text, print_table
    now = caller.cluster.clock.now_ms()
    print(f"cluster: {len(live)} live node(s): " + ", ".join(
        f"{row.node} (heartbeat {(now - row.heartbeat_ms) / 1000:.1f}s ago)" for row in live))
    paused = caller.paused()
    next_runs = caller.next_runs(live)
    last = caller.cluster.last_runs()
    run_by = set().union(*(_jobs_of(row) for row in live))
    rows = []
    for job in caller.config.jobs:
        busy = running_node(caller.cluster, job.name)
        state = f"running on {busy}" if busy else "paused" if job.name in paused else "idle"
        entry = last.get(job.name)
        if job.name not in run_by:
            when = "not run by any live node"
        elif job.name in paused:
            when = next_runs[job.name]
        else:
            when = _next_run_text({"paused": False, "enabled": job.enabled,
                                   "next_run": next_runs.get(job.name)})
        rows.append([job.name, state, when,
                     f"{entry.outcome} at {_ms_to_text(entry.ended_ms or entry.started_ms)} "
                     f"on {entry.node}" if entry else "never"])
    print_table(["job", "state", "next run", "last run"], rows)


def cluster_next_runs(config) -> tuple[str, dict[str, str]] | None:
    """--list: (where from, each job's next run as the live nodes have it), or None
    when no node is live (or the database cannot be read)."""
    caller = Caller(config)
    try:
        live = caller.live_nodes()
        runs = caller.next_runs(live)
    except Exception:  # of any kind (NoNode too): the list is computed here then
        return None
    finally:
        caller.close()
    return f"the cluster's live nodes ({', '.join(row.node for row in live)})", runs
