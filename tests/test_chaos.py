"""The chaos run's own parts (tests/chaos): the seeded event sequence, and that each
invariant reports a planted defect (a double run, a lost run, a hang, a wrong exit
code) and stays quiet on the same history without it. No database: the checks are
pure functions of a recorded history."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime

import pytest

from tests.chaos import invariants
from tests.chaos.events import JobPlan, Plan, applicable, generate
from tests.chaos.invariants import Execution, History, Proc, RunRow
from tests.chaos.report import report
from tests.conftest import ROOT

T0 = 1_800_000_000.0          # a round wall-clock time (an even number of seconds)
PLAN = Plan(0, (JobPlan("tick", "tick", 2, False, "ok", 0.1),))


def line(t: float, message: str, **fields) -> str:
    when = datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
    return json.dumps({"time": when, "level": "INFO", "logger": "worker", "pid": 1,
                       "thread": "MainThread", "message": message, **fields})


def start_line(job: str, slot: float, late: float = 0.0, coalesced: int = 1) -> str:
    due = datetime.fromtimestamp(slot).astimezone().isoformat(timespec="seconds")
    extra = f", {coalesced} missed runs coalesced" if coalesced > 1 else ""
    return line(slot + late, f"job={job} starting the run due at {due} ({late:.3f}s "
                             f"late{extra})", job=job)


def daemon(lines: list[str], *, node: str = "n1", term_at: float = T0 + 40,
           ended: float | None = T0 + 41, returncode: int | None = 0) -> Proc:
    stop = line(term_at + 0.5, "work loop stopped: stop requested; every job finished "
                               "(20 run(s) finished, 0 cancelled, 0 abandoned)")
    return Proc("n1#1", "n1", "daemon", node, 100, T0, ended, returncode, term_at,
                lines=[line(T0 + 0.5, "daemon started: 1 scheduled job(s)")] + lines + [stop],
                versions=[(T0, PLAN)])


def execution(slot: float | None, started: float, ended: float, *, idempotent=False,
              lock="a", pid=100) -> Execution:
    return Execution("tick", "n1", "n1-1", lock, idempotent, pid,
                     None if slot is None else int(slot * 1000), started, ended)


def history(nodes: int = 1, **fields) -> History:
    return History(seed=7, backend="sqlite", nodes=nodes, start=T0, **fields)


# --- the event sequence ------------------------------------------------------------

def test_the_same_seed_gives_the_same_events_and_another_seed_others():
    first = generate(11, 2, 120, "mariadb")
    assert first == generate(11, 2, 120, "mariadb")
    assert first != generate(12, 2, 120, "mariadb")
    assert {event.kind for event in first} >= {"reload", "term"}
    assert all(5 <= event.at < 117 for event in first)
    versions = [event.plan.version for event in first if event.kind == "reload"]
    assert versions == list(range(1, len(versions) + 1))


def test_excluded_kinds_and_mutations_are_never_drawn():
    events = generate(3, 2, 600, "postgresql", frozenset({"kill", "reload:timezone"}))
    assert not [e for e in events if e.kind == "kill" or e.mutation == "timezone"]
    assert [e for e in events if e.mutation == "every"]


def test_what_a_setup_cannot_do_is_not_drawn():
    assert applicable("sqlite", 1) >= {"outage", "lock", "reload:cluster"}
    events = generate(5, 1, 600, "sqlite")
    assert not [e for e in events if e.kind in ("outage", "lock") or e.mutation == "cluster"]


def test_the_package_imports_no_database_driver():
    code = ("import sys, tests.chaos.run, tests.chaos.nodes, tests.chaos.__main__; "
            "print(sorted(m for m in ('pyodbc', 'psycopg', 'sqlite3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# --- a double run ------------------------------------------------------------------

def test_a_slot_committed_twice_is_a_double_run():
    runs = [execution(T0 + 4, T0 + 4.1, T0 + 4.3),
            replace(execution(T0 + 4, T0 + 9.1, T0 + 9.3), node="n2-1", host="n2")]
    found = invariants.double_runs(history(2, executions=runs))
    assert len(found) == 1 and "slot" in found[0].message and "2 times" in found[0].message
    assert invariants.double_runs(history(2, executions=runs[:1])) == []
    idempotent = [replace(run, idempotent=True) for run in runs]
    assert invariants.double_runs(history(2, executions=idempotent)) == []


def test_two_runs_at_once_under_one_host_lock_are_a_double_run():
    runs = [execution(None, T0 + 4, T0 + 9), execution(None, T0 + 6, T0 + 6.5, pid=200)]
    found = invariants.double_runs(history(executions=runs))
    assert len(found) == 1 and "twice at once on host n1" in found[0].message
    # Another lock directory (a reload moved it) is another lock: no promise broken.
    other_dir = [runs[0], replace(runs[1], lock="b")]
    assert invariants.double_runs(history(executions=other_dir)) == []


def test_one_node_rerunning_an_unchanged_schedule_early_is_a_double_run():
    grid = [start_line("tick", T0 + 2 * k) for k in range(1, 6)]
    assert invariants.double_runs(history(procs=[daemon(grid)])) == []
    early = grid + [start_line("tick", T0 + 10.7)]      # 0.7 s after the one at +10
    found = invariants.double_runs(history(procs=[daemon(early)]))
    assert len(found) == 1 and "only 0.70s after" in found[0].message
    # After a reload that changed the job's schedule, a run at once is its new start.
    proc = daemon(early)
    proc.versions.append((T0 + 10.5, Plan(1, (replace(PLAN.jobs[0], every=3),))))
    assert invariants.double_runs(history(procs=[proc])) == []


# --- a lost run --------------------------------------------------------------------

def test_one_node_missing_an_occurrence_is_a_lost_run_unless_a_line_accounts_for_it():
    every_slot = [start_line("tick", T0 + 2 * k) for k in range(1, 20)]
    assert invariants.lost_runs(history(procs=[daemon(every_slot)])) == []
    gap = every_slot[:5] + every_slot[6:]
    found = invariants.lost_runs(history(procs=[daemon(gap)]))
    assert len(found) == 1 and "1 occurrence(s)" in found[0].message
    skipped = gap + [line(T0 + 12.1, "job=tick run due at x skipped: the previous run "
                                     "is still going")]
    assert invariants.lost_runs(history(procs=[daemon(skipped)])) == []
    coalesced = every_slot[:5] + [start_line("tick", T0 + 14, coalesced=2)] + every_slot[7:]
    assert invariants.lost_runs(history(procs=[daemon(coalesced)])) == []


def test_one_node_that_stops_running_a_job_loses_its_runs():
    found = invariants.lost_runs(history(procs=[daemon(
        [start_line("tick", T0 + 2 * k) for k in range(1, 8)])]))
    assert len(found) == 1 and "occurrence(s)" in found[0].message


def test_a_cluster_occurrence_without_a_row_is_a_lost_run():
    node = "n1-1"
    proc = daemon([], node=node)
    slots = [T0 + 2 * k for k in range(0, 21)]
    rows = [RunRow("tick", int(s * 1000), node, int(s * 1000), int(s * 1000) + 100,
                   "success", 0) for s in slots]
    assert invariants.lost_runs(history(2, procs=[proc], run_rows=rows)) == []
    lost = rows[:8] + rows[9:]
    found = invariants.lost_runs(history(2, procs=[proc], run_rows=lost))
    assert len(found) == 1 and "no row in the run table" in found[0].message
    # Not judged while the node could not claim: its database cut around the slot.
    cut = history(2, procs=[proc], run_rows=lost,
                  outages=[(0, slots[8] - 1, slots[8] + 1)])
    assert invariants.lost_runs(cut) == []
    # A misfire line accounts for it.
    due = datetime.fromtimestamp(slots[8]).astimezone().isoformat(timespec="seconds")
    proc.lines.insert(1, line(slots[8] + 4, f"job=tick missed 1 run(s), the latest at "
                                            f"{due}, 4s ago (more than ...)"))
    assert invariants.lost_runs(history(2, procs=[proc], run_rows=lost)) == []


def test_a_cluster_occurrence_cancelled_by_a_stop_before_it_began_is_accounted_for():
    """The node that claimed it was stopped while the run waited for a thread: its
    claim released, no row; the worker's "not started" line names it."""
    node = "n1-1"
    slots = [T0 + 2 * k for k in range(0, 21)]
    rows = [RunRow("tick", int(s * 1000), node, int(s * 1000), int(s * 1000) + 100,
                   "success", 0) for s in slots]
    lost = rows[:8] + rows[9:]
    proc = daemon([], node=node)
    assert len(invariants.lost_runs(history(2, procs=[proc], run_rows=lost))) == 1
    due = datetime.fromtimestamp(slots[8]).astimezone().isoformat(timespec="seconds")
    proc.lines.insert(1, line(slots[8] + 1, f"job=tick run due at {due} not started: the "
                                            f"worker was stopping (it was waiting ...)"))
    assert invariants.lost_runs(history(2, procs=[proc], run_rows=lost)) == []


