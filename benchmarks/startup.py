"""Start-up of a one-shot run against the import floor.

Each command is a fresh interpreter from the venv, timed wall-clock from spawn
to exit, in interleaved rounds (median):
- bare:      python -c pass
- imports:   python -c "import sqlalchemy.orm, pyodbc, tenacity, yaml"  (the floor)
- one-shot:  python run_worker.py --once -c <config: one SELECT 1 job, SQLite file>
- one-shot, PYTHONDONTWRITEBYTECODE=1: the same, with no bytecode cache for the
  project's own modules (site-packages keep the .pyc files pip wrote), as in an
  environment that sets that variable: worker/ is compiled from source every run.

The first three run with a bytecode cache in a temp dir (PYTHONPYCACHEPREFIX,
filled by an untimed warm-up run), as an installed worker would have one; this
also keeps .pyc files out of the repository.

Then one run each of the one-shot and the floor under `-X importtime`: the
imports with the largest cumulative time, and the modules the one-shot imports
beyond the floor's (per package), which is what lazy imports could save.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .common import ROOT, Target, interleaved, median, now, print_table, ratio

TARGET_RATIO = 1.3
TOP_IMPORTS = 10
FLOOR_IMPORTS = "import sqlalchemy.orm, pyodbc, tenacity, yaml"

CONFIG = """\
database:
  url: sqlite:///{path}
worker:
  max_workers: 1
jobs:
  - name: trivial
    call: benchmarks.jobs:select_one
"""


ONE_SHOT, NO_PYC = "one-shot", "one-shot, PYTHONDONTWRITEBYTECODE=1"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


def run(context) -> tuple[dict, list[Target]]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as directory:
        commands = _commands(Path(directory))
        for command in commands.values():      # fill the page cache and bytecode cache
            _time(command)
        samples = interleaved(list(commands), context.profile.startup_runs,
                              lambda name: _time(commands[name]))
        imports = _importtime(commands[ONE_SHOT])
        floor_modules = {entry["module"] for entry in _importtime(commands["imports"])}
    offenders = sorted(imports, key=lambda e: e["cumulative_ms"], reverse=True)[:TOP_IMPORTS]
    packages = _beyond_floor(imports, floor_modules)
    medians = {name: median(values) for name, values in samples.items()}
    _print(medians, offenders, packages)
    value = ratio(medians[ONE_SHOT], medians["imports"])
    target = Target(figure="start-up one-shot", value=f"{medians[ONE_SHOT]:.3f}s",
                    baseline=f"imports {medians['imports']:.3f}s", ratio=f"{value:.2f}x",
                    target=f"<= {TARGET_RATIO}x", met=value <= TARGET_RATIO)
    return ({"samples": samples, "median": medians, "importtime_top": offenders,
             "importtime_packages": packages}, [target])


def _commands(directory: Path) -> dict[str, Command]:
    config = directory / "oneshot.yaml"
    config.write_text(CONFIG.format(path=directory / "oneshot.db"))
    python = sys.executable
    cached = {name: value for name, value in os.environ.items()
              if name not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    cached["PYTHONPYCACHEPREFIX"] = str(directory / "pycache")
    uncached = {name: value for name, value in os.environ.items()
                if name != "PYTHONPYCACHEPREFIX"} | {"PYTHONDONTWRITEBYTECODE": "1"}
    one_shot = [python, "run_worker.py", "--once", "-c", str(config)]
    return {
        "bare": Command([python, "-c", "pass"], cached),
        "imports": Command([python, "-c", FLOOR_IMPORTS], cached),
        ONE_SHOT: Command(one_shot, cached),
        NO_PYC: Command(one_shot, uncached),
    }


def _time(command: Command) -> float:
    started = now()
    completed = subprocess.run(command.argv, cwd=ROOT, env=command.env,
                               capture_output=True, text=True)
    elapsed = now() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command.argv)} exited {completed.returncode}:\n"
                           f"{completed.stderr[-2000:]}")
    return elapsed


def _importtime(command: Command) -> list[dict]:
    """Every import of one run of the command, from python -X importtime."""
    argv = [command.argv[0], "-X", "importtime"] + command.argv[1:]
    completed = subprocess.run(argv, cwd=ROOT, env=command.env, capture_output=True,
                               text=True, check=True)
    return [entry for entry in map(_parse_importtime, completed.stderr.splitlines())
            if entry is not None]


def _beyond_floor(imports: list[dict], floor_modules: set[str]) -> list[dict]:
    """The modules the one-shot imports and the floor does not, their self time
    summed per top-level package, largest first: what a lazy import could save."""
    totals: dict[str, list] = {}
    for entry in imports:
        if entry["module"] in floor_modules:
            continue
        total = totals.setdefault(entry["module"].split(".")[0], [0.0, 0])
        total[0] += entry["self_ms"]
        total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: item[1][0], reverse=True)
    return [{"package": package, "self_ms": ms, "modules": count}
            for package, (ms, count) in ranked[:TOP_IMPORTS]]


def _parse_importtime(line: str) -> dict | None:
    """'import time:  self_us |  cumulative_us | <indent>module' -> a dict."""
    if not line.startswith("import time:"):
        return None
    self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
    if not self_us.strip().isdigit():
        return None   # the header line
    depth = (len(name) - len(name.lstrip()) - 1) // 2   # a top-level import: 0
    return {"module": name.strip(), "depth": depth, "self_ms": int(self_us) / 1000,
            "cumulative_ms": int(cumulative_us) / 1000}


def _print(medians: dict[str, float], offenders: list[dict], packages: list[dict]) -> None:
    floor, bare = medians["imports"], medians["bare"]
    print_table("Start-up, wall time per run (median of interleaved runs)",
                ["command", "seconds", "vs imports", "minus bare"],
                [[name, f"{value:.3f}", ratio(value, floor), f"{value - bare:.3f}"]
                 for name, value in medians.items()])
    print_table(f"Start-up, top {TOP_IMPORTS} imports of the one-shot run by cumulative "
                f"time (python -X importtime; depth 0 = a top-level import)",
                ["module", "depth", "cumulative ms", "self ms"],
                [[e["module"], e["depth"], f"{e['cumulative_ms']:.1f}", f"{e['self_ms']:.1f}"]
                 for e in offenders])
    print_table(f"Start-up, imports of the one-shot run beyond the floor's, self time by "
                f"top-level package (top {TOP_IMPORTS})",
                ["package", "modules", "self ms"],
                [[p["package"], p["modules"], f"{p['self_ms']:.1f}"] for p in packages])
