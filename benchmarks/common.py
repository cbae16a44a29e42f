"""Shared pieces: the run profile, interleaved rounds, targets, tables and RSS."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    """How much of everything one run does (full by default, --quick for a smoke run)."""
    rounds: int                      # interleaved rounds for throughput and scaling
    throughput_seconds: float        # each contender feeds jobs this long per round
    roundtrip_jobs: int              # jobs per round-trip count (single-threaded)
    roundtrip_repeats: int           # the per-job counters are the median of these
    scaling_jobs_per_worker: int     # SLEEP(0.05) jobs per worker thread per round
    startup_runs: int                # interleaved subprocess runs per command
    soak_jobs: int                   # daemon runs measured after the warm-up, per backend
    soak_warmup: int                 # runs (jobs) before the first RSS reading
    soak_library_jobs: int           # library-path jobs measured after the warm-up
    batch_sizes: tuple[int, ...]     # whole-process --once, jobs per config
    check_sizes: tuple[int, ...]     # whole-process --check, jobs per config
    batch_rounds: int                # whole-process rounds (batch and --check)
    big_batch_rounds: int            # rounds for configs of 10,000 jobs or more
    daemon_seconds: int              # daemon lateness: bursts measured per run
    daemon_rounds: int               # daemon lateness: interleaved rounds
    throughput_workers: tuple[int, ...] = (1, 4, 16)
    scaling_workers: tuple[int, ...] = (8, 32, 64)


# Sized to end within 10 minutes on 2 cores (12.3 minutes with 5 rounds, 100,000
# soak runs and two 20-second daemon rounds, on a machine where the hand-written
# fix does 1,200 batch jobs/s).
FULL = Profile(rounds=3, throughput_seconds=0.6, roundtrip_jobs=1000, roundtrip_repeats=3,
               scaling_jobs_per_worker=8, startup_runs=7, soak_jobs=60_000,
               soak_warmup=2_000, soak_library_jobs=10_000,
               batch_sizes=(100, 3000, 30_000), check_sizes=(100, 3000, 30_000),
               batch_rounds=3, big_batch_rounds=1, daemon_seconds=30, daemon_rounds=1)
QUICK = Profile(rounds=3, throughput_seconds=0.15, roundtrip_jobs=200, roundtrip_repeats=1,
                scaling_jobs_per_worker=4, startup_runs=3, soak_jobs=5_000,
                soak_warmup=500, soak_library_jobs=2_000,
                batch_sizes=(100, 3000), check_sizes=(100, 3000),
                batch_rounds=2, big_batch_rounds=1, daemon_seconds=5, daemon_rounds=1)


def make_profile(quick: bool, rounds: int | None) -> Profile:
    profile = QUICK if quick else FULL
    if rounds is not None:
        profile = replace(profile, rounds=rounds, startup_runs=rounds, batch_rounds=rounds)
    return profile


def interleaved(names: Sequence[str], rounds: int,
                measure: Callable[[str], float]) -> dict[str, list[float]]:
    """Each round measures every contender once, starting one further along the
    list each round (A B C, B C A, C A B, ...), so that drift in the machine's
    state (caches, the server's buffer pool, a neighbour's load) spreads over all
    of them instead of favouring whoever always runs first."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in list(names[shift:]) + list(names[:shift]):
            samples[name].append(measure(name))
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


@dataclass
class Target:
    """One line of the issue's target list, as measured in this run."""
    figure: str         # what was measured
    value: str          # its value, formatted
    baseline: str       # what it is compared against, formatted
    ratio: str          # value relative to the baseline, formatted ("" if none)
    target: str         # the target
    met: bool


@dataclass
class Report:
    """Everything a run found: per-section data (for results.json) and targets."""
    meta: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "sections": self.sections,
                "targets": [asdict(t) for t in self.targets], "notes": self.notes}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(_align(text, width, column)
                               for column, (text, width) in enumerate(zip(row, widths))))
        if index == 0:
            print("  " + "  ".join("-" * width for width in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def _align(text: str, width: int, column: int) -> str:
    return text.ljust(width) if column == 0 else text.rjust(width)


def print_targets(targets: Sequence[Target]) -> None:
    print_table("TARGETS (ratios within this run)",
                ["figure", "value", "baseline", "ratio", "target", "met"],
                [[t.figure, t.value, t.baseline, t.ratio, t.target, t.met]
                 for t in targets])


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def now() -> float:
    return time.perf_counter()