# --- a hang, exit codes, resources, logs ---------------------------------------------

def test_a_process_that_does_not_stop_after_sigterm_is_a_hang():
    hung = daemon([], ended=T0 + 60, returncode=-9)
    hung.kill_at = T0 + 54
    found = invariants.stops_in_time(history(procs=[hung]))
    assert len(found) == 1 and "it had to be killed" in found[0].message
    assert invariants.stops_in_time(history(procs=[daemon([])])) == []
    slow = daemon([], ended=T0 + 40 + 9.5)      # 2 s shutdown_timeout + 5 + 2 = 9 s
    assert "took 9.5s" in invariants.stops_in_time(history(procs=[slow]))[0].message
    deaf = daemon([])
    deaf.unanswered_hups.append(T0 + 20)
    assert "did not answer SIGHUP" in invariants.stops_in_time(history(procs=[deaf]))[0].message


def test_exit_codes_must_match_what_the_stop_line_and_the_summary_say():
    assert invariants.exit_codes(history(procs=[daemon([])])) == []
    abandoned = daemon([])
    abandoned.lines[-1] = line(T0 + 41, "work loop stopped: stop requested; every job "
                                        "finished (3 run(s) finished, 0 cancelled, "
                                        "1 abandoned)")
    found = invariants.exit_codes(history(procs=[abandoned]))
    assert len(found) == 1 and "exited 0: expected 1" in found[0].message
    died = daemon([], returncode=1)
    died.term_at = None
    assert "not asked to stop" in invariants.exit_codes(history(procs=[died]))[0].message
    once = Proc("once#1", "n1", "once", "n1", 5, T0, T0 + 2, 0,
                stdout="1 job(s): 0 succeeded, 0 failed, 1 skipped\n")
    assert "expected 75" in invariants.exit_codes(history(procs=[once]))[0].message
    assert invariants.exit_codes(history(procs=[replace(once, returncode=75)])) == []
    nothing = replace(once, stdout="0 job(s): 0 succeeded, 0 failed\n")   # none enabled
    assert invariants.exit_codes(history(procs=[nothing])) == []
    # SIGTERM after its loop stopped ends it by the signal; before, it must not.
    nothing.lines = [line(T0 + 1, "work loop stopped: every job ran once (0 run(s) "
                                  "finished, 0 cancelled, 0 abandoned)")]
    nothing.returncode, nothing.term_at = -15, T0 + 1.5
    assert invariants.exit_codes(history(procs=[nothing])) == []
    nothing.term_at = T0 + 0.5
    assert "expected 0" in invariants.exit_codes(history(procs=[nothing]))[0].message
    nothing.returncode = 0
    assert invariants.exit_codes(history(procs=[nothing])) == []


