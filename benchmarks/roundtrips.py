"""Round trips per job, counted by MariaDB itself.

Each contender runs N jobs on one thread with one connection (pool_size 1), so
the per-job figures are clean. The counts are MariaDB's status counters of that
very connection (SHOW STATUS, read through the contender's own pool or thread):
other clients of the server cannot disturb them. A reading costs a little itself
(the SHOW, and for a pool its checkout and return), so two readings are taken
back to back first and their difference is subtracted.

As a cross-check, a raw pyodbc monitor connection reads SHOW GLOBAL STATUS
around the same jobs (its own share subtracted); when it sees more than the
session did, another client was busy and only the session figures are used.

Before that, probes check on this server which counters a COM_PING, a ROLLBACK
through the ODBC driver, the pool's reset-on-return and a pre-ping move.
"""
from __future__ import annotations

from typing import Callable

from sqlalchemy import create_engine

from .backends import (MARIADB_URL, Backend, create_bench_table, drop_bench_table,
                       mariadb_backend)
from .capi import CClient
from .common import Target, interleaved, median, print_table
from .contenders import HAND, HAND_PRE_PING, RAW, WORKER, build, feed_count
from .jobs import INSERT_ROW, SELECT_ONE, JobKind
from .server import STATUS_SQL, ServerMonitor, diff, status_counters

ROWS = (WORKER, HAND, RAW, HAND_PRE_PING)
KINDS = (SELECT_ONE, INSERT_ROW)
PROBE_REPEATS = 20
TOLERANCE = 0.02   # per job
SHOWN = {"Questions", "Queries", "Com_select", "Com_insert", "Com_commit", "Com_rollback",
         "Com_admin_commands"}

Counters = dict[str, int]


def counted(read: Callable[[], Counters], action: Callable[[], object],
            times: int) -> dict[str, float]:
    """Counters moved per action on one connection, the cost of reading removed."""
    first, second = read(), read()
    action()
    third = read()
    overhead, moved = diff(first, second), diff(second, third)
    names = set(overhead) | set(moved)
    per_action = {name: (moved.get(name, 0) - overhead.get(name, 0)) / times
                  for name in names}
    return {name: value for name, value in per_action.items() if value}


def run(context) -> tuple[dict, list[Target]]:
    backend = context.mariadb
    monitor = ServerMonitor()
    create_bench_table(backend)
    try:
        data = {"probes": _run_probes()}
        targets = []
        for kind in KINDS:
            per_job = _count_kind(context.profile, monitor, backend, kind)
            data[kind.name] = per_job
            _print(kind, per_job)
            targets.append(_target(kind, per_job[WORKER]))
        return data, targets
    finally:
        drop_bench_table(backend)
        monitor.close()


# -- probes: which counter moves for what ---------------------------------------

def _run_probes() -> dict[str, dict[str, float]]:
    probes = {
        "COM_PING (libmariadb mysql_ping)": _ping_probe,
        "pyodbc rollback() = SQLEndTran, no transaction": _odbc_rollback_probe,
        "engine: SELECT 1, commit(), close() (reset-on-return)": _reset_probe,
        "engine pre_ping: connect(), close(), no statement": _pre_ping_probe,
    }
    results = {label: probe() for label, probe in probes.items()}
    print_table("Round-trip probes: MariaDB session counters moved per action",
                ["action", "counters moved"],
                [[label, _format_counters(moved) if moved is not None else "skipped"]
                 for label, moved in results.items()])
    return results


def _ping_probe() -> dict[str, float] | None:
    client = CClient.connect()
    if client is None:
        return None   # no MariaDB C library here: nothing to ping with
    try:
        return counted(lambda: status_counters(client.query(STATUS_SQL)),
                       lambda: [client.ping() for _ in range(PROBE_REPEATS)], PROBE_REPEATS)
    finally:
        client.close()


def _odbc_rollback_probe() -> dict[str, float]:
    connection = mariadb_backend().raw_connect()
    try:
        return counted(lambda: _read_odbc(connection),
                       lambda: [connection.rollback() for _ in range(PROBE_REPEATS)],
                       PROBE_REPEATS)
    finally:
        connection.close()


def _reset_probe() -> dict[str, float]:
    def step(engine) -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            connection.commit()

    return _engine_probe(step, pool_pre_ping=False)


def _pre_ping_probe() -> dict[str, float]:
    def step(engine) -> None:
        with engine.connect():
            pass

    return _engine_probe(step, pool_pre_ping=True)


def _engine_probe(step, **options) -> dict[str, float]:
    engine = create_engine(MARIADB_URL, pool_size=1, max_overflow=0, **options)
    try:
        return counted(lambda: _read_engine(engine),
                       lambda: [step(engine) for _ in range(PROBE_REPEATS)], PROBE_REPEATS)
    finally:
        engine.dispose()


def _read_odbc(connection) -> Counters:
    cursor = connection.cursor()
    try:
        return status_counters(cursor.execute(STATUS_SQL).fetchall())
    finally:
        cursor.close()


