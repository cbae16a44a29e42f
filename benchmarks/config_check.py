"""`--check` time against the floor, for a generated config of N jobs.

    .venv/bin/python -m benchmarks.config_check [--jobs 30000] [--rounds 5] [--keep PATH]

Three commands, each a fresh interpreter, timed from spawn to exit in
interleaved rounds (median of wall clock, and of the child's CPU time, user +
system, which a busy shared machine disturbs less):
- floor:    python -c "import worker.config, worker.callables, yaml; yaml.safe_load(open(F))"
            (the worker's config modules imported and the file parsed, nothing checked;
            safe_load is PyYAML's pure-Python loader, as a user who calls it gets)
- floor-c:  the same with yaml.load(open(F), Loader=yaml.CSafeLoader) (libyaml):
            for reference, the fastest PyYAML can turn the file into Python objects
- check:    python run_worker.py --check -c F   (read, validate, import every job's
            function and check its arguments; stdout discarded)

The target (issue 12): check at most 3x the floor on 30,000 jobs. Measured on
the shared 2-core machine, 2026-11-24 (medians; the machine was busy, so CPU
time is the steadier figure):

    30,000 jobs, 3.2 MB    floor          floor-c        check          check/floor
    before (PyYAML pure)   13.8 s / 10.6  4.4 s / 3.7    16.6 s / 13.0  1.20x / 1.22x
    after  (libyaml ...)   18.2 s / 10.1  4.1 s / 3.4     3.1 s /  2.4  0.17x / 0.24x
    3,000 jobs: check 1.36 s / 1.31 CPU before, 0.62 s / 0.53 CPU after.
    (wall / CPU seconds; 5 rounds, the 30,000-job "before" 3 rounds)  The jobs
mix what a real file holds: the example jobs' functions with kwargs, schedules
(every and cron), timeouts, per-job retry and a YAML anchor shared by many jobs.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .common import ROOT, interleaved, median, ratio

TARGET_RATIO = 3.0

HEAD = """\
x-fast-retry: &fast-retry
  attempts: 2
  wait_initial: 10ms
  wait_max: 50ms
database:
  url: sqlite:///{db}
  pool_recycle: 1h
worker:
  max_workers: 4
retry:
  attempts: 3
  wait_initial: 0.5s
  wait_max: 30s
jobs:
"""

JOB_SHAPES = (
    "  - name: select-{i}\n"
    "    call: tests.jobfuncs:select_one\n",
    "  - name: enqueue-{i}\n"
    "    call: jobs.commands:enqueue_commands\n"
    "    kwargs: {{count: 25}}\n"
    "    every: 10s\n",
    "  - name: process-{i}\n"
    "    call: jobs.commands:process_pending\n"
    "    kwargs: {{batch_size: 100}}\n"
    "    timeout: 5m\n"
    "    every: 30s\n"
    "    retry: {{attempts: 3}}\n",
    "  - name: purge-{i}\n"
    "    call: jobs.commands:purge_processed\n"
    "    kwargs: {{keep_days: 7}}\n"
    "    cron: \"{minute} 3 * * *\"\n",
    "  - name: shared-retry-{i}\n"
    "    call: tests.jobfuncs:select_one\n"
    "    retry: *fast-retry\n"
    "    enabled: false\n",
)


def write_config(path: Path, jobs: int, database: Path) -> Path:
    """A valid config of `jobs` jobs, cycling through JOB_SHAPES."""
    parts = [HEAD.format(db=database)]
    for i in range(jobs):
        parts.append(JOB_SHAPES[i % len(JOB_SHAPES)].format(i=i, minute=i % 60))
    path.write_text("".join(parts), encoding="utf-8")
    return path


def commands(config: Path) -> dict[str, list[str]]:
    floor = ("import worker.config, worker.callables, yaml; "
             f"yaml.safe_load(open({str(config)!r}))")
    floor_c = ("import worker.config, worker.callables, yaml; "
               f"yaml.load(open({str(config)!r}), Loader=yaml.CSafeLoader)")
    return {
        "floor": [sys.executable, "-c", floor],
        "floor-c": [sys.executable, "-c", floor_c],
        "check": [sys.executable, str(ROOT / "run_worker.py"), "--check", "-c", str(config)],
    }


def time_command(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.config_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="write the generated config here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-check-") as directory:
        config = write_config(args.keep or Path(directory) / "jobs.yaml", args.jobs,
                              Path(directory) / "worker.db")
        argvs = commands(config)
        for command in argvs.values():     # page cache, bytecode cache
            time_command(command)
        size = config.stat().st_size
        cpu: dict[str, list[float]] = {name: [] for name in argvs}

        def measure(name: str) -> float:
            wall, used = time_command(argvs[name])
            cpu[name].append(used)
            return wall
        wall = interleaved(list(argvs), args.rounds, measure)
    print(f"{args.jobs:,} jobs, {size:,} bytes, {args.rounds} rounds, median "
          f"(all samples in brackets)")
    for name in argvs:
        print(f"  {name:<8} wall {median(wall[name]):6.2f} s "
              f"[{', '.join(f'{s:.2f}' for s in wall[name])}]   "
              f"cpu {median(cpu[name]):6.2f} s [{', '.join(f'{s:.2f}' for s in cpu[name])}]")
    for figure, samples in (("wall", wall), ("cpu", cpu)):
        print(f"  check / floor ({figure}) = "
              f"{ratio(median(samples['check']), median(samples['floor'])):.2f}x "
              f"(target at most {TARGET_RATIO:g}x); check / floor-c = "
              f"{ratio(median(samples['check']), median(samples['floor-c'])):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