def test_threads_or_files_that_grow_are_reported():
    proc = daemon([])
    proc.samples = [(T0 + 11, 10, 20), (T0 + 30, 12, 22)]
    assert invariants.resources(history(procs=[proc])) == []
    proc.samples.append((T0 + 39, 10 + PLAN.max_workers + 6, 20))
    found = invariants.resources(history(procs=[proc]))
    assert len(found) == 1 and "threads at its end" in found[0].message


def test_files_held_by_a_monitoring_listener_a_reload_turned_on_are_not_growth():
    """A `metrics` section added by a reload opens the HTTP listener (4 files, 2-3
    threads): seen as growth in a 20-minute MariaDB run (seed 9502: 7 files at 10 s,
    15 at the end, max_workers 2)."""
    proc = daemon([])
    proc.samples = [(T0 + 11, 10, 7), (T0 + 30, 12, 15)]
    grown = 7 + PLAN.max_workers + 5 + 1
    proc.samples[-1] = (T0 + 30, 12, grown)
    assert len(invariants.resources(history(procs=[proc]))) == 1
    proc.versions.append((T0 + 20, replace(PLAN, version=PLAN.version + 1, metrics=True)))
    assert invariants.resources(history(procs=[proc])) == []
    proc.samples[-1] = (T0 + 30, 12, grown + invariants.MONITORING_FILES)
    assert len(invariants.resources(history(procs=[proc]))) == 1


