"""Throughput of many short jobs: worker vs hand-written fix vs raw driver.

For each backend, job kind (SELECT 1; one small insert) and worker count, the
three contenders are built once and warmed up (every pool connection opened),
then measured in interleaved rounds: each round feeds each contender jobs for
the same number of seconds, in a rotating order. The figure is the median
jobs/s over the rounds.
"""
from __future__ import annotations

from .backends import Backend, create_bench_table, drop_bench_table
from .common import Target, interleaved, median, print_table, ratio
from .contenders import CONTENDERS, HAND, RAW, WORKER, build, feed_count, feed_for
from .jobs import INSERT_ROW, SELECT_ONE, JobKind

KINDS = (SELECT_ONE, INSERT_ROW)
TARGET_WORKERS = 4
TARGET_RATIO, AIM_RATIO = 1.0, 1.2


def run(context) -> tuple[dict, list[Target]]:
    data: dict = {}
    targets: list[Target] = []
    for backend in context.backends:
        create_bench_table(backend)
        try:
            for kind in KINDS:
                rows = [_measure_config(context.profile, backend, kind, workers)
                        for workers in context.profile.throughput_workers]
                data[f"{backend.name}/{kind.name}"] = rows
                _print(backend, kind, rows)
                if backend.is_mariadb:
                    targets += _targets(backend, kind, rows)
        finally:
            drop_bench_table(backend)
    return data, targets


def _measure_config(profile, backend: Backend, kind: JobKind, workers: int) -> dict:
    window = max(8, 4 * workers)
    contenders = {name: build(name, backend, kind, workers) for name in CONTENDERS}
    failures: dict[str, list] = {name: [0, None] for name in CONTENDERS}

    def measure(name: str) -> float:
        result = feed_for(contenders[name], profile.throughput_seconds, window)
        if result.failures:
            failures[name][0] += result.failures
            failures[name][1] = failures[name][1] or result.first_error
        return result.rate

    try:
        for contender in contenders.values():   # open every connection, fill caches
            feed_count(contender, 8 * workers, window)
        samples = interleaved(CONTENDERS, profile.rounds, measure)
    finally:
        for contender in contenders.values():
            contender.close()
    for name, (count, error) in failures.items():
        if count:
            print(f"  WARNING {backend.name}/{kind.name} x{workers} {name}: {count} "
                  f"failed job(s), first: {error}")
    return {"workers": workers, "samples": samples,
            "median": {name: median(values) for name, values in samples.items()},
            "failures": {name: count for name, (count, _) in failures.items()}}


def _print(backend: Backend, kind: JobKind, rows: list[dict]) -> None:
    table = []
    for row in rows:
        m = row["median"]
        table.append([row["workers"], m[WORKER], m[HAND], m[RAW],
                      ratio(m[WORKER], m[HAND]), ratio(m[WORKER], m[RAW]),
                      ratio(m[HAND], m[RAW])])
    print_table(f"Throughput, {backend.name}, {kind.name} job (jobs/s, median of rounds)",
                ["workers", WORKER, HAND, RAW, "worker/hand", "worker/raw", "hand/raw"],
                table)


def _targets(backend: Backend, kind: JobKind, rows: list[dict]) -> list[Target]:
    targets = []
    for row in rows:
        if row["workers"] != TARGET_WORKERS:
            continue
        m = row["median"]
        value = ratio(m[WORKER], m[HAND])
        targets.append(Target(
            figure=f"throughput {backend.name} {kind.name} x{TARGET_WORKERS}",
            value=f"{m[WORKER]:,.0f}/s", baseline=f"hand {m[HAND]:,.0f}/s",
            ratio=f"{value:.2f}x",
            target=f">= {TARGET_RATIO:.1f}x (aim {AIM_RATIO:.1f}x)",
            met=value >= TARGET_RATIO))
    return targets
