"""A chaos run against a real database: start the nodes, apply the events in order at
their times, stop everything, read what was left behind, check, report."""
from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import invariants
from .events import Event, Plan, generate, initial_plan
from .invariants import History
from .nodes import ROOT, Database, Host, Process
from .report import report

ANSWER_WITHIN = 15.0     # seconds a node gets to log a reload after SIGHUP
READY_WITHIN = 60.0      # seconds a node gets to log "daemon started"
RELOAD_LINES = ("reloaded ", "reload rejected")


@dataclass
class Settings:
    backend: str
    nodes: int
    seconds: float
    seed: int
    exclude: frozenset[str] = frozenset()
    keep: bool = False        # keep the work directory even without a violation

    @property
    def command(self) -> str:
        exclude = f" --exclude {','.join(sorted(self.exclude))}" if self.exclude else ""
        return (f"python -m tests.chaos --backend {self.backend} --nodes {self.nodes} "
                f"--seconds {self.seconds:g} --seed {self.seed}{exclude}")


@dataclass
class _Timers:
    """Ends of pauses, outages and locks, due at wall-clock times."""
    due: list[tuple[float, str, int]] = field(default_factory=list)

    def add(self, at: float, what: str, node: int) -> None:
        self.due.append((at, what, node))
        self.due.sort()

    def take(self, now: float) -> list[tuple[float, str, int]]:
        ready = [t for t in self.due if t[0] <= now]
        self.due = [t for t in self.due if t[0] > now]
        return ready