def test_a_stderr_line_that_is_not_json_is_reported():
    proc = daemon([])
    assert invariants.json_logs(history(procs=[proc])) == []
    proc.lines.append("Traceback (most recent call last):")
    assert "line" in invariants.json_logs(history(procs=[proc]))[0].message


# --- the report ----------------------------------------------------------------------

def test_the_report_names_the_seed_the_invariant_and_the_events_before_it():
    events = generate(7, 1, 60, "sqlite")
    runs = [execution(None, T0 + 4, T0 + 9), execution(None, T0 + 6, T0 + 6.5, pid=200)]
    planted = history(executions=runs, events=[(T0 + e.at - 10, e) for e in events])
    out = io.StringIO()
    assert report(planted, invariants.check(planted), "python -m tests.chaos ...", out) == 1
    text = out.getvalue()
    assert "no double run: 1 violation(s) (2 committed runs of non-idempotent jobs)" in text
    assert "VIOLATION (seed 7) no double run" in text
    assert events[0].describe() in text
    assert text.rstrip().endswith("repeat with: python -m tests.chaos ...")
    clean = history(events=[(T0, events[0])])
    out = io.StringIO()
    assert report(clean, invariants.check(clean), "x", out) == 0
    assert out.getvalue().splitlines()[-1] == "chaos: 1 events, 0 runs, 0 violations (seed 7)"
    assert len(out.getvalue().splitlines()) == len(invariants.INVARIANTS) + 1


@pytest.mark.parametrize("argv", [["--backend", "oracle"],
                                  ["--backend", "sqlite", "--exclude", "nap"]])
def test_the_command_line_refuses_what_it_does_not_know(argv):
    result = subprocess.run([sys.executable, "-m", "tests.chaos", *argv], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_an_excluded_job_kind_is_neither_in_the_job_list_nor_added():
    from tests.chaos.events import initial_plan
    assert "stuck" in {job.mode for job in initial_plan().jobs}
    events = generate(9, 2, 900, "mariadb", frozenset({"job:stuck", "job:fail"}))
    plans = [initial_plan(frozenset({"job:stuck", "job:fail"}))] + \
        [e.plan for e in events if e.plan is not None]
    assert [e for e in events if e.mutation == "add"]
    assert not {job.mode for plan in plans for job in plan.jobs} & {"stuck", "fail"}


def test_every_plan_renders_to_a_config_the_worker_accepts(tmp_path):
    import yaml

    from tests.chaos.events import initial_plan
    from tests.chaos.nodes import render
    from worker.config import load
    plans = [initial_plan()] + [e.plan for e in generate(21, 2, 240, "mariadb")
                                if e.plan is not None]
    for cluster in (False, True):
        for plan in plans:
            data = render(plan, backend="sqlite", url=f"sqlite:///{tmp_path / 'c.db'}",
                          lock_dir=tmp_path / "locks", host="n2", node="n2-3",
                          cluster=cluster)
            path = tmp_path / f"v{plan.version}.yaml"
            path.write_text(yaml.safe_dump(data))
            config = load(path)
            assert config.worker.lock_dir == str(tmp_path / "locks" / plan.lock)
            assert [job.name for job in config.jobs] == [job.name for job in plan.jobs]
            assert (config.cluster is not None) == cluster
            if cluster:
                assert config.cluster.node == "n2-3"
