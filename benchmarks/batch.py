"""Whole processes: `run-worker --once` against the hand-written fix, and
`--check` against its floor, over generated configs of N jobs.

batch: for each backend (SQLite file, MariaDB/pyodbc) and N in BATCH_SIZES, two
commands, timed wall-clock from spawn to exit, in interleaved rounds (median):
- worker: `python run_worker.py --once -c <N jobs, each benchmarks.jobs:select_one,
  max_workers 4, lock_dir in the temp dir>`, at its default log level (INFO), its
  log and summary written to a file as under cron;
- hand-written fix: `python -m benchmarks.fixbatch URL N 4` (benchmarks/fixbatch.py);
- for the configs of 3,000 jobs or more also the worker at --log-level WARNING (the
  per-run log line's cost; issue 27's figures), and for the 3,000-job ones the
  worker with `history: {enabled: false}` (the run history's cost: one row per
  run, written by a thread of its own; target at most 2%).
Throughput = N / wall time. Each pair is run once untimed first (page cache,
bytecode, the lock files a cron host already has), except for configs of 10,000
jobs or more, which get BIG rounds only (one in the full run): there the worker's
first round also creates its 30,000 lock files.

check: `python run_worker.py --check -c <the same config>` against the floor:
`python -c "import <every module --check imports at top level>; yaml.safe_load(...)"`,
the modules being those `--check` itself imported (read from `-X importtime` of
one run), so that the floor differs from --check only by what --check does beyond
importing and parsing: validation, line numbers, importing the job functions.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .backends import Backend
from .common import ROOT, Target, interleaved, median, now, print_table, ratio

WORKERS = 4
WORKER, FIX = "worker", "hand-written fix"
# The worker at --log-level WARNING (no line per run), for the TARGET_JOBS configs
# only: what the per-run INFO line costs, measured in the same rounds.
WORKER_QUIET = "worker, WARNING"
# The worker with `history: {enabled: false}`, for the TARGET_JOBS configs only: what
# the run history (on by default: one row per run, written by a thread of its own)
# costs, measured in the same rounds.
WORKER_NO_HISTORY = "worker, no history"
TARGET_HISTORY = 1.02      # a batch with the history at most 2% slower than without
CHECK, FLOOR = "--check", "import + safe_load"
TARGET_JOBS, TARGET_BATCH = 3000, 1.2
TARGET_CHECK_JOBS, TARGET_CHECK = 30_000, 3.0


@dataclass(frozen=True)
class Command:
    argv: list[str]
    log: Path | None = None      # stdout and stderr go here (else discarded)


def write_config(path: Path, url: str, jobs: int, lock_dir: Path,
                 history: bool = True) -> Path:
    lines = ["database:", f"  url: '{url}'", "worker:", f"  max_workers: {WORKERS}",
             f"  lock_dir: {lock_dir}"] + ([] if history else ["history: {enabled: false}"]) \
        + ["jobs:"]
    for number in range(jobs):
        lines += [f"  - name: job-{number:05d}", "    call: benchmarks.jobs:select_one"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_command(command: Command, allowed=(0,), cpu: list[float] | None = None) -> float:
    """Wall seconds from spawn to exit; the child's CPU seconds (user + system)
    appended to `cpu` if given."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = now()
    if command.log is None:
        completed = subprocess.run(command.argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tail = completed.stderr.decode(errors="replace")[-2000:]
    else:
        with open(command.log, "wb") as log:
            completed = subprocess.run(command.argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT)
        tail = command.log.read_text(errors="replace")[-2000:]
    elapsed = now() - started
    if cpu is not None:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if completed.returncode not in allowed:
        raise RuntimeError(f"{' '.join(command.argv[:4])} ... exited "
                           f"{completed.returncode}:\n{tail}")
    return elapsed


def run_batch(context) -> tuple[dict, list[Target]]:
    profile = context.profile
    data: dict = {}
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as directory:
        directory = Path(directory)
        for backend in context.backends:
            for jobs in profile.batch_sizes:
                commands = _batch_commands(directory, backend, jobs)
                if jobs < 10_000:   # the big configs' rounds are long enough as they are
                    for command in commands.values():
                        run_command(command)
                rounds = profile.batch_rounds if jobs < 10_000 else profile.big_batch_rounds
                cpu: dict[str, list[float]] = {name: [] for name in commands}
                samples = interleaved(list(commands), rounds,
                                      lambda name: run_command(commands[name],
                                                               cpu=cpu[name]))
                rates = {name: jobs / median(values) for name, values in samples.items()}
                data[f"{backend.name} {jobs}"] = {"jobs": jobs, "samples": samples,
                                                  "cpu": cpu, "jobs_per_s": rates}
                quiet = (f"  worker at WARNING {rates[WORKER_QUIET]:7,.0f}/s"
                         if WORKER_QUIET in rates else "")
                print(f"  {backend.name:7} {jobs:6,} jobs: worker {rates[WORKER]:7,.0f}/s "
                      f" fix {rates[FIX]:7,.0f}/s  ratio "
                      f"{ratio(rates[WORKER], rates[FIX]):.2f}x{quiet}", flush=True)
    rows = [[key, entry["jobs"], median(entry["samples"][WORKER]),
             median(entry["samples"][FIX]), entry["jobs_per_s"][WORKER],
             entry["jobs_per_s"][FIX],
             f"{ratio(entry['jobs_per_s'][WORKER], entry['jobs_per_s'][FIX]):.2f}x",
             median(entry["cpu"][WORKER]), median(entry["cpu"][FIX])]
            for key, entry in data.items()]
    print_table(f"Batch, whole process, {WORKERS} workers, SELECT 1 per job (median of "
                f"interleaved runs, spawn to exit; cpu: the process's user + system "
                f"seconds)",
                ["backend jobs", "jobs", "worker s", "fix s", "worker /s", "fix /s",
                 "worker/fix", "worker cpu s", "fix cpu s"], rows)
    quiet_rows = [[key, median(entry["samples"][WORKER_QUIET]),
                   median(entry["samples"][WORKER]),
                   f"{ratio(entry['jobs_per_s'][WORKER_QUIET], entry['jobs_per_s'][FIX]):.2f}x",
                   median(entry["cpu"][WORKER_QUIET]), median(entry["cpu"][WORKER])]
                  for key, entry in data.items() if WORKER_QUIET in entry["samples"]]
    if quiet_rows:
        print_table("The per-run log line: the worker at --log-level WARNING (same rounds)",
                    ["backend jobs", "WARNING s", "INFO s", "WARNING/fix",
                     "WARNING cpu s", "INFO cpu s"], quiet_rows)
    history_rows = [[key, median(entry["samples"][WORKER]),
                     median(entry["samples"][WORKER_NO_HISTORY]),
                     f"{history_cost(entry):.3f}x",
                     median(entry["cpu"][WORKER]), median(entry["cpu"][WORKER_NO_HISTORY])]
                    for key, entry in data.items() if WORKER_NO_HISTORY in entry["samples"]]
    if history_rows:
        print_table("The run history: the worker with it (the default) and with "
                    "history: {enabled: false} (same rounds)",
                    ["backend jobs", "history s", "no history s", "history/none",
                     "history cpu s", "no history cpu s"], history_rows)
    for key, entry in data.items():
        if WORKER_NO_HISTORY in entry["samples"]:
            cost = history_cost(entry)
            targets.append(Target(
                figure=f"batch --once {key} jobs: with the run history / without",
                value=f"{median(entry['samples'][WORKER]):.2f}s",
                baseline=f"no history {median(entry['samples'][WORKER_NO_HISTORY]):.2f}s",
                ratio=f"{cost:.3f}x", target=f"<= {TARGET_HISTORY}x",
                met=cost <= TARGET_HISTORY))
        if entry["jobs"] == TARGET_JOBS and key.startswith("mariadb"):
            rates = entry["jobs_per_s"]
            value = ratio(rates[WORKER], rates[FIX])
            targets.append(Target(
                figure=f"batch --once mariadb {TARGET_JOBS:,} jobs x{WORKERS}, whole process",
                value=f"{rates[WORKER]:,.0f}/s", baseline=f"fix {rates[FIX]:,.0f}/s",
                ratio=f"{value:.2f}x", target=f">= {TARGET_BATCH}x",
                met=value >= TARGET_BATCH))
    return data, targets


def history_cost(entry: dict) -> float:
    """Wall time with the run history over wall time without (medians)."""
    return median(entry["samples"][WORKER]) / median(entry["samples"][WORKER_NO_HISTORY])


def _batch_commands(directory: Path, backend: Backend, jobs: int) -> dict[str, Command]:
    config = write_config(directory / f"{backend.name}-{jobs}.yaml", backend.url, jobs,
                          directory / "locks")
    commands = {
        WORKER: Command([sys.executable, "run_worker.py", "--once", "-c", str(config)],
                        directory / "worker.log"),
        FIX: Command([sys.executable, "-m", "benchmarks.fixbatch", backend.url, str(jobs),
                      str(WORKERS)], directory / "fix.log"),
    }
    if jobs >= TARGET_JOBS:     # the figures are at WARNING (issue 27)
        commands[WORKER_QUIET] = Command([sys.executable, "run_worker.py", "--once", "-c",
                                          str(config), "--log-level", "WARNING"],
                                         directory / "worker.log")
    if jobs == TARGET_JOBS:
        without = write_config(directory / f"{backend.name}-{jobs}-no-history.yaml",
                               backend.url, jobs, directory / "locks", history=False)
        commands[WORKER_NO_HISTORY] = Command([sys.executable, "run_worker.py", "--once",
                                               "-c", str(without)], directory / "worker.log")
    return commands


def run_check(context) -> tuple[dict, list[Target]]:
    profile = context.profile
    backend = context.mariadb or context.backends[0]
    data: dict = {}
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-check-") as directory:
        directory = Path(directory)
        for jobs in profile.check_sizes:
            config = write_config(directory / f"check-{jobs}.yaml", backend.url, jobs,
                                  directory / "locks")
            check = Command([sys.executable, "run_worker.py", "--check", "-c", str(config)])
            modules = _modules_imported(check.argv)
            floor = Command([sys.executable, "-c",
                             f"import yaml{''.join(', ' + m for m in modules)}\n"
                             f"with open({str(config)!r}) as f: yaml.safe_load(f)"])
            commands = {CHECK: check, FLOOR: floor}
            if jobs < 10_000:
                for command in commands.values():
                    run_command(command)
            rounds = profile.batch_rounds if jobs < 10_000 else profile.big_batch_rounds
            samples = interleaved(list(commands), rounds,
                                  lambda name: run_command(commands[name]))
            medians = {name: median(values) for name, values in samples.items()}
            data[jobs] = {"samples": samples, "median": medians, "floor_imports": modules}
            print(f"  {jobs:6,} jobs: --check {medians[CHECK]:.3f}s  floor "
                  f"{medians[FLOOR]:.3f}s  ratio {ratio(medians[CHECK], medians[FLOOR]):.2f}x",
                  flush=True)
    print_table("--check against its floor (python importing what --check imports + "
                "yaml.safe_load of the file), median of interleaved runs",
                ["jobs", "--check s", "floor s", "ratio", "--check ms/1,000 jobs"],
                [[jobs, f"{e['median'][CHECK]:.3f}", f"{e['median'][FLOOR]:.3f}",
                  f"{ratio(e['median'][CHECK], e['median'][FLOOR]):.2f}x",
                  f"{e['median'][CHECK] / jobs * 1e6:.1f}"]
                 for jobs, e in data.items()])
    if TARGET_CHECK_JOBS in data:
        medians = data[TARGET_CHECK_JOBS]["median"]
        value = ratio(medians[CHECK], medians[FLOOR])
        targets.append(Target(
            figure=f"--check {TARGET_CHECK_JOBS:,} jobs", value=f"{medians[CHECK]:.2f}s",
            baseline=f"import+safe_load {medians[FLOOR]:.2f}s", ratio=f"{value:.2f}x",
            target=f"<= {TARGET_CHECK}x", met=value <= TARGET_CHECK))
    return data, targets


def _modules_imported(argv: list[str]) -> list[str]:
    """The modules a run imports that are not part of the interpreter's own start-up
    or the standard library's: the worker's, the job module's and third-party
    top-level imports, read from python -X importtime (depth-0 entries)."""
    completed = subprocess.run([argv[0], "-X", "importtime"] + argv[1:], cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"--check exited {completed.returncode}:\n"
                           f"{completed.stderr[-2000:]}")
    stdlib = set(sys.stdlib_module_names)
    modules = []
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        name = line.rsplit("|", 1)[1]
        if name.startswith("  "):     # imported by another module: comes along
            continue
        name = name.strip()
        if not all(part.isidentifier() for part in name.split(".")) or \
                name.split(".")[0] in stdlib or name.startswith("_"):
            continue      # the header line, the standard library, .pth hooks
        modules.append(name)
    return list(dict.fromkeys(modules))