class ChaosRun:
    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.events = generate(settings.seed, settings.nodes, settings.seconds,
                               settings.backend, settings.exclude)
        self.plan: Plan = initial_plan(settings.exclude)
        self.workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir=ROOT / "tests" / "chaos"))
        self.history = History(settings.seed, settings.backend, settings.nodes, time.time())
        self.timers = _Timers()
        self.hosts: list[Host] = []
        self.processes: list[Process] = []
        self.once_count = 0
        self.tds = None
        self.proxies: list = []
        self.lock_threads: list[threading.Thread] = []
        self._sampling = threading.Event()

    # --- set-up ---------------------------------------------------------------------

    def _backend_urls(self) -> tuple[str, list[str]]:
        """The direct URL (for the checker) and one URL per host (through its proxy)."""
        backend, nodes = self.settings.backend, self.settings.nodes
        if backend == "sqlite":
            url = f"sqlite:///{self.workdir / 'chaos.db'}"
            return url, [url] * nodes
        from tests.backends import BACKENDS
        from tests.tcpproxy import TcpProxy
        server = BACKENDS[backend]
        if backend == "sqlserver":
            from tests.sqlserver.process import TdsServerProcess
            self.tds = TdsServerProcess(self.workdir, name="tds")
            server = server.on(self.tds)
        self.proxies = [TcpProxy(server.upstream_port, server.upstream_host)
                        for _ in range(nodes)]
        return server.url, [server.proxied_url(proxy.port) for proxy in self.proxies]

    def run(self) -> int:
        violations = 1
        try:
            direct, urls = self._backend_urls()
            self.database = Database(direct)
            self.database.reset()
            cluster = self.settings.nodes > 1
            self.hosts = [Host(i, self.workdir, self.settings.backend, urls[i],
                               self.proxies[i] if self.proxies else None, cluster)
                          for i in range(self.settings.nodes)]
            sampler = threading.Thread(target=self._sample, daemon=True, name="chaos-sampler")
            sampler.start()
            for host in self.hosts:
                self.processes.append(host.start_daemon(self.plan))
            for host in self.hosts:
                self._wait_ready(host.daemon)
            self.history.start = time.time()
            self._apply_events()
            self._stop_all()
            self._sampling.set()
            self.history.executions = self.database.executions()
            self.history.run_rows = self.database.run_rows()
            for process in self.processes:
                process.finish_record()
                self.history.procs.append(process.record)
            if self.settings.keep:
                # Everything the checks read, to check a kept run again.
                import pickle
                (self.workdir / "history.pickle").write_bytes(pickle.dumps(self.history))
            results = invariants.check(self.history)
            violations = report(self.history, results, self.settings.command, self.out)
        finally:
            self._cleanup()
        if violations or self.settings.keep:
            print(f"chaos: processes' logs and configs kept in {self.workdir}", file=self.out)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return violations

    def _wait_ready(self, process: Process) -> None:
        """Until the node has its signal handlers (as systemd waits for READY before
        it would reload): it logged that it started, or that it waits for the
        database. Pauses and outages due meanwhile still end on time."""
        deadline = time.time() + READY_WITHIN
        while time.time() < deadline and process.alive() and not process.ready():
            self._wait_until(time.time() + 0.1)

    def _sample(self) -> None:
        while not self._sampling.wait(1.0):
            for process in list(self.processes):
                if process.alive():
                    process.sample()
                else:
                    process.reap()

    # --- events ---------------------------------------------------------------------

    def _apply_events(self) -> None:
        start = self.history.start
        for event in self.events:
            self._wait_until(start + event.at)
            self.history.events.append((time.time(), event))
            getattr(self, f"_on_{event.kind}")(event)
        self._wait_until(start + self.settings.seconds)

    def _wait_until(self, moment: float) -> None:
        while True:
            now = self._end_due()
            if now >= moment:
                return
            time.sleep(min(0.1, moment - now))

    def _end_due(self) -> float:
        """End the pauses and outages due by now; now."""
        now = time.time()
        for _, what, node in self.timers.take(now):
            self._end(what, node)
        return now

    def _end(self, what: str, node: int) -> None:
        if what == "pause":
            self._resume(self.hosts[node])
        elif what == "outage":
            self.proxies[node].restore()
            for index, (n, begin, end) in enumerate(self.history.outages):
                if n == node and end == float("inf"):
                    self.history.outages[index] = (n, begin, time.time())

    def _on_reload(self, event: Event) -> None:
        self.plan = event.plan
        waiting = []
        for host in self.hosts:
            daemon = host.daemon
            if daemon is None or not daemon.alive() or not daemon.ready():
                continue
            host.write(self.plan)
            before = daemon.count(RELOAD_LINES)
            sent = daemon.signal(signal.SIGHUP)
            if daemon.paused_since is not None:
                if daemon.pending_hup is None:      # a second SIGHUP merges with it
                    daemon.pending_hup = before
            else:
                waiting.append((daemon, before, sent))
        for daemon, before, sent in waiting:
            self._await_reload(daemon, before, sent)

    def _await_reload(self, daemon: Process, before: int, sent: float) -> None:
        """Wait for the node's reload line; its time is when the new plan took over."""
        deadline = sent + ANSWER_WITHIN
        while daemon.alive():
            # Looked at once at least: a node awaited after another one, past its own
            # deadline, had answered in time (seed 34332388: flagged all the same).
            if daemon.count(RELOAD_LINES) > before:
                self._note_reload(daemon, before)
                return
            # Outages and pauses end on time meanwhile: a node waiting at start-up
            # for its database answers the SIGHUP once it has started, and its
            # outage ended only after this wait gave up (seed 34332388).
            if self._end_due() >= deadline:
                break
            time.sleep(0.05)
        if daemon.alive():
            daemon.record.unanswered_hups.append(sent)
            if daemon.record.config_unknown_from is None:
                daemon.record.config_unknown_from = sent

    def _note_reload(self, daemon: Process, before: int) -> None:
        import json
        lines = [json.loads(line) for line in daemon.lines()
                 if any(f'"message": "{p}' in line for p in RELOAD_LINES)]
        for entry in lines[before:]:
            if entry["message"].startswith("reloaded "):
                from datetime import datetime
                at = datetime.fromisoformat(entry["time"]).timestamp()
                daemon.record.versions.append((at, self.plan))

    def _resume(self, host: Host) -> None:
        daemon = host.daemon
        if daemon is None or daemon.paused_since is None:
            return
        daemon.resume()
        if daemon.pending_hup is not None:
            # Counted from when the SIGHUP was sent, not from now: a reload line
            # written between the two (seed 9102: a SIGSTOP that had not yet held)
            # was taken for no answer at all.
            before, daemon.pending_hup = daemon.pending_hup, None
            self._await_reload(daemon, before, time.time())

    def _on_term(self, event: Event) -> None:
        self._restart(self.hosts[event.node], signal.SIGTERM)

    def _on_kill(self, event: Event) -> None:
        self._restart(self.hosts[event.node], signal.SIGKILL)

    def _restart(self, host: Host, signum: int) -> None:
        daemon = host.daemon
        if daemon is not None and daemon.alive():
            self._resume(host)
            self._stop(daemon, signum)
        time.sleep(0.5)
        process = host.start_daemon(self.plan)
        self.processes.append(process)
        self._wait_ready(process)

    def _stop(self, process: Process, signum: int) -> None:
        at = process.signal(signum)
        if signum == signal.SIGKILL:
            process.record.kill_at = at
            process.wait(10)
            return
        process.record.term_at = at
        bound = max(p.shutdown_timeout for _, p in process.record.versions) + \
            invariants.STOP_GRACE + invariants.STOP_SLACK
        if not process.wait(bound + 5):
            process.record.kill_at = process.signal(signal.SIGKILL)
            process.wait(10)

    def _on_pause(self, event: Event) -> None:
        host = self.hosts[event.node]
        if host.daemon is not None and host.daemon.alive() and host.daemon.paused_since is None:
            host.daemon.pause()
            self.timers.add(time.time() + event.duration, "pause", event.node)

    def _on_outage(self, event: Event) -> None:
        proxy = self.proxies[event.node]
        if any(n == event.node and end == float("inf")
               for n, _, end in self.history.outages):
            return
        proxy.cut()
        self.history.outages.append((event.node, time.time(), float("inf")))
        self.timers.add(time.time() + event.duration, "outage", event.node)

    def _on_lock(self, event: Event) -> None:
        self.lock_threads.append(self.database.hold_run_table(
            event.duration, self.history.locks, self.tds))

    def _on_once(self, event: Event) -> None:
        self.once_count += 1
        jobs = tuple(name for name in event.jobs if self.plan.job(name))
        self.processes.append(self.hosts[event.node].start_once(self.plan, self.once_count,
                                                                  jobs))

    # --- the end --------------------------------------------------------------------

    def _stop_all(self) -> None:
        for _, what, node in self.timers.take(float("inf")):
            self._end(what, node)
        for thread in self.lock_threads:
            thread.join(30)
        for host in self.hosts:
            self._resume(host)
        for process in self.processes:
            if process.alive():
                process.record.term_at = process.signal(signal.SIGTERM)
        for process in self.processes:
            if process.alive() and process.record.term_at is not None:
                bound = max(p.shutdown_timeout for _, p in process.record.versions) + \
                    invariants.STOP_GRACE + invariants.STOP_SLACK
                left = process.record.term_at + bound + 5 - time.time()
                if not process.wait(max(0.1, left)):
                    process.record.kill_at = process.signal(signal.SIGKILL)
                    process.wait(10)
            process.reap()

    def _cleanup(self) -> None:
        self._sampling.set()
        for process in self.processes:
            if process.alive():
                process.popen.kill()
                process.popen.wait(10)
        for proxy in self.proxies:
            proxy.close()
        if self.tds is not None:
            self.tds.stop()
        database = getattr(self, "database", None)
        if database is not None:
            with contextlib.suppress(Exception):
                database.close()


def main(settings: Settings, out: TextIO = sys.stdout) -> int:
    # A SIGTERM to the run (a CI timeout) still stops the nodes it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return ChaosRun(settings, out).run()
