"""Run the benchmarks: .venv/bin/python -m benchmarks.run [--quick] [--only NAME ...] [--rounds N]

Prints plain-text tables and a TARGETS summary, and writes benchmarks/results.json.
See benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from . import batch, daemon, roundtrips, scale, scaling, soak, startup, throughput
from .backends import Backend, mariadb_backend, mariadb_problem, sqlite_backend
from .common import ROOT, Profile, Report, Target, make_profile, print_targets

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"

Section = Callable[["Context"], tuple[dict, list[Target]]]
SECTIONS: dict[str, Section] = {
    "throughput": throughput.run,
    "roundtrips": roundtrips.run,
    "scaling": scaling.run,
    "startup": startup.run,
    "soak": soak.run,
    "batch": batch.run_batch,
    "check": batch.run_check,
    "daemon": daemon.run,
    "scale": scale.run,
}
# Run only when named (--only scale): it takes longer than the whole default run.
NOT_BY_DEFAULT = {"scale"}
NEEDS_MARIADB = {"roundtrips", "scaling"}


@dataclass
class Context:
    profile: Profile
    backends: list[Backend]
    report: Report
    scale: scale.ScaleProfile

    @property
    def mariadb(self) -> Backend | None:
        return next((b for b in self.backends if b.is_mariadb), None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer rounds, shorter feeds, a 5,000-job soak")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(SECTIONS),
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="interleaved rounds (throughput, scaling, start-up runs, "
                                          "batch and --check runs)")
    parser.add_argument("--batch-jobs", type=int, nargs="+", metavar="N",
                        help="the batch section's config sizes (default: the profile's), "
                             "e.g. --batch-jobs 3000 for the history and log-line rows only")
    parser.add_argument("--scale-jobs", type=int, nargs="+", metavar="N",
                        help="the scale section's daemon sizes (default 1000 10000 100000, "
                             "with --quick 1000); the largest is also its --once size")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH,
                        help=f"where to write the JSON results (default: {RESULTS_PATH})")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.scale_jobs and min(args.scale_jobs) < 1:
        parser.error("--scale-jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)   # job modules resolve relative to the repo root, as for the CLI
    _compile_bytecode()
    profile = make_profile(args.quick, args.rounds)
    if args.batch_jobs:
        profile = replace(profile, batch_sizes=tuple(args.batch_jobs))
    report = Report(meta=_meta(args, profile))
    selected = args.only or [name for name in SECTIONS if name not in NOT_BY_DEFAULT]
    _print_header(report.meta)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as directory:
        context = Context(profile, _backends(Path(directory), report), report,
                          scale.scale_profile(args.quick, args.scale_jobs))
        for name in selected:
            _run_section(name, context)
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    report.meta["loadavg_end"] = os.getloadavg()
    print_targets(report.targets)
    load = report.meta["loadavg_end"]
    print(f"\nload average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for note in report.notes:
        print(f"note: {note}")
    args.output.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    print(f"\n{len(selected)} section(s) in {report.meta['seconds']}s; "
          f"results written to {_relative(args.output)}")
    return 0


def _compile_bytecode() -> None:
    """Write the bytecode of this checkout's modules, as `pip install` does for an
    installed package: with PYTHONDONTWRITEBYTECODE set (as on some CI images) every
    process would otherwise compile the worker's modules from source at start-up,
    and the hand-written fix has next to none to compile."""
    import compileall
    for directory in ("worker", "jobs", "benchmarks"):
        compileall.compile_dir(ROOT / directory, quiet=2)
    compileall.compile_file(ROOT / "run_worker.py", quiet=2)


def _run_section(name: str, context: Context) -> None:
    if name in NEEDS_MARIADB and context.mariadb is None:
        context.report.notes.append(f"{name}: skipped, MariaDB is not available")
        return
    print(f"\n=== {name} " + "=" * (70 - len(name)))
    section_started = time.perf_counter()
    data, targets = SECTIONS[name](context)
    context.report.sections[name] = data
    context.report.targets += targets
    print(f"({name}: {time.perf_counter() - section_started:.1f}s)")


def _backends(directory: Path, report: Report) -> list[Backend]:
    backends = [sqlite_backend(directory)]
    problem = mariadb_problem()   # also turns ODBC pooling off, before any connection
    if problem is None:
        backends.append(mariadb_backend())
    else:
        report.notes.append(f"MariaDB skipped: {problem}")
        print(f"WARNING: MariaDB not available, SQLite only: {problem}")
    return backends


def _meta(args: argparse.Namespace, profile: Profile) -> dict:
    import pyodbc
    import sqlalchemy
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "profile": asdict(profile) | {"quick": args.quick},
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "pyodbc": pyodbc.version,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "git": _git_state(),
    }


def _print_header(meta: dict) -> None:
    profile = meta["profile"]
    print(f"benchmarks: {'quick' if profile['quick'] else 'full'} run, {profile['rounds']} "
          f"rounds; Python {meta['python']}, SQLAlchemy {meta['sqlalchemy']}, pyodbc "
          f"{meta['pyodbc']}, {meta['cpus']} CPUs, git {meta['git']}")
    load = meta["loadavg_start"]
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (anything "
          f"else running on these CPUs skews the timings; ratios within a run less so)")


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in worker/' if dirty else ''}"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