def _read_engine(engine) -> Counters:
    """The counters of the engine's one pooled connection (pool_size 1)."""
    with engine.connect() as connection:
        return _read_odbc(connection.connection.dbapi_connection)


# -- per-job counts for each contender --------------------------------------------

def _count_kind(profile, monitor: ServerMonitor, backend: Backend,
                kind: JobKind) -> dict[str, dict]:
    runs: dict[str, list[tuple[dict, dict]]] = {name: [] for name in ROWS}

    def measure(name: str) -> float:
        runs[name].append(_count_once(monitor, name, backend, kind, profile.roundtrip_jobs))
        return 0.0

    interleaved(ROWS, profile.roundtrip_repeats, measure)
    return {name: _summarise(kind, _median_counters([s for s, _ in samples]),
                             _median_counters([g for _, g in samples]))
            for name, samples in runs.items()}


def _count_once(monitor: ServerMonitor, name: str, backend: Backend, kind: JobKind,
                jobs: int) -> tuple[dict[str, float], dict[str, float]]:
    """(session counters per job, global counters per job) for one contender."""
    contender = build(name, backend, kind, 1)
    seen_globally: dict[str, int] = {}

    def run_jobs() -> None:
        before = monitor.counters()
        result = feed_count(contender, jobs, 4)
        seen_globally.update(monitor.moved(before, monitor.counters()))
        if result.failures:
            print(f"  WARNING round trips {name}/{kind.name}: {result.failures} failed "
                  f"job(s), first: {result.first_error}")

    try:
        feed_count(contender, 5, 4)          # connect and initialise outside the count
        session = counted(lambda: contender.on_own_connection(_read_odbc), run_jobs, jobs)
    finally:
        contender.close()
    return session, {counter: value / jobs for counter, value in seen_globally.items()}


def _median_counters(samples: list[dict[str, float]]) -> dict[str, float]:
    names = {name for sample in samples for name in sample}
    return {name: median([sample.get(name, 0.0) for sample in samples]) for name in names}


def _round_trips(per_job: dict[str, float]) -> float:
    return per_job.get("Questions", 0.0) + per_job.get("Com_admin_commands", 0.0)


def _summarise(kind: JobKind, per_job: dict[str, float],
               global_per_job: dict[str, float]) -> dict:
    def c(name: str) -> float:
        return per_job.get(name, 0.0)

    # SQLAlchemy's pre-ping on mysql+pyodbc is a SELECT 1, not a COM_PING: any
    # SELECT beyond the job's own counts as a ping, not as a statement.
    select_pings = max(0.0, c("Com_select") - kind.own_selects)
    round_trips = _round_trips(per_job)
    return {
        "statements": c("Questions") - c("Com_commit") - c("Com_rollback") - select_pings,
        "commits": c("Com_commit"),
        "rollbacks": c("Com_rollback"),
        "pings": c("Com_admin_commands") + select_pings,
        "round_trips": round_trips,
        "extra": round_trips - 2.0,          # the job's one statement + one COMMIT
        "global_round_trips": _round_trips(global_per_job),
        "counters": per_job,
        "global_counters": global_per_job,
    }


def _print(kind: JobKind, per_job: dict[str, dict]) -> None:
    rows = []
    for name, figures in per_job.items():
        others = {k: v for k, v in figures["counters"].items() if k not in SHOWN}
        rows.append([name, figures["statements"], figures["commits"], figures["rollbacks"],
                     figures["pings"], figures["round_trips"], figures["extra"],
                     figures["global_round_trips"], _format_counters(others) or "-"])
    print_table(f"Round trips per job, {kind.name} job, MariaDB, one thread, session "
                f"counters (expected: 1 statement + 1 COMMIT = 2)",
                ["contender", "statements", "commits", "rollbacks", "pings", "round trips",
                 "extra", "(global)", "other counters per job"], rows)
    noisy = [name for name, f in per_job.items()
             if f["global_round_trips"] > f["round_trips"] + TOLERANCE]
    if noisy:
        print(f"  note: other clients were busy during {', '.join(noisy)} (the global "
              f"counters saw more than the session); the session figures are exact")


def _format_counters(counters: dict[str, float]) -> str:
    return " ".join(f"{name.removeprefix('Com_')}={round(value, 3):g}"
                    for name, value in sorted(counters.items()))


def _target(kind: JobKind, figures: dict[str, float]) -> Target:
    met = (abs(figures["commits"] - 1) <= TOLERANCE and figures["rollbacks"] <= TOLERANCE
           and figures["pings"] <= TOLERANCE and abs(figures["extra"]) <= TOLERANCE)
    return Target(
        figure=f"round trips/job mariadb {kind.name}",
        value=(f"{figures['round_trips']:.2f} (commit {figures['commits']:.2f}, rollback "
               f"{figures['rollbacks']:.2f}, ping {figures['pings']:.2f})"),
        baseline="1 statement + 1 COMMIT",
        ratio=f"{figures['round_trips'] / 2:.2f}x",
        target="2.00, nothing else", met=met)
